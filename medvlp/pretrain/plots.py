"""Figures for runs and evaluations (matplotlib, Agg; no pyplot global state, so safe in any thread/process).

Every function writes a PNG atomically (temp file + rename) and returns its path.
Legend: Q query images, k retrieved texts per query, S image side, D depth of a volume.
"""
from __future__ import annotations

import math
import os
import textwrap
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np


def _figure(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h))
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100, bbox_inches="tight")
    os.replace(tmp, path)
    return path


def _ema(values: np.ndarray, alpha: float) -> np.ndarray:
    out = np.empty_like(values, dtype=np.float64)
    acc = values[0]
    for i, v in enumerate(values):
        acc = alpha * acc + (1 - alpha) * v if i else v
        out[i] = acc
    return out


def loss_curve_png(steps: Sequence[int], losses: Sequence[float], path: str | os.PathLike,
                   extra_series: Mapping[str, tuple[Sequence[int], Sequence[float]]] | None = None,
                   title: str = "training loss") -> Path:
    """Loss against step (raw + EMA-smoothed when there are many points); `extra_series` {name: (steps, values)}
    go on a second y axis (e.g. learning rate, eval AUC)."""
    if len(steps) != len(losses):
        raise ValueError(f"loss_curve_png: {len(steps)} steps but {len(losses)} losses")
    fig = _figure(7, 4)
    ax = fig.add_subplot(1, 1, 1)
    y = np.asarray(losses, dtype=np.float64)
    ax.plot(steps, y, color="tab:blue", alpha=0.35 if len(y) > 20 else 1.0, label="loss")
    if len(y) > 20:
        ax.plot(steps, _ema(y, 0.9), color="tab:blue", label="loss (EMA 0.9)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if extra_series:
        ax2 = ax.twinx()
        colors = ["tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"]
        for i, (name, (xs, vs)) in enumerate(sorted(extra_series.items())):
            ax2.plot(xs, vs, color=colors[i % len(colors)], label=name, marker="o" if len(xs) < 20 else None)
        ax2.legend(loc="upper center", fontsize=8)
    ax.legend(loc="upper right", fontsize=8)
    return _save(fig, path)


def roc_png(curves: Mapping[str, tuple[Any, Any]], path: str | os.PathLike, title: str = "zero-shot ROC") -> Path:
    """One small ROC panel per finding: `curves` {finding: (labels_N, scores_N)}; AUC in the panel title and the
    operating point nearest (0, 1) marked."""
    from medvlp.pretrain.metrics import operating_point, roc_auc, roc_curve

    names = sorted(curves)
    if not names:
        raise ValueError("roc_png: no findings to plot")
    cols = min(4, len(names))
    rows = math.ceil(len(names) / cols)
    fig = _figure(3.0 * cols, 3.0 * rows)
    for i, name in enumerate(names):
        y, s = curves[name]
        ax = fig.add_subplot(rows, cols, i + 1)
        auc = roc_auc(y, s, warn=False)
        if math.isfinite(auc):
            fpr, tpr, _ = roc_curve(y, s)
            ax.plot(fpr, tpr, color="tab:blue")
            op = operating_point(y, s)
            ax.plot(1 - op["specificity"], op["sensitivity"], "o", color="tab:red", markersize=4)
        ax.plot([0, 1], [0, 1], "--", color="grey", linewidth=0.8)
        ax.set_title(f"{name}: AUC {auc:.3f}" if math.isfinite(auc) else f"{name}: one class", fontsize=9)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.tick_params(labelsize=7)
    fig.suptitle(title)
    return _save(fig, path)


def _to_display(img) -> tuple[np.ndarray, str | None]:
    """(H, W) grey or (H, W, 3) RGB in [0, 1] from (3,S,S) / (1,S,S) / (S,S) / (S,S,3) / (1,D,H,W) / (D,H,W)."""
    a = img.detach().float().cpu().numpy() if hasattr(img, "detach") else np.asarray(img, dtype=np.float64)
    a = np.squeeze(a)
    if a.ndim == 3 and a.shape[0] not in (1, 3) and a.shape[-1] not in (3,):  # a volume (D, H, W): middle slice
        a = a[a.shape[0] // 2]
    if a.ndim == 3 and a.shape[0] == 3:
        a = np.transpose(a, (1, 2, 0))
    if a.ndim not in (2, 3):
        raise ValueError(f"cannot display an image of shape {np.shape(img)}")
    lo, hi = float(np.min(a)), float(np.max(a))
    a = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
    return a, ("gray" if a.ndim == 2 else None)


def retrieval_examples_png(images: Sequence[Any], texts: Sequence[str], topk_idx, path: str | os.PathLike,
                           gt_texts: Sequence[str] | None = None, width: int = 60) -> Path:
    """Q rows: the query image, then its top-k retrieved texts (rank, text). With `gt_texts` (the query's true
    report) a retrieved text equal to it is marked ✓ and drawn in green."""
    topk = np.asarray(topk_idx.detach().cpu() if hasattr(topk_idx, "detach") else topk_idx)
    if topk.ndim != 2 or topk.shape[0] != len(images):
        raise ValueError(f"retrieval_examples_png: topk_idx {topk.shape} must be (Q={len(images)}, k)")
    n_q, k = topk.shape
    fig = _figure(10, 2.4 * n_q)
    grid = fig.add_gridspec(n_q, 2, width_ratios=[1, 3])
    for q in range(n_q):
        ax_img = fig.add_subplot(grid[q, 0])
        arr, cmap = _to_display(images[q])
        ax_img.imshow(arr, cmap=cmap)
        ax_img.set_axis_off()
        ax_img.set_title(f"query {q}" + (f": {textwrap.shorten(gt_texts[q], 40)}" if gt_texts else ""), fontsize=8)
        ax_txt = fig.add_subplot(grid[q, 1])
        ax_txt.set_axis_off()
        for r in range(k):
            t = texts[int(topk[q, r])]
            hit = gt_texts is not None and t == gt_texts[q]
            body = textwrap.fill(textwrap.shorten(t, 3 * width), width)
            ax_txt.text(0.0, 1.0 - r / k, f"{r + 1}. {body}" + (" ✓" if hit else ""), va="top", fontsize=8,
                        color="tab:green" if hit else "black", transform=ax_txt.transAxes)
    return _save(fig, path)


def overlay_curves_png(runs: Sequence[Mapping[str, Any]], metric: str, path: str | os.PathLike,
                       label_key: str = "run_name") -> Path:
    """One line per run of `metric`'s history (runs as returned by `medvlp.pretrain.tracking.read_runs`); runs without
    the metric are listed in the title as missing."""
    fig = _figure(7, 4)
    ax = fig.add_subplot(1, 1, 1)
    missing = []
    for r in runs:
        hist = r.get("history", {}).get(metric)
        label = str(r.get(label_key) or r.get("run_id", "?"))
        if not hist:
            missing.append(label)
            continue
        xs, ys = zip(*hist)
        ax.plot(xs, ys, label=label, marker="o" if len(xs) < 20 else None)
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.set_title(metric + (f" (missing in: {', '.join(missing)})" if missing else ""), fontsize=10)
    if len(runs) > len(missing):
        ax.legend(fontsize=8)
    return _save(fig, path)
