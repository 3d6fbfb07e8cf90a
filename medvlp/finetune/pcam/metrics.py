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
    """Accumulates logits, labels and per-(image, finding) localisation outcomes over batches.

    Boxes are scored at every threshold of `thresholds` (plus `threshold`), so a threshold can be picked on one
    split (`best_threshold`) and the outcomes of another read at it (`summary(threshold)`). Each localisation case
    keeps its image row, finding, pointing hit, and per threshold the IoU and the predicted box's area, plus the
    matched ground-truth box's width and height (`cases()`, for paired bootstraps and the lesion-size sweep)."""

    def __init__(self, names: Sequence[str], threshold: float = 0.5, ious: Sequence[float] = IOU_THRESHOLDS,
                 thresholds: Sequence[float] | None = None) -> None:
        self.names, self.threshold, self.ious = list(names), float(threshold), tuple(ious)
        self.thresholds = tuple(sorted({float(threshold), *(float(t) for t in (thresholds or ()))}))
        for t in self.thresholds:
            if not 0.0 <= t <= 1.0:
                raise ValueError(f"threshold: must be in [0, 1], got {t}")
        self.logits: list[np.ndarray] = []
        self.labels: list[np.ndarray] = []
        self.keys: list[str] = []
        self.n_rows = 0
        # per case: (image row, finding, pointing hit, IoU per threshold, predicted box area per threshold,
        # matched ground-truth box width, height)
        self._cases: list[tuple[int, int, bool, list[float], list[float], float, float]] = []

    @property
    def records(self) -> list[tuple[int, bool, float]]:
        """(finding, pointing hit, IoU at `threshold`) per case."""
        j = self.thresholds.index(self.threshold)
        return [(c[1], c[2], c[3][j]) for c in self._cases]

    def update(self, logits_BK: torch.Tensor, labels_BK: torch.Tensor, heat_BKHW: torch.Tensor,
               gt: GroundTruth, keys: Sequence[str] | None = None) -> None:
        K = len(self.names)
        if logits_BK.shape[1] != K or heat_BKHW.shape[1] != K or len(gt) != logits_BK.shape[0]:
            raise ValueError(f"LocalisationMeter: logits {tuple(logits_BK.shape)}, heatmaps "
                             f"{tuple(heat_BKHW.shape)} and {len(gt)} ground truths do not fit {K} findings")
        B = int(logits_BK.shape[0])
        self.logits.append(logits_BK.detach().float().cpu().numpy())
        self.labels.append(labels_BK.detach().float().cpu().numpy())
        self.keys.extend(str(k) for k in (keys if keys is not None else range(self.n_rows, self.n_rows + B)))
        for b, items in enumerate(gt):
            for k in sorted({k for k, _ in items}):
                if k >= K or float(labels_BK[b, k]) != 1:
                    continue  # localisation is scored where the finding is present
                boxes = [box for kk, box in items if kk == k]
                ious, areas, match = [], [], boxes[0]
                for t in self.thresholds:
                    pred = largest_box(heat_BKHW[b, k], t)
                    if pred is None:
                        ious.append(0.0)
                        areas.append(0.0)
                        continue
                    scores = [box_iou(pred, g) for g in boxes]
                    ious.append(max(scores))
                    areas.append(float((pred[2] - pred[0]) * (pred[3] - pred[1])))
                    if t == self.threshold:
                        match = boxes[int(np.argmax(scores))]
                self._cases.append((self.n_rows + b, k, peak_inside(heat_BKHW[b, k], boxes), ious, areas,
                                    float(match[2] - match[0]), float(match[3] - match[1])))
        self.n_rows += B

    def _at(self, threshold: float | None) -> int:
        t = self.threshold if threshold is None else float(threshold)
        if t not in self.thresholds:
            raise ValueError(f"threshold {t} was not scored (scored: {list(self.thresholds)})")
        return self.thresholds.index(t)

    def summary(self, threshold: float | None = None) -> dict[str, float]:
        """Flat metrics at `threshold` (default: the meter's): auc/<finding>, auc_mean, and for each of pointing,
        iou, acc@T: /<finding> and _mean (means over the findings that have localisation cases), n_loc/<finding>,
        and area_ratio/<finding> (median predicted-box area over ground-truth-box area: > 1 means boxes larger
        than the lesion)."""
        j = self._at(threshold)
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
            rec = [c for c in self._cases if c[1] == k]
            out[f"n_loc/{name}"] = float(len(rec))
            if not rec:
                continue
            iou = np.asarray([c[3][j] for c in rec])
            vals = {"pointing": np.mean([c[2] for c in rec]), "iou": iou.mean()}
            vals.update({f"acc@{t:g}": np.mean(iou >= t) for t in self.ious})
            for key in keys:
                out[f"{key}/{name}"] = float(vals[key])
                per[key].append(float(vals[key]))
            out[f"area_ratio/{name}"] = float(np.median([c[4][j] / max(c[5] * c[6], 1.0) for c in rec]))
        for key in keys:
            out[f"{key}_mean"] = float(np.mean(per[key])) if per[key] else float("nan")
        return out

    def best_threshold(self, key: str = "iou_mean") -> float:
        """The scored threshold with the highest `key` of `summary` (ties: the lower threshold)."""
        vals = [self.summary(t).get(key, float("nan")) for t in self.thresholds]
        finite = [(v, -i) for i, v in enumerate(vals) if not math.isnan(v)]
        if not finite:
            return self.threshold
        return self.thresholds[-max(finite)[1]]

    def cases(self) -> dict[str, np.ndarray]:
        """Every row and case as arrays (eval_items.npz): keys (N,), labels / logits (N, K), thresholds (T,),
        case_row, case_finding, case_hit (C,), case_iou, case_area (C, T), case_gt_w, case_gt_h (C,)."""
        K, T = len(self.names), len(self.thresholds)
        c = self._cases
        return {"keys": np.asarray(self.keys, dtype=str), "names": np.asarray(self.names, dtype=str),
                "labels": np.concatenate(self.labels) if self.labels else np.zeros((0, K), np.float32),
                "logits": np.concatenate(self.logits) if self.logits else np.zeros((0, K), np.float32),
                "thresholds": np.asarray(self.thresholds, dtype=np.float64),
                "case_row": np.asarray([x[0] for x in c], dtype=np.int64),
                "case_finding": np.asarray([x[1] for x in c], dtype=np.int64),
                "case_hit": np.asarray([x[2] for x in c], dtype=bool),
                "case_iou": np.asarray([x[3] for x in c], dtype=np.float64).reshape(len(c), T),
                "case_area": np.asarray([x[4] for x in c], dtype=np.float64).reshape(len(c), T),
                "case_gt_w": np.asarray([x[5] for x in c], dtype=np.float64),
                "case_gt_h": np.asarray([x[6] for x in c], dtype=np.float64)}
