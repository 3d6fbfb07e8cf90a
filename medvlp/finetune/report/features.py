"""Patch shards -> slide-bag shards: the frozen pretrained image tower embeds every patch, and the patches of one slide
become one bag sample (`feats.npy` (n, E) float16 + `coords.npy` (n, 2) int32) that the report stage reads.

    medvlp features extract --checkpoint RUN --shards PATCHES --out DIR [--batch-size 64] [--slide-key slide_id]

* Embedding: `load_pretrained(CKPT)`, the stream's eval view of each patch (`Pretrained.transform`), then
  `encode_image(x, normalize=False)` in batches under `torch.no_grad()`; E = the model's embedding width.
* Slides: patches are grouped by `meta[slide_key]` (default `slide_id`, falling back to `patient_id`), in the
  order they first appear. Coordinates come from `meta.coords` ([x, y]) or `meta.x` / `meta.y`, else the patch's
  position in its slide (i, 0). The slide's labels are the patch labels' maximum, its text the patches' distinct
  texts joined, its split the first patch's split; `meta.class_index` is kept when the patches agree.
* Resumable: each input shard's embeddings are written atomically to `DIR/parts/<shard>.npz` first; a rerun skips
  input shards whose part exists, then (re)writes the slide shards and `index.json` from the parts.
"""
from __future__ import annotations

import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medvlp.data_shards.reader import iter_raw
from medvlp.data_shards.schema import Sample, decode_sample
from medvlp.data_shards.writer import read_index, write_index, write_shards

PARTS = "parts"


def _patch_coords(meta: dict, i: int) -> list[int]:
    if isinstance(meta.get("coords"), (list, tuple)) and len(meta["coords"]) == 2:
        return [int(meta["coords"][0]), int(meta["coords"][1])]
    if "x" in meta and "y" in meta:
        return [int(meta["x"]), int(meta["y"])]
    return [i, 0]


def _embed_shard(url: str, model, view, batch_size: int, slide_key: str, pbar) -> dict[str, Any]:
    rows: list[dict] = []
    feats: list[np.ndarray] = []
    batch: list[torch.Tensor] = []

    def flush() -> None:
        if batch:
            with torch.no_grad():
                emb = model.encode_image(torch.stack(batch), normalize=False)
            feats.append(emb.float().cpu().numpy().astype(np.float16))
            pbar.update(len(batch))
            batch.clear()

    for raw in iter_raw([url]):
        s = decode_sample(raw)
        if s.image is None:
            raise ValueError(f"sample {s.key!r} in {url}: no image (features extract reads patch shards)")
        meta = s.meta
        slide = str(meta.get(slide_key, meta.get("patient_id", s.key)))
        rows.append({"key": s.key, "slide": slide, "split": s.split, "text": s.text, "labels": s.labels,
                     "meta": {k: v for k, v in meta.items() if k in ("dataset", "class_index", "coords", "x", "y")}})
        batch.append(view(s.image))
        if len(batch) >= batch_size:
            flush()
    flush()
    dim = feats[0].shape[1] if feats else 0
    return {"rows": rows, "feats": np.concatenate(feats) if feats else np.zeros((0, dim), np.float16)}


def _save_part(path: Path, part: dict) -> None:
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, feats=part["feats"], rows=np.array(json.dumps(part["rows"])))
    os.replace(tmp, path)


def _load_part(path: Path) -> dict:
    with np.load(path, allow_pickle=False) as z:
        return {"feats": z["feats"], "rows": json.loads(str(z["rows"]))}


def _slides(parts: list[dict]) -> list[Sample]:
    groups: OrderedDict[str, list[tuple[dict, np.ndarray]]] = OrderedDict()
    for part in parts:
        for row, f in zip(part["rows"], part["feats"]):
            groups.setdefault(row["slide"], []).append((row, f))
    out = []
    for slide, items in groups.items():
        rows = [r for r, _ in items]
        feats = np.stack([f for _, f in items]).astype(np.float16)
        coords = np.array([_patch_coords(r["meta"], i) for i, r in enumerate(rows)], dtype=np.int32)
        labels: dict[str, int] = {}
        for r in rows:
            for k, v in r["labels"].items():
                labels[k] = max(labels.get(k, v), v)
        texts = list(dict.fromkeys(r["text"] for r in rows if r["text"]))
        meta = {"dataset": rows[0]["meta"].get("dataset", ""), "modality": "slide", "split": rows[0]["split"],
                "patient_id": slide, "slide_id": slide, "n_patches": len(rows)}
        cls = {r["meta"].get("class_index") for r in rows}
        if len(cls) == 1 and None not in cls:
            meta["class_index"] = cls.pop()
        key = "slide-" + "".join(c if c.isalnum() or c in "-_" else "_" for c in slide)
        out.append(Sample(key=key, text=" ".join(texts), feats=feats, coords=coords, labels=labels, meta=meta))
    return out


def extract_features(checkpoint: str, shards: str, out: str, *, batch_size: int = 64, slide_key: str = "slide_id",
                     slides_per_shard: int = 256, progress: bool = True, command: str | None = None) -> dict:
    """Embed the patches of a shard dir with a frozen pretrained tower; write slide-bag shards (see module doc).
    Returns the written index."""
    from medvlp.pretrain.progress import progress_bar as tqdm  # a bar on a terminal, plain lines off it

    from medvlp.pretrain import load_pretrained

    index = read_index(shards)
    if index.get("modality") in ("slide", "ct"):
        raise ValueError(f"--shards {shards}: modality {index.get('modality')!r} has no 2D patches to embed")
    pre = load_pretrained(checkpoint)
    model = pre.model.eval()
    view = pre.transform(index.get("modality") or pre.modality)
    out_dir = Path(out)
    (out_dir / PARTS).mkdir(parents=True, exist_ok=True)
    names = [sh["name"] for sh in index["shards"]]
    done = {n for n in names if (out_dir / PARTS / f"{n}.npz").is_file()}
    todo_n = sum(sh["count"] for sh in index["shards"] if sh["name"] not in done)
    with tqdm(total=todo_n, disable=not progress, desc="patches", unit="patch", dynamic_ncols=True) as pbar:
        for name in names:
            if name in done:
                continue
            part = _embed_shard(str(Path(shards) / name), model, view, batch_size, slide_key, pbar)
            _save_part(out_dir / PARTS / f"{name}.npz", part)
    parts = [_load_part(out_dir / PARTS / f"{n}.npz") for n in names]
    slides = _slides(parts)
    for old in out_dir.glob("slides-*.tar"):
        old.unlink()
    infos = write_shards(slides, out_dir, prefix="slides", maxcount=slides_per_shard)
    extra = {"features": {"checkpoint": str(checkpoint), "source_shards": str(shards), "dim": int(
        parts[0]["feats"].shape[1]) if parts and len(parts[0]["feats"]) else 0}}
    return write_index(out_dir, infos, "slide", list(index.get("label_names", [])), command=command, extra=extra)
