"""Heatmaps and boxes from logit maps: upsample, normalise, threshold, connected components, PNG overlays.

heatmap  the finding's logit map s_k upsampled (bilinear) to the image and min-max normalised per image to
         [0, 1] (1 at the peak). Min-max keeps a threshold comparable across poolings, whose logit maps have
         different scales.
boxes    the connected components (8-connectivity) of heatmap >= threshold, each as [x0, y0, x1, y1] in image
         pixels with x1, y1 exclusive (the synthetic corpus' convention), largest component first.

Shape legend: B images, K findings, h/w logit-map rows/columns, H/W image rows/columns.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F


def upsample_maps(maps_BKhw: torch.Tensor, size_HW: tuple[int, int]) -> torch.Tensor:
    """Bilinear upsampling (align_corners=False: map cell centres sit at the centres of their pixel blocks)."""
    if maps_BKhw.ndim != 4:
        raise ValueError(f"logit maps must be (B, K, h, w), got {tuple(maps_BKhw.shape)}")
    return F.interpolate(maps_BKhw.float(), size=tuple(size_HW), mode="bilinear", align_corners=False)


def normalise(maps_BKHW: torch.Tensor) -> torch.Tensor:
    """Per image and finding min-max to [0, 1]; a constant map becomes all zeros (no location)."""
    lo = maps_BKHW.amin(dim=(-2, -1), keepdim=True)
    hi = maps_BKHW.amax(dim=(-2, -1), keepdim=True)
    span = hi - lo
    return torch.where(span > 0, (maps_BKHW - lo) / span.clamp_min(1e-12), torch.zeros_like(maps_BKHW))


def heatmaps(maps_BKhw: torch.Tensor, size_HW: tuple[int, int]) -> torch.Tensor:
    """Logit maps -> normalised heatmaps (B, K, H, W) in [0, 1] at the image size."""
    return normalise(upsample_maps(maps_BKhw, size_HW))


def components(heat_HW: np.ndarray | torch.Tensor, threshold: float) -> list[dict[str, Any]]:
    """Connected components of heat >= threshold: [{"box", "area", "peak"}], largest first (ties: higher peak)."""
    from scipy import ndimage

    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold: must be in [0, 1], got {threshold}")
    heat = heat_HW.detach().cpu().numpy() if hasattr(heat_HW, "detach") else np.asarray(heat_HW)
    if heat.ndim != 2:
        raise ValueError(f"heatmap must be (H, W), got shape {heat.shape}")
    if heat.max() <= 0:
        return []  # a flat map marks nothing
    lab, n = ndimage.label(heat >= threshold, structure=np.ones((3, 3), dtype=int))
    out = []
    for i, sl in enumerate(ndimage.find_objects(lab), start=1):
        if sl is None:
            continue
        inside = lab[sl] == i
        out.append({"box": [int(sl[1].start), int(sl[0].start), int(sl[1].stop), int(sl[0].stop)],
                    "area": int(inside.sum()), "peak": float(heat[sl][inside].max())})
    out.sort(key=lambda c: (-c["area"], -c["peak"]))
    return out


def largest_box(heat_HW, threshold: float) -> list[int] | None:
    comps = components(heat_HW, threshold)
    return comps[0]["box"] if comps else None


# ------------------------------------------------------------------------------------------------ output
def _grey_uint8(img: np.ndarray | torch.Tensor) -> np.ndarray:
    """(H, W), (H, W, 3), (C, H, W) uint8 or float -> (H, W, 3) uint8 for display (floats min-max scaled)."""
    a = img.detach().cpu().float().numpy() if hasattr(img, "detach") else np.asarray(img)
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[2] not in (1, 3):
        a = a.transpose(1, 2, 0)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if a.dtype != np.uint8:
        a = a.astype(np.float64)
        lo, hi = float(a.min()), float(a.max())
        a = np.zeros_like(a) if hi <= lo else (a - lo) / (hi - lo)
        a = np.rint(a * 255).astype(np.uint8)
    return np.repeat(a[..., None], 3, axis=2) if a.ndim == 2 else a


def overlay_png(image, heat_HW, path: str | os.PathLike, *, boxes: Sequence[Sequence[int]] = (),
                gt_boxes: Sequence[Sequence[int]] = (), alpha: float = 0.45) -> Path:
    """Write the image with the heatmap blended in (jet colours), predicted boxes white, ground truth green."""
    from matplotlib import colormaps
    from PIL import Image, ImageDraw

    rgb = _grey_uint8(image)
    heat = heat_HW.detach().cpu().numpy() if hasattr(heat_HW, "detach") else np.asarray(heat_HW)
    if heat.shape != rgb.shape[:2]:
        raise ValueError(f"heatmap {heat.shape} and image {rgb.shape[:2]} differ in size")
    col = (colormaps["jet"](np.clip(heat, 0, 1))[..., :3] * 255).astype(np.float64)
    a = alpha * np.clip(heat, 0, 1)[..., None] ** 0.5  # cold regions stay readable
    out = Image.fromarray(np.rint(rgb * (1 - a) + col * a).astype(np.uint8))
    draw = ImageDraw.Draw(out)
    for colour, bs in (((0, 255, 0), gt_boxes), ((255, 255, 255), boxes)):
        for x0, y0, x1, y1 in bs:
            draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=colour)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    out.save(tmp)
    os.replace(tmp, path)
    return path


def write_json(doc: Any, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, path)
    return path
