"""Config of the streaming data pipeline (owned here; `launch.config` assembles it into the tree)."""
from __future__ import annotations

from dataclasses import dataclass, field


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
    index: str = ""  # index.json of remote/pipe shard specs ("" = the index.json beside local shards)
    max_patches: int = 4096  # slide bags are randomly subsampled (eval: evenly strided) to at most this (0 = all)
    pair_views: bool = False  # 2D: also yield Path-CLIP weak/strong views ("image_weak", "image_strong")
    flip: bool | None = None  # random horizontal/3D flips; null = modality default (off for cxr/ct: laterality)
    log_corrupt: int = 5  # corrupt samples logged (with key) per worker; all are counted in the loader stats
    members: list[str] = field(default_factory=list)  # extra batch members (data_shards.members: boxes, ...); [] = none
    max_bad_in_row: int = 1000  # unreadable shards / corrupt samples in a row (no good one) before the stream fails
    verify: bool = False  # sha256 of each shard checked against index.json when a worker first opens it
    on_mismatch: str = "skip"  # verify: a shard whose sha256 differs is skipped and counted (skip) or fails (fail)
    allow_pipe: bool = True  # accept pipe:CMD shard specs (they run CMD in a shell); false for shared recipes

    def validate(self) -> None:
        if self.modality not in ("cxr", "patho", "ct", "slide"):
            raise ValueError(f"modality: {self.modality!r} is not one of cxr, patho, ct, slide")
        if self.batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {self.batch_size}")
        if self.workers < 0:
            raise ValueError(f"workers: must be >= 0, got {self.workers}")
        if self.image_size < 8:
            raise ValueError(f"image_size: must be >= 8, got {self.image_size}")
        if self.samples_per_epoch < 0:
            raise ValueError(f"samples_per_epoch: must be >= 0, got {self.samples_per_epoch}")
        if self.shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer: must be >= 0, got {self.shuffle_buffer}")
        if self.max_patches < 0:
            raise ValueError(f"max_patches: must be >= 0, got {self.max_patches}")
        if self.members:
            from data_shards.members import check_members

            check_members(self.members)
        if self.context_length < 1:
            raise ValueError(f"context_length: must be >= 1, got {self.context_length}")
        if self.log_corrupt < 0:
            raise ValueError(f"log_corrupt: must be >= 0, got {self.log_corrupt}")
        if self.max_bad_in_row < 1:
            raise ValueError(f"max_bad_in_row: must be >= 1, got {self.max_bad_in_row}")
        if self.on_mismatch not in ("skip", "fail"):
            raise ValueError(f"on_mismatch: {self.on_mismatch!r} is not one of skip, fail")
        if self.split not in ("train", "val", "test"):
            raise ValueError(f"split: {self.split!r} is not one of train, val, test")
        for name in ("train_shards", "val_shards"):
            if not self.allow_pipe and "pipe:" in getattr(self, name):
                raise ValueError(f"{name}: {getattr(self, name)[:200]!r} is a pipe: spec, which runs a shell command; "
                                 "refused because data.allow_pipe is false")
        if self.volume_size is not None and (len(self.volume_size) != 3 or min(self.volume_size) < 1):
            raise ValueError(f"volume_size: must be 3 positive ints (D, H, W) or null, got {self.volume_size}")
