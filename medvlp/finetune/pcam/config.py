"""The PCAM stage's root config (`kind: pcam`): data, head, loss, evaluation, the fine-tune loop, tracking."""
from __future__ import annotations

from dataclasses import dataclass, field

from medvlp.data_shards.config import DataConfig
from medvlp.finetune.pcam.loss import UNCERTAIN_POLICIES
from medvlp.finetune.pcam.model import POOLINGS
from medvlp.finetune.runner import RunnerConfig
from medvlp.pretrain.config import TrackingConfig

BACKBONE_MODES = ("trained", "frozen")


@dataclass
class PcamHeadConfig:
    """The classifier over the image tower's feature map."""

    findings: list[str] = field(default_factory=list)  # findings to classify, in order ([] = all label names)
    pooling: str = "pcam"  # avg | max | lse | pcam: how a finding's feature map becomes one feature
    lse_r: float = 10.0  # sharpness r of lse pooling (r -> 0: avg, r -> inf: max)
    batchnorm: bool = False  # a BatchNorm per finding on the pooled feature
    dropout: float = 0.0  # dropout on the pooled feature
    feature_level: int = -1  # which VisionTokens map feeds the head: -1 the coarsest, -2 the next finer, ...
    backbone: str = "trained"  # trained | frozen: whether the image tower is fine-tuned
    model: str = "debug"  # registry model built with random weights when finetune.checkpoint is ""

    def validate(self) -> None:
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling: {self.pooling!r} is not one of {', '.join(POOLINGS)}")
        if not self.lse_r > 0:
            raise ValueError(f"lse_r: must be > 0, got {self.lse_r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout: must be in [0, 1), got {self.dropout}")
        if self.backbone not in BACKBONE_MODES:
            raise ValueError(f"backbone: {self.backbone!r} is not one of {', '.join(BACKBONE_MODES)}")
        if len(set(self.findings)) != len(self.findings):
            raise ValueError(f"findings: listed twice in {self.findings}")


@dataclass
class PcamLossConfig:
    """Multi-label BCE and what uncertain (-1) labels mean."""

    uncertain: str = "ignore"  # policy for every finding's uncertain labels: ignore | zeros | ones
    uncertain_by_finding: dict[str, str] = field(default_factory=dict)  # per-finding policies over `uncertain`
    batch_weight: bool = True  # positives weighted n_neg/n_pos per finding and batch (the reference's option)
    pos_weight: dict[str, float] = field(default_factory=dict)  # fixed positive weights (without batch_weight)

    def validate(self) -> None:
        for name, p in [("uncertain", self.uncertain)] + [(f"uncertain_by_finding.{k}", v)
                                                           for k, v in self.uncertain_by_finding.items()]:
            if p not in UNCERTAIN_POLICIES:
                raise ValueError(f"{name}: {p!r} is not one of {', '.join(UNCERTAIN_POLICIES)}")
        for k, v in self.pos_weight.items():
            if not v > 0:
                raise ValueError(f"pos_weight.{k}: must be > 0, got {v}")


@dataclass
class PcamEvalConfig:
    """Classification and localisation evaluation on the held-out split."""

    split: str = "test"  # split of data.val_shards (or data.train_shards) read once, by the final evaluation
    val_split: str = "val"  # split of the periodic evaluations and of the box-threshold choice ("" = none)
    threshold: float = 0.5  # heatmap threshold (of the peak-normalised map) for boxes; the fallback of `thresholds`
    thresholds: list[float] = field(default_factory=lambda: [0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8])  # candidates: the
    # final evaluation picks the one with the best mean IoU on val_split ([] or no val samples: `threshold`)
    max_batches: int = 0  # evaluate at most this many batches (0 = the whole split)
    overlays: int = 8  # heatmap overlays of this many fixed examples per evaluation (0 = none), logged to MLflow
    boxes: bool = True  # the split stores ground-truth boxes (false: AUC only, e.g. CheXpert's label CSVs)

    def validate(self) -> None:
        for t in [self.threshold, *self.thresholds]:
            if not 0.0 <= t <= 1.0:
                raise ValueError(f"threshold: must be in [0, 1], got {t}")
        if self.max_batches < 0 or self.overlays < 0:
            raise ValueError("max_batches / overlays: must be >= 0")


@dataclass
class PcamConfig:
    """PCAM fine-tuning: weakly supervised localisation from image-level labels."""

    kind: str = "pcam"  # recipe kind (selects this root config)
    data: DataConfig = field(default_factory=DataConfig)  # shards and streaming (batch size: finetune.batch_size)
    head: PcamHeadConfig = field(default_factory=PcamHeadConfig)  # classifier head and pooling
    loss: PcamLossConfig = field(default_factory=PcamLossConfig)  # BCE and uncertain-label policies
    eval: PcamEvalConfig = field(default_factory=PcamEvalConfig)  # AUC, pointing game, IoU
    finetune: RunnerConfig = field(default_factory=RunnerConfig)  # the fine-tune loop (accelerate)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)  # MLflow

    def validate(self) -> None:
        if self.kind != "pcam":
            raise ValueError(f"kind: {self.kind!r} is not 'pcam'")
        unknown = [k for k in self.loss.uncertain_by_finding if self.head.findings and k not in self.head.findings]
        if unknown:
            raise ValueError(f"loss.uncertain_by_finding: {unknown} not in head.findings {self.head.findings}")


def policies_for(cfg: PcamLossConfig, names: list[str]) -> list[str]:
    """The uncertain-label policy of each finding (per-finding entries over the default)."""
    unknown = [k for k in cfg.uncertain_by_finding if k not in names]
    if unknown:
        raise ValueError(f"loss.uncertain_by_finding: {unknown} are not findings of this run ({', '.join(names)})")
    return [cfg.uncertain_by_finding.get(n, cfg.uncertain) for n in names]
