"""Where a CPU pretraining step goes: our Trainer step vs an open_clip_train-style step, phase by phase.

    OMP_NUM_THREADS=1 python benchmarks/profile_step.py --model RN50 --batch 8 --steps 2

Both sides build the same network (open_clip's RN50 config) and step it on one pre-made random batch, fp32:
  * ours: the public `medvlp.pretrain.train.Trainer` (DeepSpeed engine, ZeRO 0, `ContrastiveLoss`), `Trainer.train_step`;
  * open_clip: `open_clip.create_model` + `ClipLoss` + torch AdamW, the inner loop of open_clip_train
    (forward, loss, backward, clip_grad_norm_ 1.0, optimizer step, zero_grad, logit-scale clamp).
Each phase runs under a `torch.profiler.record_function` label (the calls are wrapped here, in the benchmark only)
and the table gives each label's CPU time per step: forward, loss, backward (autograd), clipping, optimizer, and
for ours the rest of DeepSpeed's engine.backward / engine.step (its overhead). Sides alternate (ABAB) per round.
Writes benchmarks/results/profile-step-<date>-<hw>.md.
"""
from __future__ import annotations

import argparse
import datetime as dt
import functools
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PHASES = ("forward", "loss", "backward (autograd)", "clipping", "optimizer", "DeepSpeed backward overhead",
          "DeepSpeed step overhead", "step total")


def _label(name, fn):
    import torch

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with torch.profiler.record_function(name):
            return fn(*args, **kwargs)
    return wrapped


