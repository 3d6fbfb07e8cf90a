"""Config of the streaming data pipeline (owned here; `medvlp.launch.config` assembles it into the tree)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class AugmentConfig:
    """Strengths of the random training augmentation (data.augment=true). Every draw comes from the sample's own
    generator (seed, epoch, rank, worker, position), so a stream stays deterministic; a knob at its 'off' value
    draws nothing, so turning one on changes no other sample's numbers."""

    crop_scale: list[float] | None = None  # 2D random crop area fraction [min, max]; null = cxr [0.6, 1], others [0.5, 1]
    crop_ratio: list[float] | None = None  # 2D random crop aspect ratio [min, max] (log-uniform); null = [3/4, 4/3]
    brightness: float = 0.1  # grey 2D: additive shift drawn in [-b, b] (image in [0, 1])
    contrast: float = 0.2  # grey 2D: contrast factor drawn in [1 - c, 1 + c] about the image mean
    gamma: float = 0.2  # grey 2D: gamma exponent drawn in [1 - g, 1 + g]
    intensity_p: float = 0.8  # grey 2D: probability of the brightness/contrast/gamma jitter
    ct_flip_axes: list[int] = field(default_factory=lambda: [2])  # CT: axes of (D, H, W) flipped (p 0.5) when data.flip
    ct_scale: float = 0.1  # CT: windowed intensity factor drawn in [1 - s, 1 + s]
    ct_shift: float = 0.1  # CT: windowed intensity shift drawn in [-t, t] (windowed values are in [-1, 1])
    ct_intensity_p: float = 0.8  # CT: probability of the scale/shift
    ct_noise_std: float = 0.0  # CT: Gaussian noise, sigma drawn in [0, std] (windowed units); 0 = off
    ct_crop_scale: float = 1.0  # CT: random sub-volume of this fraction per axis, resized back; 1 = off

    def validate(self, prefix: str = "") -> None:
        for name in ("crop_scale", "crop_ratio"):
            v = getattr(self, name)
            if v is not None and (len(v) != 2 or not 0 < v[0] <= v[1] or (name == "crop_scale" and v[1] > 1)):
                raise ValueError(f"{prefix}{name}: need [min, max] with 0 < min <= max"
                                 f"{' <= 1' if name == 'crop_scale' else ''}, got {v}")
        for name in ("brightness", "contrast", "gamma", "ct_scale", "ct_shift", "ct_noise_std"):
            if getattr(self, name) < 0:
                raise ValueError(f"{prefix}{name}: must be >= 0, got {getattr(self, name)}")
        for name in ("intensity_p", "ct_intensity_p"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{prefix}{name}: a probability in [0, 1], got {getattr(self, name)}")
        if any(a not in (0, 1, 2) for a in self.ct_flip_axes):
            raise ValueError(f"{prefix}ct_flip_axes: axes of (D, H, W) are 0, 1, 2; got {self.ct_flip_axes}")
        if not 0 < self.ct_crop_scale <= 1:
            raise ValueError(f"{prefix}ct_crop_scale: must be in (0, 1], got {self.ct_crop_scale}")


@dataclass
class DataConfig:
    """Where shards are and how they stream."""

    train_shards: str = ""  # shard dir (with index.json), brace spec or URL/pipe spec of the training shards
    val_shards: str = ""  # same, for evaluation ("" = use the test/val split of train_shards)
    modality: str = "cxr"  # cxr | patho | ct | slide: picks the decode and transforms
    image_size: int = 64  # 2D images are resized/cropped to this square size
    volume_size: list[int] | None = None  # (D, H, W) CT volumes are resized to; null = keep stored size
    hu_windows: list[list[float]] = field(default_factory=lambda: [[-1000.0, 1000.0]])  # CT [lo, hi] HU windows, each -> [-1, 1]; several stack as channels (3D model in_channels must match)
    batch_size: int = 32  # per-rank micro batch
    workers: int = 0  # DataLoader worker processes per rank
    persistent_workers: bool = True  # training: the workers live across epochs (same batches as a loader made per epoch)
    resampled: bool = True  # sample shards with replacement (infinite stream; epochs by samples_per_epoch)
    samples_per_epoch: int = 0  # global samples per epoch in resampled mode (0 = dataset size from index)
    shuffle_buffer: int = 256  # in-memory sample shuffle buffer (0 = off)
    split: str = "train"  # which split of the shards to stream
    augment: bool = True  # random augmentation for training
    seed: int = 0  # base seed: the stream is deterministic given (seed, epoch, rank, worker)
    context_length: int = 77  # text tokens per caption
    index: str = ""  # index.json path, URL or pipe:CMD ("" = beside the shards: local dir, folder URL or first shard URL)
    max_patches: int = 4096  # slide bags are randomly subsampled (eval: evenly strided) to at most this (0 = all)
    pair_views: bool = False  # 2D: also yield Path-CLIP weak/strong views ("image_weak", "image_strong")
    flip: bool | None = None  # random horizontal/3D flips; null = modality default (off for cxr/ct: laterality)
    log_corrupt: int = 5  # corrupt samples logged (with key) per worker; all are counted in the loader stats
    members: list[str] = field(default_factory=list)  # extra batch members (medvlp.data_shards.members: boxes, ...); [] = none
    max_bad_in_row: int = 1000  # unreadable shards / corrupt samples in a row (no good one) before the stream fails
    verify: bool = False  # sha256 of each shard checked against index.json when a worker first opens it
    on_mismatch: str = "skip"  # verify: a shard whose sha256 differs is skipped and counted (skip) or fails (fail)
    allow_pipe: bool = True  # accept pipe:CMD shard specs (they run CMD in a shell); false for shared recipes
    remote_timeout_s: float = 3600.0  # http(s) shards: one shard's whole transfer at most this long (0 = no limit)
    remote_low_speed: int = 1024  # http(s) shards: a transfer below this many bytes/s ...
    remote_low_speed_s: int = 60  # ... for this many seconds is abandoned, the shard counted unreadable (0 = off)
    remote_outage_s: float = 300.0  # http(s) shards: server unreachable this long in a row (retried with backoff) -> the stream fails
    aug: AugmentConfig = field(default_factory=AugmentConfig)  # augmentation strengths (used when augment is true)
    pipeline: str = "auto"  # 2D single view: reference (float per sample) | fast (uint8 crops, batch-side float + jitter + normalisation, on the training device) | auto (fast on JPEG shards the builder wrote at training resolution, --resize shortest --image-format jpeg, as index.json records; reference otherwise)
    decode_device: str = "auto"  # fast pipeline, JPEG shards: cpu (workers decode) | cuda (nvJPEG in the training process) | auto (cuda when the loader's device is a GPU)

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
            from medvlp.data_shards.members import check_members

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
        for name in ("train_shards", "val_shards", "index"):
            if not self.allow_pipe and "pipe:" in getattr(self, name):
                raise ValueError(f"{name}: {getattr(self, name)[:200]!r} is a pipe: spec, which runs a shell command; "
                                 "refused because data.allow_pipe is false")
        for name in ("remote_timeout_s", "remote_low_speed", "remote_low_speed_s", "remote_outage_s"):
            v = getattr(self, name)
            if not v >= 0 or v == float("inf"):
                raise ValueError(f"{name}: must be a finite number >= 0, got {v}")
        if not self.hu_windows or any(len(w) != 2 or not w[0] < w[1] for w in self.hu_windows):
            raise ValueError(f"hu_windows: need one or more [lo, hi] pairs with lo < hi, got {self.hu_windows}")
        self.aug.validate("aug.")
        if self.pipeline not in ("auto", "reference", "fast"):
            raise ValueError(f"pipeline: {self.pipeline!r} is not one of auto, reference, fast")
        if self.decode_device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"decode_device: {self.decode_device!r} is not one of auto, cpu, cuda")
        if self.volume_size is not None and (len(self.volume_size) != 3 or min(self.volume_size) < 1):
            raise ValueError(f"volume_size: must be 3 positive ints (D, H, W) or null, got {self.volume_size}")
