"""Pretraining throughput: our DeepSpeed train step vs. `open_clip_train` on the same model, batch and precision.

    .venv/bin/python benchmarks/bench_pretrain.py                       # CPU: RN50 224², batch 32, fp32 + bf16
    .venv/bin/python benchmarks/bench_pretrain.py --model RN50 --batch 32 --steps 5 --warmup 1 --rounds 3 \
        --precision fp32,bf16 --zero 0                                    # the same, spelled out
    .venv/bin/python benchmarks/bench_pretrain.py --precision fp32 --variant train.memory_format=contiguous \
        --variant train.keep_host_memory=false        # + our step without each speed knob, in every round
    .venv/bin/python benchmarks/bench_pretrain.py --quick               # debug model, batch 8, 3 steps (smoke)
    .venv/bin/python benchmarks/bench_pretrain.py --skip-openclip       # ours only
    # GPU defaults: ViT-B-16 and RN50 at 224², batch 256, bf16, with MFU.

Writes benchmarks/results/pretrain-<date>-<hw>.{md,csv}.

Sides alternate ABAB... over `--rounds` rounds (whoever went first goes second in the next round); the summary gives
our samples/s over open_clip's per round, as a median with its min-max spread, so a change of machine load during
the run shows as spread instead of as a false ratio.
Every run is a fresh child process (so neither side inherits the other's allocator, threads or compiled state):
  * ours: the public `medvlp.pretrain.train.Trainer` (DeepSpeed engine at ZeRO stage `--zero`, `build_model`,
    `ContrastiveLoss`), stepped by `Trainer.train_step` (the loop's own step) on ONE pre-made batch of random images
    of the model's size and random BPE token ids, already on the device (no data loading at all);
  * theirs: `open_clip_train.main --dataset-type synthetic`, whose data set returns one black PIL image run through
    the train preprocessing (RandomResizedCrop, ToTensor, Normalize) and the tokenised "Dummy caption", served by a
    DataLoader with `--openclip-workers` processes; the per-step time is parsed from its "Batch (t)" log lines
    (`--log-every-n-steps 1` makes each line one step). Its batch time includes any wait for data ("Data (t)",
    reported in its own column), so its workers prefetch in parallel: on 2 cores the worker also competes for CPU.
Timing: `warmup` steps first, then `steps` optimizer steps; samples/s = batch·steps / (time from the end of the last
warm-up step to the end of the last timed step), the same definition on both sides (open_clip's batch time runs
from one step's end to the next's). Training FLOPs per sample come from `medvlp.pretrain.model.flops_per_sample` (same
network on both sides); MFU = FLOPs/s over the device's dense bf16 peak (GPU only).

Shape legend: B batch, S image side, L context length.
"""
from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.hw import cpu_model  # noqa: E402

RESULT_TAG = "BENCH_RESULT "
THREADS_TAG = "BENCH_THREADS "
SOT, EOT = 49406, 49407  # open_clip BPE start/end-of-text ids (EOT is the largest id: the text tower pools on it)
OPENCLIP_PRECISION = {"fp32": "fp32", "bf16": "amp_bf16"}  # ours -> open_clip_train --precision
# open_clip_train's per-step log line (train.py): "... Data (t): 0.001 Batch (t): 9.312, 3.43/s, ..."
STEP_RE = re.compile(r"Train Epoch: \d+ \[\s*(\d+)/\s*\d+.*?Data \(t\): ([\d.]+) Batch \(t\): ([\d.]+)")


@dataclass
class Row:
    """One measured configuration (one line of the table)."""

    impl: str  # "medvlp" (ours; "medvlp/<memory format>" for a non-default layout) or "open_clip"
    model: str  # registry model name
    precision: str  # fp32 | bf16 (ours: train.precision; open_clip: fp32 | amp_bf16)
    batch: int  # samples per optimizer step (one process)
    zero: str  # DeepSpeed ZeRO stage ("-" for open_clip)
    round: int = 0  # measuring round (sides alternate ABAB... across rounds)
    steps: int = 0  # timed optimizer steps
    s_per_step: float = 0.0  # mean seconds per timed step
    median_s: float = 0.0  # median seconds per timed step
    samples_per_s: float = 0.0  # batch·steps / timed seconds
    tflops: float = 0.0  # achieved training TFLOP/s (flops_per_sample · samples/s)
    mfu: float | None = None  # tflops / device bf16 peak (GPU only)
    threads: int = 0  # torch.get_num_threads() in the measuring process
    data_wait_s: float = 0.0  # mean seconds per step waiting for the data loader (open_clip "Data (t)")
    load: str = ""  # 1-min load average at start -> end of the row
    error: str = ""  # why the row has no numbers
    step_times: list[float] = field(default_factory=list)  # every step's seconds, warm-up included


