"""Streaming throughput: samples/s (total and per worker) decoding + transforming 224x224 RGB samples, for
DataLoader workers 0, 1, 2 (0 = in the main process), in train mode (decode + augmentation) and eval mode
(decode + resize/centre crop); plus the offline build rate (`medvlp.data_shards.build.build_shards`) when present.

    .venv/bin/python benchmarks/bench_stream.py [--n 2000] [--size 224] [--workers 0 1 2] [--batch-size 32]
    .venv/bin/python benchmarks/bench_stream.py --recipes          # every pretraining recipe at its own size
    .venv/bin/python benchmarks/bench_stream.py --recipes debug rn50-cxr

    .venv/bin/python benchmarks/bench_stream.py --feed [--feed-n 512 --rounds 3]

Writes benchmarks/results/stream-<date>-<hw>.md. Timing starts at the first batch of each run (worker start-up
is reported separately), so the rate is the steady state an epoch sees.

`--recipes` checks that streaming keeps up with training for each pretraining recipe (medvlp/launch/recipes, no `kind`):
a synthetic corpus of the recipe's modality at its stored size (2D: data.image_size; CT: the side of
data.volume_size), streamed through the recipe's own data settings (transforms, augmentation, volume size) by ONE
DataLoader worker; beside it the recipe model's training rate in one process on this machine (`Trainer.train_step`
on a pre-made batch, fp32, ZeRO 0), and the ratio streaming-per-worker / training (target >= 2). For GPU jobs it
also prints the rate one GPU would train at (`medvlp.launch.plan` defaults: H100 dense bf16 peak x 40% MFU) and the ratio
of the recipe's `data.workers` streaming against it. Writes stream-recipes-<date>-<hw>.md.
"""
from __future__ import annotations

import argparse
import csv
import math
import datetime as dt
import os
import random
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.hw import cpu_model  # noqa: E402
from medvlp.data_shards.config import DataConfig  # noqa: E402
from medvlp.data_shards.schema import Sample  # noqa: E402
from medvlp.data_shards.stream import make_loader  # noqa: E402
from medvlp.data_shards.writer import write_index, write_shards  # noqa: E402


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
        from medvlp.data_shards.build import build_shards
    except ImportError:
        return None
    out = root / f"built-w{workers}-{time.monotonic_ns()}"  # fresh dir: the build reuses finished shards
    t0 = time.perf_counter()
    idx = build_shards(str(manifest), str(out), workers=workers, maxcount=200, image_size=size, progress=False,
                       modality="patho", command="bench")
    return idx["num_samples"] / (time.perf_counter() - t0)


def _recipe_docs(names: list[str]) -> list[tuple[str, object]]:
    """(name, PretrainConfig) of the chosen recipes (all pretraining recipes when `names` is empty)."""
    from medvlp.launch.config import list_recipes, load_config, load_recipe_dict

    from medvlp.pretrain.configtree import ConfigError

    out = []
    for name in names or list_recipes():
        try:
            kind = load_recipe_dict(name).get("kind")
        except ConfigError as e:
            raise SystemExit(f"--recipes: {e}") from e
        if kind not in (None, "pretrain"):
            if names:
                raise SystemExit(f"--recipes: {name!r} is a fine-tune recipe; only pretraining recipes stream "
                                 "image-text pairs")
            continue
        out.append((name, load_config(name)))
    return out


def _stored_size(data) -> int:
    """The side a synthetic corpus is written at so the recipe's loader sees its real input size."""
    return int(data.volume_size[-1]) if data.modality == "ct" and data.volume_size else int(data.image_size)


