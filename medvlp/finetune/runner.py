"""The fine-tune runner: one `accelerate` training loop shared by every fine-tune stage.

    class MyStage:                                     # the Stage protocol below
        def build(self, pretrained, cfg): ...          # -> nn.Module (forward takes what `loss` passes)
        def loss(self, model, batch): ...              # -> (scalar loss, {"name": float, ...})
        def batches(self, cfg, split, ctx, *, epoch=0, start_step=0): ...  # -> this process's batch dicts
        def evaluate(self, model, cfg, ctx): ...       # optional -> {"metric": float}

    ctx: a `StageContext` (rank, world_size, is_main, out_dir, tracker; `step` in `evaluate`), the same for every
    stage; outside the runner `StageContext()` is one process, the main one, with no tracker.

    result = run_stage(MyStage(), cfg)                 # cfg: the stage's root config, with a `finetune:` section

What the loop does, in order:

1. Seeds everything (`finetune.seed`), loads the pretrained model when `finetune.checkpoint` is set
   (`pretrain.load_pretrained`), asks the stage to `build` its module, applies `freeze` / `unfreeze`
   (fnmatch patterns over parameter names, `freeze_by_pattern`) and prints the trainable parameter counts.
2. Builds AdamW over the trainable parameters (weight decay on matrices and kernels only) and a warmup + cosine
   schedule (both the run spine's, `medvlp.pretrain.spine`, as in pretraining), and hands model + optimizer to an `accelerate.Accelerator` (`mixed_precision`, gradient
   accumulation, DDP across `accelerate launch` processes, its DeepSpeed plugin when `finetune.deepspeed` is set).
3. One optimizer step = `grad_accum` micro batches, each under `accelerator.accumulate(model)` (gradients are
   synchronised only on the last one); then the gradient-norm clip (`grad_clip`), the optimizer step and the
   scheduler step. Loss and the stage's metrics are averaged over micro batches and processes.
4. Every `log_every` steps the averaged metrics go to MLflow (rank 0 only, `medvlp.pretrain.tracking.Tracker`; the
   flattened config is logged as params); every `eval_every` steps and at the end `stage.evaluate` runs (on every
   process, model in eval mode, no grad; rank 0's result is logged under `eval/`). Its context carries the step
   and, on rank 0, the MLflow tracker (None elsewhere) for artifacts.
5. Every `ckpt_every` steps and at the end `accelerator.save_state` writes `OUT/checkpoints/step_XXXXXXXX/`
   (model as safetensors, optimizer, scheduler, RNG states of every process, the loop position); a `COMPLETE`
   marker naming this run is written last, and only the `keep_ckpts` newest complete checkpoints of this run are
   kept. With `finetune.resume` the loop continues from this run's newest complete checkpoint: same weights,
   optimizer moments, schedule, RNG and data position, so the resumed run's losses equal the uninterrupted run's.

The run folder and the guards are the run spine's (`medvlp.pretrain.spine`), shared with pretraining: an out_dir
holding another run is refused unless resuming (`run_stage(..., overwrite=True)` moves it to OUT/replaced/<stamp>/);
the folder is locked while the run trains; SIGTERM/SIGINT after the first step finish the step, write a checkpoint
and stop (`FinetuneResult.stopped_by_signal`; the CLI exits 0); a NaN/inf loss raises (`finetune.nonfinite_loss:
raise`, the default) or skips the step (`skip`, after `max_bad_steps` in a row it raises); a data stream that fails
(a remote outage past `data.remote_outage_s`) drops the half-done step and, with one process, checkpoints the last
completed one before the error (naming it) ends the run; an interrupted run's MLflow record gets the metrics of its
last steps and the spine's interruption tags (`spine.mark_interrupted`); an MLflow store that cannot be written is
refused before the run folder is touched.
6. At the end: `OUT/model.safetensors` (the trained module's state dict), `OUT/config.yaml` (the resolved config),
   `OUT/result.json`; `run_stage` returns a `FinetuneResult`.

Data: the stage shards its own batches (`batches` gets this process's rank and the world size in its context); the
runner never wraps them in a distributed sampler. The runner passes the `epoch` and the micro batches already taken
from it (`start_step`): the stage starts there (exact, cheap resume). An exhausted iterable starts the next epoch.

DDP and DeepSpeed only see what runs through the wrapped module's forward: `stage.loss` must call `model(...)`,
not a submodule of it, for its gradients to be synchronised.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol, runtime_checkable

import torch
import torch.nn as nn

from medvlp.data_shards.guard import DataStreamError
from medvlp.pretrain import spine
from medvlp.pretrain.configtree import to_dict
from medvlp.pretrain.spine import (CKPT_DIR, COMPLETE, NonFiniteLossError, RunDirError,  # noqa: F401 - re-exported
                                   TrainingInterrupted, complete_checkpoints, lr_multiplier)

log = logging.getLogger("medvlp.finetune")

MIXED_PRECISION = ("no", "bf16", "fp16")


# ----------------------------------------------------------------------------------------------- config
@dataclass
class RunnerConfig:
    """The fine-tune loop (the `finetune:` section of every stage's recipe)."""

    checkpoint: str = ""  # pretrained model: a pretrain run folder, model.safetensors or exported folder ("" = none)
    out_dir: str = "runs/finetune"  # checkpoints, final weights, config.yaml, result.json
    steps: int = 100  # optimizer steps
    batch_size: int = 32  # micro batch per process (the global batch is batch_size x processes x grad_accum)
    lr: float = 1e-3  # peak learning rate (AdamW)
    weight_decay: float = 0.0  # AdamW weight decay, on matrices and conv kernels only
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW betas
    warmup_steps: int = 0  # linear warmup steps, then cosine decay
    min_lr_ratio: float = 0.0  # cosine floor, as a fraction of lr
    grad_accum: int = 1  # micro batches per optimizer step
    grad_clip: float = 1.0  # global gradient-norm clip (0 = off)
    mixed_precision: str = "no"  # no | bf16 | fp16 (accelerate's autocast; fp16 needs a GPU)
    freeze: list[str] = field(default_factory=list)  # fnmatch patterns of parameter names to freeze ("*" = all)
    unfreeze: list[str] = field(default_factory=list)  # patterns trained even when a freeze pattern matches
    frozen_eval: bool = True  # keep fully frozen submodules in eval mode (no dropout, no BatchNorm stat updates)
    eval_every: int = 0  # steps between evaluations (0 = only at the end)
    final_eval: bool = True  # evaluate when training ends
    ckpt_every: int = 0  # steps between checkpoints (0 = only at the end)
    keep_ckpts: int = 2  # complete checkpoints kept
    resume: bool = False  # continue from the newest complete checkpoint in out_dir
    stop_after: int = 0  # stop with a checkpoint after this many steps in this invocation (time-boxed jobs); 0 = off
    nonfinite_loss: str = "raise"  # a NaN/inf loss: raise (stop at once) | skip (drop the step, no update)
    max_bad_steps: int = 5  # with nonfinite_loss=skip: consecutive skipped steps before the run stops
    seed: int = 0  # seed of weights init, dropout and anything else drawn from the global RNGs
    deepspeed: str = ""  # "" = plain DDP; a DeepSpeed JSON path, or zero0..zero3, for accelerate's DeepSpeed plugin
    log_every: int = 10  # steps between metric logs
    progress: bool = True  # progress bar on rank 0

    def validate(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps: must be >= 1, got {self.steps}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {self.batch_size}")
        if self.grad_accum < 1:
            raise ValueError(f"grad_accum: must be >= 1, got {self.grad_accum}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"mixed_precision: {self.mixed_precision!r} is not one of {', '.join(MIXED_PRECISION)}")
        for name in ("warmup_steps", "eval_every", "ckpt_every", "grad_clip", "weight_decay", "stop_after"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")
        if self.log_every < 1:
            raise ValueError(f"log_every: must be >= 1, got {self.log_every}")
        if self.keep_ckpts < 1:
            raise ValueError(f"keep_ckpts: must be >= 1, got {self.keep_ckpts}")
        spine.check_nonfinite_policy(self.nonfinite_loss, "nonfinite_loss")
        if self.max_bad_steps < 1:
            raise ValueError(f"max_bad_steps: must be >= 1, got {self.max_bad_steps}")
        spine.check_optim_values(self.lr, self.weight_decay, self.betas, self.min_lr_ratio, self.grad_clip)
        if self.mixed_precision == "fp16" and not torch.cuda.is_available():
            raise ValueError("mixed_precision: fp16 needs a CUDA GPU; use bf16 (or no) on CPU")
        ds = self.deepspeed
        if ds and not (ds in ("zero0", "zero1", "zero2", "zero3") or ds.endswith(".json")):
            raise ValueError(f"deepspeed: {ds!r} is neither zero0..zero3 nor a .json path")
        if ds and self.nonfinite_loss == "skip":
            raise ValueError("nonfinite_loss: skip is not supported with deepspeed (its engine keeps the partial "
                             "gradients); use raise")


# ----------------------------------------------------------------------------------------------- protocol
@dataclass(frozen=True)
class StageContext:
    """What the runner tells a stage about the run it is in (`StageContext()`: one process, outside a run)."""

    rank: int = 0  # this process
    world_size: int = 1  # processes in the run
    is_main: bool = True  # the process that writes the run's files and logs to MLflow
    out_dir: str = ""  # the run folder (finetune.out_dir; "" outside a run)
    tracker: Any = None  # the MLflow tracker on the main process (None elsewhere and without tracking)
    step: int | None = None  # in `evaluate`: the optimizer step evaluated (None: a final evaluation outside a run)


@runtime_checkable
class Stage(Protocol):
    """What a fine-tune stage gives the runner. `cfg` is always the stage's whole root config."""

    def build(self, pretrained: Any, cfg: Any) -> nn.Module:
        """The module to train (`pretrained` is a `pretrain.Pretrained`, or None without `finetune.checkpoint`)."""

    def loss(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
        """(scalar loss, metrics of floats/0-d tensors) of one micro batch; must call `model(...)` (wrapped)."""

    def batches(self, cfg: Any, split: str, ctx: StageContext, *, epoch: int = 0,
                start_step: int = 0) -> Iterable[dict]:
        """This process's batches of `split` ("train" | "val" | "test"), sharded by `ctx.rank` / `ctx.world_size`,
        starting at micro batch `start_step` of `epoch`."""


@dataclass
class FinetuneResult:
    """What `run_stage` returns (also written as OUT/result.json)."""

    out_dir: str
    steps_done: int  # optimizer steps completed (including those before a resume)
    trainable: list[str]  # names of the trained parameters
    n_trainable: int  # trained parameter count
    n_total: int  # all parameters
    losses: list[tuple[int, float]]  # (step, mean loss over micro batches and processes), steps of this invocation
    metrics: dict[str, float]  # the final evaluation (empty when the stage has no `evaluate`)
    evals: list[tuple[int, dict]]  # (step, metrics) of every evaluation
    checkpoint: str  # newest complete checkpoint folder ("" if none was written)
    weights: str  # OUT/model.safetensors
    run_id: str | None  # MLflow run id (rank 0; None when tracking is off)
    resumed_from: int  # step the run resumed from (0 = fresh)
    stopped: bool  # stopped early by `stop_after` or a signal (checkpoint written; no final eval, no model.safetensors)
    world_size: int
    seconds: float
    stopped_by_signal: bool = False  # SIGTERM/SIGINT stopped the run (after a checkpoint)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------- freezing
def freeze_by_pattern(model: nn.Module, freeze: Iterable[str] = (), unfreeze: Iterable[str] = ()) -> list[str]:
    """Set `requires_grad` by fnmatch patterns over parameter names; -> the names left trainable.

    A parameter is frozen when a `freeze` pattern matches its name and no `unfreeze` pattern does (so
    `freeze=["*"], unfreeze=["head.*"]` trains the head only). Parameters no pattern matches keep their current
    `requires_grad`. A pattern that matches no parameter is an error naming it (a typo would silently train or
    freeze the wrong thing)."""
    freeze, unfreeze = list(freeze), list(unfreeze)
    names = [n for n, _ in model.named_parameters()]
    for kind, pats in (("freeze", freeze), ("unfreeze", unfreeze)):
        for pat in pats:
            if not any(fnmatchcase(n, pat) for n in names):
                sample = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
                raise ValueError(f"finetune.{kind}: pattern {pat!r} matches no parameter (names look like: {sample})")
    for n, p in model.named_parameters():
        if any(fnmatchcase(n, pat) for pat in unfreeze):
            p.requires_grad_(True)
        elif any(fnmatchcase(n, pat) for pat in freeze):
            p.requires_grad_(False)
    return [n for n, p in model.named_parameters() if p.requires_grad]


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad), total


def describe_trainable(model: nn.Module) -> str:
    """One line: trainable / total parameters and the share."""
    n, total = count_parameters(model)
    return f"trainable parameters: {n:,} of {total:,} ({100.0 * n / max(total, 1):.2f}%)"


def set_train_mode(model: nn.Module, frozen_eval: bool = True) -> None:
    """model.train(), then fully frozen submodules back to eval (dropout off, BatchNorm statistics fixed)."""
    model.train()
    if not frozen_eval:
        return
    for m in model.modules():
        params = list(m.parameters())
        if m is not model and params and not any(p.requires_grad for p in params):
            m.eval()


# ----------------------------------------------------------------------------------------------- helpers
def build_optimizer(model: nn.Module, cfg: RunnerConfig) -> torch.optim.Optimizer:
    """The spine's AdamW over the trainable parameters; weight decay on matrices / kernels only (pretraining's rule)."""
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("finetune.freeze: every parameter is frozen; nothing to train (see finetune.unfreeze)")
    return spine.build_adamw(model, cfg.lr, cfg.betas, cfg.weight_decay)


def to_device(batch: Any, device: torch.device) -> Any:
    """Tensors in (nested) dicts / lists / tuples moved to `device`; everything else as is."""
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)) and any(torch.is_tensor(v) for v in batch):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


config_dict = to_dict  # a (dataclass) config tree as plain nested dicts: the config home's, as in pretraining


def runner_config(cfg: Any) -> RunnerConfig:
    """The `finetune` section of a stage root config (or `cfg` itself when it is a RunnerConfig)."""
    if isinstance(cfg, RunnerConfig):
        return cfg
    rc = getattr(cfg, "finetune", None)
    if not isinstance(rc, RunnerConfig):
        raise TypeError(f"{type(cfg).__name__}: a stage root config needs a `finetune: RunnerConfig` field")
    return rc


def load_pretrained_model(path: str) -> Any:
    """`pretrain.load_pretrained(path)` (a run folder, a model.safetensors or an exported folder)."""
    if not Path(path).exists():
        raise FileNotFoundError(f"finetune.checkpoint: {path} does not exist")
    try:
        from medvlp.pretrain import load_pretrained
    except ImportError as e:  # pragma: no cover - depends on the installed pretrain version
        raise RuntimeError("finetune.checkpoint: this pretrain package has no load_pretrained") from e
    return load_pretrained(path)


def _deepspeed_plugin(rc: RunnerConfig):
    from accelerate import DeepSpeedPlugin

    if rc.deepspeed.startswith("zero") and not rc.deepspeed.endswith(".json"):
        plugin = DeepSpeedPlugin(zero_stage=int(rc.deepspeed[4:]), gradient_accumulation_steps=rc.grad_accum,
                                 gradient_clipping=rc.grad_clip or None)
    else:
        path = Path(rc.deepspeed)
        if not path.is_file():
            raise FileNotFoundError(f"finetune.deepspeed: {path} is not a file")
        doc = json.loads(path.read_text())
        doc.pop("bf16", None), doc.pop("fp16", None)  # precision comes from finetune.mixed_precision
        doc["gradient_accumulation_steps"] = rc.grad_accum
        if rc.grad_clip:
            doc["gradient_clipping"] = rc.grad_clip
        plugin = DeepSpeedPlugin(hf_ds_config=doc)
    # no prepared DataLoader tells accelerate the micro batch: say it here
    plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = rc.batch_size
    return plugin


class _LoopState:
    """The loop position saved with every checkpoint (registered with `accelerator.register_for_checkpointing`):
    the step, the MLflow run and, once the loop has its batches, their (epoch, micro batches consumed) position."""

    def __init__(self) -> None:
        self.step = 0  # optimizer steps done
        self.epoch = 0  # data epoch of the current iterator (as loaded; the batches' own once they exist)
        self.consumed = 0  # micro batches taken from the current epoch
        self.run_id = ""
        self.batches: spine.EpochBatches | None = None

    def state_dict(self) -> dict:
        if self.batches is not None:
            self.epoch, self.consumed = self.batches.epoch, self.batches.step
        return {"step": self.step, "epoch": self.epoch, "consumed": self.consumed, "run_id": self.run_id}

    def load_state_dict(self, d: dict) -> None:
        self.step, self.epoch, self.consumed = int(d["step"]), int(d["epoch"]), int(d["consumed"])
        self.run_id = str(d.get("run_id", ""))


def _train_batches(stage: Stage, cfg: Any, ctx: StageContext, state: _LoopState) -> spine.EpochBatches:
    """Endless micro batches from `stage.batches(cfg, "train", ctx, epoch=..., start_step=...)`, epoch after epoch,
    from the loaded position on (the spine's batch iteration, as in pretraining)."""
    state.batches = spine.EpochBatches(
        lambda epoch, start: stage.batches(cfg, "train", ctx, epoch=epoch, start_step=start), state.epoch,
        state.consumed, what=f"{type(stage).__name__}.batches(split='train', rank={ctx.rank})", lazy=True)
    return state.batches


def _mean_metrics(items: list[dict]) -> dict[str, float]:
    keys = sorted({k for d in items for k in d})
    out = {}
    for k in keys:
        vals = [float(d[k]) for d in items if k in d]
        out[k] = sum(vals) / len(vals)
    return out


# ----------------------------------------------------------------------------------------------- shards
# How the runner finds a stage's declaration (`medvlp.finetune.registry` registers its finder on import, as it
# registers its root finder with the config home): kind -> an object with `name` and `shards` (a ShardNeed), or None.
_STAGE_FINDERS: list[Callable[[str], Any]] = []


def register_stage_finder(find: Callable[[str], Any]) -> None:
    if find not in _STAGE_FINDERS:
        _STAGE_FINDERS.append(find)


def check_stage_shards(cfg: Any) -> None:
    """Refuse shards that do not fit the stage declared for `cfg.kind` (its `shards` in the stage registry): a
    `ShardRequirementError` naming the config key, the shards' modality and the stage. Nothing for a config of no
    declared stage."""
    kind = getattr(cfg, "kind", None)
    for find in _STAGE_FINDERS if isinstance(kind, str) else ():
        spec = find(kind)
        if spec is not None:
            if spec.shards is not None:
                spec.shards.check(cfg, spec.name)
            return


# ----------------------------------------------------------------------------------------------- the loop
def run_stage(stage: Stage, cfg: Any, tracker: Any = None, overwrite: bool = False) -> FinetuneResult:
    """Train `stage` under `cfg` (its root config; the loop reads `cfg.finetune`, MLflow reads `cfg.tracking`).

    `tracker`: a started `medvlp.pretrain.tracking.Tracker` to log into (the caller ends it); default: one is made from
    `cfg.tracking` on rank 0 (none when the config has no `tracking` section). `finetune.out_dir` holding another
    run is refused (`RunDirError`) unless `finetune.resume`; `overwrite=True` moves that run aside first."""
    from accelerate.state import AcceleratorState, GradientState

    rc = runner_config(cfg)
    try:
        rc.validate()
    except ValueError as e:  # a RunnerConfig made in code: name the key as a recipe would (finetune.lr: ...)
        from medvlp.pretrain.configtree import ConfigError

        raise ConfigError(f"finetune.{e}") from None
    spine.warn_long_warmup(rc.warmup_steps, rc.steps, "finetune.warmup_steps", "finetune.steps")
    for name in ("build", "loss", "batches"):
        if not callable(getattr(stage, name, None)):
            raise TypeError(f"{type(stage).__name__}: a Stage needs a `{name}` method")
    check_stage_shards(cfg)  # the stage's declared shards, before anything is written or built
    t0 = time.time()
    # one process may run several stages one after the other (tests, sweeps): start from a fresh accelerate state
    # (an existing process group is reused)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    if rc.deepspeed and "RANK" not in os.environ:  # one process without a launcher: DeepSpeed still wants a group
        from medvlp.pretrain.engine import free_port

        # kept after the run: DeepSpeed caches its groups, so a later stage in this process reuses this one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    flag = "ACCELERATE_USE_DEEPSPEED"  # accelerate's PartialState then lets DeepSpeed form the process group
    set_flag = bool(rc.deepspeed) and os.environ.get(flag) != "true"
    if set_flag:
        os.environ[flag] = "true"
    lock = spine.RunLock(rc.out_dir)  # taken by the main process once the processes are known (see _run)
    try:
        return _run(stage, cfg, tracker, rc, t0, overwrite, lock)
    finally:
        lock.release()
        if set_flag:  # a later stage in this process without finetune.deepspeed must not get DeepSpeed
            os.environ.pop(flag, None)


def _run(stage: Stage, cfg: Any, tracker: Any, rc: RunnerConfig, t0: float, overwrite: bool,
         lock: spine.RunLock) -> FinetuneResult:
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs, set_seed
    from medvlp.pretrain.progress import progress_bar as tqdm  # a bar on a terminal, plain lines off it

    # DeepSpeed without CUDA: accelerate finds no backend by itself (and would run each process alone)
    handlers = [InitProcessGroupKwargs(backend="gloo")] if rc.deepspeed and not torch.cuda.is_available() else []
    if getattr(stage, "find_unused_parameters", False):
        # A stage whose steps may leave some trainable parameters without a gradient (e.g. an organ absent from a
        # batch) says so; DDP then looks for them instead of failing at the next step.
        handlers.append(DistributedDataParallelKwargs(find_unused_parameters=True))
    # cpu=True without CUDA: processes started by `accelerate launch --multi_gpu` / torchrun then form a gloo group
    # (accelerate's own --cpu flag with several processes means MPI). DeepSpeed sets up its own group.
    accelerator = Accelerator(cpu=not torch.cuda.is_available() and not rc.deepspeed,
                              mixed_precision=rc.mixed_precision, gradient_accumulation_steps=rc.grad_accum,
                              deepspeed_plugin=_deepspeed_plugin(rc) if rc.deepspeed else None,
                              step_scheduler_with_optimizer=False, kwargs_handlers=handlers)
    rank, world = accelerator.process_index, accelerator.num_processes
    main = accelerator.is_main_process
    out = Path(rc.out_dir)
    _claim_out_dir(accelerator, out, rc, overwrite, lock,
                   getattr(cfg, "tracking", None) if tracker is None else None, kind=getattr(cfg, "kind", ""))
    set_seed(rc.seed)

    pretrained = load_pretrained_model(rc.checkpoint) if rc.checkpoint else None
    model = stage.build(pretrained, cfg)
    if not isinstance(model, nn.Module):
        raise TypeError(f"{type(stage).__name__}.build must return an nn.Module, got {type(model).__name__}")
    trainable = freeze_by_pattern(model, rc.freeze, rc.unfreeze)
    n_train, n_total = count_parameters(model)
    if main:
        print(describe_trainable(model), flush=True)
    optimizer = build_optimizer(model, rc)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_multiplier(s, rc.warmup_steps, rc.steps, rc.min_lr_ratio))
    model, optimizer = accelerator.prepare(model, optimizer)
    state = _LoopState()
    accelerator.register_for_checkpointing(scheduler, state)

    resumed_from = 0
    if rc.resume:
        ckpts = spine.own_checkpoints(out, spine.read_run_uid(out))  # never another run's
        if ckpts:
            from medvlp.pretrain.checkpoint import safe_load_gate

            safe_load_gate(ckpts[-1])  # before accelerate's load_state unpickles its files in full
            accelerator.load_state(str(ckpts[-1]))
            resumed_from = state.step
            # the restored lr belongs to the saved schedule; recompute it from this config's (steps may have grown)
            scheduler.base_lrs = [rc.lr] * len(scheduler.base_lrs)
            mult = lr_multiplier(state.step, rc.warmup_steps, rc.steps, rc.min_lr_ratio)
            for group in scheduler.optimizer.param_groups:
                group["lr"] = rc.lr * mult
            if main:
                print(f"resumed from {ckpts[-1]} (step {state.step})", flush=True)
        elif main:
            print(f"finetune.resume: no complete checkpoint in {out / CKPT_DIR}; starting fresh", flush=True)

    own_tracker = tracker is None
    if own_tracker and getattr(cfg, "tracking", None) is not None:
        from medvlp.pretrain.tracking import flatten

        tracker = spine.start_tracker(cfg.tracking, rank, flatten(config_dict(cfg)), state.run_id,
                                      resumed=bool(resumed_from))
    run_id = getattr(tracker, "run_id", None) if tracker is not None else None
    state.run_id = run_id or state.run_id
    run_uid = None
    if main:  # the run's identity (its checkpoints carry it) and config, once the model is built
        run_uid = spine.start_run(out, "finetune", rc.resume)
        _write_config(out, cfg)

    ctx = StageContext(rank=rank, world_size=world, is_main=main, out_dir=str(out), tracker=tracker if main else None)
    batches = _train_batches(stage, cfg, ctx, state)
    losses: list[tuple[int, float]] = []
    evals: list[tuple[int, dict]] = []
    last_ckpt = str(complete_checkpoints(out)[-1]) if main and complete_checkpoints(out) else ""
    window: list[dict] = []
    status, stopped, by_signal, bad_in_a_row, reason = "FAILED", False, False, 0, ""
    pbar = tqdm(total=rc.steps, initial=state.step, disable=not (rc.progress and main), desc="finetune",
                dynamic_ncols=True)
    guard = spine.StopFlag().__enter__()  # SIGTERM/SIGINT: checkpoint at the next step boundary, then stop
    try:
        set_train_mode(model, rc.frozen_eval)
        while state.step < rc.steps:
            step_metrics, bad, micro_start = [], False, getattr(accelerator, "step", 0)

            def abandon(start=micro_start) -> None:  # a step whose data failed: none of its gradients is kept
                model.zero_grad(set_to_none=True)
                if hasattr(accelerator, "step"):
                    accelerator.step = start

            for _, raw in spine.micro_batches(batches.next, batches, rc.grad_accum, abandon):
                batch = to_device(raw, accelerator.device)
                with accelerator.accumulate(model):
                    with accelerator.autocast():
                        loss, metrics = stage.loss(model, batch)
                    bad = not bool(torch.isfinite(loss.detach()))
                    if rc.nonfinite_loss == "skip" and world > 1:  # every process skips the step together
                        bad = _any_process(bad, accelerator)
                    if bad:
                        break
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and rc.grad_clip > 0:
                        accelerator.clip_grad_norm_(model.parameters(), rc.grad_clip)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                step_metrics.append({"loss": loss.detach().float().item(),
                                     **{k: float(v) for k, v in metrics.items()}})
            if bad:  # drop the partial step's gradients; the next step's accumulation boundary stays in place
                bad_in_a_row += 1
                spine.on_nonfinite(rc.nonfinite_loss, state.step + 1, bad_in_a_row, rc.max_bad_steps)
                model.zero_grad(set_to_none=True)
                if hasattr(accelerator, "step"):
                    accelerator.step = micro_start
                continue
            bad_in_a_row = 0
            guard.armed = True
            scheduler.step()
            state.step += 1
            local = _mean_metrics(step_metrics)
            keys = sorted(local)
            vec = torch.tensor([local[k] for k in keys], dtype=torch.float64, device=accelerator.device)
            vec = accelerator.reduce(vec, reduction="mean") if world > 1 else vec
            avg = dict(zip(keys, vec.tolist()))
            losses.append((state.step, avg["loss"]))
            window.append(avg)
            pbar.update(1)
            pbar.set_postfix(loss=f"{avg['loss']:.4f}")
            if state.step % rc.log_every == 0 or state.step == rc.steps:
                if tracker is not None and main:
                    tracker.log_metrics(_train_metrics(window, scheduler), step=state.step)
                window = []
            if rc.eval_every and state.step % rc.eval_every == 0 and state.step < rc.steps:
                evals.append((state.step, _evaluate(stage, accelerator, model, cfg, rc, ctx, state.step)))
            stop = bool(rc.stop_after) and state.step - resumed_from >= rc.stop_after and state.step < rc.steps
            by_signal = state.step < rc.steps and _any_process(guard.stop, accelerator)
            stop = stop or by_signal
            if (rc.ckpt_every and state.step % rc.ckpt_every == 0) or state.step == rc.steps or stop:
                last_ckpt = _save(accelerator, out, state.step, rc.keep_ckpts, run_uid) or last_ckpt
            if stop:
                stopped = True
                break
        final: dict = {}
        weights = out / "model.safetensors"
        if rc.final_eval and not stopped:
            final = _evaluate(stage, accelerator, model, cfg, rc, ctx, state.step)
            if final:
                evals.append((state.step, final))
        accelerator.wait_for_everyone()
        state_dict = accelerator.get_state_dict(model) if not stopped else {}
        if main and not stopped:
            from safetensors.torch import save_file

            save_file({k: v.detach().cpu().contiguous() for k, v in state_dict.items()}, str(weights))
        status = "KILLED" if by_signal else "FINISHED"
        reason = spine.interruption_reason(None, guard.signum) if by_signal else ""
    except DataStreamError as e:  # a remote outage past data.remote_outage_s, too many bad shards, ...
        status, reason = "KILLED", spine.interruption_reason(e)
        if world == 1 and state.step > 0 and spine.step_of(last_ckpt or "-") != state.step:
            # the last completed step, so that nothing trained is lost (several processes may be inside a
            # collective of the abandoned step: no safe checkpoint there)
            last_ckpt = _save(accelerator, out, state.step, rc.keep_ckpts, run_uid) or last_ckpt
        raise spine.with_checkpoint_note(e, state.step, last_ckpt if state.step else None,
                                         "finetune.resume") from None
    except (KeyboardInterrupt, NonFiniteLossError) as e:
        status = "FAILED" if isinstance(e, NonFiniteLossError) else "KILLED"
        reason = spine.interruption_reason(e)
        raise
    finally:
        guard.__exit__()
        pbar.close()
        if reason and main and tracker is not None:  # the curves end where training did; fine-tuning logs no
            # MLflow model, so the tags reference the checkpoint
            spine.report_interrupted(tracker, reason, state.step, last_ckpt,
                                     _train_metrics(window, scheduler) if window else None)
        if own_tracker and tracker is not None:
            tracker.end(status)
    result = FinetuneResult(out_dir=str(out), steps_done=state.step, trainable=trainable, n_trainable=n_train,
                            n_total=n_total, losses=losses, metrics=final, evals=evals, checkpoint=last_ckpt,
                            weights="" if stopped else str(weights), run_id=run_id, resumed_from=resumed_from,
                            stopped=stopped, world_size=world, seconds=time.time() - t0, stopped_by_signal=by_signal)
    if main:
        (out / "result.json").write_text(json.dumps(result.to_dict(), indent=1))
    accelerator.wait_for_everyone()
    return result


def _train_metrics(window: list[dict], scheduler) -> dict[str, float]:
    """What a log writes: the mean of each metric over the steps since the last log, and the learning rate."""
    logged = {f"train/{k}": v for k, v in _mean_metrics(window).items()}
    logged["train/lr"] = scheduler.get_last_lr()[0]
    return logged


def _evaluate(stage, accelerator, model, cfg, rc: RunnerConfig, ctx: StageContext, step: int) -> dict:
    fn = getattr(stage, "evaluate", None)
    if not callable(fn):
        return {}
    inner = accelerator.unwrap_model(model)
    inner.eval()
    try:
        with torch.no_grad(), accelerator.autocast():
            metrics = {k: float(v) for k, v in (fn(inner, cfg, dataclasses.replace(ctx, step=step)) or {}).items()}
    finally:
        set_train_mode(model, rc.frozen_eval)
    if ctx.tracker is not None:
        ctx.tracker.log_metrics({f"eval/{k}": v for k, v in metrics.items()}, step=step)
    if accelerator.is_main_process:
        print(f"eval @ step {step}: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()), flush=True)
    return metrics


def _save(accelerator, out: Path, step: int, keep: int, run_uid: str | None) -> str:
    """save_state into OUT/checkpoints/step_XXXXXXXX; COMPLETE marker last (naming this run); prune this run's own
    checkpoints to the `keep` newest."""
    path = out / CKPT_DIR / spine.tag_for(step)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(path))  # every process writes its own RNG state; the main one the rest
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return str(path)
    spine.write_complete(path, step, run_uid)
    spine.prune_checkpoints(out, keep, run_uid)
    return str(path)


def _any_process(flag: bool, accelerator) -> bool:
    """True on every process when `flag` is true on any (a no-op for one process)."""
    if accelerator.num_processes == 1:
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(t, reduction="sum").item() > 0)


