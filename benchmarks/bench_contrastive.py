"""Benchmark the CLIP contrastive loss backends: fwd+bwd time and peak extra memory, one table per run.

    python benchmarks/bench_contrastive.py                       # D=256, N = 4096, 8192, ... until a cap
    python benchmarks/bench_contrastive.py --dims 256,512,768 --n-max 65536 --timeout 300
    python benchmarks/bench_contrastive.py --quick               # N = 4096 only, one repetition
    python benchmarks/bench_contrastive.py --interleave --n 16384 --rounds 5   # naive vs chunked, ABAB in one process

``--interleave`` times the rows alternately in one process (A B A B …, plus a dense 4096³ fp32 matmul each round
as the machine's measured peak), so a load change on a shared machine hits every row alike; it prints each row's
median, min–max spread, GFLOP/s (passes of 2·N²·D over the time) and fraction of the measured matmul peak, and
the chunked/naive ratio per round (median and spread). Writes contrastive-interleave-<date>-<hardware>.md.

Rows: naive torch (materialised logits + F.cross_entropy, the kernels' reference), open_clip's ClipLoss,
``chunked``; on CUDA also ``triton`` and Inf-CL (``inf_cl``, skipped with the reason when not installed).
Each (row, N, D) runs in a fresh subprocess so the peak memory is its own: on CPU the VmHWM (peak RSS) rise
over the inputs, on CUDA torch.cuda.max_memory_allocated over the inputs. N doubles from --n-min until a row
fails, times out, or would pass --mem-cap-gib / --timeout at the next doubling; a row that stops does not
stop the others. Writes benchmarks/results/contrastive-<date>-<hardware>.md and .csv.
"""
from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CPU_ROWS = ("naive", "open_clip", "chunked")
GPU_ROWS = ("naive", "open_clip", "chunked", "triton", "inf_cl")
# Dense bf16 tensor-core peaks (TFLOP/s) for the roofline column; others can pass --peak-tflops.
_BF16_PEAK = {"H100 SXM": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}


