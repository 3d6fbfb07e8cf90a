"""The pretraining loop: shards -> towers -> gathered contrastive loss -> DeepSpeed step, tracked in MLflow.

    trainer = Trainer(cfg)          # cfg: PretrainConfig; builds the model and the DeepSpeed engine
    result = trainer.fit()          # out_dir checks, resume, the loop, checkpoints, final eval
    # or step by step: trainer.train_step(), trainer.save_checkpoint(), trainer.evaluate()

One optimizer step = `train.grad_accum` micro batches of `data.batch_size` per rank; the global batch is
micro × accum × world. Fault handling:
The run folder, the signal guard and the non-finite-loss policy are the run spine's (`medvlp.pretrain.spine`),
shared with fine-tuning:
  * NaN/inf loss on any rank (`train.nonfinite_loss: skip`, the default): every rank skips the step (no backward,
    no update) with a warning; after `train.max_bad_steps` in a row the run stops with an error (after logging what
    it has). `raise` stops at the first one.
  * A data stream that fails (`DataStreamError`: the shard server unreachable past `data.remote_outage_s`, too many
    bad shards): the half-done step is dropped (gradients, batch position, RNG draws) and, with one process, a
    checkpoint of the last completed step is written before the error (which names it) ends the run.
  * Any interruption (signal, data failure, non-finite loss) ends the MLflow run KILLED (FAILED for a non-finite
    loss) with the metrics so far, the loss curve, the last checkpoint's model (`tracking.log_model`) and the tags
    of `spine.mark_interrupted` (`medvlp.interrupted`, `medvlp.step_reached`, `medvlp.last_checkpoint`).
  * An MLflow store that cannot be written is refused before the run folder is touched (`check_out_dir`).
  * SIGTERM/SIGINT: finish the current step, write a checkpoint, exit cleanly (status "KILLED" in MLflow). A signal
    while waiting for data ends the step there (its partial gradients dropped) and checkpoints the last full step
    (one process) or exits at once (several ranks). A signal before the first step, or a second signal, exits at
    once (`TrainingInterrupted`).
  * `out_dir` already holding a run: refused unless resuming or `overwrite=True` (which moves the old run's files
    to out_dir/replaced/<stamp>/; nothing is deleted). A folder another live run is training in is refused (its
    `.lock`); a lock left by a dead process is taken over. Retention deletes only this run's own checkpoints.
  * `train.resume`: compare the config with the run's saved config.yaml (differences outside `RESUME_HARMLESS` are
    refused, naming each key), load the latest *complete* checkpoint (model, optimizer, schedule, RNG; an unreadable
    one is skipped with a warning for the previous complete one) and continue the data stream at the saved
    (epoch, step) position, so the next loss equals the uninterrupted run's (dropout included: the restored RNG is
    kept).
Shapes: img_B3SS / vol_B1DHW images, tok_BL tokens, emb_BE embeddings.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from medvlp.data_shards.guard import DataStreamError
from medvlp.pretrain import engine as eng
from medvlp.pretrain import spine
from medvlp.pretrain.configtree import build, dump_yaml, flatten, to_dict

log = logging.getLogger("medvlp.pretrain")


# The run spine's errors and signal guard, under the names this module has always had.
NonFiniteLossError = spine.NonFiniteLossError
RunDirError = spine.RunDirError
TrainingInterrupted = spine.TrainingInterrupted
_DataWaitInterrupt = spine.DataWaitInterrupt
_StopFlag = spine.StopFlag


# Keys a resume may change: bookkeeping, evaluation and tracking, not the trained model's recipe. `train.steps`
# extends (or shortens) the run; the cosine schedule is then stretched to the new length (a warning says so).
RESUME_HARMLESS = ("train.resume", "train.steps", "train.stop_after", "train.ckpt_every", "train.keep_ckpts",
                   "train.eval_every", "train.final_eval", "train.log_every", "train.max_bad_steps", "train.nonfinite_loss",
                   "train.dist_timeout_s", "train.out_dir", "train.keep_host_memory", "data.workers",
                   "data.log_corrupt", "data.val_shards", "eval.", "tracking.")
RUN_FILES = spine.RUN_FILES  # what a run writes into out_dir (a folder holding any of these holds a run)


@dataclass
class TrainResult:
    steps_done: int
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, loss) for every step run here
    metrics: dict[str, float] = field(default_factory=dict)  # final eval metrics
    stopped_by_signal: bool = False
    stopped_early: bool = False  # by a signal or train.stop_after (a checkpoint was written)
    model_uri: str = ""  # the MLflow model logged at the end ("runs:/<id>/model"; "" when not logged)
    out_dir: str = ""
    run_id: str | None = None
    samples_per_s: float = 0.0


def _any_rank(flag: bool, device: torch.device) -> bool:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def _to(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


class _Batches(spine.EpochBatches):
    """The shard stream as the spine's endless batches (epoch after epoch, the (epoch, step-in-epoch) position for
    checkpoints), with the loader's count of corrupt samples."""

    def __init__(self, data_cfg, rank: int, world: int, tokenizer, epoch: int, step: int, device=None) -> None:
        from medvlp.data_shards.stream import make_loader

        # device: where data.pipeline=fast turns its uint8 batches into normalised float (and decodes on a GPU);
        # persistent: the DataLoader workers live across epochs (next_epoch), none respawned per epoch
        persistent = bool(getattr(data_cfg, "persistent_workers", False))

        def open_epoch(e: int, s: int):
            prev = self.source
            if persistent and prev is not None and s == 0 and e == prev.epoch + 1:
                return prev.next_epoch()  # the epoch after a finished one, on the same worker processes
            if persistent and prev is not None:
                prev.close()  # reopened elsewhere (a rewind): the old workers stop now
            return make_loader(data_cfg, rank=rank, world_size=world, tokenizer=tokenizer, epoch=e, start_step=s,
                               train=True, device=device, persistent=persistent)

        super().__init__(open_epoch, epoch, step)

    @property
    def corrupt(self) -> int:
        return int(getattr(self.source, "stats", {}).get("corrupt", 0))