def train_rate(name: str, batch: int, steps: int, tmp: Path, threads: int) -> float:
    """Samples/s of recipe `name`'s model in one process with `threads` torch threads: Trainer.train_step on one
    pre-made batch (no loading), fp32, ZeRO 0."""
    import torch

    from benchmarks.bench_pretrain import _SameBatch, synthetic_batch
    from medvlp.launch.config import load_config
    from medvlp.pretrain.train import Trainer

    cfg = load_config(name, [f"data.batch_size={batch}", f"data.train_shards={tmp}", f"train.steps={steps + 1}",
                             "train.zero_stage=0", "train.precision=fp32", "train.deepspeed_config=''",
                             "train.grad_accum=1", f"train.out_dir={tmp / 'unused-out'}", "tracking.enabled=false"])
    trainer = Trainer(cfg, progress=False)
    b = synthetic_batch(trainer.model, batch, trainer.device, 0)
    if trainer.model.image_kind == "3d":  # the recipe's volume size, which the loader resizes to, not the model's
        shape = b.pop("image").shape[:2] + tuple(cfg.data.volume_size or trainer.model.image_size)
        b = {"volume": torch.randn(shape), **b}
    trainer.batches = _SameBatch(b)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        trainer.train_step()  # warm-up
        t0 = time.perf_counter()
        for _ in range(steps):
            trainer.train_step()
        return batch * steps / (time.perf_counter() - t0)
    finally:
        torch.set_num_threads(before)


def gpu_rate(model: str) -> float:
    """Samples/s one GPU trains `model` at, by the planner's defaults (peak x MFU over training FLOPs)."""
    from medvlp.launch.plan import Hardware
    from medvlp.pretrain.model import flops_per_sample

    hw = Hardware()
    return hw.peak_tflops * 1e12 * hw.mfu / flops_per_sample(model)


def recipe_check(a) -> None:
    from medvlp.data_shards.synth import synth_to_shards
    from medvlp.pretrain.configtree import replace
    from medvlp.pretrain.model import flops_per_sample

    tag, cpu = hardware()
    load0 = os.getloadavg()[0]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_stream_recipes_") as tmp:
        for name, cfg in _recipe_docs(a.recipes):
            data, size = cfg.data, _stored_size(cfg.data)
            shards = Path(tmp) / f"{data.modality}-{size}"
            if not shards.exists():
                t0 = time.perf_counter()
                synth_to_shards(shards, data.modality, a.recipe_n, seed=0, shard_size=64, size=size)
                print(f"corpus {shards.name}: {a.recipe_n} samples in {time.perf_counter() - t0:.1f}s", flush=True)
            dcfg = replace(data, train_shards=str(shards), workers=1, samples_per_epoch=a.recipe_n,
                           batch_size=min(data.batch_size, a.batch_size), shuffle_buffer=64, seed=0)
            t0 = time.perf_counter()
            it = iter(make_loader(dcfg, train=True))
            first = next(it)
            t1 = time.perf_counter()
            rest = sum(len(b["key"]) for b in it)
            stream = rest / (time.perf_counter() - t1)
            tb = min(data.batch_size, a.train_batch)
            train = train_rate(name, tb, a.train_steps, Path(tmp), a.train_threads or os.cpu_count())
            # GPU recipes only, and only models big enough for the planner's MFU to mean something (>= 1 GFLOP/sample)
            gpu = gpu_rate(cfg.model.name) if data.workers > 0 and flops_per_sample(cfg.model.name) >= 1e9 else None
            rows.append({"recipe": name, "model": cfg.model.name, "modality": data.modality,
                         "input": "x".join(map(str, data.volume_size)) if data.modality == "ct" and data.volume_size
                         else f"{data.image_size}x{data.image_size}", "stream": stream, "startup": t1 - t0,
                         "train": train, "train_batch": tb, "ratio": stream / train, "workers": data.workers,
                         "gpu": gpu, "gpu_ratio": gpu and stream * data.workers / gpu,
                         "gpu_workers": gpu and math.ceil(2 * gpu / stream), "n": rest + len(first["key"])})
            r = rows[-1]
            print(f"{name}: stream {stream:.1f}/s per worker, train {train:.2f}/s -> {r['ratio']:.1f}x"
                  + (f"; H100 estimate {gpu:.0f}/s vs {data.workers} workers -> {r['gpu_ratio']:.2f}x" if gpu else ""),
                  flush=True)
    date = dt.date.today().isoformat()
    lines = [f"# Streaming against training, per pretraining recipe, {date}, {tag}", "",
             f"CPU: {cpu} ({os.cpu_count()} logical cores); 1-min load average {load0:.1f} at start, "
             f"{os.getloadavg()[0]:.1f} at end; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}.",
             f"Streaming: a synthetic corpus of the recipe's modality written at its input size ({a.recipe_n} "
             "samples, 64 per shard), read by `medvlp.data_shards.stream.make_loader` with the recipe's data settings and "
             f"ONE worker, train mode (augmentation as the recipe sets it), batch min(recipe, {a.batch_size}); rate "
             "after the first batch.",
             f"Training: the recipe's model, `Trainer.train_step` on one pre-made batch (batch min(recipe, "
             f"{a.train_batch}), fp32, ZeRO 0, one process, {a.train_threads or os.cpu_count()} torch threads, "
             f"{a.train_steps} steps after one warm-up) on this CPU: the rate one training process must be fed at.",
             "GPU (recipes with data.workers > 0, i.e. written for GPU jobs, and models of >= 1 GFLOP per "
             "training sample; '—' otherwise): samples/s one H100 would train at by "
             "`medvlp plan`'s defaults (989 TFLOP/s dense bf16 x 40% MFU over `flops_per_sample`; optimistic for "
             "small models, whose MFU is far lower); 'GPU ratio' = the recipe's data.workers x the per-worker rate "
             "above over it, 'workers for 2x' = the workers per GPU that would stream twice that rate (estimates: "
             "the worker rate is this CPU core's).", "",
             "| recipe | model | modality | input | stream /s per worker | start-up s | train /s (CPU, batch) "
             "| stream / train | recipe workers | H100 train /s (est.) | GPU ratio (est.) | workers for 2x (est.) |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['recipe']} | {r['model']} | {r['modality']} | {r['input']} | {r['stream']:.1f} | "
                     f"{r['startup']:.2f} | {r['train']:.2f} ({r['train_batch']}) | **{r['ratio']:.1f}x** | "
                     f"{r['workers']} | " + (f"{r['gpu']:.0f} | {r['gpu_ratio']:.2f}x | {r['gpu_workers']} |"
                                             if r["gpu"] else "— | — | — |"))
    out = Path(a.out) / f"stream-recipes-{date}-{tag}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {out}")


