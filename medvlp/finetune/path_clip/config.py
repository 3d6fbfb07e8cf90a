"""Config root of the Path-CLIP stage (`kind: path_clip` recipes): data, task, adapter, the runner section with the
label budget, the few-label protocol, and MLflow tracking."""
from __future__ import annotations

from dataclasses import dataclass, field

from medvlp.finetune.runner import RunnerConfig
from medvlp.pretrain.config import TrackingConfig

METHODS = ("shortcut_rgb", "zero_shot", "linear_probe", "tip_adapter", "residual_adapter", "path_clip",
           "path_clip_no_dvc", "path_clip_no_noise", "path_clip_fixed_alpha", "full_finetune", "fixmatch")
DEFAULT_METHODS = ("shortcut_rgb", "zero_shot", "linear_probe", "residual_adapter", "path_clip", "path_clip_no_dvc",
                   "path_clip_no_noise", "full_finetune", "fixmatch")
TRAINED = ("residual_adapter", "path_clip", "path_clip_fixed_alpha", "full_finetune")
TAU_SOURCES = ("frozen", "refined")


@dataclass
class FewShotData:
    """Where the labelled task lives."""

    shards: str = ""  # shard dir (with index.json) of the task: train split = the labelled pool, test split = eval
    modality: str = ""  # 2D modality of the images (patho | cxr); "" = the shards' own (index.json)
    image_size: int = 0  # square side the views are cropped to; 0 = the model's input size
    train_split: str = "train"  # split the labelled subset is drawn from
    val_split: str = "val"  # split the baselines' grid settings are picked on (probe C, Tip-Adapter a, b; alpha)
    eval_split: str = "test"  # split every metric is measured on
    max_eval: int = 0  # eval / val samples used at most (first in shard order; 0 = the whole split)

    def validate(self) -> None:
        if self.image_size < 0 or self.max_eval < 0:
            raise ValueError("image_size / max_eval: must be >= 0")


@dataclass
class TaskConfig:
    """What is classified and the class prompts (prompts travel with the recipe: the eval never guesses them)."""

    classes: str = "labels"  # labels (task.label / one-hot label names) | class_index (the batch member)
    label: str = ""  # binary task: the 1/0 label of the shards (e.g. tumor); "" = one class per label name (one-hot)
    class_names: list[str] = field(default_factory=list)  # class names (binary: negative, positive); [] = from labels
    prompts: dict[str, list[str]] = field(default_factory=dict)  # class name -> prompts (averaged); [] = a template


@dataclass
class AdapterConfig:
    """The Path-CLIP head and its loss (docs/path_clip.md has the formulas)."""

    method: str = "path_clip"  # path_clip | path_clip_fixed_alpha | residual_adapter (CLIPath) | full_finetune
    alpha_mode: str = "adaptive"  # adaptive (alpha from theta and the dual-view agreement tau) | fixed
    alpha: float = 0.5  # fixed alpha, or the adaptive alpha at full agreement before training
    alpha_lo: float = 0.0  # lower bound of the adaptive alpha
    alpha_hi: float = 1.0  # upper bound of the adaptive alpha
    noise_std: float = 0.1  # hidden representation perturbation: noise std relative to the feature's RMS entry
    dvc_weight: float = 1.0  # lambda of the dual-view contrastive loss (0 = off)
    temperature: float = 0.1  # NT-Xent temperature of the DVC loss
    tau_momentum: float = 0.9  # moving-average momentum of the dual-view agreement tau
    tau_source: str = "frozen"  # tau from the frozen embeddings of the two views (frozen) or the adapter's (refined)

    def validate(self) -> None:
        if self.method not in TRAINED:
            raise ValueError(f"method: {self.method!r} is not one of {', '.join(TRAINED)}")
        if self.alpha_mode not in ("adaptive", "fixed"):
            raise ValueError(f"alpha_mode: {self.alpha_mode!r} is not one of adaptive, fixed")
        if not 0 <= self.alpha_lo < self.alpha_hi <= 1 or not self.alpha_lo <= self.alpha <= self.alpha_hi:
            raise ValueError(f"alpha: need 0 <= alpha_lo <= alpha <= alpha_hi <= 1, got {self.alpha_lo}, "
                             f"{self.alpha}, {self.alpha_hi}")
        if self.tau_source not in TAU_SOURCES:
            raise ValueError(f"tau_source: {self.tau_source!r} is not one of {', '.join(TAU_SOURCES)}")
        if self.noise_std < 0 or self.dvc_weight < 0 or self.temperature <= 0:
            raise ValueError("noise_std / dvc_weight: must be >= 0; temperature: must be > 0")


@dataclass
class FewShotRunnerConfig(RunnerConfig):
    """The runner section plus the label budget of this run."""

    shots: int = 0  # labelled images per class (k-shot); 0 = use label_fraction
    label_fraction: float = 0.0  # labelled fraction of the training split, stratified (e.g. 0.005 = 0.5%)
    budget_seed: int = 0  # seed of the labelled subset: the same seed gives the same images
    views: int = 16  # augmented views cached per labelled image and kind (weak, strong); 0 = augment every step

    def validate(self) -> None:
        super().validate()
        if self.shots < 0 or self.label_fraction < 0 or self.label_fraction > 1:
            raise ValueError("shots: must be >= 0; label_fraction: must be in [0, 1]")
        if self.views < 0:
            raise ValueError(f"views: must be >= 0, got {self.views}")