# ------------------------------------------------------------------------------------------------ ours (child)
class _SameBatch:
    """Stands in for the train loop's batch stream: always the same pre-made batch (data loading excluded)."""

    def __init__(self, batch: dict) -> None:
        self.batch = batch

    def next(self) -> dict:
        return self.batch


def synthetic_batch(model, batch: int, device, seed: int) -> dict:
    """Random normalised images of the model's size and random BPE captions (SOT ... EOT, zero padded)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    size = model.image_size
    shape = (batch, model.visual.in_channels, *size) if model.image_kind == "3d" else (batch, 3, size, size)
    img_B3SS = torch.randn(shape, generator=g)
    L = model.context_length
    tok_BL = torch.zeros(batch, L, dtype=torch.long)
    lengths_B = torch.randint(4, max(5, L // 2), (batch,), generator=g)
    for i, n in enumerate(lengths_B.tolist()):
        tok_BL[i, 0] = SOT
        tok_BL[i, 1:n - 1] = torch.randint(1, SOT, (n - 2,), generator=g)
        tok_BL[i, n - 1] = EOT
    return {"image": img_B3SS.to(device), "tokens": tok_BL.to(device)}


def run_ours(spec: dict) -> dict:
    """Child process: build the real Trainer, run warmup + steps train steps, return the timings."""
    import torch

    from medvlp.pretrain.config import PretrainConfig
    from medvlp.pretrain.configtree import build
    from medvlp.pretrain.registry import get_model_config
    from medvlp.pretrain.train import Trainer

    size = get_model_config(spec["model"])["vision"].get("image_size", 64)
    from medvlp.launch.config import apply_overrides

    cfg = build(PretrainConfig, apply_overrides({
        "model": {"name": spec["model"]}, "loss": {"backend": spec["loss_backend"]},
        "data": {"batch_size": spec["batch"], "image_size": size if isinstance(size, int) else 64},
        "train": {"steps": spec["warmup"] + spec["steps"], "zero_stage": spec["zero"], "precision": spec["precision"],
                  "seed": spec["seed"], "out_dir": "unused-bench-out"},  # fit() is not called: nothing is written
        "tracking": {"enabled": False}}, spec.get("overrides", [])))
    trainer = Trainer(cfg, progress=False)
    if trainer.device.type == "cuda" and not spec["cudnn_benchmark"]:
        torch.backends.cudnn.benchmark = False  # the Trainer sets these on CUDA, as open_clip_train.main does
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    device, train = trainer.device, cfg.train
    batch = synthetic_batch(trainer.model, spec["batch"], device, spec["seed"])
    # A bf16 engine (GPU) holds bf16 weights; open_clip's ViT stem does not cast its input (the ResNet path in
    # medvlp/pretrain/towers.py does), so the pre-made images come in the weights' dtype, as a loader could deliver them.
    batch["image"] = batch["image"].to(next(trainer.engine.module.parameters()).dtype)
    trainer.batches = _SameBatch(batch)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    ends = []
    sync()
    t0 = time.perf_counter()
    for _ in range(train.steps):
        if not math.isfinite(trainer.train_step()):
            raise RuntimeError("non-finite loss on the synthetic batch")
        sync()
        ends.append(time.perf_counter())
        print(f"step {len(ends)}/{train.steps}: {ends[-1] - (ends[-2] if len(ends) > 1 else t0):.3f}s",
              file=sys.stderr, flush=True)
    starts = [t0] + ends[:-1]
    return {"threads": torch.get_num_threads(), "step_times": [e - s for s, e in zip(starts, ends)],
            "timed_s": ends[-1] - (ends[spec["warmup"] - 1] if spec["warmup"] else t0),
            "device": str(device)}


def _run_child(cmd: list[str], env: dict, timeout_s: float, on_line) -> tuple[int | None, deque]:
    """Run `cmd` in its own process group, feeding each output line to `on_line`, which returns True to stop the
    process early. Returns (exit code, or None when stopped early or timed out; the last output lines)."""
    tail: deque = deque(maxlen=40)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT,
                            start_new_session=True)
    t_start = time.monotonic()
    # A watchdog, not a check per line: a child that hangs silently must be stopped too.
    watchdog = threading.Timer(timeout_s, _stop_group, (proc,))
    watchdog.start()
    stopped = False
    try:
        for line in proc.stdout:
            tail.append(line.rstrip())
            if on_line(line):
                stopped = True
                break
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            _stop_group(proc)
        proc.wait()
    if time.monotonic() - t_start >= timeout_s:
        tail.append(f"timed out after {timeout_s:.0f}s")
        stopped = True
    return (None if stopped else proc.returncode), tail


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the child's own process group (it and its DataLoader workers), SIGKILL if it lingers."""
    for sig, wait_s in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def measure_ours(a, model: str, precision: str, env: dict, variant: str = "") -> Row:
    """Our step; `variant` = space-separated dotted config overrides (a speed knob turned off, ...)."""
    row = Row("medvlp" + (f" [{variant}]" if variant else ""), model, precision, a.batch, str(a.zero))
    spec = {"model": model, "precision": precision, "batch": a.batch, "zero": a.zero, "steps": a.steps,
            "warmup": a.warmup, "seed": a.seed, "loss_backend": a.loss_backend, "overrides": variant.split(),
            "cudnn_benchmark": not a.no_cudnn_benchmark}
    out: dict = {}

    def on_line(line: str) -> bool:
        if line.startswith(RESULT_TAG):
            out.update(json.loads(line[len(RESULT_TAG):]))
        elif line.startswith("step "):
            print("   ", line.rstrip(), flush=True)
        return False

    load0 = os.getloadavg()[0]
    rc, tail = _run_child([sys.executable, str(Path(__file__).resolve()), "--child-ours", json.dumps(spec)],
                          env, a.timeout, on_line)
    row.load = f"{load0:.1f}->{os.getloadavg()[0]:.1f}"
    if rc != 0 or not out:
        row.error = tail[-1] if tail and tail[-1].startswith("timed out") else f"exit {rc}: " + " | ".join(list(tail)[-3:])
        return row
    row.threads, row.step_times, row.steps = out["threads"], out["step_times"], a.steps
    timed = row.step_times[a.warmup:]
    row.s_per_step, row.median_s = out["timed_s"] / a.steps, statistics.median(timed)
    row.samples_per_s = a.batch * a.steps / out["timed_s"]
    return row


