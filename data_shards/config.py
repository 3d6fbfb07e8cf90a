"""Config of the streaming data pipeline (owned here; `launch.config` assembles it into the tree)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DataConfig:
    """Where shards are and how they stream."""

    train_shards: str = ""  # shard dir (with index.json), brace spec or URL/pipe spec of the training shards
    val_shards: str = ""  # same, for evaluation ("" = use the test/val split of train_shards)
    modality: str = "cxr"  # cxr | patho | ct | slide: picks the decode and transforms
    image_size: int = 64  # 2D images are resized/cropped to this square size
    volume_size: list[int] | None = None  # (D, H, W) CT volumes are resized to; null = keep stored size
    batch_size: int = 32  # per-rank micro batch
    workers: int = 0  # DataLoader worker processes per rank
    resampled: bool = True  # sample shards with replacement (infinite stream; epochs by samples_per_epoch)
    samples_per_epoch: int = 0  # global samples per epoch in resampled mode (0 = dataset size from index)
    shuffle_buffer: int = 256  # in-memory sample shuffle buffer (0 = off)
    split: str = "train"  # which split of the shards to stream
    augment: bool = True  # random augmentation for training
    seed: int = 0  # base seed: the stream is deterministic given (seed, epoch, rank, worker)
    context_length: int = 77  # text tokens per caption

    def validate(self) -> None:
        if self.modality not in ("cxr", "patho", "ct", "slide"):
            raise ValueError(f"modality: {self.modality!r} is not one of cxr, patho, ct, slide")
        if self.batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {self.batch_size}")
        if self.workers < 0:
            raise ValueError(f"workers: must be >= 0, got {self.workers}")
        if self.image_size < 8:
            raise ValueError(f"image_size: must be >= 8, got {self.image_size}")
