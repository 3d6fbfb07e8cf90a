"""Root config of the anatomy stage (`kind: anatomy`, `medvlp finetune anatomy RECIPE`)."""
from __future__ import annotations

from dataclasses import dataclass, field

from medvlp.data_shards.config import DataConfig
from medvlp.finetune.anatomy.evaluate import ABNORMAL_TEMPLATE, NORMAL_TEMPLATE
from medvlp.finetune.anatomy.model import AnatomyModelConfig
from medvlp.finetune.anatomy.vsd import VSD_MODES
from medvlp.finetune.runner import RunnerConfig
from medvlp.pretrain.config import ModelConfig, TrackingConfig

ANATOMY_MEMBERS = ["organ_labels", "organ_sentences"]


def _data() -> DataConfig:
    return DataConfig(modality="ct", members=list(ANATOMY_MEMBERS), batch_size=8, shuffle_buffer=64)


@dataclass
class AnatomyEvalConfig:
    """Zero-shot organ abnormality evaluation."""

    split: str = "test"  # split of data.val_shards (or data.train_shards) the metrics are measured on
    threshold_split: str = "val"  # split the operating points are picked on ("" = eval.split itself: optimistic)
    max_samples: int = 0  # volumes evaluated (0 = the whole split)
    batch_size: int = 8  # volumes per evaluation forward
    prompts: dict[str, list[list[str]]] = field(default_factory=dict)  # organ -> [[normal...], [abnormal...]]
    normal_template: str = NORMAL_TEMPLATE  # normal prompt of organs without explicit prompts ({organ} filled in)
    abnormal_template: str = ABNORMAL_TEMPLATE  # abnormal prompt of organs without explicit prompts


@dataclass
class AnatomyConfig:
    """ViSD-Boost anatomy normality modelling on CT volumes with organ masks (docs/anatomy.md)."""

    kind: str = "anatomy"  # recipe kind
    data: DataConfig = field(default_factory=_data)  # CT shards with organ masks, organ labels and sentences
    model: ModelConfig = field(default_factory=lambda: ModelConfig(name="debug-3d"))  # towers from scratch (no checkpoint)
    window: list[float] = field(default_factory=lambda: [-160.0, 240.0])  # HU window to [-1, 1] (level 40, width 400)
    organs: list[str] = field(default_factory=list)  # organ names in mask-id order (1..O); [] = the data's organ_names
    head: AnatomyModelConfig = field(default_factory=AnatomyModelConfig)  # organ tokens, VSE, VSD
    eval: AnatomyEvalConfig = field(default_factory=AnatomyEvalConfig)  # zero-shot organ abnormality
    finetune: RunnerConfig = field(default_factory=lambda: RunnerConfig(out_dir="runs/anatomy", lr=3e-4,
                                                                        batch_size=8))  # the fine-tune loop
    tracking: TrackingConfig = field(default_factory=lambda: TrackingConfig(experiment="anatomy"))  # MLflow

    def validate(self) -> None:
        self.data.validate()
        self.finetune.validate()
        if self.data.modality != "ct":
            raise ValueError(f"data.modality: the anatomy stage needs CT volumes with organ masks, got "
                             f"{self.data.modality!r}")
        missing = [m for m in ANATOMY_MEMBERS if m not in self.data.members]
        if missing:
            raise ValueError(f"data.members: the anatomy stage needs {missing} (per-organ labels and sentences)")
        if self.head.vsd_mode not in VSD_MODES:
            raise ValueError(f"head.vsd_mode: {self.head.vsd_mode!r} is not one of {', '.join(VSD_MODES)}")
        if self.head.token_select not in ("interior", "any"):
            raise ValueError(f"head.token_select: {self.head.token_select!r} is not one of interior, any")
        if self.head.stat_pool < 0:
            raise ValueError(f"head.stat_pool: must be >= 0 (scales), got {self.head.stat_pool}")
        if self.head.stem_norm and not self.head.stem_stat:
            raise ValueError("head.stem_norm: standardises the stem statistics, so it needs head.stem_stat: true")
        if self.head.width % self.head.heads:
            raise ValueError(f"head.width: {self.head.width} is not divisible by head.heads {self.head.heads}")
        if not 0.0 <= self.head.vse_momentum < 1.0:
            raise ValueError(f"head.vse_momentum: must be in [0, 1), got {self.head.vse_momentum}")
        if not 0.0 <= self.head.codebook_decay < 1.0:
            raise ValueError(f"head.codebook_decay: must be in [0, 1), got {self.head.codebook_decay}")
        if self.head.codebook_size < 1:
            raise ValueError(f"head.codebook_size: must be >= 1, got {self.head.codebook_size}")
        if len(self.window) != 2 or not self.window[0] < self.window[1]:
            raise ValueError(f"window: expected [low HU, high HU] with low < high, got {self.window}")
        if self.eval.threshold_split not in ("", "train", "val", "test"):
            raise ValueError(f"eval.threshold_split: {self.eval.threshold_split!r} is not one of '', train, val, test")
        if self.eval.split not in ("train", "val", "test"):
            raise ValueError(f"eval.split: {self.eval.split!r} is not one of train, val, test")
