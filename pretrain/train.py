"""The pretraining loop: shards -> towers -> gathered contrastive loss -> DeepSpeed step, tracked in MLflow.

    result = run_pretrain(cfg, config_dict)     # cfg: any object with .data .model .loss .optim .train .eval .tracking

One optimizer step = `train.grad_accum` micro batches of `data.batch_size` per rank; the global batch is
micro × accum × world. Fault handling:
  * NaN/inf loss on any rank: every rank skips the step (no backward, no update) with a warning; after
    `train.max_bad_steps` in a row the run stops with an error (after logging what it has).
  * SIGTERM/SIGINT: finish the current step, write a checkpoint, exit cleanly (status "KILLED" in MLflow).
  * `train.resume`: load the latest *complete* checkpoint (model, optimizer, schedule, RNG) and continue the data
    stream at the saved (epoch, step) position, so the next loss equals the uninterrupted run's.
Shapes: img_B3SS / vol_B1DHW images, tok_BL tokens, emb_BE embeddings.
"""
from __future__ import annotations

import json
import logging
import math
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from pretrain import engine as eng

log = logging.getLogger("medvlp.pretrain")


class NonFiniteLossError(RuntimeError):
    """Raised after too many consecutive non-finite losses."""


@dataclass
class TrainResult:
    steps_done: int
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, loss) for every step run here
    metrics: dict[str, float] = field(default_factory=dict)  # final eval metrics
    stopped_by_signal: bool = False
    stopped_early: bool = False  # by a signal or train.stop_after (a checkpoint was written)
    out_dir: str = ""
    run_id: str | None = None
    samples_per_s: float = 0.0


