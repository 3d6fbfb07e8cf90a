"""Classification and localisation metrics of the PCAM stage (docs/methods.md).

* AUC per finding (uncertain labels left out) and their mean.
* Pointing game: on images where a finding is present with a ground-truth box, a hit when the heatmap's
  maximum falls inside one of that finding's boxes; accuracy = hits / (hits + misses).
* IoU: the box of the largest connected component of heatmap >= threshold against the finding's best-matching
  ground-truth box (0 when nothing passes the threshold); localisation accuracy at T = share with IoU >= T,
  T in {0.1, 0.25, 0.5}.

Boxes are [x0, y0, x1, y1] image pixels with x1, y1 exclusive; heatmaps and boxes must be in the same frame.
Shape legend: N images, K findings, H/W heatmap rows/columns, M boxes per image (padded).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from medvlp.finetune.pcam.heatmap import largest_box
from medvlp.pretrain.metrics import roc_auc

IOU_THRESHOLDS = (0.1, 0.25, 0.5)
GroundTruth = list[list[tuple[int, list[float]]]]  # per image: (finding index, box)


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two [x0, y0, x1, y1] boxes (exclusive ends); 0 for empty boxes."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def peak_inside(heat_HW: torch.Tensor | np.ndarray, boxes: Sequence[Sequence[float]]) -> bool:
    """Pointing game hit: the (first) maximum's pixel centre lies inside one of the boxes."""
    heat = heat_HW.detach().cpu().numpy() if hasattr(heat_HW, "detach") else np.asarray(heat_HW)
    y, x = np.unravel_index(int(np.argmax(heat)), heat.shape)
    cx, cy = x + 0.5, y + 0.5
    return any(b[0] <= cx <= b[2] and b[1] <= cy <= b[3] for b in boxes)


def ground_truth_from_batch(boxes_BM4: torch.Tensor, count_B: torch.Tensor, label_BM: torch.Tensor,
                            scale: float | Sequence[float] = 1.0) -> GroundTruth:
    """The `boxes` batch member -> per image [(finding index, box)]; `scale` maps stored pixels to heatmap pixels
    (one factor for all images, or one per image)."""
    scales = [float(scale)] * len(count_B) if isinstance(scale, (int, float)) else [float(s) for s in scale]
    out: GroundTruth = []
    for b in range(len(count_B)):
        n = int(count_B[b])
        out.append([(int(label_BM[b, j]), [float(v) * scales[b] for v in boxes_BM4[b, j].tolist()])
                    for j in range(n) if int(label_BM[b, j]) >= 0])
    return out


class LocalisationMeter:
    """Accumulates logits, labels and per-(image, finding) localisation outcomes over batches."""

    def __init__(self, names: Sequence[str], threshold: float = 0.5, ious: Sequence[float] = IOU_THRESHOLDS) -> None:
        self.names, self.threshold, self.ious = list(names), float(threshold), tuple(ious)
        self.logits: list[np.ndarray] = []
        self.labels: list[np.ndarray] = []
        self.records: list[tuple[int, bool, float]] = []  # (finding, pointing hit, IoU)

    def update(self, logits_BK: torch.Tensor, labels_BK: torch.Tensor, heat_BKHW: torch.Tensor,
               gt: GroundTruth) -> None:
        K = len(self.names)
        if logits_BK.shape[1] != K or heat_BKHW.shape[1] != K or len(gt) != logits_BK.shape[0]:
            raise ValueError(f"LocalisationMeter: logits {tuple(logits_BK.shape)}, heatmaps "
                             f"{tuple(heat_BKHW.shape)} and {len(gt)} ground truths do not fit {K} findings")
        self.logits.append(logits_BK.detach().float().cpu().numpy())
        self.labels.append(labels_BK.detach().float().cpu().numpy())
        for b, items in enumerate(gt):
            for k in sorted({k for k, _ in items}):
                if k >= K or float(labels_BK[b, k]) != 1:
                    continue  # localisation is scored where the finding is present
                boxes = [box for kk, box in items if kk == k]
                pred = largest_box(heat_BKHW[b, k], self.threshold)
                iou = max(box_iou(pred, g) for g in boxes) if pred is not None else 0.0
                self.records.append((k, peak_inside(heat_BKHW[b, k], boxes), iou))

    def summary(self) -> dict[str, float]:
        """Flat metrics: auc/<finding>, auc_mean, and for each of pointing, iou, acc@T: /<finding> and _mean
        (means over the findings that have localisation cases), plus n_loc/<finding>."""
        out: dict[str, float] = {}
        if self.logits:
            logits_NK, labels_NK = np.concatenate(self.logits), np.concatenate(self.labels)
            aucs = [roc_auc(labels_NK[:, k], logits_NK[:, k], warn=False) for k in range(len(self.names))]
            for name, a in zip(self.names, aucs):
                out[f"auc/{name}"] = a
            finite = [a for a in aucs if not math.isnan(a)]
            out["auc_mean"] = float(np.mean(finite)) if finite else float("nan")
        keys = ["pointing", "iou"] + [f"acc@{t:g}" for t in self.ious]
        per: dict[str, list[float]] = {key: [] for key in keys}
        for k, name in enumerate(self.names):
            rec = [r for r in self.records if r[0] == k]
            out[f"n_loc/{name}"] = float(len(rec))
            if not rec:
                continue
            vals = {"pointing": np.mean([r[1] for r in rec]), "iou": np.mean([r[2] for r in rec])}
            vals.update({f"acc@{t:g}": np.mean([r[2] >= t for r in rec]) for t in self.ious})
            for key in keys:
                out[f"{key}/{name}"] = float(vals[key])
                per[key].append(float(vals[key]))
        for key in keys:
            out[f"{key}_mean"] = float(np.mean(per[key])) if per[key] else float("nan")
        return out