def _batch(model, batch: int, size: int, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    img = torch.randn(batch, 3, size, size, generator=g)
    tok = torch.randint(1, 49406, (batch, 77), generator=g)
    tok[:, 0], tok[:, 20:] = 49406, 0
    tok[:, 19] = 49407
    return img, tok


def ours(model_name: str, batch: int, seed: int):
    """A step function for our Trainer, with labelled phases."""
    import torch

    from medvlp.pretrain.config import PretrainConfig
    from medvlp.pretrain.configtree import build
    from medvlp.pretrain.registry import get_model_config
    from medvlp.pretrain.train import Trainer

    size = get_model_config(model_name)["vision"].get("image_size", 224)
    cfg = build(PretrainConfig, {"model": {"name": model_name}, "data": {"batch_size": batch, "image_size": size},
                                 "train": {"steps": 100, "zero_stage": 0, "precision": "fp32", "seed": seed,
                                           "out_dir": "unused-profile-out"}, "tracking": {"enabled": False}})
    trainer = Trainer(cfg, progress=False)
    img, tok = _batch(trainer.model, batch, size, seed)

    class Same:
        def next(self):
            return {"image": img, "tokens": tok}
    trainer.batches = Same()
    eng = trainer.engine
    eng.module.forward = _label("forward", eng.module.forward)
    trainer.loss_fn = _label("loss", trainer.loss_fn)
    eng.backward = _label("engine.backward", eng.backward)
    eng.clip_fp32_gradients = _label("clipping", eng.clip_fp32_gradients)
    eng.optimizer.step = _label("optimizer", eng.optimizer.step)
    eng.step = _label("engine.step", eng.step)
    return lambda: trainer.train_step()


def open_clip_side(model_name: str, batch: int, seed: int):
    """open_clip_train's inner step on the same network, with labelled phases."""
    import open_clip
    import torch
    from open_clip.loss import ClipLoss

    torch.manual_seed(seed)
    model = open_clip.create_model(model_name)
    model.train()
    exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n  # noqa: E731
    named = list(model.named_parameters())
    opt = torch.optim.AdamW([{"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
                             {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": 0.2}], lr=5e-4)
    loss_fn = ClipLoss()
    img, tok = _batch(model, batch, 224, seed)
    fwd, lss = _label("forward", model.forward), _label("loss", loss_fn.forward)
    opt_step = _label("optimizer", opt.step)
    clip = _label("clipping", torch.nn.utils.clip_grad_norm_)

    def step():
        opt.zero_grad()
        out = fwd(img, tok)
        if isinstance(out, dict):
            out = (out["image_features"], out["text_features"], out["logit_scale"])
        loss = lss(*out[:3])
        loss.backward()
        clip(model.parameters(), 1.0)
        opt_step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, 4.6052)
        return float(loss)
    return step


def _phase_times(prof) -> dict:
    """CPU ms per label (record_function events), autograd backward from the engine-free events."""
    tot: dict[str, float] = {}
    for ev in prof.key_averages():
        tot[ev.key] = tot.get(ev.key, 0.0) + ev.cpu_time_total / 1e3
    return tot


def profile(step, steps: int) -> tuple[dict, float]:
    import torch

    step()  # warm-up
    t0 = time.perf_counter()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            with torch.profiler.record_function("step total"):
                step()
    wall = (time.perf_counter() - t0) / steps
    return {k: v / steps for k, v in _phase_times(prof).items()}, wall


def _rows(t: dict, side: str) -> dict:
    back = t.get("backward (autograd)", 0.0)
    out = {"forward": t.get("forward", 0.0), "loss": t.get("loss", 0.0), "clipping": t.get("clipping", 0.0),
           "optimizer": t.get("optimizer", 0.0), "step total": t.get("step total", 0.0)}
    if side == "ours":
        out["DeepSpeed backward overhead"] = max(0.0, t.get("engine.backward", 0.0) - back)
        out["DeepSpeed step overhead"] = max(0.0, t.get("engine.step", 0.0) - out["clipping"] - out["optimizer"])
    out["backward (autograd)"] = back
    return out


def main(argv=None) -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="RN50")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=2, help="profiled steps per side per round")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    a = ap.parse_args(argv)
    # Autograd's backward, whoever calls it, under one label.
    torch.Tensor.backward = _label("backward (autograd)", torch.Tensor.backward)
    sides = {"ours": ours(a.model, a.batch, a.seed), "open_clip": open_clip_side(a.model, a.batch, a.seed)}
    res: dict[str, list[dict]] = {s: [] for s in sides}
    walls: dict[str, list[float]] = {s: [] for s in sides}
    for r in range(a.rounds):
        for s in (list(sides) if r % 2 == 0 else list(sides)[::-1]):
            t, wall = profile(sides[s], a.steps)
            res[s].append(_rows(t, s))
            walls[s].append(wall)
            print(f"round {r} {s}: {wall:.2f} s/step", flush=True)
    med = statistics.median
    lines = [f"# CPU pretraining step by phase — {a.model}, batch {a.batch}, fp32, one process, "
             f"{dt.date.today().isoformat()}", "",
             f"torch threads {torch.get_num_threads()}; {a.rounds} rounds x {a.steps} profiled steps per side, sides "
             f"alternating; CPU ms per step from torch.profiler record_function labels (median over rounds). "
             f"Load average at the end: {'/'.join(f'{x:.1f}' for x in os.getloadavg())}. "
             "Labels nest (DeepSpeed overheads = engine.backward minus autograd, engine.step minus clipping and "
             "optimizer), so the step total is not their sum. Both sides share this process, so process-wide settings "
             "our Trainer makes (train.keep_host_memory: freed memory kept for reuse) help the open_clip side too: "
             "this table shows where time goes per phase; `benchmarks/bench_pretrain.py` (a process per side) gives "
             "the ratio.", "",
             "| phase | ours (ms) | open_clip (ms) | ours / open_clip |", "|---|---|---|---|"]
    for ph in PHASES:
        o = med([x.get(ph, 0.0) for x in res["ours"]])
        c = med([x.get(ph, 0.0) for x in res["open_clip"]])
        lines.append(f"| {ph} | {o:.1f} | {c:.1f} | {o / c:.2f} |" if c > 0 else f"| {ph} | {o:.1f} | {c:.1f} | — |")
    lines.append(f"| wall s per step (profiled) | {med(walls['ours']):.2f} | {med(walls['open_clip']):.2f} | "
                 f"{med(walls['ours']) / med(walls['open_clip']):.2f} |")
    text = "\n".join(lines) + "\n"
    from benchmarks.hw import cpu_model

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    cores = len(os.sched_getaffinity(0))
    slug = "".join(ch if ch.isalnum() else "-" for ch in cpu_model().lower()).strip("-")
    path = out / f"profile-step-{dt.date.today().isoformat()}-{slug}-{cores}c-b{a.batch}.md"
    path.write_text(text)
    print(text + f"wrote {path}")


if __name__ == "__main__":
    main()