# ------------------------------------------------------------------------------------------------ open_clip
def openclip_model_arg(model: str, tmp: Path) -> tuple[str, str]:
    """(--model value, config file to register): open_clip's own name when its config is the same network as
    ours, else our registry config converted to open_clip's schema (so e.g. `debug` runs there too)."""
    import open_clip

    from medvlp.pretrain.registry import get_model_config

    spec = get_model_config(model)
    if spec["vision"]["type"] not in ("resnet", "vit") or spec["text"]["type"] != "openclip":
        raise ValueError(f"model {model!r}: open_clip_train cannot build a {spec['vision']['type']}/"
                         f"{spec['text']['type']} model")
    ours = {"embed_dim": spec["embed_dim"],
            "vision_cfg": {k: v for k, v in spec["vision"].items() if k != "type"},
            "text_cfg": {k: v for k, v in spec["text"].items() if k != "type"}}
    theirs = open_clip.get_model_config(model) if model in open_clip.list_models() else None
    if theirs is not None and _same_net(ours, theirs):
        return model, ""
    path = tmp / f"medvlp-{model}.json"
    path.write_text(json.dumps(ours))
    return path.stem, str(path)


def _same_net(a: dict, b: dict) -> bool:
    """Same embed dim and every tower field we set equals theirs (their extra fields at open_clip defaults)."""
    if a["embed_dim"] != b.get("embed_dim"):
        return False
    return all(b.get(t, {}).get(k) == v for t in ("vision_cfg", "text_cfg") for k, v in a[t].items()
               if not (k == "head_width" and v == 64 and k not in b.get(t, {})))