def _image_of(batch: dict) -> torch.Tensor:
    for k in ("image", "volume"):
        if k in batch:
            return batch[k]
    raise KeyError(f"batch has no image or volume member (keys: {sorted(batch)})")


def peak_flops(device: torch.device) -> float:
    """Dense bf16 peak of the device (for MFU); 0 on CPU (MFU not reported)."""
    if device.type != "cuda":
        return 0.0
    name = torch.cuda.get_device_name(device).lower()
    table = {"h200": 989e12, "h100": 989e12, "a100": 312e12, "l40": 181e12, "a10": 125e12}
    return next((v for k, v in table.items() if k in name), 0.0)




def _fmt_value(v: Any) -> str:
    return json.dumps(v, default=str)


def saved_config(out_dir: str | Path) -> dict | None:
    """The flat resolved config a run saved in OUT_DIR (config.yaml, else a legacy flat config.json); None if none."""
    import yaml

    out_dir = Path(out_dir)
    if (out_dir / "config.yaml").is_file():
        doc = yaml.safe_load((out_dir / "config.yaml").read_text()) or {}
    elif (out_dir / "config.json").is_file():
        doc = json.loads((out_dir / "config.json").read_text())
    else:
        return None
    if not isinstance(doc, dict):
        raise RunDirError(f"{out_dir}: the saved config is not a mapping")
    return flatten(doc)


def config_differences(saved: dict, new: dict) -> tuple[list[str], list[str]]:
    """(refused, harmless) differences between two flat configs, each as 'key: old -> new'. Keys the saved config
    lacks (fields added since) are not differences; keys only the saved config has are."""
    refused, harmless = [], []
    for key in sorted(saved):
        old, cur = saved[key], new.get(key, "<absent>")
        if isinstance(old, (list, tuple)) and isinstance(cur, (list, tuple)):
            same = list(old) == list(cur)
        else:
            same = old == cur or (isinstance(old, (int, float)) and isinstance(cur, (int, float))
                                  and not isinstance(old, bool) and float(old) == float(cur))
        if same:
            continue
        line = f"{key}: {_fmt_value(old)} -> {_fmt_value(cur)}"
        ok = any(key == h or (h.endswith(".") and key.startswith(h)) for h in RESUME_HARMLESS)
        (harmless if ok else refused).append(line)
    return refused, harmless


run_files = spine.run_files