# ----------------------------------------------------------------------------------------- --feed
FEED_SIDES = ("reference / PNG-1024", "reference / JPEG-256", "fast / JPEG-256", "open_clip / JPEG-256")


def feed_corpus(root: Path, modality: str, n: int, unique: int) -> dict[str, Path]:
    """The same `unique` synthetic images at 1024^2 (repeated to n samples under their own keys) as PNG-1024 shards
    (what the builder stores at --image-size 1024 today) and as JPEG-256 shards (--resize shortest --image-size 256
    --image-format jpeg --jpeg-quality 90: the builder's own resize_shortest and encoder)."""
    from medvlp.data_shards.build import resize_shortest
    from medvlp.data_shards.synth import synth_samples

    base = list(synth_samples(modality, unique, seed=0, size=256))
    rng = np.random.default_rng(0)
    big = []  # 1024^2: the synthetic image upsampled, with sensor-like noise so the PNG compresses like a scan
    for b in base:
        up = np.asarray(Image.fromarray(b.image).resize((1024, 1024), Image.BICUBIC), np.float32)
        big.append((up + rng.normal(0, 3, up.shape)).clip(0, 255).astype(np.uint8))
    out = {}
    for tag, q in (("png1024", 0), ("jpeg256", 90)):
        samples = []
        for i in range(n):
            b = base[i % unique]
            img = big[i % unique] if q == 0 else resize_shortest(big[i % unique], 256)
            samples.append(Sample(key=f"bench/{i:05d}", text=b.text, image=img, labels=b.labels,
                                  meta={"split": "train", "modality": modality}, jpeg_quality=q))
        d = root / f"{modality}-{tag}"
        write_index(d, write_shards(samples, d, maxcount=128), modality, sorted(base[0].labels), command="bench")
        out[tag] = d
    return out


def _cpu_s() -> float:
    return time.process_time()