@dataclass
class ProtocolConfig:
    """`medvlp eval few-shot`: every method at every budget and seed, one table."""

    label_fractions: list[float] = field(default_factory=list)  # labelled fractions (e.g. 0.001, 0.005, 0.02)
    shots: list[int] = field(default_factory=lambda: [1, 4, 16])  # k per class (binary: n = 2, 8, 32)
    seeds: int = 3  # labelled subsets (and training seeds) per budget
    run_seeds: list[int] = field(default_factory=list)  # run only these seeds (cells already in out_dir are reused)
    wait_s: int = 0  # seconds to wait for a missing cell that another process (run_seeds) is computing
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))  # methods in the table
    alpha_grid: list[float] = field(default_factory=lambda: [0.2, 0.4, 0.6, 0.8, 1.0])  # residual adapter's alphas
    probe_C: list[float] = field(default_factory=lambda: [0.1, 1.0, 10.0, 100.0])  # linear probe's C, picked on val
    tip_alpha: list[float] = field(default_factory=lambda: [1.0, 3.0, 10.0])  # Tip-Adapter cache weights (on val)
    tip_beta: list[float] = field(default_factory=lambda: [1.0, 5.5, 10.0])  # Tip-Adapter sharpness (on val)
    full_lrs: list[float] = field(default_factory=lambda: [1e-4, 1e-3])  # tower arms: learning rates (on val)
    full_eval_steps: list[int] = field(default_factory=lambda: [10, 30, 60])  # tower arms: step counts (on val)
    fixmatch_threshold: float = 0.95  # FixMatch: confidence of a pseudo-label
    fixmatch_unlabelled: int = 32  # FixMatch: unlabelled images per step (from the rest of the training split)
    fixmatch_weight: float = 1.0  # FixMatch: weight of the unlabelled loss
    source_shards: str = ""  # shards of the source domain (the pretraining's): every arm is also scored there
    source_split: str = "test"  # split of source_shards scored for forgetting
    bootstrap: int = 1000  # paired bootstrap draws (seeds x test items) for Path-CLIP minus each arm
    out_dir: str = "runs/path-clip-fewshot"  # table, figure, per-cell runs and results.json

    def validate(self) -> None:
        bad = [m for m in self.methods if m not in METHODS]
        if bad:
            raise ValueError(f"methods: {bad} are not among {', '.join(METHODS)}")
        if self.seeds < 1:
            raise ValueError(f"seeds: must be >= 1, got {self.seeds}")
        if self.wait_s < 0:
            raise ValueError(f"wait_s: must be >= 0, got {self.wait_s}")
        if any(s < 0 or s >= self.seeds for s in self.run_seeds):
            raise ValueError(f"run_seeds: each in [0, seeds={self.seeds}), got {self.run_seeds}")
        if not self.full_lrs or any(not v > 0 or v == float("inf") for v in self.full_lrs) or \
                not self.full_eval_steps or \
                any(k < 1 for k in self.full_eval_steps):
            raise ValueError("full_lrs: one or more finite values > 0; full_eval_steps: one or more step counts >= 1")
        if not 0 < self.fixmatch_threshold <= 1 or self.fixmatch_unlabelled < 1 or self.fixmatch_weight < 0:
            raise ValueError("fixmatch_threshold: in (0, 1]; fixmatch_unlabelled: >= 1; fixmatch_weight: >= 0")
        if not self.label_fractions and not self.shots:
            raise ValueError("label_fractions / shots: give at least one budget")
        if any(not 0 < f <= 1 for f in self.label_fractions) or any(k < 1 for k in self.shots):
            raise ValueError("label_fractions: each in (0, 1]; shots: each >= 1")
        if any(not 0 <= a <= 1 for a in self.alpha_grid) or not self.alpha_grid:
            raise ValueError("alpha_grid: one or more values in [0, 1]")
        for name in ("probe_C", "tip_alpha", "tip_beta"):
            vals = getattr(self, name)
            if not vals or any(v <= 0 for v in vals):
                raise ValueError(f"{name}: one or more values > 0")


@dataclass
class PathCLIPConfig:
    """Root of a `kind: path_clip` recipe."""

    kind: str = "path_clip"  # recipe kind
    data: FewShotData = field(default_factory=FewShotData)  # the labelled task's shards
    task: TaskConfig = field(default_factory=TaskConfig)  # classes and prompts
    adapter: AdapterConfig = field(default_factory=AdapterConfig)  # Path-CLIP head and loss
    finetune: FewShotRunnerConfig = field(default_factory=lambda: FewShotRunnerConfig(
        out_dir="runs/path-clip", steps=150, batch_size=32, lr=1e-3, weight_decay=5e-3, warmup_steps=10,
        log_every=25))  # the fine-tune loop and the label budget
    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)  # the few-label protocol
    tracking: TrackingConfig = field(default_factory=lambda: TrackingConfig(experiment="path-clip"))  # MLflow