def check_out_dir(cfg: Any, overwrite: bool = False, found: list[str] | None = None) -> None:
    """RunDirError unless `cfg.train.out_dir` is free for this run: empty of run files, or resuming, or overwriting.
    Also refused: a folder another live run holds (its lock), and (rank 0) an MLflow store that cannot be written
    (`tracking.TrackingStoreError`). Cheap (no process group): the CLI calls it before building anything;
    `Trainer.fit` checks again on every rank."""
    from medvlp.pretrain.tracking import check_store

    out = Path(cfg.train.out_dir)
    check_store(cfg.tracking, int(os.environ.get("RANK", "0") or 0))
    spine.refuse_if_taken(out, cfg.train.resume, overwrite, "train.out_dir", found)
    holder = spine.RunLock.holder(out) if int(os.environ.get("RANK", "0") or 0) == 0 else None  # rank 0 locks
    if holder is not None:
        raise RunDirError(f"{out} is in use by another run (pid {holder.get('pid')} on {holder.get('host')}, since "
                          f"{holder.get('since')}): wait for it to end or choose another out_dir")


class Trainer:
    """Contrastive pretraining of one `PretrainConfig` under DeepSpeed.

    The constructor joins (or starts) the process group, seeds, builds the model, the loss and the engine; nothing is
    written. `fit()` checks `train.out_dir`, resumes, runs the loop (checkpoints, logging, evaluation) and returns a
    `TrainResult`. The pieces are public for custom loops and benchmarks:

    * `train_step()` -> float: one optimizer step over `train.grad_accum` micro batches from `self.batches` (any
      object with `next() -> batch dict`; the shard stream by default). Returns the global mean loss, or NaN when
      the step was skipped on every rank (a non-finite loss somewhere); `self.step` counts the steps made.
    * `save_checkpoint()` -> Path: a complete checkpoint of the current step (all ranks call it).
    * `evaluate()` -> dict: rank 0 evaluates per `cfg.eval` (the others wait); the training RNG is left untouched.
    """

    def __init__(self, cfg: Any, *, overwrite: bool = False, progress: bool = True, batches: Any = None,
                 config_dict: dict | None = None) -> None:
        from medvlp.pretrain.loss import ContrastiveLoss
        from medvlp.pretrain.model import build_model

        if dataclasses.is_dataclass(cfg):
            cfg = build(type(cfg), to_dict(cfg))  # checked and validated like a loaded recipe
        self.cfg, self.overwrite, self.progress = cfg, overwrite, progress
        self.config_dict = config_dict if config_dict is not None else flatten(to_dict(cfg))
        self.rank, self.world, local_rank = eng.init_distributed(timeout_s=cfg.train.dist_timeout_s)
        self.device = device = eng.device_for(local_rank)
        if device.type == "cpu" and cfg.train.keep_host_memory:
            eng.keep_freed_host_memory()
        if device.type == "cuda":  # as open_clip_train does: autotuned convolutions, TF32 matmuls for fp32 parts
            torch.backends.cudnn.benchmark = True
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        eng.seed_everything(cfg.train.seed)  # same init on every rank
        self.out_dir = Path(cfg.train.out_dir)
        model = build_model(cfg.model, cfg.loss)
        want = getattr(model, "image_size", None)
        if model.image_kind == "2d" and want and int(want if isinstance(want, int) else want[0]) != cfg.data.image_size:
            raise ValueError(f"data.image_size={cfg.data.image_size} but model {cfg.model.name!r} takes {want}x{want} "
                             f"images: set data.image_size={want}")
        if cfg.model.grad_checkpointing:
            model.set_grad_checkpointing(True)
        if batches is None:
            _check_splits(cfg, self.world)
        self.model = model
        self.engine, _, self.scheduler, self.ds_config = eng.create_engine(model, cfg.train, cfg.optim,
                                                                           cfg.data.batch_size, self.world)
        self.loss_fn = ContrastiveLoss(cfg.loss)
        eng.seed_everything(cfg.train.seed, self.rank)  # per-rank stream of randomness (a resume restores its own)
        self.autocast = (torch.autocast("cpu", dtype=torch.bfloat16)
                         if device.type == "cpu" and cfg.train.precision == "bf16" else nullcontext())
        fmt = cfg.train.memory_format
        self.channels_last = model.image_kind == "2d" and (
            fmt == "channels_last" or (fmt == "auto" and getattr(model.visual, "kind", "") == "resnet"))
        self.step = 0  # optimizer steps made (restored on resume)
        self.losses: list[tuple[int, float]] = []  # (step, loss) of the whole run (restored on resume)
        self.run_id: str | None = None
        self.tracker = None
        self.batches = batches
        self._position = {"epoch": 0, "step": 0}  # where the shard stream starts (restored on resume)
        self._bad = 0
        self._logged_step = 0  # the last step whose metrics went to MLflow
        self._stop: _StopFlag | None = None
        self._lock: spine.RunLock | None = None
        self.run_uid: str | None = None  # this run's identity (rank 0; its checkpoints' COMPLETE markers carry it)

    # ------------------------------------------------------------------------------------------- pieces
    def _batch_source(self):
        if self.batches is None:
            self.batches = _Batches(self.cfg.data, self.rank, self.world, self.model.tokenizer,
                                    self._position["epoch"], self._position["step"], device=self.device)
        return self.batches

    def _next_batch(self) -> dict:
        src, stop = self._batch_source(), self._stop
        if stop is None:
            return src.next()
        stop.waiting = True
        try:
            return src.next()
        finally:
            stop.waiting = False

    def train_step(self) -> float:
        """One optimizer step over grad_accum micro batches. Returns the global mean loss, or NaN when a non-finite
        micro batch on any rank skipped the whole step on every rank (NonFiniteLossError after train.max_bad_steps
        in a row)."""
        from medvlp.pretrain.cache import cached_step

        cfg, engine, device, world = self.cfg, self.engine, self.device, self.world
        losses, micro_start = [], engine.micro_steps
        loss_on = lambda *o: self.loss_fn(*o, rank=self.rank, world_size=world)  # noqa: E731
        # a step abandoned half-way (signal, data failure) must leave no trace: its micro batches' draws included
        for _, raw in spine.micro_batches(self._next_batch, self._batch_source(), cfg.train.grad_accum,
                                          lambda: _discard_partial_step(engine, micro_start)):
            batch = _to(raw, device)
            img, tok = _image_of(batch), batch["tokens"]
            if engine.bfloat16_enabled():  # bf16 weights (GPU): feed bf16 pixels
                img = img.to(torch.bfloat16)
            if self.channels_last and img.dim() == 4:  # NHWC convolutions from the first layer on
                img = img.contiguous(memory_format=torch.channels_last)
            if cfg.loss.cache_chunk and cfg.loss.cache_chunk < img.shape[0]:
                # the cache backpropagates chunk by chunk itself, so finiteness is known only afterwards
                loss = cached_step(engine, img, tok, loss_on, chunk=cfg.loss.cache_chunk, backward=engine.backward)
                bad = _any_rank(not torch.isfinite(loss).item(), device)
            else:
                with self.autocast:
                    out = engine(img, tok)  # (img_emb, txt_emb, scale[, siglip bias])
                    loss = loss_on(*[o.float() for o in out])
                bad = _any_rank(not torch.isfinite(loss).item(), device)
                if not bad:
                    engine.backward(loss)
            if bad:
                _discard_partial_step(engine, micro_start)
                self._bad += 1
                spine.on_nonfinite(cfg.train.nonfinite_loss, self.step + 1, self._bad, cfg.train.max_bad_steps)
                return float("nan")
            engine.step()
            losses.append(float(loss.detach()))
        mean = sum(losses) / len(losses)
        if dist.is_initialized() and world > 1:  # report the global loss (mean over ranks)
            t = torch.tensor([mean], device=device, dtype=torch.float64)
            dist.all_reduce(t)
            mean = float(t.item()) / world
        self._bad = 0
        self.step += 1
        self.losses.append((self.step, mean))
        return mean

    def save_checkpoint(self) -> Path:
        """A complete checkpoint of step `self.step` in out_dir/checkpoints (all ranks call this)."""
        src = self.batches
        pos = src.position() if src is not None and hasattr(src, "position") else dict(self._position)
        client = {"step": self.step, "data": pos, "losses": self.losses[-10000:], "mlflow_run_id": self.run_id,
                  "run_uid": self.run_uid, "config": self.config_dict or {}}
        return eng.save_checkpoint(self.engine, self.cfg.train.out_dir, self.step, client,
                                   keep=self.cfg.train.keep_ckpts)

    def evaluate(self) -> dict:
        """Rank 0 evaluates on the held-out split (ZeRO-3 gathers the weights first); others wait. The RNG state is
        saved and restored around it, so evaluating mid-run does not change the training that follows."""
        import deepspeed

        module = self.engine.module
        params = list(module.parameters())
        zero3 = any(hasattr(p, "ds_id") for p in params)
        ctx = deepspeed.zero.GatheredParameters(params, modifier_rank=None) if zero3 else nullcontext()
        metrics: dict = {}
        rng = spine.rng_snapshot()
        try:
            with ctx:
                if self.rank == 0:
                    from medvlp.pretrain.eval import evaluate_for_training

                    was_training = module.training
                    module.eval()
                    metrics = evaluate_for_training(module, self.cfg, device=self.device,
                                                    out_dir=self.cfg.train.out_dir, tracker=self.tracker,
                                                    step=self.step)
                    module.train(was_training)
        finally:
            spine.rng_restore(rng)
        if dist.is_initialized():
            dist.barrier()
        return metrics

    # ------------------------------------------------------------------------------------------- run folder
    def prepare_out_dir(self) -> None:
        """Take the folder's lock (rank 0; a folder in use by another live run is refused); refuse an out_dir
        holding another run unless resuming or overwriting (which moves the old run aside); on resume refuse a
        changed config (naming each changed key); record the run's identity and write config.yaml (rank 0). Every
        rank decides together."""
        cfg, out = self.cfg, self.out_dir
        resume = cfg.train.resume
        if resume and self.overwrite:
            raise RunDirError("train.resume and overwrite: choose one (continue the run, or replace it)")
        from medvlp.pretrain.tracking import TrackingStoreError, store_refusal

        busy = ""
        store = store_refusal(cfg.tracking, self.rank)  # before anything is written: a refused run leaves the folder
        if _any_rank(bool(store), self.device):
            raise TrackingStoreError(store or "the MLflow store cannot be written (see rank 0)")
        if self.rank == 0:
            self._lock = spine.RunLock(out)
            try:
                self._lock.acquire()
            except RunDirError as e:
                busy = str(e)
        if _any_rank(bool(busy), self.device):
            raise RunDirError(busy or f"{out} is in use by another run (see rank 0)")
        found = run_files(out)
        if _any_rank(bool(found) and not resume and not self.overwrite, self.device):
            check_out_dir(cfg, self.overwrite, found=found or ["on another rank"])
        problem = ""
        if resume and self.rank == 0:
            saved = saved_config(out)
            problem = spine.foreign_run(out, "pretrain", cfg.kind, "train.out_dir")  # another loop's run
            if saved is not None and not problem:
                refused, harmless = config_differences(saved, self.config_dict)
                if refused:
                    problem = (f"resume: the config differs from the run's saved config in {out}: "
                               f"{'; '.join(refused)} (only bookkeeping keys may change on resume: "
                               f"{', '.join(RESUME_HARMLESS)}); keep the saved values or start a new train.out_dir")
                elif harmless:
                    log.warning("resume: config changes from the saved run: %s", "; ".join(harmless))
                    if any(h.startswith("train.steps:") for h in harmless):
                        log.warning("resume: train.steps changed, so the lr schedule is stretched to the new length")
            elif found and not problem:
                log.warning("resume: %s holds no saved config to compare with", out)
        if _any_rank(bool(problem), self.device):
            raise RunDirError(problem or "resume: the config differs from the saved one (see rank 0)")
        if self.rank == 0:
            if self.overwrite and found:
                spine.move_aside(out)  # the previous run goes to out_dir/replaced/<stamp>/, never deleted
            out.mkdir(parents=True, exist_ok=True)
            self.run_uid = spine.start_run(out, "pretrain", resume)
            tmp = out / "config.yaml.tmp"  # the run's recipe: rerunning it starts afresh (resume is a CLI choice)
            tmp.write_text(dump_yaml(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, resume=False))))
            tmp.replace(out / "config.yaml")
        if dist.is_initialized():
            dist.barrier()

    def resume(self) -> Path | None:
        """Load the latest complete checkpoint that reads (an unreadable one is skipped with a warning for the one
        before it): weights, optimizer, schedule, RNG, step, data position, loss history, MLflow run. Returns the
        checkpoint loaded, or None (nothing to resume: a warning, training starts from scratch)."""
        done = spine.own_checkpoints(self.out_dir, spine.read_run_uid(self.out_dir))  # never another run's
        if not done:
            log.warning("resume: no complete checkpoint under %s; starting from scratch", self.out_dir)
            return None
        from medvlp.pretrain.checkpoint import refuse_unsafe
        refuse_unsafe(done)  # the safe-load gate: a checkpoint that would run code stops the resume, no fallback
        for tag_dir in reversed(done):
            err = None
            try:
                client = eng.load_checkpoint(self.engine, tag_dir)
            except Exception as e:  # noqa: BLE001 - any unreadable file: try the previous checkpoint
                err = e
            if _any_rank(err is not None, self.device):
                why = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}" if err else "on another rank"
                log.warning("resume: checkpoint %s is unreadable (%s); falling back to the previous complete one",
                            tag_dir, why)
                continue
            self.step = int(client["step"])
            self._position = {"epoch": client["data"]["epoch"], "step": client["data"]["step"]}
            self.losses = [tuple(x) for x in client.get("losses", [])]
            self.run_id = client.get("mlflow_run_id")
            if self.rank == 0:
                log.info("resumed from %s (step %d, epoch %d, batch %d)", tag_dir, self.step,
                         self._position["epoch"], self._position["step"])
            return tag_dir
        raise RunDirError(f"resume: none of the {len(done)} complete checkpoints under {self.out_dir / eng.CKPT_DIR} "
                          f"could be read (see the warnings); start a new train.out_dir or --overwrite")

    # ------------------------------------------------------------------------------------------- the loop
    def fit(self) -> TrainResult:
        """Train to `train.steps` (or until a signal / `train.stop_after`); returns losses, eval metrics, paths.
        The run folder's lock is held from the folder checks to the end."""
        try:
            return self._fit()
        finally:
            if self._lock is not None:
                self._lock.release()

    def _fit(self) -> TrainResult:
        from medvlp.pretrain.progress import progress_bar as tqdm  # a bar on a terminal, plain lines off it

        cfg, rank = self.cfg, self.rank
        if rank == 0:
            spine.warn_long_warmup(cfg.optim.warmup_steps, cfg.train.steps, "optim.warmup_steps", "train.steps")
        self.prepare_out_dir()
        if cfg.train.resume:
            self.resume()
        start_step = self.step
        self._batch_source()
        result = TrainResult(steps_done=start_step, losses=self.losses, out_dir=str(self.out_dir))
        global_batch = cfg.data.batch_size * cfg.train.grad_accum * self.world
        flops_per_sample = _flops_per_sample(self.model)
        peak = peak_flops(self.device) * self.world
        tracker = self.tracker = spine.start_tracker(cfg.tracking, rank, self.config_dict, self.run_id,
                                                     resumed=bool(start_step))
        stop = self._stop = _StopFlag()
        try:
            with tracker, stop:
                self.run_id = result.run_id = getattr(tracker, "run_id", None)
                if rank == 0 and not start_step:
                    tracker.log_params({"derived.world_size": self.world, "derived.global_batch": global_batch,
                                        "derived.zero_stage": self.ds_config["zero_optimization"]["stage"]})
                try:
                    self._loop(result, tracker, stop, global_batch, flops_per_sample, peak, tqdm)
                except (KeyboardInterrupt, NonFiniteLossError, DataStreamError) as e:
                    # TrainingInterrupted (a KeyboardInterrupt), a data stream that failed (a remote outage), a
                    # non-finite loss: the run says so, with its curves and its last checkpoint's model
                    self._end_interrupted(tracker, result, spine.interruption_reason(e),
                                          "FAILED" if isinstance(e, NonFiniteLossError) else "KILLED")
                    raise
                result.steps_done = self.step
                if not result.stopped_early:
                    eng.save_model_weights(self.engine, self.out_dir / "model.safetensors")
                    if cfg.train.final_eval:
                        result.metrics = self.evaluate()
                    _log_curves(tracker, result, self.out_dir, rank)
                    if rank == 0 and cfg.tracking.enabled and cfg.tracking.log_model:
                        from medvlp.pretrain.export import log_model_artifact

                        result.model_uri = log_model_artifact(self.out_dir, tracker=tracker)
                elif result.stopped_by_signal:
                    self._end_interrupted(tracker, result, spine.interruption_reason(None, stop.signum), "KILLED")
        finally:
            self._stop = None
        return result

    def _end_interrupted(self, tracker, result: TrainResult, reason: str, status: str) -> None:
        """End the MLflow run of an interrupted training (rank 0): the last losses not yet logged, the loss curve,
        the model of the last complete checkpoint (when `tracking.log_model`), the tags of
        `spine.mark_interrupted`, then status KILLED (FAILED for a non-finite loss). Nothing here may hide the
        interruption itself: a failure is a warning."""
        result.steps_done = self.step
        if self.rank != 0 or tracker is None or not getattr(tracker, "active", False):
            return
        latest = None
        try:
            own = spine.own_checkpoints(self.out_dir, self.run_uid or spine.read_run_uid(self.out_dir))
            latest = own[-1] if own else None
        except Exception as e:  # noqa: BLE001 - the interruption is what must be reported
            log.warning("MLflow: the interrupted run's checkpoints could not be listed (%s: %s)", type(e).__name__, e)

        def artifacts() -> str:  # the loss curve and the last checkpoint's model
            _log_curves(tracker, result, self.out_dir, self.rank)
            if latest is None or not self.cfg.tracking.log_model:
                return ""
            from medvlp.pretrain.export import log_model_artifact

            result.model_uri = log_model_artifact(self.out_dir, step=spine.step_of(latest), tracker=tracker)
            return result.model_uri

        pending = None
        if self.losses and self.losses[-1][0] > self._logged_step:  # losses[-1] is this step's
            pending = {"train/loss": self.losses[-1][1], "train/lr": self.scheduler.get_last_lr()[0]}
        spine.report_interrupted(tracker, reason, self.step, latest, pending, artifacts)
        tracker.end(status)

    def _loop(self, result, tracker, stop, global_batch, flops_per_sample, peak, tqdm) -> None:
        cfg, rank = self.cfg, self.rank
        start_step = self.step
        t_last, n_last = time.perf_counter(), 0
        pbar = tqdm(total=cfg.train.steps, initial=start_step, disable=not self.progress or rank != 0,
                    desc="pretrain", dynamic_ncols=True)
        log_file = open(self.out_dir / "train_log.jsonl", "a") if rank == 0 else None
        try:
            while self.step < cfg.train.steps:
                try:
                    loss_val = self.train_step()
                except _DataWaitInterrupt:
                    if self.world > 1:  # the other ranks may be inside a collective of this step: no safe checkpoint
                        raise TrainingInterrupted(stop.signum, "while waiting for data on one of several ranks")
                    self._checkpoint_and_stop(result, by_signal=True)
                    break
                except DataStreamError as e:  # a remote outage past data.remote_outage_s, too many bad shards...
                    if self.world > 1:  # the other ranks wait in this step's collectives: no safe checkpoint
                        raise
                    self._checkpoint_and_stop(result, by_signal=False)
                    latest = spine.latest_complete(self.out_dir) if self.step else None
                    raise spine.with_checkpoint_note(e, self.step, latest, "train.resume") from None
                if not math.isfinite(loss_val):
                    continue
                stop.armed = True
                step = self.step
                n_last += global_batch
                pbar.update(1)
                pbar.set_postfix(loss=f"{loss_val:.4f}")
                if log_file is not None:
                    log_file.write(json.dumps({"step": step, "loss": loss_val,
                                               "lr": self.scheduler.get_last_lr()[0]}) + "\n")
                    log_file.flush()
                if step % max(1, cfg.train.log_every) == 0 or step == cfg.train.steps:
                    dt = time.perf_counter() - t_last
                    sps = n_last / max(dt, 1e-9)
                    result.samples_per_s = sps
                    m = {"train/loss": loss_val, "train/lr": self.scheduler.get_last_lr()[0],
                         "train/logit_scale": float(_logit_scale(self.engine.module)), "train/samples_per_s": sps,
                         "data/corrupt": getattr(self.batches, "corrupt", 0)}
                    if peak > 0 and flops_per_sample > 0:
                        m["train/mfu"] = flops_per_sample * sps / peak
                    tracker.log_metrics(m, step)
                    self._logged_step = step
                    t_last, n_last = time.perf_counter(), 0
                self.run_id = result.run_id = getattr(tracker, "run_id", None)
                want_ckpt = (cfg.train.ckpt_every and step % cfg.train.ckpt_every == 0) or step == cfg.train.steps
                time_boxed = bool(cfg.train.stop_after) and step - start_step >= cfg.train.stop_after
                stopping = _any_rank(stop.stop, self.device) or time_boxed
                if want_ckpt or stopping:
                    self.save_checkpoint()
                if stopping:
                    result.stopped_by_signal = not time_boxed
                    result.stopped_early = True
                    break
                if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < cfg.train.steps:
                    self.evaluate()
        finally:
            pbar.close()
            if log_file is not None:
                log_file.close()
        result.steps_done = self.step

    def _checkpoint_and_stop(self, result: TrainResult, by_signal: bool) -> None:
        latest = eng.latest_complete(self.out_dir)
        if self.step > 0 and (latest is None or latest.name != eng.tag_for(self.step)):
            self.save_checkpoint()
        result.stopped_by_signal, result.stopped_early = by_signal, True