def _claim_out_dir(accelerator, out: Path, rc: RunnerConfig, overwrite: bool, lock: spine.RunLock,
                   tracking: Any = None, kind: str = "") -> None:
    """The run folder rules of the spine, decided by the main process for all: refuse an MLflow store that cannot
    be written (`tracking`: the config's section when the runner makes the tracker; before anything is written);
    take OUT's lock; refuse a folder holding another run unless resuming (an overwrite moves that run aside), and on
    resume one holding a pretraining run or a run of another recipe `kind`."""
    from medvlp.pretrain.tracking import TrackingStoreError, store_refusal

    problem = ""
    store = store_refusal(tracking, 0 if accelerator.is_main_process else 1) if tracking is not None else ""
    if accelerator.is_main_process and not store:
        try:
            lock.acquire()
            spine.refuse_if_taken(out, rc.resume, overwrite, "finetune.out_dir")
            if rc.resume:
                problem = spine.foreign_run(out, "finetune", kind, "finetune.out_dir")
        except RunDirError as e:
            problem = str(e)
    if _any_process(bool(store), accelerator):
        raise TrackingStoreError(store or "the MLflow store cannot be written (see the main process)")
    if _any_process(bool(problem), accelerator):
        raise RunDirError(problem or f"finetune.out_dir {out}: refused by the main process (see its error)")
    if accelerator.is_main_process:
        if overwrite and spine.run_files(out):
            spine.move_aside(out)  # the previous run goes to OUT/replaced/<stamp>/, never deleted
        out.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()


def _write_config(out: Path, cfg: Any) -> None:
    import yaml

    (out / "config.yaml").write_text(yaml.safe_dump(config_dict(cfg), sort_keys=False))
