"""`medvlp localize`: heatmap overlays and boxes for image files from a trained PCAM run.

    medvlp localize --checkpoint RUN IMAGE... --out DIR [--threshold 0.5] [--findings a,b]

RUN is a PCAM fine-tune run folder (`model.safetensors` + `pcam_model.json`) or its `model.safetensors`. Each image
goes through the stream's eval view (`medvlp.data_shards.transforms.image_view`: shorter side resized to the model's input
size, centre crop, normalised); the logit maps are mapped back onto the original image (the crop's outside is
the map's minimum) and normalised to [0, 1] per finding. Written to DIR:

  <stem>_<finding>.png   the image with the heatmap blended in and the thresholded component boxes (white)
  <stem>.json            {"image", "size": [H, W], "findings": {name: {"probability", "boxes": [{box, area, peak}],
                          "overlay"}}}; boxes in original-image pixels, x1/y1 exclusive, largest first
  boxes.json             the list of every image's document
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from medvlp.finetune.pcam.heatmap import components, normalise, overlay_png, write_json
from medvlp.finetune.pcam.stage import MODEL_META, PcamModel, build_pcam_model


class LocalizeError(ValueError):
    """A bad checkpoint or image (one line naming the file)."""


def load_localizer(checkpoint: str | Path) -> tuple[PcamModel, dict]:
    """(model in eval mode on CPU, the run's pcam_model.json) from a run folder or its model.safetensors."""
    from safetensors.torch import load_file

    from medvlp.finetune.pcam.config import PcamHeadConfig
    from medvlp.pretrain.towers import build_vision

    p = Path(checkpoint)
    weights = p / "model.safetensors" if p.is_dir() else p
    meta_path = weights.parent / MODEL_META
    if not weights.is_file():
        raise LocalizeError(f"--checkpoint {p}: no model.safetensors (is this a finished PCAM fine-tune run?)")
    if not meta_path.is_file():
        raise LocalizeError(f"--checkpoint {p}: no {MODEL_META} beside {weights.name} (not a PCAM run)")
    meta = json.loads(meta_path.read_text())
    try:
        head_cfg = PcamHeadConfig(**meta["head"])
        head_cfg.validate()
    except (TypeError, ValueError, KeyError) as e:
        raise LocalizeError(f"--checkpoint {meta_path}: bad head section ({e})") from None
    visual = build_vision(int(meta["spec"]["embed_dim"]), meta["spec"]["vision"])
    model, _ = build_pcam_model(visual, int(meta["image_size"]), len(meta["findings"]), head_cfg)
    sd = load_file(str(weights))
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise LocalizeError(f"--checkpoint {weights}: weights do not fit {MODEL_META}: {str(e).splitlines()[0]}") \
            from None
    return model.eval(), meta


def read_image(path: str | Path, modality: str) -> np.ndarray:
    """An image file -> uint8/uint16 array, grey (H, W) for radiographs, RGB (H, W, 3) otherwise."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(im).astype(np.uint16) if im.mode != "I" else np.clip(np.asarray(im), 0, 65535) \
                    .astype(np.uint16)
                return arr if modality == "cxr" else np.repeat((arr >> 8).astype(np.uint8)[..., None], 3, axis=2)
            return np.asarray(im.convert("L" if modality == "cxr" else "RGB"))
    except (FileNotFoundError, UnidentifiedImageError, OSError) as e:
        raise LocalizeError(f"{path}: cannot read the image ({type(e).__name__}: {e})") from None


def to_original(maps_Khw: torch.Tensor, hw: tuple[int, int], size: int) -> torch.Tensor:
    """Logit maps of the eval view (shorter side -> size, centre crop) -> normalised heatmaps (K, H, W)."""
    H, W = hw
    s = size / min(H, W)
    nh, nw = max(size, round(H * s)), max(size, round(W * s))
    top, left = (nh - size) // 2, (nw - size) // 2
    view = F.interpolate(maps_Khw[None].float(), size=(size, size), mode="bilinear", align_corners=False)[0]
    canvas = view.amin(dim=(-2, -1), keepdim=True).expand(-1, nh, nw).clone()
    canvas[:, top:top + size, left:left + size] = view
    full = F.interpolate(canvas[None], size=(H, W), mode="bilinear", align_corners=False)[0]
    return normalise(full[None])[0]


@torch.no_grad()
def localize(checkpoint: str | Path, images: Sequence[str | Path], out_dir: str | Path, *,
             threshold: float | None = None, findings: Sequence[str] | None = None) -> list[dict]:
    """Write overlays and box JSON for `images` (see the module doc); -> the per-image documents."""
    from medvlp.data_shards.transforms import image_view, to_float_image

    model, meta = load_localizer(checkpoint)
    names = list(meta["findings"])
    want = list(findings) if findings else names
    bad = [f for f in want if f not in names]
    if bad:
        raise LocalizeError(f"--findings: {bad} are not findings of this model ({', '.join(names)})")
    thr = float(meta.get("threshold", 0.5) if threshold is None else threshold)
    if not 0.0 <= thr <= 1.0:
        raise LocalizeError(f"--threshold: must be in [0, 1], got {thr}")
    size, modality = int(meta["image_size"]), meta["modality"]
    view = image_view(modality, size, train=False)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    docs, stems = [], set()
    for path in images:
        arr = read_image(path, modality)
        x = view(to_float_image(arr), None)
        res = model(x[None])
        probs = torch.sigmoid(res["logits"][0]).tolist()
        heat_KHW = to_original(res["maps"][0], arr.shape[:2], size)
        stem = Path(path).stem
        while stem in stems:  # two inputs with one name: keep both
            stem += "_"
        stems.add(stem)
        doc = {"image": str(path), "size": [int(arr.shape[0]), int(arr.shape[1])], "threshold": thr,
               "findings": {}}
        for k, name in enumerate(names):
            if name not in want:
                continue
            comps = components(heat_KHW[k], thr)
            png = overlay_png(arr, heat_KHW[k], out / f"{stem}_{_safe(name)}.png", boxes=[c["box"] for c in comps])
            doc["findings"][name] = {"probability": float(probs[k]) if math.isfinite(probs[k]) else None,
                                     "boxes": comps, "overlay": png.name}
        write_json(doc, out / f"{stem}.json")
        docs.append(doc)
    write_json(docs, out / "boxes.json")
    return docs


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