def _check_splits(cfg: Any, world: int) -> None:
    """Before the run folder is claimed: the training split must fill one global batch (resampled streaming, the
    same rule as the stream's), and the split the final evaluation reads (`eval.split`, of the validation shards
    when set) must hold samples; otherwise the run would fail after writing its folder, or after training. A
    ValueError naming the keys and the counts."""
    from medvlp.data_shards.reader import find_index

    d = cfg.data

    def splits_of(spec: str) -> dict:
        return find_index(spec, d.index, d.allow_pipe)[0].get("splits") or {}

    if d.train_shards and d.resampled:
        from medvlp.data_shards.stream import epoch_steps

        n = d.samples_per_epoch or int(splits_of(d.train_shards).get(d.split, 0))
        if n:
            epoch_steps(n, d.batch_size, world)  # the stream's own rule and message
    spec = d.val_shards or d.train_shards
    if not cfg.train.final_eval or not spec:
        return
    splits = splits_of(spec)
    if int(splits.get(cfg.eval.split, 0)) <= 0:
        have = ", ".join(f"{k} {v}" for k, v in sorted(splits.items())) or "none"
        raise ValueError(f"eval.split: {spec} has no {cfg.eval.split!r} samples (index.json splits: {have}); the "
                         "final evaluation would fail after training: set eval.split to a split it has, or "
                         "train.final_eval=false")