def _vm_hwm_bytes() -> int:
    """Peak resident set of this process so far (Linux /proc; ru_maxrss elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _loss_fn(row: str):
    """(features_img, features_txt, scale) -> loss for one benchmark row; raises ImportError with a reason."""
    import torch

    from medvlp.kernels import clip_loss

    if row == "naive":
        return lambda i, t, s: clip_loss(i, t, s, backend="reference")
    if row == "chunked":
        return lambda i, t, s: clip_loss(i, t, s, backend="chunked")
    if row == "triton":
        return lambda i, t, s: clip_loss(i, t, s, backend="triton")
    if row == "open_clip":
        from open_clip.loss import ClipLoss

        fn = ClipLoss()
        return lambda i, t, s: fn(i, t, s)
    if row == "inf_cl":
        try:
            from inf_cl import cal_inf_loss
        except ImportError as exc:
            raise ImportError(f"inf-cl is not installed ({exc}); pip install inf-cl") from exc

        def inf_cl(i, t, s):
            labels = torch.arange(i.shape[0], device=i.device)
            return 0.5 * (cal_inf_loss(i, t, labels=labels, scale=s).mean()
                          + cal_inf_loss(t, i, labels=labels, scale=s).mean())
        return inf_cl
    raise ValueError(f"row: unknown benchmark row {row!r}")


def run_row(row: str, n: int, d: int, reps: int, dtype_name: str, rep_budget_s: float = 1e9) -> dict:
    """Time fwd+bwd of one row in this process; returns the measurement (called in a fresh subprocess)."""
    import torch
    import torch.nn.functional as F

    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    dtype = getattr(torch, dtype_name)
    fn = _loss_fn(row)
    g = torch.Generator(device="cpu").manual_seed(0)
    img = F.normalize(torch.randn(n, d, generator=g), dim=-1).to(dev, dtype).requires_grad_()
    txt = F.normalize(torch.randn(n, d, generator=g), dim=-1).to(dev, dtype).requires_grad_()
    scale = torch.tensor(1 / 0.07, device=dev, requires_grad=True)
    if cuda:
        fn(img, txt, scale).backward()  # compile / autotune outside the timing
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        # A tiny call first loads the BLAS/thread pools, which would otherwise count as the row's memory.
        small = [t.detach()[:64].clone().requires_grad_() for t in (img, txt)]
        fn(small[0], small[1], scale).backward()
        base = _vm_hwm_bytes()
    times = []
    for _ in range(reps):
        if times and sum(times) > rep_budget_s:
            break  # one long repetition is already a stable number
        img.grad = txt.grad = scale.grad = None
        t0 = time.perf_counter()
        fn(img, txt, scale).backward()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() if cuda else _vm_hwm_bytes()) - base
    return {"time_s": statistics.median(times), "reps": len(times), "peak_extra_gib": peak / 2**30}


def matmul_peak_gflops(size: int = 4096, dtype_name: str = "float32") -> tuple[float, float]:
    """(GFLOP per wall s, GFLOP per CPU s) of one dense size³ matmul here, now (the roofline reference; run it
    beside what it normalises)."""
    import torch

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    a = torch.randn(size, size, device=dev, dtype=getattr(torch, dtype_name))
    b = torch.randn(size, size, device=dev, dtype=a.dtype)
    torch.mm(a[:256], b)  # thread pools and BLAS kernels loaded outside the timing
    if dev == "cuda":
        torch.cuda.synchronize()
    t0, c0 = time.perf_counter(), time.process_time()
    torch.mm(a, b)
    if dev == "cuda":
        torch.cuda.synchronize()
    flop = 2 * size ** 3 / 1e9
    return flop / (time.perf_counter() - t0), flop / max(time.process_time() - c0, 1e-9)


def interleave(rows: list[str], n: int, d: int, rounds: int, dtype_name: str, peak_size: int = 4096) -> dict:
    """Rows timed alternately (one fwd+bwd each per round) in this process, with the matmul peak each round."""
    import torch
    import torch.nn.functional as F

    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    dtype = getattr(torch, dtype_name)
    g = torch.Generator(device="cpu").manual_seed(0)
    img = F.normalize(torch.randn(n, d, generator=g), dim=-1).to(dev, dtype).requires_grad_()
    txt = F.normalize(torch.randn(n, d, generator=g), dim=-1).to(dev, dtype).requires_grad_()
    scale = torch.tensor(1 / 0.07, device=dev, requires_grad=True)
    fns = {row: _loss_fn(row) for row in rows}
    for fn in fns.values():  # warm-up on a slice: thread pools, kernels
        small = [t.detach()[:256].clone().requires_grad_() for t in (img, txt)]
        fn(small[0], small[1], scale).backward()
    times: dict[str, list[float]] = {row: [] for row in rows}
    cpu: dict[str, list[float]] = {row: [] for row in rows}
    peaks: list[float] = []
    cpu_peaks: list[float] = []
    for r in range(rounds):
        order = rows if r % 2 == 0 else rows[::-1]  # ABBA…: neither row always runs right after the matmul
        wall_peak, cpu_peak = matmul_peak_gflops(peak_size, dtype_name)
        peaks.append(wall_peak)
        cpu_peaks.append(cpu_peak)
        for row in order:
            img.grad = txt.grad = scale.grad = None
            t0, c0 = time.perf_counter(), time.process_time()
            fns[row](img, txt, scale).backward()
            if cuda:
                torch.cuda.synchronize()
            times[row].append(time.perf_counter() - t0)
            cpu[row].append(time.process_time() - c0)
        print(json.dumps({"round": r, "peak_gflops": round(peaks[-1], 1), "peak_gflop_per_cpu_s": round(cpu_peak, 1),
                          **{row: round(times[row][-1], 3) for row in rows},
                          **{f"{row}_cpu_s": round(cpu[row][-1], 3) for row in rows}}), flush=True)
    return {"times": times, "peaks": peaks, "cpu": cpu, "cpu_peaks": cpu_peaks}


def _interleave_report(res: dict, rows: list[str], n: int, d: int, dtype_name: str, hw: str) -> str:
    times, peaks, cpu, cpu_peaks = res["times"], res["peaks"], res["cpu"], res["cpu_peaks"]
    med = statistics.median
    peak, cpu_peak = med(peaks), med(cpu_peaks)
    lines = [f"# Contrastive loss fwd+bwd, interleaved — {hw}, {dtype_name}, N={n}, D={d}, "
             f"{dt.date.today().isoformat()}", "",
             f"{len(peaks)} rounds, rows alternating in one process (ABBA…); each round also times a dense 4096³ "
             f"matmul: median {peak:.1f} GFLOP/s (min {min(peaks):.1f}, max {max(peaks):.1f}), the peak the "
             f"fractions below use; per CPU second (process time, which other jobs' load disturbs far less than "
             f"wall time) {cpu_peak:.1f} GFLOP. torch threads: {_threads()}. Load average at the end (1/5/15 min): "
             f"{_load()}.", "",
             "| row | passes of 2·N²·D | median (s) | min–max (s) | GFLOP/s | of matmul peak | CPU s (median) "
             "| GFLOP per CPU s | of matmul's |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        t = times[row]
        passes = _pass_count(row, d, dtype_name) or 0
        gf = passes * 2 * n * n * d / med(t) / 1e9
        gfc = passes * 2 * n * n * d / med(cpu[row]) / 1e9
        lines.append(f"| {row} | {passes} | {med(t):.3f} | {min(t):.3f}–{max(t):.3f} | {gf:.1f} | {gf / peak:.0%} "
                     f"| {med(cpu[row]):.3f} | {gfc:.1f} | {gfc / cpu_peak:.0%} |")
    if "naive" in rows:
        lines.append("")
        for row in rows:
            if row == "naive":
                continue
            for what, series in (("wall", times), ("CPU", cpu)):
                ratio = [a / b for a, b in zip(series[row], series["naive"])]
                lines.append(f"{row} / naive, {what} time per round: median {med(ratio):.3f} (min {min(ratio):.3f}, "
                             f"max {max(ratio):.3f}; " + ", ".join(f"{x:.3f}" for x in ratio) + ")  ")
    return "\n".join(lines) + "\n"


def _hardware() -> tuple[str, str, bool]:
    """(slug for file names, description, has CUDA)."""
    import torch

    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-"), name, True
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    model = "cpu"
    try:
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"cpu-{cores}c", f"{model}, {cores} cores", False


def _measure(row, n, d, args) -> dict:
    """One (row, N, D) in a fresh subprocess; status ok | timeout | failed | skipped."""
    cmd = [sys.executable, __file__, "--_row", row, "--_n", str(n), "--_d", str(d), "--_reps", str(args.reps),
           "--rep-budget", str(args.rep_budget),
           "--dtype", args.dtype]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"status": f"timeout > {args.timeout:.0f} s"}
    if proc.returncode != 0:
        err = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"
        return {"status": ("skipped: " if "ImportError" in err or "not installed" in err else "failed: ") + err[:120]}
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]), status="ok")


def _pass_count(row: str, d: int, dtype_name: str):
    import torch

    if row == "triton":
        from medvlp.kernels.contrastive_triton import pass_count

        return pass_count(d, getattr(torch, dtype_name))
    # naive: one matrix and its transpose; open_clip: I·Tᵀ and T·Iᵀ separately (2 forward, 4 backward).
    return {"naive": 3, "open_clip": 6, "chunked": 4}.get(row)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n-min", type=int, default=4096, help="first batch size N")
    p.add_argument("--n-max", type=int, default=65536, help="largest N tried")
    p.add_argument("--dims", default="256", help="comma-separated embedding dims")
    p.add_argument("--rows", default="", help="comma-separated rows (default: all for this hardware)")
    p.add_argument("--timeout", type=float, default=240.0, help="seconds per (row, N, D) subprocess")
    p.add_argument("--mem-cap-gib", type=float, default=8.0, help="stop a row once its peak extra exceeds this")
    p.add_argument("--reps", type=int, default=3, help="timed fwd+bwd repetitions (median reported)")
    p.add_argument("--rep-budget", type=float, default=150.0, help="no further repetitions after this many s")
    p.add_argument("--dtype", default="", help="float32 | bfloat16 (default: fp32 on CPU, bf16 on CUDA)")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="bf16 peak for the roofline column")
    p.add_argument("--quick", action="store_true", help="N = n-min only, one repetition")
    p.add_argument("--interleave", action="store_true", help="rows alternately in one process (see above)")
    p.add_argument("--n", type=int, default=16384, help="N for --interleave")
    p.add_argument("--rounds", type=int, default=5, help="rounds for --interleave")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="output folder")
    p.add_argument("--_row"), p.add_argument("--_n", type=int), p.add_argument("--_d", type=int)
    p.add_argument("--_reps", type=int, default=3)
    args = p.parse_args(argv)
    if args._row:  # child mode: one measurement, one JSON line
        print(json.dumps(run_row(args._row, args._n, args._d, args._reps, args.dtype or "float32", args.rep_budget)))
        return
    slug, hw, cuda = _hardware()
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    if args.interleave:
        rows = args.rows.split(",") if args.rows else ["naive", "chunked"]
        d = int(args.dims.split(",")[0])
        report = _interleave_report(interleave(rows, args.n, d, args.rounds, args.dtype), rows, args.n, d,
                                    args.dtype, hw)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"contrastive-interleave-{dt.date.today().isoformat()}-{slug}-n{args.n}.md"
        path.write_text(report)
        print(report + f"wrote {path}")
        return
    if args.quick:
        args.n_max, args.reps = args.n_min, 1
    rows = args.rows.split(",") if args.rows else list(GPU_ROWS if cuda else CPU_ROWS)
    peak = args.peak_tflops or next((v for k, v in _BF16_PEAK.items() if k in hw), 0.0)
    records = []
    for d in (int(x) for x in args.dims.split(",")):
        for row in rows:
            n = args.n_min
            while n <= args.n_max:
                rec = {"row": row, "N": n, "D": d, **_measure(row, n, d, args)}
                passes = _pass_count(row, d, args.dtype)
                if rec["status"] == "ok" and cuda and peak and passes:
                    rec["roofline"] = passes * 2 * n * n * d / rec["time_s"] / (peak * 1e12)
                records.append(rec)
                print(json.dumps(rec), flush=True)
                if rec["status"] != "ok":
                    break
                # Stop before a doubling whose N² growth would pass a cap (naive memory grows as N²).
                if 4 * rec["peak_extra_gib"] > args.mem_cap_gib or 4 * rec["time_s"] > args.timeout:
                    break
                n *= 2
    _write(records, slug, hw, args, cuda)


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def _load() -> str:
    try:
        return "/".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def _write(records, slug, hw, args, cuda) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"contrastive-{dt.date.today().isoformat()}-{slug}"
    cols = ["row", "N", "D", "status", "time_s", "reps", "peak_extra_gib"] + (["roofline"] if cuda else [])
    with open(f"{stem}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(records)
    mem = "torch.cuda.max_memory_allocated over the inputs" if cuda else "peak RSS (VmHWM) rise over the inputs"
    lines = [f"# Contrastive loss fwd+bwd — {hw}, {args.dtype}, {dt.date.today().isoformat()}", "",
             f"Median of up to {args.reps} fwd+bwd (column reps); extra memory = {mem}; "
             "one fresh process per cell.",
             f"Load average at the end (1/5/15 min): {_load()} — other jobs on the machine slow every row.", "",
             "| row | N | D | fwd+bwd (s) | reps | peak extra (GiB) |" + (" bf16 roofline |" if cuda else ""),
             "|---|---|---|---|---|---|" + ("---|" if cuda else "")]
    for r in records:
        if r["status"] == "ok":
            cells = [f"{r['time_s']:.3f}", str(r["reps"]), f"{r['peak_extra_gib']:.3f}"]
        else:
            cells = [r["status"], "—", "—"]
        if cuda:
            cells.append(f"{r['roofline']:.1%}" if "roofline" in r else "—")
        lines.append(f"| {r['row']} | {r['N']} | {r['D']} | " + " | ".join(cells) + " |")
    Path(f"{stem}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {stem}.md and {stem}.csv")


if __name__ == "__main__":
    main()