class _StopFlag:
    """SIGTERM/SIGINT set a flag; the loop checkpoints at the next step boundary and exits."""

    def __init__(self) -> None:
        self.stop = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "_StopFlag":
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread
                pass
        return self

    def _handler(self, signum, frame) -> None:  # noqa: ARG002
        log.warning("signal %s: will checkpoint and stop after this step", signum)
        self.stop = True

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _any_rank(flag: bool, device: torch.device) -> bool:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def _to(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


class _Batches:
    """Endless batches across epochs; remembers the (epoch, step-in-epoch) position for checkpoints."""

    def __init__(self, data_cfg, rank: int, world: int, tokenizer, epoch: int, step: int) -> None:
        from data_shards.stream import make_loader

        self._make = lambda e, s: make_loader(data_cfg, rank=rank, world_size=world, tokenizer=tokenizer,
                                              epoch=e, start_step=s, train=True)
        self.epoch, self.step = epoch, step
        self.loader = self._make(epoch, step)
        self._it = iter(self.loader)

    def next(self) -> dict:
        for _ in range(2):
            try:
                b = next(self._it)
                self.step += 1
                return b
            except StopIteration:
                self.epoch, self.step = self.epoch + 1, 0
                self.loader = self._make(self.epoch, 0)
                self._it = iter(self.loader)
        raise RuntimeError("the training stream yielded no batch for a whole epoch: is the split empty?")

    def position(self) -> dict:
        return {"epoch": self.epoch, "step": self.step}

    @property
    def corrupt(self) -> int:
        return int(getattr(self.loader, "stats", {}).get("corrupt", 0))


def _image_of(batch: dict) -> torch.Tensor:
    for k in ("image", "volume"):
        if k in batch:
            return batch[k]
    raise KeyError(f"batch has no image or volume member (keys: {sorted(batch)})")


def _peak_flops(device: torch.device) -> float:
    """Dense bf16 peak of the device (for MFU); 0 on CPU (MFU not reported)."""
    if device.type != "cuda":
        return 0.0
    name = torch.cuda.get_device_name(device).lower()
    table = {"h200": 989e12, "h100": 989e12, "a100": 312e12, "l40": 181e12, "a10": 125e12}
    return next((v for k, v in table.items() if k in name), 0.0)


def run_pretrain(cfg: Any, config_dict: dict | None = None, progress: bool = True) -> TrainResult:
    """Train per `cfg`; returns the losses, final eval metrics and where things were written."""
    return _run_pretrain(cfg, config_dict, progress)


def _run_pretrain(cfg: Any, config_dict: dict | None, progress: bool) -> TrainResult:
    from tqdm import tqdm

    from pretrain.loss import ContrastiveLoss
    from pretrain.model import build_model
    from pretrain.tracking import Tracker

    rank, world, local_rank = eng.init_distributed(timeout_s=cfg.train.dist_timeout_s)
    device = eng.device_for(local_rank)
    if device.type == "cuda":  # as open_clip_train does: autotuned convolutions, TF32 matmuls for fp32 parts
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    eng.seed_everything(cfg.train.seed)  # same init on every rank
    out_dir = Path(cfg.train.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if rank == 0 and config_dict is not None:  # the resolved config beside the weights (medvlp eval reads it)
        tmp = out_dir / "config.json.tmp"
        tmp.write_text(json.dumps(config_dict, indent=1, sort_keys=True, default=str) + "\n")
        tmp.replace(out_dir / "config.json")

    model = build_model(cfg.model, cfg.loss)
    want = getattr(model, "image_size", None)
    if model.image_kind == "2d" and want and int(want if isinstance(want, int) else want[0]) != cfg.data.image_size:
        raise ValueError(f"data.image_size={cfg.data.image_size} but model {cfg.model.name!r} takes {want}x{want} "
                         f"images: set data.image_size={want}")
    if cfg.model.grad_checkpointing:
        model.set_grad_checkpointing(True)
    engine, _, scheduler, ds_cfg = eng.create_engine(model, cfg.train, cfg.optim, cfg.data.batch_size, world)
    loss_fn = ContrastiveLoss(cfg.loss)
    start_step, epoch, epoch_step, history, run_id = 0, 0, 0, [], None
    if cfg.train.resume:
        tag_dir = eng.latest_complete(out_dir)
        if tag_dir is None:
            log.warning("resume: no complete checkpoint under %s; starting from scratch", out_dir)
        else:
            client = eng.load_checkpoint(engine, tag_dir)
            start_step = int(client["step"])
            epoch, epoch_step = client["data"]["epoch"], client["data"]["step"]
            history = [tuple(x) for x in client.get("losses", [])]
            run_id = client.get("mlflow_run_id")
            if rank == 0:
                log.info("resumed from %s (step %d, epoch %d, batch %d)", tag_dir, start_step, epoch, epoch_step)
    eng.seed_everything(cfg.train.seed + start_step, rank)  # per-rank stream of randomness from here on
    batches = _Batches(cfg.data, rank, world, model.tokenizer, epoch, epoch_step)

    autocast = (torch.autocast("cpu", dtype=torch.bfloat16)
                if device.type == "cpu" and cfg.train.precision == "bf16" else nullcontext())
    result = TrainResult(steps_done=start_step, losses=list(history), out_dir=str(out_dir))
    global_batch = cfg.data.batch_size * cfg.train.grad_accum * world
    flops_per_sample = _flops_per_sample(model)
    peak = _peak_flops(device) * world

    tracker = Tracker(cfg.tracking, rank, config_dict, resume_run_id=run_id)
    with tracker, _StopFlag() as stop:
        result.run_id = getattr(tracker, "run_id", None)
        if rank == 0 and not run_id:
            tracker.log_params({"derived.world_size": world, "derived.global_batch": global_batch,
                                "derived.zero_stage": ds_cfg["zero_optimization"]["stage"]})
        bad, t_last, n_last = 0, time.perf_counter(), 0
        pbar = tqdm(total=cfg.train.steps, initial=start_step, disable=not progress or rank != 0,
                    desc="pretrain", dynamic_ncols=True)
        step = start_step
        log_file = open(out_dir / "train_log.jsonl", "a") if rank == 0 else None
        while step < cfg.train.steps:
            loss_val, finite = _train_step(engine, batches, loss_fn, cfg, rank, world, device, autocast)
            if not finite:
                bad += 1
                log.warning("step %d: non-finite loss on some rank; step skipped (%d in a row)", step, bad)
                if bad >= cfg.train.max_bad_steps:
                    tracker.end("FAILED")
                    raise NonFiniteLossError(f"loss was NaN/inf for {bad} consecutive steps (train.max_bad_steps)")
                continue
            bad = 0
            step += 1
            n_last += global_batch
            result.losses.append((step, loss_val))
            pbar.update(1)
            pbar.set_postfix(loss=f"{loss_val:.4f}")
            if log_file is not None:
                log_file.write(json.dumps({"step": step, "loss": loss_val, "lr": scheduler.get_last_lr()[0]}) + "\n")
                log_file.flush()
            if step % max(1, cfg.train.log_every) == 0 or step == cfg.train.steps:
                dt = time.perf_counter() - t_last
                sps = n_last / max(dt, 1e-9)
                result.samples_per_s = sps
                m = {"train/loss": loss_val, "train/lr": scheduler.get_last_lr()[0],
                     "train/logit_scale": float(_logit_scale(engine.module)), "train/samples_per_s": sps,
                     "data/corrupt": batches.corrupt}
                if peak > 0 and flops_per_sample > 0:
                    m["train/mfu"] = flops_per_sample * sps / peak
                tracker.log_metrics(m, step)
                t_last, n_last = time.perf_counter(), 0
            result.run_id = getattr(tracker, "run_id", None)
            want_ckpt = (cfg.train.ckpt_every and step % cfg.train.ckpt_every == 0) or step == cfg.train.steps
            time_boxed = bool(cfg.train.stop_after) and step - start_step >= cfg.train.stop_after
            stopping = _any_rank(stop.stop, device) or time_boxed
            if want_ckpt or stopping:
                _checkpoint(engine, cfg, step, batches, result, config_dict)
            if stopping:
                result.stopped_by_signal = not time_boxed
                result.stopped_early = True
                break
            if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < cfg.train.steps:
                _evaluate(engine.module, cfg, rank, device, tracker, step)
        pbar.close()
        if log_file is not None:
            log_file.close()
        result.steps_done = step
        if not result.stopped_early:
            eng.save_model_weights(engine, out_dir / "model.safetensors")
            if cfg.train.final_eval:
                result.metrics = _evaluate(engine.module, cfg, rank, device, tracker, step)
            _log_curves(tracker, result, out_dir, rank)
        elif result.stopped_by_signal:
            tracker.end("KILLED")
    return result


def _discard_partial_step(engine, micro_start: int) -> None:
    """A skipped step must not leak into the next: drop the gradients its earlier micro batches accumulated and
    rewind DeepSpeed's micro-step count, so the next step's accumulation boundary stays where it belongs."""
    engine.zero_grad()
    engine.optimizer.zero_grad()
    engine.micro_steps = micro_start


def _train_step(engine, batches: _Batches, loss_fn, cfg, rank, world, device, autocast) -> tuple[float, bool]:
    """One optimizer step over grad_accum micro batches. Returns (mean loss, finite on every rank); a non-finite
    micro batch on any rank skips the whole step on every rank."""
    from pretrain.cache import cached_step

    losses, micro_start = [], engine.micro_steps
    loss_on = lambda *o: loss_fn(*o, rank=rank, world_size=world)  # noqa: E731
    for _ in range(cfg.train.grad_accum):
        batch = _to(batches.next(), device)
        img, tok = _image_of(batch), batch["tokens"]
        if engine.bfloat16_enabled():  # bf16 weights (GPU): feed bf16 pixels
            img = img.to(torch.bfloat16)
        if cfg.loss.cache_chunk and cfg.loss.cache_chunk < img.shape[0]:
            # the cache backpropagates chunk by chunk itself, so finiteness is known only afterwards
            loss = cached_step(engine, img, tok, loss_on, chunk=cfg.loss.cache_chunk, backward=engine.backward)
            bad = _any_rank(not torch.isfinite(loss).item(), device)
        else:
            with autocast:
                out = engine(img, tok)  # (img_emb, txt_emb, scale[, siglip bias])
                loss = loss_on(*[o.float() for o in out])
            bad = _any_rank(not torch.isfinite(loss).item(), device)
            if not bad:
                engine.backward(loss)
        if bad:
            _discard_partial_step(engine, micro_start)
            return float("nan"), False
        engine.step()
        losses.append(float(loss.detach()))
    mean = sum(losses) / len(losses)
    if dist.is_initialized() and world > 1:  # report the global loss (mean over ranks)
        t = torch.tensor([mean], device=device, dtype=torch.float64)
        dist.all_reduce(t)
        mean = float(t.item()) / world
    return mean, True


def _logit_scale(module) -> float:
    ls = getattr(module, "logit_scale", None)
    return math.exp(min(float(ls.detach().float().reshape(-1)[0]), math.log(100))) if ls is not None and ls.numel() else 0.0


def _flops_per_sample(model) -> float:
    try:
        from pretrain.model import flops_per_sample
        return float(flops_per_sample(model))
    except Exception:  # noqa: BLE001 - MFU is informative only
        return 0.0


def _checkpoint(engine, cfg, step: int, batches: _Batches, result: TrainResult, config_dict) -> None:
    client = {"step": step, "data": batches.position(), "losses": result.losses[-10000:], "mlflow_run_id": result.run_id,
              "config": config_dict or {}}
    eng.save_checkpoint(engine, cfg.train.out_dir, step, client, keep=cfg.train.keep_ckpts)


def _evaluate(module, cfg, rank: int, device, tracker, step: int) -> dict:
    """Rank 0 evaluates on the held-out split (ZeRO-3 gathers the weights first); others wait."""
    import deepspeed

    params = list(module.parameters())
    zero3 = any(hasattr(p, "ds_id") for p in params)
    ctx = deepspeed.zero.GatheredParameters(params, modifier_rank=None) if zero3 else nullcontext()
    metrics: dict = {}
    with ctx:
        if rank == 0:
            from pretrain.eval import evaluate_for_training

            was_training = module.training
            module.eval()
            metrics = evaluate_for_training(module, cfg, device=device, out_dir=cfg.train.out_dir, tracker=tracker,
                                            step=step)
            module.train(was_training)
    if dist.is_initialized():
        dist.barrier()
    return metrics


def _log_curves(tracker, result: TrainResult, out_dir: Path, rank: int) -> None:
    if rank != 0 or not result.losses:
        return
    from pretrain.plots import loss_curve_png

    steps, losses = zip(*result.losses)
    path = out_dir / "loss_curve.png"
    loss_curve_png(list(steps), list(losses), path)
    tracker.log_artifact(str(path))