def run_pretrain(cfg: Any, config_dict: dict | None = None, progress: bool = True,
                 overwrite: bool = False) -> TrainResult:
    """`Trainer(cfg, ...).fit()`: train per `cfg`; returns the losses, final eval metrics and where things went."""
    return Trainer(cfg, overwrite=overwrite, progress=progress, config_dict=config_dict).fit()


def _discard_partial_step(engine, micro_start: int) -> None:
    """A skipped step must not leak into the next: drop the gradients its earlier micro batches accumulated and
    rewind DeepSpeed's micro-step count, so the next step's accumulation boundary stays where it belongs."""
    engine.zero_grad()
    engine.optimizer.zero_grad()
    engine.micro_steps = micro_start


def _logit_scale(module) -> float:
    ls = getattr(module, "logit_scale", None)
    return math.exp(min(float(ls.detach().float().reshape(-1)[0]), math.log(100))) if ls is not None and ls.numel() else 0.0


def _flops_per_sample(model) -> float:
    try:
        from medvlp.pretrain.model import flops_per_sample
        return float(flops_per_sample(model))
    except Exception:  # noqa: BLE001 - MFU is informative only
        return 0.0


def _log_curves(tracker, result: TrainResult, out_dir: Path, rank: int) -> None:
    if rank != 0 or not result.losses:
        return
    from medvlp.pretrain.plots import loss_curve_png

    steps, losses = zip(*result.losses)
    path = out_dir / "loss_curve.png"
    loss_curve_png(list(steps), list(losses), path)
    tracker.log_artifact(str(path))