def openclip_args(a, model_arg: str, precision: str, logs: Path, name: str) -> list[str]:
    n = a.batch * (a.warmup + a.steps + 1)  # one spare step: we stop it before its end-of-epoch checkpoint
    return ["--dataset-type", "synthetic", "--model", model_arg, "--batch-size", str(a.batch),
            "--device", "cuda" if a.cuda else "cpu", "--precision", OPENCLIP_PRECISION[precision],
            "--workers", str(a.openclip_workers), "--train-num-samples", str(n), "--epochs", "1",
            "--log-every-n-steps", "1", "--logs", str(logs), "--name", name, "--save-frequency", "0",
            "--report-to", "", "--seed", str(a.seed), "--grad-clip-norm", "1.0"]


def measure_openclip(a, model: str, precision: str, env: dict) -> Row:
    row = Row("open_clip", model, precision, a.batch, "-")
    with tempfile.TemporaryDirectory(prefix="bench_openclip_") as tmp:
        try:
            model_arg, cfg_file = openclip_model_arg(model, Path(tmp))
        except ValueError as e:
            row.error = str(e)
            return row
        # Same entry point as `python -m open_clip_train.main ARGS`, plus a registered config when needed and the
        # thread count of the measuring process.
        boot = ("import sys, torch, open_clip; from open_clip_train.main import main\n"
                f"print('{THREADS_TAG}' + str(torch.get_num_threads()), flush=True)\n"
                "if sys.argv[1]: open_clip.add_model_config(sys.argv[1])\n"
                "main(sys.argv[2:])")
        args = openclip_args(a, model_arg, precision, Path(tmp) / "logs", f"bench-{model_arg}-{precision}")
        steps: list[tuple[float, float]] = []

        def on_line(line: str) -> bool:
            if line.startswith(THREADS_TAG):
                row.threads = int(line[len(THREADS_TAG):])
            m = STEP_RE.search(line)
            if m:
                steps.append((float(m.group(2)), float(m.group(3))))
                print(f"    step {len(steps)}/{a.warmup + a.steps}: {steps[-1][1]:.3f}s", flush=True)
            return len(steps) >= a.warmup + a.steps

        load0 = os.getloadavg()[0]
        rc, tail = _run_child([sys.executable, "-c", boot, cfg_file, *args], env, a.timeout, on_line)
        row.load = f"{load0:.1f}->{os.getloadavg()[0]:.1f}"
    if len(steps) < a.warmup + a.steps:
        why = tail[-1] if tail and tail[-1].startswith("timed out") else f"exit {rc}: " + " | ".join(list(tail)[-3:])
        row.error = f"{len(steps)} steps logged; {why}"
        return row
    timed = steps[a.warmup:a.warmup + a.steps]
    row.step_times = [b for _, b in steps]
    row.steps = a.steps
    total = sum(b for _, b in timed)
    row.s_per_step, row.median_s = total / a.steps, statistics.median(b for _, b in timed)
    row.samples_per_s = a.batch * a.steps / total
    row.data_wait_s = sum(d for d, _ in timed) / a.steps
    return row


# ------------------------------------------------------------------------------------------------ table
def hardware(cuda: bool) -> tuple[str, str]:
    """(file-name tag, description) of the machine: the GPU when one is used, else the CPU and its core count."""
    cpu = cpu_model()
    slug = lambda s: re.sub(r"[^a-z0-9]+", "-", re.sub(r"\(.*?\)|cpu|@.*", "", s.lower())).strip("-")[:32]  # noqa: E731
    if cuda:
        import torch

        gpu = torch.cuda.get_device_name(0)
        return f"{slug(gpu)}-x{torch.cuda.device_count()}", f"{gpu} (CPU: {cpu}, {os.cpu_count()} cores)"
    return f"{slug(cpu)}-{os.cpu_count()}c", f"{cpu}, {os.cpu_count()} logical cores"


def add_flops(rows: list[Row], cuda: bool) -> None:
    """Achieved TFLOP/s for every measured row, and MFU against the device's dense bf16 peak on GPU."""
    from medvlp.pretrain.model import flops_per_sample

    peak = 0.0
    if cuda:
        import torch

        from medvlp.pretrain.train import peak_flops  # the train loop's MFU denominator, so both report the same MFU
        peak = peak_flops(torch.device("cuda", 0))
    for r in rows:
        if r.samples_per_s:
            f = flops_per_sample(r.model) * r.samples_per_s
            r.tflops = f / 1e12
            r.mfu = f / peak if peak else None


