"""The config home: the typed configs owned by pretraining (model, loss, optimizer, loop, eval, tracking), the
registry of recipe root configs, and `load_config` (recipe + overrides -> typed, validated tree).

    from medvlp.pretrain.config import load_config
    cfg = load_config("debug", overrides=["data.batch_size=64", "optim.lr=1e-3"])

* A recipe is a YAML file among the bundled recipes (`RECIPE_DIR`, medvlp/launch/recipes/) or any path (e.g. a run
  folder's config.yaml). ``inherit: NAME`` merges it over another recipe. ``kind:`` selects the root config class
  from `ROOTS` (default ``pretrain``); other packages add theirs with `register_root`, or a finder with
  `register_root_finder` (the CLI registers the fine-tune stages' kinds that way).
* Overrides are ``dotted.key=value``; the value is parsed as YAML (``1e-3``, ``true``, ``[1, 2]``, ``null``).
* An unknown key or a value of the wrong type fails with `ConfigError` naming the full key path (the builder is
  `medvlp.pretrain.configtree`).
* ``train.deepspeed_config`` may name a bundled template (``zero2``, ``zero3-offload.json``): it is resolved here to
  a file path, so the engine only ever sees paths.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from medvlp.data_shards.config import DataConfig
from medvlp.pretrain.configtree import ConfigError, apply_overrides, build, deep_merge, suggest


def _finite(name: str, v: float, *, positive: bool = False, nonneg: bool = False) -> None:
    """ValueError("name: ...") unless `v` is a finite number (and > 0 / >= 0 when asked)."""
    if not math.isfinite(v):
        raise ValueError(f"{name}: must be a finite number, got {v}")
    if positive and not v > 0:
        raise ValueError(f"{name}: must be > 0, got {v}")
    if nonneg and v < 0:
        raise ValueError(f"{name}: must be >= 0, got {v}")


def _at_least(name: str, v: int, low: int) -> None:
    if v < low:
        raise ValueError(f"{name}: must be >= {low}, got {v}")


@dataclass
class ModelConfig:
    """Which CLIP architecture to build (architectures are data: medvlp/pretrain/model_configs/*.json)."""

    name: str = "debug"  # model config name in the registry (or a path to a JSON file)
    tokenizer: str = ""  # path to a trained tokenizer dir (BERT-style text towers); "" = open_clip BPE
    checkpoint: str = ""  # local checkpoint to initialise from ("" = from scratch)
    init: str = ""  # local open_clip checkpoint (file or folder) to start from; its architecture is built (init_from)
    init_arch: str = ""  # architecture of model.init: an open_clip model name or a .json config ("" = beside it)
    text_init: str = ""  # local Hugging Face BERT-family folder: text tower + tokenizer to start from
    grad_checkpointing: bool = False  # activation checkpointing on both towers
    init_logit_scale: float | None = None  # initial t of s = exp(t); null = model config's (CLIP: log(1/0.07))
    init_logit_bias: float | None = None  # initial learned logit bias (SigLIP); null = model config's (none for CLIP)


@dataclass
class LossConfig:
    """Contrastive loss."""

    kind: str = "clip"  # clip (symmetric InfoNCE) | siglip (pairwise sigmoid)
    backend: str = "torch"  # torch (reference) | chunked (blockwise) | triton (fused) | auto
    gather_with_grad: bool = True  # all-gather features with gradients (global batch) vs. local loss
    local_loss: bool = True  # each rank computes its own rows of the global logits (open_clip style)
    chunk_size: int = 0  # row block of the blockwise backend (0 = picked by N and D for bounded memory)
    cache_chunk: int = 0  # embedding-cache micro-chunk (GradCache); 0 = off (one forward for the batch)
    auto_chunked_min: int = 512  # backend=auto without Triton: chunked when the key count N >= this, else torch

    def validate(self) -> None:
        if self.kind not in ("clip", "siglip"):
            raise ValueError(f"kind: {self.kind!r} is not one of clip, siglip")
        if self.backend not in ("torch", "chunked", "triton", "auto"):
            raise ValueError(f"backend: {self.backend!r} is not one of torch, chunked, triton, auto")
        if self.kind == "siglip" and self.backend in ("chunked", "triton"):
            raise ValueError(f"backend: {self.backend!r} computes the CLIP loss only; SigLIP needs torch or auto")
        if self.chunk_size < 0:
            raise ValueError(f"chunk_size: must be >= 0 (0 = automatic), got {self.chunk_size}")
        _at_least("cache_chunk", self.cache_chunk, 0)
        _at_least("auto_chunked_min", self.auto_chunked_min, 0)


@dataclass
class OptimConfig:
    """AdamW with warmup + cosine."""

    lr: float = 5e-4  # peak learning rate
    weight_decay: float = 0.1  # not applied to biases, norms, the logit scale
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])  # AdamW betas
    eps: float = 1e-6  # AdamW epsilon
    warmup_steps: int = 10  # linear warmup steps
    min_lr_ratio: float = 0.0  # cosine floor, as a fraction of lr
    grad_clip: float = 1.0  # global grad-norm clip (0 = off)

    def validate(self) -> None:
        from medvlp.pretrain.spine import check_optim_values

        check_optim_values(self.lr, self.weight_decay, self.betas, self.min_lr_ratio, self.grad_clip)
        _finite("eps", self.eps, positive=True)
        _at_least("warmup_steps", self.warmup_steps, 0)


@dataclass
class TrainConfig:
    """The training loop and its engine."""

    steps: int = 100  # optimizer steps
    grad_accum: int = 1  # micro batches per optimizer step
    zero_stage: int = 0  # DeepSpeed ZeRO stage 0/1/2/3
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16
    out_dir: str = "runs/debug"  # checkpoints and artifacts
    ckpt_every: int = 50  # steps between checkpoints (0 = only at the end)
    keep_ckpts: int = 2  # complete checkpoints kept
    eval_every: int = 0  # steps between evals (0 = only at the end)
    final_eval: bool = True  # evaluate (cfg.eval) on the held-out split when training ends
    log_every: int = 10  # steps between metric logs
    resume: bool = False  # continue from the latest complete checkpoint in out_dir
    nonfinite_loss: str = "skip"  # a NaN/inf loss: skip (drop the step, no update) | raise (stop at once)
    max_bad_steps: int = 5  # consecutive NaN/inf losses tolerated (skipped) before stopping
    stop_after: int = 0  # stop (with a checkpoint) after this many steps in this invocation (time-boxed jobs); 0 = off
    seed: int = 0  # global seed
    dist_timeout_s: float = 600.0  # seconds a collective may wait for a missing rank before failing
    deepspeed_config: str = ""  # optional DeepSpeed JSON template merged under the generated config
    # Layout of 2D image batches fed to the model: channels_last runs a ResNet's convolutions and batch norms in
    # NHWC (oneDNN on CPU, cuDNN on GPU), ~7-15% faster per RN50 step on CPU.
    memory_format: str = "auto"  # auto (channels_last for ResNet towers) | channels_last | contiguous
    # CPU runs: freed tensor memory stays in the process for the next step instead of being returned to the OS and
    # page-faulted back in (glibc; ~15% of an RN50 CPU step). The resident size then stays near the step's peak.
    keep_host_memory: bool = True  # CPU: reuse freed memory next step (faster; RSS stays near the peak)

    def validate(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage: {self.zero_stage} is not one of 0, 1, 2, 3")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision: {self.precision!r} is not one of auto, fp32, bf16")
        if self.memory_format not in ("auto", "channels_last", "contiguous"):
            raise ValueError(f"memory_format: {self.memory_format!r} is not one of auto, channels_last, contiguous")
        _at_least("steps", self.steps, 1)
        _at_least("grad_accum", self.grad_accum, 1)
        if not self.out_dir.strip():
            raise ValueError("out_dir: must not be empty")
        for name in ("ckpt_every", "keep_ckpts", "eval_every", "log_every", "stop_after"):
            _at_least(name, getattr(self, name), 0)
        _at_least("max_bad_steps", self.max_bad_steps, 1)
        if self.nonfinite_loss not in ("skip", "raise"):
            raise ValueError(f"nonfinite_loss: {self.nonfinite_loss!r} is not one of skip, raise")
        _finite("dist_timeout_s", self.dist_timeout_s, positive=True)


@dataclass
class EvalConfig:
    """Evaluation after/while training."""

    zero_shot: bool = True  # prompt-pair zero-shot AUC per finding
    retrieval: bool = True  # image<->text R@1/5/10
    linear_probe: bool = True  # logistic regression on frozen features
    kshot: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])  # k-shot probe sizes
    kshot_seeds: int = 3  # seeds per k
    bootstrap: int = 200  # bootstrap resamples for AUC 95% CIs
    max_samples: int = 2000  # samples evaluated per split: a seeded stratified draw from the whole split (0 = all)
    split: str = "test"  # split the final metrics are measured on (read once, at the end of training)
    val_split: str = "val"  # split of the periodic evaluations during training (falls back to `split` if empty)
    probe_split: str = "train"  # split the linear / k-shot probes are fitted on
    probe_C: float = 0.0  # logistic-regression C of the full probe; 0 = chosen per finding on a validation hold-out
    kshot_C: float = 1.0  # logistic-regression C of the k-shot probes (too few samples to validate)
    batch_size: int = 64  # images/texts embedded per forward pass
    seed: int = 0  # seed of bootstrap resamples and k-shot draws
    retrieval_examples: int = 4  # query images drawn in retrieval_examples.png (0 = no figure)

    def validate(self) -> None:
        if any(k < 1 for k in self.kshot):
            raise ValueError(f"kshot: every size must be >= 1, got {self.kshot}")
        _at_least("kshot_seeds", self.kshot_seeds, 1)
        _at_least("bootstrap", self.bootstrap, 0)
        _at_least("max_samples", self.max_samples, 0)  # 0 = the whole split
        _at_least("batch_size", self.batch_size, 1)
        _finite("probe_C", self.probe_C, nonneg=True)
        _finite("kshot_C", self.kshot_C, positive=True)
        _at_least("retrieval_examples", self.retrieval_examples, 0)


@dataclass
class TrackingConfig:
    """MLflow."""

    enabled: bool = True  # log to MLflow (rank 0 only)
    uri: str = ""  # tracking URI; "" = $MLFLOW_TRACKING_URI or sqlite:///mlruns.db
    experiment: str = "medvlp"  # experiment name
    run_name: str = ""  # run name ("" = generated)
    fallback_uri: str = ""  # store used when the server does not answer ("" = sqlite:///mlruns.db in the CWD)
    probe_timeout_s: float = 2.0  # how long an http(s) server may take to answer the start-up probe
    retry_every_s: float = 30.0  # after a logging failure, seconds between retries of the buffered items
    http_retries: int = 1  # MLflow HTTP retries per call (bounds the stall when a server dies mid-run)
    http_timeout_s: int = 10  # MLflow HTTP timeout per request, seconds
    max_buffered: int = 100000  # logging calls kept while the store is unreachable (oldest dropped beyond)
    log_model: bool = True  # at the end of training, log the model as a registrable MLflow model (pyfunc)
    system_metrics: bool = True  # MLflow system metrics (CPU, memory, disk, network, GPU) of the run, rank 0
    system_metrics_every_s: float = 10.0  # system metrics sampling interval, seconds

    def validate(self) -> None:
        _finite("probe_timeout_s", self.probe_timeout_s, positive=True)
        _finite("retry_every_s", self.retry_every_s, nonneg=True)
        _at_least("http_retries", self.http_retries, 0)
        _at_least("http_timeout_s", self.http_timeout_s, 1)
        _at_least("max_buffered", self.max_buffered, 1)
        _finite("system_metrics_every_s", self.system_metrics_every_s, positive=True)


@dataclass
class PretrainConfig:
    """The whole resolved tree of a pretraining run (the `kind: pretrain` root of a recipe)."""

    kind: str = "pretrain"  # recipe kind: selects this root config (pretrain)
    data: DataConfig = field(default_factory=DataConfig)  # shards and streaming
    model: ModelConfig = field(default_factory=ModelConfig)  # towers and projections
    loss: LossConfig = field(default_factory=LossConfig)  # contrastive loss and its backend
    optim: OptimConfig = field(default_factory=OptimConfig)  # optimizer, schedule, clipping
    train: TrainConfig = field(default_factory=TrainConfig)  # steps, checkpoints, DeepSpeed
    eval: EvalConfig = field(default_factory=EvalConfig)  # zero-shot / retrieval / probes
    tracking: TrackingConfig = field(default_factory=TrackingConfig)  # MLflow

    def validate(self) -> None:
        if self.kind != "pretrain":
            raise ValueError(f"kind: {self.kind!r} is not a pretraining config (expected 'pretrain')")


# ----------------------------------------------------------------------------------------------- root registry
_BUNDLED = Path(__file__).resolve().parents[1] / "launch"
RECIPE_DIR = _BUNDLED / "recipes"  # the bundled recipes (package data)
DEEPSPEED_DIR = _BUNDLED / "deepspeed"  # the bundled DeepSpeed templates (package data)

# recipe `kind:` -> root config dataclass; other packages register theirs (`register_root`)
ROOTS: dict[str, type] = {"pretrain": PretrainConfig}
# (find, known): `find(kind)` -> a root class or None; `known()` -> the kinds it can find (for error messages)
_FINDERS: list[tuple[Callable[[str], type | None], Callable[[], list[str]]]] = []


def register_root(kind: str, cls: type) -> None:
    """Make recipes with ``kind: <kind>`` build `cls` (a dataclass with a ``kind`` field)."""
    if not dataclasses.is_dataclass(cls) or "kind" not in {f.name for f in dataclasses.fields(cls)}:
        raise TypeError(f"{cls!r}: a root config must be a dataclass with a `kind` field")
    ROOTS[kind] = cls


def register_root_finder(find: Callable[[str], type | None], known: Callable[[], list[str]] = list) -> None:
    """Let `find(kind)` supply root classes for kinds not in `ROOTS` (found classes are registered)."""
    if all(f is not find for f, _ in _FINDERS):
        _FINDERS.append((find, known))


def root_for(kind: Any) -> type:
    """The root config class of recipe ``kind``: registered, or supplied by a registered finder."""
    if kind not in ROOTS and isinstance(kind, str):
        for find, _ in _FINDERS:
            cls = find(kind)
            if cls is not None:
                register_root(kind, cls)
                break
    if kind not in ROOTS:
        known = list(ROOTS) + [k for _, names in _FINDERS for k in names() if k not in ROOTS]
        near = suggest(str(kind), known)
        hint = f" (did you mean {near}?)" if near else ""
        raise ConfigError(f"kind: {kind!r} is not one of {', '.join(known)}{hint}")
    return ROOTS[kind]


def resolve_deepspeed_template(value: str) -> str:
    """A `train.deepspeed_config` value -> an existing file path ('' stays ''): a path as given, else a bundled
    template by name (``zero2`` or ``zero2.json``)."""
    if not value:
        return ""
    p = Path(value)
    if p.is_file():
        return str(p)
    for cand in (DEEPSPEED_DIR / p.name, DEEPSPEED_DIR / f"{p.name}.json"):
        if cand.is_file():
            return str(cand)
    names = sorted(q.stem for q in DEEPSPEED_DIR.glob("*.json"))
    near = suggest(p.stem, names)
    hint = f" (did you mean {near}?)" if near else ""
    raise ConfigError(f"train.deepspeed_config: {value} not found, and no bundled template of that name{hint}; "
                      f"bundled: {', '.join(names)}")


# ----------------------------------------------------------------------------------------------- recipes
def recipe_path(name: str) -> Path:
    p = Path(name)
    if p.suffix in (".yaml", ".yml") and p.exists():
        return p
    cand = RECIPE_DIR / f"{name}.yaml"
    if cand.exists():
        return cand
    raise ConfigError(f"recipe {name!r} not found (looked for {p} and {cand}); available: {', '.join(list_recipes())}")


def list_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def load_recipe_dict(name: str, _seen: tuple[str, ...] = ()) -> dict:
    path = recipe_path(name)
    if str(path) in _seen:
        raise ConfigError(f"recipe {name!r}: inherit cycle {' -> '.join(_seen)}")
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"recipe {path}: invalid YAML: {e}") from e
    if not isinstance(doc, dict):
        raise ConfigError(f"recipe {path}: top level must be a mapping")
    parent = doc.pop("inherit", None)
    if parent:
        doc = deep_merge(load_recipe_dict(parent, _seen + (str(path),)), doc)
    return doc


def load_config(recipe: str | None = "debug", overrides: list[str] | None = None, cls: type | None = None) -> Any:
    """Recipe (+ inherit chain) + dotted overrides -> typed, validated config tree. The root class is `cls` if given,
    else the one registered for the recipe's ``kind`` (default ``pretrain``)."""
    doc = load_recipe_dict(recipe) if recipe else {}
    doc = apply_overrides(doc, overrides or [])
    kind = doc.get("kind")
    if cls is None:
        cls = root_for(kind if kind is not None else "pretrain")
    elif kind is not None:
        want = next((k for k, c in ROOTS.items() if c is cls), None)
        if want is not None and kind != want:
            raise ConfigError(f"kind: recipe {recipe!r} is a {kind!r} recipe, not {want!r}")
    if kind is None:
        doc.pop("kind", None)
    cfg = build(cls, doc)
    train = getattr(cfg, "train", None)
    if train is not None and getattr(train, "deepspeed_config", ""):
        train.deepspeed_config = resolve_deepspeed_template(train.deepspeed_config)
    return cfg