def feed_side(side: str, data, shards: dict[str, Path], n: int, batch: int) -> dict:
    """One pass of `n` samples through one side in this process (workers=0), after one warm-up batch: wall and
    CPU seconds; for the fast path also the CPU seconds of the batch-side float / jitter / normalisation (on a
    GPU job that runs on the GPU)."""
    from medvlp.pretrain.configtree import replace

    pipe, fmt = side.split(" / ")
    url = shards["png1024" if fmt == "PNG-1024" else "jpeg256"]
    if pipe == "open_clip":
        return open_clip_side(url, data, n, batch)
    cfg = replace(data, train_shards=str(url), workers=0, samples_per_epoch=n + batch, batch_size=batch,
                  shuffle_buffer=min(data.shuffle_buffer, 256), seed=0,
                  pipeline="fast" if pipe == "fast" else "reference")
    loader = make_loader(cfg, train=True)
    finish_s = [0.0]
    if loader.finish is not None:
        inner = loader.finish

        def timed(b):
            t = _cpu_s()
            out = inner(b)
            finish_s[0] += _cpu_s() - t
            return out
        loader.finish = timed
    it = iter(loader)
    next(it)
    finish_s[0] = 0.0
    w0, c0, k = time.perf_counter(), _cpu_s(), 0
    for b in it:
        k += len(b["key"])
    return {"n": k, "wall": time.perf_counter() - w0, "cpu": _cpu_s() - c0, "finish_cpu": finish_s[0]}


def open_clip_side(url: Path, data, n: int, batch: int) -> dict:
    """open_clip_train's webdataset pipeline (its `get_wds_dataset` stages without the tokenizer: shards ->
    tar samples -> shuffle -> decode("pilrgb") -> rename image -> its `image_transform` -> batch), training
    transform at the recipe's size; the JPEG-256 shards."""
    import open_clip
    import webdataset as wds

    pre = open_clip.image_transform(data.image_size, is_train=True)
    urls = sorted(str(p) for p in Path(url).glob("*.tar"))
    pipeline = wds.DataPipeline(
        wds.ResampledShards(urls, seed=0, deterministic=True), wds.tarfile_to_samples(),
        wds.shuffle(min(data.shuffle_buffer, 256), min(data.shuffle_buffer, 256), rng=random.Random(0)),
        wds.decode("pilrgb"), wds.rename(image="jpg;png;jpeg;webp;img.jpg", text="txt"),
        wds.map_dict(image=pre), wds.to_tuple("image", "text"), wds.batched(batch, partial=False))
    it = iter(pipeline)
    next(it)
    w0, c0, k = time.perf_counter(), _cpu_s(), 0
    while k < n:
        k += len(next(it)[0])
    return {"n": k, "wall": time.perf_counter() - w0, "cpu": _cpu_s() - c0, "finish_cpu": 0.0}