COLUMNS = ["impl", "model", "precision", "batch", "zero", "round", "steps", "s_per_step", "median_s",
           "samples_per_s", "vs_open_clip", "tflops", "mfu", "threads", "data_wait_s", "load", "error"]


def _ratio(r: Row, rows: list[Row]) -> float | None:
    """Our samples/s over open_clip's in the same round (the two runs next to each other in time)."""
    ref = next((o for o in rows if o.impl == "open_clip" and o.model == r.model and o.precision == r.precision
                and o.round == r.round and o.samples_per_s), None)
    return r.samples_per_s / ref.samples_per_s if ref and r.samples_per_s else None


def summary(rows: list[Row]) -> list[dict]:
    """Per (our variant, model, precision): median samples/s of both sides over the rounds, and the per-round ratio
    ours/open_clip as median with its min-max spread."""
    out = []
    keys = dict.fromkeys((r.impl, r.model, r.precision) for r in rows if r.impl != "open_clip")
    for impl, model, prec in keys:
        ours = [r for r in rows if (r.impl, r.model, r.precision) == (impl, model, prec) and r.samples_per_s]
        theirs = [r for r in rows if (r.impl, r.model, r.precision) == ("open_clip", model, prec) and r.samples_per_s]
        ratios = [x for x in (_ratio(r, rows) for r in ours) if x is not None]
        med = lambda xs: statistics.median(xs) if xs else None  # noqa: E731
        out.append({"impl": impl, "model": model, "precision": prec, "rounds": len(ratios),
                    "ours": med([r.samples_per_s for r in ours]), "theirs": med([r.samples_per_s for r in theirs]),
                    "ratio": med(ratios), "lo": min(ratios, default=None), "hi": max(ratios, default=None),
                    "ratios": ratios})
    return out


