"""One statistic for every experiment table: variants x seeds, mean +- sample sd, a CI over seeds, and a paired
bootstrap over test items x seeds for differences between two arms.

    summary = seed_summary([0.81, 0.84, 0.79])            # {"mean", "sd" (ddof=1), "n", "ci_lo", "ci_hi"}
    pm(summary)                                           # "0.813 ± 0.025"
    d = paired_bootstrap_diff(roc_auc, y_SN, a_SN, b_SN)  # {"diff", "ci_lo", "ci_hi", "p_le_0", "n_seeds", "n_items"}
    write_table(rows, out_dir / "table")                  # table.md + table.csv

The "±" in every table is the sample standard deviation over seeds (ddof=1); the CI over seeds is Student's t
(95 % by default), which says where the mean of the training distribution lies; the paired bootstrap resamples both
the seeds and the test items (the same draw for both arms), so its interval covers training variance and test
sampling together.
"""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

__all__ = ["seed_summary", "pm", "paired_bootstrap_diff", "write_table"]


def seed_summary(values: Sequence[float], level: float = 0.95) -> dict[str, float]:
    """Mean, sample sd (ddof=1) and Student-t CI of the mean over seeds; NaN values are dropped and counted out."""
    v = np.asarray([x for x in values if x is not None and not math.isnan(float(x))], dtype=np.float64)
    n = int(v.size)
    if n == 0:
        return {"mean": float("nan"), "sd": float("nan"), "n": 0, "ci_lo": float("nan"), "ci_hi": float("nan")}
    mean = float(v.mean())
    if n == 1:
        return {"mean": mean, "sd": float("nan"), "n": 1, "ci_lo": float("nan"), "ci_hi": float("nan")}
    from scipy.stats import t

    sd = float(v.std(ddof=1))
    half = float(t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    return {"mean": mean, "sd": sd, "n": n, "ci_lo": mean - half, "ci_hi": mean + half}


def pm(summary: Mapping[str, float], digits: int = 3) -> str:
    """`mean ± sd` (sd over seeds, ddof=1); a single seed prints its value alone."""
    if summary["n"] == 0:
        return "—"
    if summary["n"] == 1 or math.isnan(summary["sd"]):
        return f"{summary['mean']:.{digits}f}"
    return f"{summary['mean']:.{digits}f} ± {summary['sd']:.{digits}f}"


def paired_bootstrap_diff(metric_fn: Callable[[np.ndarray, np.ndarray], float], y, score_a, score_b,
                          n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> dict[str, float]:
    """metric(a) - metric(b), averaged over seeds, with a bootstrap CI over seeds x test items.

    `y`, `score_a`, `score_b`: arrays (S, N, ...) — S seeds (training repetitions) of the same N test items in the
    same order, or `y` of shape (N, ...) shared by every seed. Each draw resamples S seeds and N items with
    replacement, the same ones for both arms (paired). Draws where the metric is undefined (e.g. one class only)
    are skipped; `p_le_0` is the fraction of valid draws with a difference <= 0.
    """
    a, b = np.asarray(score_a), np.asarray(score_b)
    if a.shape != b.shape or a.ndim < 2:
        raise ValueError(f"score_a and score_b must both be (seeds, items, ...); got {a.shape} and {b.shape}")
    y = np.asarray(y)
    if y.ndim == a.ndim - 1:  # one label array shared by every seed
        y = np.broadcast_to(y, (a.shape[0],) + y.shape)
    if y.shape[:2] != a.shape[:2]:
        raise ValueError(f"y must be (seeds, items, ...) or (items, ...) matching scores {a.shape}; got {y.shape}")
    S, N = a.shape[:2]

    def stat(si, ii) -> float:
        d = [metric_fn(y[s][ii], a[s][ii]) - metric_fn(y[s][ii], b[s][ii]) for s in si]
        d = [x for x in d if not math.isnan(x)]
        return float(np.mean(d)) if d else float("nan")

    point = stat(range(S), np.arange(N))
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(n_boot):
        v = stat(rng.integers(0, S, S), rng.integers(0, N, N))
        if not math.isnan(v):
            draws.append(v)
    if not draws:
        return {"diff": point, "ci_lo": float("nan"), "ci_hi": float("nan"), "p_le_0": float("nan"),
                "n_seeds": S, "n_items": N}
    d = np.asarray(draws)
    lo, hi = np.quantile(d, [(1 - level) / 2, 1 - (1 - level) / 2])
    return {"diff": point, "ci_lo": float(lo), "ci_hi": float(hi), "p_le_0": float((d <= 0).mean()),
            "n_seeds": S, "n_items": N}


def write_table(rows: Sequence[Mapping[str, Any]], stem: str | Path, title: str | None = None) -> tuple[Path, Path]:
    """Rows (dicts with the same keys, in order) as `stem.md` (a Markdown table) and `stem.csv`; returns both paths.
    Floats are printed with 3 decimals in Markdown and in full in CSV."""
    if not rows:
        raise ValueError("write_table: no rows")
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    cols = list(rows[0].keys())
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ([f"## {title}", ""] if title else []) + ["| " + " | ".join(cols) + " |",
                                                      "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    md, cs = stem.with_suffix(".md"), stem.with_suffix(".csv")
    md.write_text("\n".join(lines) + "\n")
    with cs.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    return md, cs
