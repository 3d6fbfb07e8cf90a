"""Streaming throughput: samples/s (total and per worker) decoding + transforming 224x224 RGB samples, for
DataLoader workers 0, 1, 2 (0 = in the main process), in train mode (decode + augmentation) and eval mode
(decode + resize/centre crop); plus the offline build rate (`data_shards.build.build_shards`) when present.

    .venv/bin/python benchmarks/bench_stream.py [--n 2000] [--size 224] [--workers 0 1 2] [--batch-size 32]

Writes benchmarks/results/stream-<date>-<hw>.md. Timing starts at the first batch of each run (worker start-up
is reported separately), so the rate is the steady state an epoch sees.
"""
from __future__ import annotations

import argparse
import csv
import datetime as dt
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.hw import cpu_model  # noqa: E402
from data_shards.config import DataConfig  # noqa: E402
from data_shards.schema import Sample  # noqa: E402
from data_shards.stream import make_loader  # noqa: E402
from data_shards.writer import write_index, write_shards  # noqa: E402


def tissue_like(rng: np.random.Generator, size: int) -> np.ndarray:
    """uint8 (size, size, 3): smooth colour blobs plus fine noise, so PNGs compress like real patches."""
    low = rng.random((size // 16, size // 16, 3)).astype(np.float32)
    img = np.asarray(Image.fromarray((low * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC), np.float32)
    img += rng.normal(0, 12, img.shape)
    return img.clip(0, 255).astype(np.uint8)


def make_corpus(root: Path, n: int, size: int, seed: int = 0) -> tuple[Path, Path]:
    """n PNG files + a CSV manifest (for the build rate) and the same samples as shards (for streaming)."""
    rng = np.random.default_rng(seed)
    img_dir, shard_dir = root / "png", root / "shards"
    img_dir.mkdir(parents=True)
    samples = []
    with open(root / "manifest.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "report", "patient_id", "modality", "label:tumor"])
        for i in range(n):
            img = tissue_like(rng, size)
            Image.fromarray(img).save(img_dir / f"p{i:05d}.png")
            w.writerow([f"png/p{i:05d}.png", f"patch {i}", f"pt{i}", "patho", i % 2])
            samples.append(Sample(key=f"bench/p{i:05d}", text=f"patch {i}", image=img, labels={"tumor": i % 2},
                                  meta={"split": "train", "modality": "patho"}))
    write_index(shard_dir, write_shards(samples, shard_dir, maxcount=100), "patho", ["tumor"], command="bench")
    return root / "manifest.csv", shard_dir


def stream_rate(shard_dir: Path, n: int, size: int, workers: int, batch_size: int, train: bool) -> dict:
    cfg = DataConfig(train_shards=str(shard_dir), modality="patho", image_size=size, batch_size=batch_size,
                     workers=workers, samples_per_epoch=n, shuffle_buffer=256, seed=0)
    t0 = time.perf_counter()
    it = iter(make_loader(cfg, train=train))
    first = next(it)
    t1 = time.perf_counter()
    rest = sum(len(b["key"]) for b in it)
    t2 = time.perf_counter()
    rate = rest / (t2 - t1)
    return {"startup_s": t1 - t0, "rate": rate, "per_worker": rate / max(workers, 1), "n": rest + len(first["key"])}


def build_rate(manifest: Path, root: Path, size: int, workers: int) -> float | None:
    try:
        from data_shards.build import build_shards
    except ImportError:
        return None
    out = root / f"built-w{workers}-{time.monotonic_ns()}"  # fresh dir: the build reuses finished shards
    t0 = time.perf_counter()
    idx = build_shards(str(manifest), str(out), workers=workers, maxcount=200, image_size=size, progress=False,
                       modality="patho", command="bench")
    return idx["num_samples"] / (time.perf_counter() - t0)


def hardware() -> str:
    cpu = cpu_model()
    short = re.sub(r"[^a-z0-9]+", "-", re.sub(r"\(.*?\)|cpu|@.*", "", cpu.lower())).strip("-")[:32]
    return f"{short}-{os.cpu_count()}c", cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000, help="samples in the temporary corpus")
    ap.add_argument("--size", type=int, default=224, help="image side (stored and streamed)")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="DataLoader worker counts")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--no-build", action="store_true", help="skip the build-rate column")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    a = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    tag, cpu = hardware()
    load0 = os.getloadavg()[0]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_stream_") as tmp:
        t0 = time.perf_counter()
        manifest, shard_dir = make_corpus(Path(tmp), a.n, a.size)
        print(f"corpus: {a.n} x {a.size}^2 RGB in {time.perf_counter() - t0:.1f}s")
        for w in a.workers:
            tr = stream_rate(shard_dir, a.n, a.size, w, a.batch_size, train=True)
            ev = stream_rate(shard_dir, a.n, a.size, w, a.batch_size, train=False)
            br = None if a.no_build else build_rate(manifest, Path(tmp), a.size, max(w, 1))
            rows.append((w, tr, ev, br))
            print(f"workers={w}: train {tr['rate']:.0f}/s ({tr['per_worker']:.0f}/s/worker), "
                  f"eval {ev['rate']:.0f}/s, start-up {tr['startup_s']:.2f}s, build {br and round(br)}/s")
    date = dt.date.today().isoformat()
    lines = [f"# Streaming throughput, {date}, {tag}", "",
             f"CPU: {cpu} ({os.cpu_count()} logical cores visible); 1-min load average {load0:.1f} at start, "
             f"{os.getloadavg()[0]:.1f} at end (other processes share the cores: workers > cores cannot scale).",
             f"Corpus: {a.n} RGB PNG {a.size}x{a.size} (smooth colour + noise), 100 samples/shard, batch "
             f"{a.batch_size}, patho transforms. Rates exclude the first batch; start-up = time to it.",
             "Build: `build_shards` from PNG files + CSV, `max(workers, 1)` processes (empty = not available).", "",
             "| workers | train samples/s | train /worker | eval samples/s | eval /worker | start-up s | build samples/s |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for w, tr, ev, br in rows:
        lines.append(f"| {w} | {tr['rate']:.0f} | {tr['per_worker']:.0f} | {ev['rate']:.0f} | "
                     f"{ev['rate'] / max(w, 1):.0f} | {tr['startup_s']:.2f} | {'' if br is None else f'{br:.0f}'} |")
    out = Path(a.out) / f"stream-{date}-{tag}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines[6:]))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