def write_tables(rows: list[Row], a, notes: list[str], out_dir: Path, tag: str) -> tuple[Path, Path]:
    date = dt.date.today().isoformat()
    out_dir.mkdir(parents=True, exist_ok=True)
    md, csv_path = out_dir / f"pretrain-{date}-{tag}.md", out_dir / f"pretrain-{date}-{tag}.csv"
    fmt = lambda v, d=2: "" if v is None or v == 0 else f"{v:.{d}f}"  # noqa: E731
    lines = [f"# Pretraining throughput, {date}, {tag}", "", *notes, "",
             "| ours | model | precision | rounds | ours samples/s (median) | open_clip samples/s (median) "
             "| ours / open_clip (median of rounds) | min–max | per round |",
             "|---|---|---|---:|---:|---:|---:|---|---|"]
    for x in summary(rows):
        ratio = "" if x["ratio"] is None else f"**{x['ratio']:.2f}x**"
        spread = "" if x["lo"] is None else f"{x['lo']:.2f}–{x['hi']:.2f}"
        per_round = " ".join(f"{v:.2f}" for v in x["ratios"])
        lines.append(f"| {x['impl']} | {x['model']} | {x['precision']} | {x['rounds']} | {fmt(x['ours'])} | "
                     f"{fmt(x['theirs'])} | {ratio} | {spread} | {per_round} |")
    lines += ["", "Every run (in the order measured):", "",
              "| impl | model | precision | batch | ZeRO | round | steps | s/step | median s | samples/s "
              "| vs open_clip | TFLOP/s | MFU | threads | data wait s | load avg | error |",
              "|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS + ["step_times"])
        for r in rows:
            ratio = _ratio(r, rows) if r.impl != "open_clip" else None
            d = asdict(r)
            w.writerow([d[c] if c in d else ratio for c in COLUMNS] + [" ".join(f"{t:.3f}" for t in r.step_times)])
            lines.append(f"| {r.impl} | {r.model} | {r.precision} | {r.batch} | {r.zero} | {r.round} | {r.steps} | "
                         f"{fmt(r.s_per_step)} | {fmt(r.median_s)} | {fmt(r.samples_per_s)} | "
                         f"{'' if ratio is None else f'{ratio:.2f}x'} | {f'{r.tflops:.3g}' if r.tflops else ''} | "
                         f"{'' if r.mfu is None else f'{100 * r.mfu:.1f}%'} | {r.threads or ''} | "
                         f"{fmt(r.data_wait_s, 3) if r.impl == 'open_clip' else '-'} | {r.load} | "
                         f"{r.error.replace('|', '/')[:160]} |")
    md.write_text("\n".join(lines) + "\n")
    return md, csv_path


def table_notes(a, hw: str, models: list[str]) -> list[str]:
    import deepspeed
    import open_clip
    import torch

    return [
        f"Machine: {hw}; torch {torch.__version__}, deepspeed {deepspeed.__version__}, open_clip "
        f"{open_clip.__version__}; 1-min load average {os.getloadavg()[0]:.1f} at the end (per row: start->end; "
        "other processes share the cores, so CPU numbers are indicative).",
        f"{a.rounds} rounds; in each, every side runs once in a fresh child process (the order alternates: ours "
        "first in even rounds, open_clip first in odd ones), with the same environment and thread settings "
        f"({'OMP_NUM_THREADS=' + str(a.threads) if a.threads else 'torch default threads'}; the `threads` column is "
        "torch.get_num_threads() inside each child). Ratio per round = our samples/s over open_clip's in that round; "
        "the summary gives the median over rounds and the min-max spread.",
        f"Each run: {a.warmup} warm-up steps, then {a.steps} timed optimizer steps; samples/s = batch x steps / "
        "timed seconds; s/step is the mean, 'median s' the median step.",
        f"medvlp: `create_engine` (DeepSpeed ZeRO {a.zero}, one process) + `build_model` + `ContrastiveLoss` "
        f"(backend {a.loss_backend}) with its default speed settings (train.memory_format=auto: channels_last image "
        "batches for ResNet towers; train.keep_host_memory=true: freed memory reused, not page-faulted back; fused "
        "torch AdamW); a row 'medvlp [k=v ...]' is the same with those config overrides. Stepped by the public "
        "`Trainer.train_step`, on one pre-made batch already on "
        "the device (random images of the model's size, random BPE captions): no data loading. bf16 = DeepSpeed "
        "bf16 engine on GPU, bf16 autocast around the forward on CPU (the train loop's meaning of "
        "train.precision=bf16). AdamW (torch), grad clip 1.0.",
        "open_clip: `python -m open_clip_train.main --dataset-type synthetic --model M --batch-size B --device D "
        f"--precision P --workers {a.openclip_workers} --train-num-samples N --epochs 1 --log-every-n-steps 1 "
        "--logs DIR --save-frequency 0 --report-to '' --grad-clip-norm 1.0` (bf16 = amp_bf16 autocast; no "
        "pretrained weights); step time = its 'Batch (t)' log lines. Its synthetic data set preprocesses one black "
        f"PIL image per sample in {a.openclip_workers} DataLoader worker(s) that prefetch during the step; "
        "'data wait s' is the mean time its step waited for them (included in its s/step).",
        "TFLOP/s = medvlp.pretrain.model.flops_per_sample (3 x forward matmul/conv FLOPs) x samples/s, the same network on "
        "both sides" + ("; MFU over the GPU's dense bf16 peak." if a.cuda else "; MFU is GPU-only."),
        f"Models: {', '.join(models)}; `vs open_clip` = our samples/s over open_clip's at the same model and "
        "precision.",
    ]


# ------------------------------------------------------------------------------------------------ CLI
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="comma list of registry models (CPU: RN50; GPU: ViT-B-16,RN50)")
    ap.add_argument("--batch", type=int, default=None, help="batch per step (CPU 32, GPU 256)")
    ap.add_argument("--steps", type=int, default=None, help="timed optimizer steps per run (CPU 5, GPU 10)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps before them (CPU 1, GPU 2)")
    ap.add_argument("--rounds", type=int, default=None, help="ABAB rounds: each side runs once per round (CPU 3, GPU 2)")
    ap.add_argument("--variant", action="append", default=[],
                    help="an extra side of ours with these dotted config overrides (space-separated), measured "
                         "every round: e.g. 'train.memory_format=contiguous' shows what NHWC buys")
    ap.add_argument("--precision", default=None, help="comma list of fp32,bf16 (CPU: fp32,bf16; GPU: bf16)")
    ap.add_argument("--zero", type=int, default=0, choices=(0, 1, 2, 3), help="our DeepSpeed ZeRO stage")
    ap.add_argument("--loss-backend", default="auto", help="our loss.backend (torch|chunked|triton|auto)")
    ap.add_argument("--openclip-workers", type=int, default=None, help="their DataLoader workers (CPU 1, GPU 8)")
    ap.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS for both sides (0 = torch default)")
    ap.add_argument("--skip-openclip", action="store_true", help="measure ours only")
    ap.add_argument("--quick", action="store_true", help="smoke: debug model, batch 8, 3 steps (1 warm-up)")
    ap.add_argument("--no-cudnn-benchmark", action="store_true",
                    help="ours without cudnn.benchmark/TF32 (open_clip_train always sets them on CUDA)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=1800, help="seconds allowed per row")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--child-ours", default="", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child_ours:
        return a
    import torch

    a.cuda = torch.cuda.is_available()
    quick = dict(model="debug", batch=8, steps=3, warmup=1, precision="fp32", rounds=1)
    gpu = dict(model="ViT-B-16,RN50", batch=256, steps=10, warmup=2, precision="bf16", openclip_workers=8, rounds=2)
    cpu = dict(model="RN50", batch=32, steps=5, warmup=1, precision="fp32,bf16", openclip_workers=1, rounds=3)
    for k, v in (gpu if a.cuda else cpu).items():
        if getattr(a, k) is None:
            setattr(a, k, quick.get(k, v) if a.quick else v)
    a.models = [m for m in a.model.split(",") if m]
    a.precisions = [p for p in a.precision.split(",") if p]
    for p in a.precisions:
        if p not in OPENCLIP_PRECISION:
            raise SystemExit(f"--precision: {p!r} is not one of {', '.join(OPENCLIP_PRECISION)}")
    for v in a.variant:
        try:
            from medvlp.launch.config import apply_overrides
            from medvlp.pretrain.config import PretrainConfig
            from medvlp.pretrain.configtree import build

            build(PretrainConfig, apply_overrides({"train": {"out_dir": "x"}}, v.split()))
        except Exception as e:  # noqa: BLE001 - any bad override: say which, before minutes of measuring
            raise SystemExit(f"--variant {v!r}: {e}") from e
    if a.steps < 1 or a.warmup < 0 or a.batch < 2 or a.rounds < 1:
        raise SystemExit(f"--steps and --rounds must be >= 1, --warmup >= 0, --batch >= 2 (got {a.steps}, "
                         f"{a.rounds}, {a.warmup}, {a.batch})")
    return a


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    if a.child_ours:
        print(RESULT_TAG + json.dumps(run_ours(json.loads(a.child_ours))), flush=True)
        return
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    if a.threads:
        env["OMP_NUM_THREADS"] = str(a.threads)
    tag, hw = hardware(a.cuda)
    rows: list[Row] = []
    for model in a.models:
        for prec in a.precisions:
            for rnd in range(a.rounds):  # ABAB...: the side that goes first alternates, so drifts in load hit both
                sides = [("medvlp" + (f" [{v}]" if v else ""), lambda m, p, e, v=v: measure_ours(a, m, p, e, v))
                         for v in ["", *a.variant]]
                if not a.skip_openclip:
                    sides.append(("open_clip", lambda m, p, e: measure_openclip(a, m, p, e)))
                for name, fn in (sides if rnd % 2 == 0 else sides[::-1]):
                    print(f"[round {rnd + 1}/{a.rounds}] {name} {model} {prec} batch {a.batch}: "
                          f"{a.warmup} + {a.steps} steps ...", flush=True)
                    r = fn(model, prec, env)
                    r.round = rnd
                    rows.append(r)
                    print(f"  -> {r.samples_per_s:.2f} samples/s, {r.s_per_step:.3f} s/step, threads {r.threads}, "
                          f"load {r.load} {r.error}", flush=True)
                    add_flops(rows, a.cuda)  # the table is rewritten after every run: a cut-short run keeps its rows
                    md, csv_path = write_tables(rows, a, table_notes(a, hw, a.models), Path(a.out), tag)
    print(md.read_text())
    print(f"wrote {md} and {csv_path}")


if __name__ == "__main__":
    main()
