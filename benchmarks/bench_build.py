"""Build-rate benchmark: a manifest of synthetic radiograph-sized PNGs -> shards, for several worker counts.

Writes a dated, hardware-named table to benchmarks/results/ (never run by tests). Example:
    .venv/bin/python benchmarks/bench_build.py --n 64 --side 1024 --workers 1 2 --rounds 2
Numbers: samples/s and source MB/s of a cold build, the time of an idempotent rerun (all shards reused), and
beside them a bare PIL loop on the same files (decode -> the builder's resize -> PNG encode, one process, no
manifest, tar, hashes or sidecars), so the builder's own overhead shows; N-worker scaling = rate_N / (N·rate_1).
Rounds alternate bare and each worker count (ABAB...) and the table gives medians, so a load change on a shared
machine hits every row alike. The workers' fork server (one interpreter importing the builder) is started once
before the rounds and its start-up is reported on its own line.
"""
from __future__ import annotations

import argparse
import csv
import io
import statistics
import datetime as dt
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.hw import cpu_model  # noqa: E402
from medvlp.data_shards.build import pool_context, build_shards  # noqa: E402


def make_corpus(root: Path, n: int, side: int, bits: int) -> Path:
    """n PNGs (smooth anatomy-like gradient + noise, so PNG compresses like a real radiograph) + manifest.csv."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) / side
    base = 0.5 + 0.3 * np.sin(6 * xx) * np.cos(4 * yy)
    top = 65535 if bits == 16 else 255
    rows = []
    for i in range(n):
        img = np.clip(base + rng.normal(0, 0.02, base.shape), 0, 1) * top
        Image.fromarray(img.astype(np.uint16 if bits == 16 else np.uint8)).save(root / f"img{i:05d}.png")
        rows.append({"image": f"img{i:05d}.png", "report": f"Synthetic study {i}. No acute finding.",
                     "patient_id": f"P{i // 2}", "label:nodule": str(i % 2)})
    with open(root / "manifest.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return root / "manifest.csv"


def bare_pil(files: list[Path], image_size: int) -> None:
    """The per-image work with nothing around it: PIL decode, the builder's resize, PNG encode into memory."""
    for path in files:
        with Image.open(path) as im:
            im.load()
            w, h = im.size
            sc = image_size / max(w, h)
            size = (max(1, round(w * sc)), max(1, round(h * sc))) if sc < 1 else (w, h)
            if im.mode.startswith("I"):  # 16-bit: LANCZOS in float32 and round back, as the builder does
                f32 = Image.fromarray(np.asarray(im).astype(np.float32), mode="F")
                arr = np.asarray(f32.resize(size, Image.LANCZOS))
                out = Image.fromarray(np.clip(np.rint(arr), 0, 65535).astype(np.uint16))
            else:
                out = im.resize(size, Image.LANCZOS)
        out.save(io.BytesIO(), format="PNG", compress_level=6)


def start_workers() -> float:
    """Start the build workers' fork server now; returns its start-up seconds (0 where spawn is used)."""
    import multiprocessing.forkserver as fs

    ctx = pool_context()
    if ctx.get_start_method() != "forkserver":
        return 0.0
    t0 = time.perf_counter()
    fs.ensure_running()
    ctx.Process(target=int).start()  # the first fork waits for the server's preload to finish
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=64, help="images")
    ap.add_argument("--side", type=int, default=1024, help="source image side")
    ap.add_argument("--bits", type=int, default=16, choices=[8, 16])
    ap.add_argument("--image-size", type=int, default=512, help="stored longer side")
    ap.add_argument("--maxcount", type=int, default=8, help="samples per shard")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=2, help="ABAB rounds (medians reported)")
    ap.add_argument("--results", default=str(Path(__file__).parent / "results"))
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench_build_"))
    med = statistics.median
    try:
        man = make_corpus(tmp, a.n, a.side, a.bits)
        files = sorted(tmp.glob("*.png"))
        src_mb = sum(p.stat().st_size for p in files) / 2**20
        startup = start_workers() if max(a.workers) > 1 else 0.0
        print(f"worker fork server start-up: {startup:.1f} s", flush=True)
        bare: list[float] = []
        cold: dict[int, list[float]] = {w: [] for w in a.workers}
        rerun: dict[int, list[float]] = {w: [] for w in a.workers}
        out_mb = 0.0
        for r in range(a.rounds):
            order = ["bare", *a.workers] if r % 2 == 0 else [*a.workers, "bare"][::-1]
            for what in order:
                if what == "bare":
                    t0 = time.perf_counter()
                    bare_pil(files, a.image_size)
                    bare.append(time.perf_counter() - t0)
                    print(f"round {r}: bare PIL {a.n / bare[-1]:.2f} samples/s", flush=True)
                    continue
                w = int(what)
                out = tmp / f"out{w}_{r}"
                t0 = time.perf_counter()
                doc = build_shards(man, out, workers=w, maxcount=a.maxcount, image_size=a.image_size, progress=False)
                cold[w].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                build_shards(man, out, workers=w, maxcount=a.maxcount, image_size=a.image_size, progress=False)
                rerun[w].append(time.perf_counter() - t0)
                out_mb = sum(sh["bytes"] for sh in doc["shards"]) / 2**20
                shutil.rmtree(out, ignore_errors=True)
                print(f"round {r}: {w} worker(s) {a.n / cold[w][-1]:.2f} samples/s", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    bare_rate = a.n / med(bare)
    rate1 = a.n / med(cold[min(a.workers)]) / min(a.workers)
    lines = [f"| bare PIL loop (1 process) | {med(bare):.2f} | {bare_rate:.2f} | {src_mb / med(bare):.1f} "
             "| — | — | — | — |"]
    for w in a.workers:
        c, rate = med(cold[w]), a.n / med(cold[w])
        lines.append(f"| builder, {w} worker{'s' if w > 1 else ''} | {c:.2f} | {rate:.2f} | {src_mb / c:.1f} | "
                     f"{rate / (w * rate1):.2f} | {bare_rate / rate * w:.2f} | {out_mb:.1f} | {med(rerun[w]):.2f} |")
    print("\n".join(lines))
    cpu = cpu_model()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    host = f"{platform.machine()}-{cores}cpu"
    stamp = dt.date.today().isoformat()
    path = Path(a.results) / f"build_{stamp}_{host}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        load = "/".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        load = "n/a"
    head = (f"# shard build rate, {stamp}, {cpu}, {cores} CPUs\n\n"
            f"{a.n} PNGs {a.side}x{a.side} {a.bits}-bit ({src_mb:.1f} MB) -> longer side {a.image_size}, "
            f"{a.maxcount} per shard; median of {a.rounds} rounds (bare and builds alternating). "
            f"Load average at the end (1/5/15 min): {load}. Worker fork server start-up (once per build "
            f"process, not in the times below): {startup:.1f} s.\n\n"
            f"Scaling = rate_N / (N x the 1-worker rate); builder/bare per worker = the bare loop's rate over the "
            f"builder's rate per worker.\n\n"
            f"| what | cold s | samples/s | source MB/s | scaling | builder/bare per worker | shards MB | rerun s |\n"
            f"|---|---|---|---|---|---|---|---|\n")
    path.write_text(head + "\n".join(lines) + "\n")
    print(f"-> {path}")


if __name__ == "__main__":
    main()
