"""Build-rate benchmark: a manifest of synthetic radiograph-sized PNGs -> shards, for several worker counts.

Writes a dated, hardware-named table to benchmarks/results/ (never run by tests). Example:
    .venv/bin/python benchmarks/bench_build.py --n 64 --side 1024 --workers 1 2
Numbers: samples/s and source MB/s of a cold build, and the time of an idempotent rerun (all shards reused).
"""
from __future__ import annotations

import argparse
import csv
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
from data_shards.build import build_shards  # noqa: E402


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=64, help="images")
    ap.add_argument("--side", type=int, default=1024, help="source image side")
    ap.add_argument("--bits", type=int, default=16, choices=[8, 16])
    ap.add_argument("--image-size", type=int, default=512, help="stored longer side")
    ap.add_argument("--maxcount", type=int, default=16, help="samples per shard")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--results", default=str(Path(__file__).parent / "results"))
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench_build_"))
    try:
        man = make_corpus(tmp, a.n, a.side, a.bits)
        src_mb = sum(p.stat().st_size for p in tmp.glob("*.png")) / 2**20
        lines = []
        for w in a.workers:
            out = tmp / f"out{w}"
            t0 = time.perf_counter()
            doc = build_shards(man, out, workers=w, maxcount=a.maxcount, image_size=a.image_size, progress=False)
            cold = time.perf_counter() - t0
            t0 = time.perf_counter()
            build_shards(man, out, workers=w, maxcount=a.maxcount, image_size=a.image_size, progress=False)
            rerun = time.perf_counter() - t0
            out_mb = sum(sh["bytes"] for sh in doc["shards"]) / 2**20
            lines.append(f"| {w} | {a.n} | {cold:.2f} | {a.n / cold:.1f} | {src_mb / cold:.1f} | {out_mb:.1f} | "
                         f"{rerun:.2f} |")
            print(lines[-1], flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    host = f"{platform.machine()}-{os.cpu_count()}cpu"
    stamp = dt.date.today().isoformat()
    path = Path(a.results) / f"build_{stamp}_{host}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    head = (f"# shard build rate, {stamp}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs\n\n"
            f"{a.n} PNGs {a.side}x{a.side} {a.bits}-bit ({src_mb:.1f} MB) -> longer side {a.image_size}, "
            f"{a.maxcount} per shard\n\n| workers | samples | cold s | samples/s | source MB/s | shards MB | "
            f"rerun s |\n|---|---|---|---|---|---|---|\n")
    path.write_text(head + "\n".join(lines) + "\n")
    print(f"-> {path}")


if __name__ == "__main__":
    main()
