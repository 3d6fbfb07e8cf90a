"""Few-label budgets: stratified, seeded subsets of a training split.

    idx = label_budget(y_N, shots=4, seed=1)              # 4 per class
    idx = label_budget(y_N, label_fraction=0.005, seed=1) # 0.5 % of the split, stratified by class

* k-shot: k samples of every class (a class with fewer than k samples gives all it has, with a warning).
* label fraction f: n = max(C, round(f * N)) samples split over the classes in proportion to their counts
  (largest-remainder rounding), at least one per class present, so a budget never silently drops a class.
The same (labels, budget, seed) always gives the same indices (numpy's PCG64 seeded from `seed`); the subset is
returned sorted.
"""
from __future__ import annotations

import math
import warnings

import numpy as np


def _per_class_quota(counts_C: np.ndarray, n: int) -> np.ndarray:
    """n samples over classes in proportion to their counts (largest remainder), >= 1 per present class."""
    present = counts_C > 0
    ideal = n * counts_C / max(int(counts_C.sum()), 1)
    quota = np.floor(ideal).astype(np.int64)
    quota[present & (quota == 0)] = 1
    quota = np.minimum(quota, counts_C)
    left = n - int(quota.sum())
    order = np.argsort(-(ideal - np.floor(ideal)), kind="stable")
    while left > 0:  # hand out the rest by largest remainder, never beyond a class's count
        for c in order:
            if left > 0 and quota[c] < counts_C[c]:
                quota[c] += 1
                left -= 1
    while left < 0:  # the minimum of one per class overshot: take from the largest quota
        c = int(np.argmax(quota))
        quota[c] -= 1
        left += 1
    return quota


def label_budget(y_N, *, shots: int = 0, label_fraction: float = 0.0, seed: int = 0,
                 num_classes: int | None = None) -> np.ndarray:
    """Sorted indices of a stratified, seeded subset of `y_N` (class ids 0..C-1): `shots` per class, or a
    `label_fraction` of the whole split. Exactly one of the two must be set."""
    y_N = np.asarray(y_N).reshape(-1)
    if (shots > 0) == (label_fraction > 0):
        raise ValueError(f"finetune: set exactly one of shots (> 0) or label_fraction (> 0), got shots={shots}, "
                         f"label_fraction={label_fraction}")
    if label_fraction and not 0 < label_fraction <= 1:
        raise ValueError(f"finetune.label_fraction: must be in (0, 1], got {label_fraction}")
    if y_N.size == 0:
        raise ValueError("label budget: the training split has no labelled samples")
    if y_N.min() < 0:
        raise ValueError(f"label budget: class ids must be >= 0, got {int(y_N.min())}")
    C = int(num_classes if num_classes is not None else y_N.max() + 1)
    counts_C = np.bincount(y_N, minlength=C)
    if shots > 0:
        short = [c for c in range(C) if 0 < counts_C[c] < shots]
        if short:
            warnings.warn(f"{shots}-shot: classes {short} have fewer samples ({counts_C[short].tolist()}); "
                          "taking all of them", RuntimeWarning, stacklevel=2)
        quota = np.minimum(counts_C, shots)
    else:
        n = max(int((counts_C > 0).sum()), int(round(label_fraction * y_N.size)))
        quota = _per_class_quota(counts_C, min(n, y_N.size))
    rng = np.random.Generator(np.random.PCG64(seed))
    picked = [rng.choice(np.flatnonzero(y_N == c), size=int(quota[c]), replace=False)
              for c in range(C) if quota[c] > 0]
    return np.sort(np.concatenate(picked)).astype(np.int64)


def budget_name(shots: int = 0, label_fraction: float = 0.0) -> str:
    """'4-shot' or '0.5%'."""
    if shots > 0:
        return f"{shots}-shot"
    pct = label_fraction * 100
    return f"{pct:.3g}%" if not math.isclose(pct, round(pct)) else f"{int(round(pct))}%"