def feed_check(a) -> None:
    """Per-core samples/s of the four sides for rn50-cxr and vitb16-patho, interleaved A B C D per round."""
    import statistics

    import torch

    from medvlp.launch.config import load_config

    torch.set_num_threads(1)
    tag, cpu = hardware()
    load0 = os.getloadavg()[0]
    loads = [load0]  # 1-min load average before every side: the box may be shared
    results: dict[str, dict[str, list[dict]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench_feed_") as tmp:
        for recipe in a.feed_recipes:
            data = load_config(recipe).data
            t0 = time.perf_counter()
            shards = feed_corpus(Path(tmp), data.modality, a.feed_n, a.feed_unique)
            print(f"{recipe}: corpus of {a.feed_n} samples ({a.feed_unique} distinct 1024^2 images) in "
                  f"{time.perf_counter() - t0:.0f}s", flush=True)
            results[recipe] = {s: [] for s in FEED_SIDES}
            for r in range(a.rounds):
                for side in FEED_SIDES:
                    loads.append(os.getloadavg()[0])
                    m = feed_side(side, data, shards, a.feed_n, a.batch_size)
                    results[recipe][side].append(m)
                    print(f"  round {r}: {side}: {m['n'] / m['cpu']:.0f}/CPU-s ({m['n'] / m['wall']:.0f}/wall-s)"
                          + (f", batch side {m['finish_cpu']:.2f} CPU s" if m["finish_cpu"] else ""), flush=True)
    date = dt.date.today().isoformat()
    loads.append(os.getloadavg()[0])
    lines = [f"# Feeding a GPU: per-core stream rates, {date}, {tag}", "",
             f"CPU: {cpu} ({os.cpu_count()} logical cores); 1-min load average {load0:.1f} at start, "
             f"{loads[-1]:.1f} at end, {min(loads):.1f}-{max(loads):.1f} (median "
             f"{statistics.median(loads):.1f}) over the {len(loads)} readings taken before each side; "
             f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, torch threads 1.",
             f"Command: `python benchmarks/bench_stream.py --feed --feed-n {a.feed_n} --rounds {a.rounds} "
             f"--feed-unique {a.feed_unique}" + (f" --tag {a.tag}" if a.tag else "") + "`.",
             f"Corpus per recipe: {a.feed_unique} distinct synthetic 1024^2 images of the recipe's modality repeated to "
             f"{a.feed_n} samples, stored as PNG-1024 shards and as JPEG-256 shards (shorter side 256, quality 90). "
             "Every side runs in this one process (no DataLoader worker: one core's work), train mode with the "
             f"recipe's data settings, batch {a.batch_size}, one warm-up batch; sides interleaved per round. "
             "'per core' = samples per CPU second of the process (robust to other jobs on the machine; wall rates "
             "beside them). fast = `data.pipeline=fast`; its batch-side float / jitter / normalisation runs here on "
             "the CPU and is counted in 'per core, all'; 'per core, worker side' leaves it out (on a GPU job it runs "
             "on the GPU). open_clip = its webdataset stages + PIL + `image_transform(is_train=True)`. No side "
             "tokenises text.", "",
             "| recipe | side | per core, all (median, min-max) | per core, worker side | wall samples/s (median) |",
             "|---|---|---:|---:|---:|"]
    summary = {}
    for recipe, sides in results.items():
        for side, ms in sides.items():
            allc = [m["n"] / m["cpu"] for m in ms]
            work = [m["n"] / max(m["cpu"] - m["finish_cpu"], 1e-9) for m in ms]
            wall = [m["n"] / m["wall"] for m in ms]
            summary[(recipe, side)] = (statistics.median(allc), statistics.median(work))
            lines.append(f"| {recipe} | {side} | {statistics.median(allc):.0f} ({min(allc):.0f}-{max(allc):.0f}) | "
                         f"{statistics.median(work):.0f} | {statistics.median(wall):.0f} |")
        fast = [m["n"] / max(m["cpu"] - m["finish_cpu"], 1e-9) for m in sides["fast / JPEG-256"]]
        ocl = [m["n"] / m["cpu"] for m in sides["open_clip / JPEG-256"]]
        ref = [m["n"] / m["cpu"] for m in sides["reference / PNG-1024"]]
        lines.append(f"| {recipe} | fast / open_clip per round (worker side) | "
                     f"{', '.join(f'{f / o:.2f}' for f, o in zip(fast, ocl))} | | |")
        lines.append(f"| {recipe} | fast / reference PNG-1024 per round (worker side) | "
                     f"{', '.join(f'{f / o:.2f}' for f, o in zip(fast, ref))} | | |")
    out = Path(a.out) / f"stream-feed-{date}-{tag}{'-' + a.tag if a.tag else ''}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {out}")


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
    ap.add_argument("--recipes", nargs="*", default=None,
                    help="check streaming against training for these pretraining recipes (none named = all)")
    ap.add_argument("--recipe-n", type=int, default=256, help="samples per recipe corpus")
    ap.add_argument("--train-batch", type=int, default=8, help="largest batch of the training-rate measurement")
    ap.add_argument("--train-steps", type=int, default=2, help="timed training steps per recipe")
    ap.add_argument("--train-threads", type=int, default=0, help="torch threads of the training rate (0 = all cores)")
    ap.add_argument("--feed", action="store_true",
                    help="per-core rates: PNG-1024 vs JPEG-256 shards, reference vs fast path vs open_clip")
    ap.add_argument("--feed-recipes", nargs="+", default=["rn50-cxr", "vitb16-patho"])
    ap.add_argument("--feed-n", type=int, default=512, help="samples per --feed pass")
    ap.add_argument("--feed-unique", type=int, default=16, help="distinct 1024^2 images in the --feed corpus")
    ap.add_argument("--rounds", type=int, default=3, help="--feed: interleaved rounds")
    ap.add_argument("--tag", default="", help="--feed: suffix of the results file name (stream-feed-DATE-HW-TAG.md)")
    a = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if a.feed:
        return feed_check(a)
    if a.recipes is not None:
        return recipe_check(a)
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
