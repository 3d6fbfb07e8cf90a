"""Evaluation metrics as pure functions: ROC AUC (+ bootstrap CI), operating point, retrieval R@K, linear probes.

Everything here is deterministic given its `seed` and takes numpy arrays (torch tensors are converted).
Legend: N train / M test samples, K findings, Q queries, C candidates, E embedding width.
Labels are 1 (positive), 0 (negative) or -1 (uncertain); uncertain labels are left out of every AUC and probe.
"""
from __future__ import annotations

import warnings
from typing import Callable, Sequence

import numpy as np

UNCERTAIN = -1


def _np(x) -> np.ndarray:
    """Accept numpy arrays, lists and (CPU or GPU) torch tensors."""
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x)


# ----------------------------------------------------------------------------------------------- ROC
def _average_ranks(x_N: np.ndarray) -> np.ndarray:
    """1-based ranks with ties sharing the mean of their ranks (the Mann-Whitney convention)."""
    order = np.argsort(x_N, kind="mergesort")
    xs = x_N[order]
    # boundaries of runs of equal values
    starts = np.r_[0, np.flatnonzero(xs[1:] != xs[:-1]) + 1]
    ends = np.r_[starts[1:], len(xs)]
    mean_rank = (starts + ends + 1) / 2.0  # mean of 1-based ranks starts+1 .. ends
    ranks = np.empty(len(xs), dtype=np.float64)
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks


def roc_auc(y, score, *, warn: bool = True) -> float:
    """Area under the ROC curve = P(score_pos > score_neg) + ½·P(score_pos == score_neg).

    Computed exactly from average ranks (Mann-Whitney U), so tied scores count one half. Entries with
    label -1 (uncertain) or a non-finite score are ignored. With a single class left the AUC is undefined:
    returns NaN (with a RuntimeWarning unless `warn=False`).
    """
    y_N, s_N = _np(y).reshape(-1), _np(score).astype(np.float64).reshape(-1)
    if y_N.shape != s_N.shape:
        raise ValueError(f"roc_auc: labels {y_N.shape} and scores {s_N.shape} differ in length")
    keep = (y_N != UNCERTAIN) & np.isfinite(s_N)
    y_N, s_N = y_N[keep] > 0, s_N[keep]
    n_pos, n_neg = int(y_N.sum()), int((~y_N).sum())
    if n_pos == 0 or n_neg == 0:
        if warn:
            warnings.warn(f"roc_auc: only one class present ({n_pos} positives, {n_neg} negatives); AUC is NaN",
                          RuntimeWarning, stacklevel=2)
        return float("nan")
    ranks = _average_ranks(s_N)
    u = ranks[y_N].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def roc_curve(y, score) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) over the distinct scores, from (0, 0) at threshold +inf; uncertain labels ignored.

    A sample is called positive when score >= threshold.
    """
    y_N, s_N = _np(y).reshape(-1), _np(score).astype(np.float64).reshape(-1)
    keep = (y_N != UNCERTAIN) & np.isfinite(s_N)
    y_N, s_N = y_N[keep] > 0, s_N[keep]
    order = np.argsort(-s_N, kind="mergesort")
    s_sorted, y_sorted = s_N[order], y_N[order]
    if len(s_N):
        last_of_run = np.r_[np.flatnonzero(s_sorted[1:] != s_sorted[:-1]), len(s_sorted) - 1]
    else:
        last_of_run = np.array([], dtype=int)
    tp = np.cumsum(y_sorted)[last_of_run]
    fp = np.cumsum(~y_sorted)[last_of_run]
    n_pos, n_neg = max(int(y_N.sum()), 1), max(int((~y_N).sum()), 1)
    fpr = np.r_[0.0, fp / n_neg]
    tpr = np.r_[0.0, tp / n_pos]
    thr = np.r_[np.inf, s_sorted[last_of_run]]
    return fpr, tpr, thr


def operating_point(y, score) -> dict[str, float]:
    """The ROC point nearest (0, 1) and its threshold, accuracy, sensitivity and specificity.

    Ties in distance go to the higher threshold (the first one met). NaNs when one class is missing.
    """
    y_N = _np(y).reshape(-1)
    s_N = _np(score).astype(np.float64).reshape(-1)
    keep = (y_N != UNCERTAIN) & np.isfinite(s_N)
    y_N, s_N = y_N[keep] > 0, s_N[keep]
    nan = float("nan")
    if y_N.all() or not y_N.any():
        return {"threshold": nan, "accuracy": nan, "sensitivity": nan, "specificity": nan}
    fpr, tpr, thr = roc_curve(y_N.astype(int), s_N)
    # rounding makes float noise (1 - 2/3 != 1/3) not decide between equally distant points
    i = int(np.argmin(np.round(fpr**2 + (1.0 - tpr) ** 2, 12)))
    pred = s_N >= thr[i]
    return {"threshold": float(thr[i]), "accuracy": float((pred == y_N).mean()),
            "sensitivity": float(tpr[i]), "specificity": float(1.0 - fpr[i])}


def macro_auc(y_NK, score_NK) -> float:
    """Mean AUC over findings that have both classes (NaN if none has)."""
    y_NK, s_NK = _np(y_NK), _np(score_NK)
    aucs = [roc_auc(y_NK[:, k], s_NK[:, k], warn=False) for k in range(y_NK.shape[1])]
    finite = [a for a in aucs if np.isfinite(a)]
    return float(np.mean(finite)) if finite else float("nan")


def bootstrap_ci(metric_fn: Callable[[np.ndarray, np.ndarray], float], y, score, n: int = 200, seed: int = 0,
                 alpha: float = 0.05) -> tuple[float, float]:
    """Percentile bootstrap (1 − alpha) CI of `metric_fn(y, score)`, resampling rows (axis 0) with replacement.

    Resamples whose metric is NaN (e.g. one class drawn) are dropped; if fewer than half survive, (NaN, NaN).
    The same seed gives the same interval.
    """
    y, score = _np(y), _np(score)
    if len(y) != len(score):
        raise ValueError(f"bootstrap_ci: labels ({len(y)}) and scores ({len(score)}) differ in length")
    if n < 1 or len(y) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(n):
        idx = rng.integers(0, len(y), size=len(y))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            v = metric_fn(y[idx], score[idx])
        if np.isfinite(v):
            vals.append(v)
    if len(vals) < max(1, n // 2):
        return float("nan"), float("nan")
    lo, hi = np.percentile(np.asarray(vals), [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(lo), float(hi)


# ----------------------------------------------------------------------------------------------- retrieval
def recall_at_k(sim_QC, gt=None, ks: Sequence[int] = (1, 5, 10)) -> dict[int, float]:
    """Fraction of queries whose correct candidate is among the top k by similarity.

    `gt`: None (query q's correct candidate is candidate q), an int array (Q,) of correct candidate indices, or a
    boolean matrix (Q, C) marking every correct candidate (e.g. identical report texts).
    Ties are pessimistic: a query's rank is the number of *wrong* candidates scoring >= its best correct one,
    so a collapsed model with constant similarities gets R@k ≈ k/C, never a perfect score.
    """
    sim_QC = _np(sim_QC).astype(np.float64)
    n_q, n_c = sim_QC.shape
    if gt is None:
        if n_q > n_c:
            raise ValueError(f"recall_at_k: gt=None needs Q <= C, got a {n_q}x{n_c} similarity matrix")
        gt = np.arange(n_q)
    gt = _np(gt)
    if gt.ndim == 1:
        if gt.shape[0] != n_q:
            raise ValueError(f"recall_at_k: gt has {gt.shape[0]} entries for {n_q} queries")
        mask_QC = np.zeros((n_q, n_c), dtype=bool)
        mask_QC[np.arange(n_q), gt.astype(np.int64)] = True
    else:
        if gt.shape != sim_QC.shape:
            raise ValueError(f"recall_at_k: gt mask {gt.shape} does not match similarities {sim_QC.shape}")
        mask_QC = gt.astype(bool)
    if not mask_QC.any(axis=1).all():
        raise ValueError(f"recall_at_k: query {int(np.flatnonzero(~mask_QC.any(axis=1))[0])} has no correct candidate")
    best_Q = np.where(mask_QC, sim_QC, -np.inf).max(axis=1)
    rank_Q = ((sim_QC >= best_Q[:, None]) & ~mask_QC).sum(axis=1)  # 0 = correct item ranked first
    return {int(k): float((rank_Q < k).mean()) for k in ks}


# ----------------------------------------------------------------------------------------------- probes
PROBE_CS = (0.01, 0.1, 1.0, 10.0)  # inverse L2 strengths tried on the validation split


def _standardiser(X_NE: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """z-score with the given features' statistics (labels are not used, so the whole train pool may be used)."""
    mu_E = X_NE.mean(axis=0)
    sd_E = X_NE.std(axis=0)
    sd_E = np.where(sd_E > 1e-12, sd_E, 1.0)  # constant features stay constant instead of becoming inf
    return lambda X: (X - mu_E) / sd_E


def _fit_score(X_fit, y_fit, X_eval, C: float, seed: int, max_iter: int) -> np.ndarray:
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(C=C, max_iter=max_iter, random_state=seed)
    clf.fit(X_fit, y_fit)
    return clf.decision_function(X_eval)


def _choose_C(X_NE, y_N, Cs, val_frac: float, seed: int, max_iter: int) -> float:
    """C with the best AUC on a stratified hold-out of the train rows; ties go to the smaller C (more regularised).

    Needs >= 5 samples per class (else the fixed default C = 1.0 is used, documented in `linear_probe`).
    """
    pos, neg = np.flatnonzero(y_N == 1), np.flatnonzero(y_N == 0)
    if min(len(pos), len(neg)) < 5:
        return 1.0
    rng = np.random.default_rng(seed)
    val = np.r_[rng.permutation(pos)[: max(1, int(round(len(pos) * val_frac)))],
                rng.permutation(neg)[: max(1, int(round(len(neg) * val_frac)))]]
    fit = np.setdiff1d(np.arange(len(y_N)), val)
    best_C, best_auc = 1.0, -np.inf
    for C in sorted(Cs):
        auc = roc_auc(y_N[val], _fit_score(X_NE[fit], y_N[fit], X_NE[val], C, seed, max_iter), warn=False)
        if np.isfinite(auc) and auc > best_auc + 1e-12:
            best_C, best_auc = C, auc
    return float(best_C)


def linear_probe(train_X_NE, train_Y_NK, test_X_ME, test_Y_MK, label_names: Sequence[str] | None = None, *,
                 C: float | None = None, Cs: Sequence[float] = PROBE_CS, val_frac: float = 0.2, seed: int = 0,
                 max_iter: int = 1000) -> dict:
    """One-vs-rest logistic regression per finding on frozen, standardised features; AUC on the test rows.

    Features are z-scored with train statistics. `C=None` picks C per finding from `Cs` on a stratified `val_frac`
    hold-out of the train rows, then refits on all of them; a finding with < 5 train samples of a class uses C = 1.
    Uncertain (-1) labels are dropped per finding. A finding with one class in train or test gets AUC NaN.
    Returns {"auc": {name: auc}, "C": {name: C}, "auc_macro": mean over finite AUCs}.
    """
    Xtr, Xte = _np(train_X_NE).astype(np.float64), _np(test_X_ME).astype(np.float64)
    Ytr, Yte = _np(train_Y_NK), _np(test_Y_MK)
    names = list(label_names) if label_names is not None else [str(k) for k in range(Ytr.shape[1])]
    if Ytr.shape[1] != len(names) or Yte.shape[1] != len(names):
        raise ValueError(f"linear_probe: {len(names)} label names but label matrices {Ytr.shape} / {Yte.shape}")
    z = _standardiser(Xtr)
    Ztr, Zte = z(Xtr), z(Xte)
    aucs: dict[str, float] = {}
    chosen: dict[str, float] = {}
    for k, name in enumerate(names):
        rows = np.flatnonzero(Ytr[:, k] != UNCERTAIN)
        y = (Ytr[rows, k] > 0).astype(int)
        if y.min(initial=1) == y.max(initial=0):  # one class (or none): nothing to separate
            aucs[name], chosen[name] = float("nan"), float("nan")
            continue
        c = float(C) if C is not None else _choose_C(Ztr[rows], y, Cs, val_frac, seed, max_iter)
        chosen[name] = c
        aucs[name] = roc_auc(Yte[:, k], _fit_score(Ztr[rows], y, Zte, c, seed, max_iter), warn=False)
    finite = [a for a in aucs.values() if np.isfinite(a)]
    return {"auc": aucs, "C": chosen, "auc_macro": float(np.mean(finite)) if finite else float("nan")}


def kshot_probe(train_X_NE, train_Y_NK, test_X_ME, test_Y_MK, label_names: Sequence[str] | None = None, *,
                ks: Sequence[int] = (1, 2, 4, 8, 16), n_seeds: int = 3, seed: int = 0, C: float = 1.0,
                max_iter: int = 1000) -> dict[int, dict]:
    """k-shot linear probe: per finding, k positives AND k negatives drawn from the train rows, fit, AUC on test.

    For each k and each of `n_seeds` draws the macro AUC over findings is computed; the result per k is
    {"auc_mean", "auc_std" (over draws, ddof 0), "n_findings" (findings with >= k of each class), "skipped"
    (names of findings without enough samples)}. A k no finding can serve gets NaNs and a warning. C is fixed
    (default 1.0): with 1-2 samples per class there is nothing to validate on. Features are z-scored with the
    statistics of the whole train pool (labels unused). Draws are deterministic given (seed, k, draw).
    """
    Xtr, Xte = _np(train_X_NE).astype(np.float64), _np(test_X_ME).astype(np.float64)
    Ytr, Yte = _np(train_Y_NK), _np(test_Y_MK)
    names = list(label_names) if label_names is not None else [str(k) for k in range(Ytr.shape[1])]
    z = _standardiser(Xtr)
    Ztr, Zte = z(Xtr), z(Xte)
    out: dict[int, dict] = {}
    for k_shot in ks:
        usable = [j for j in range(len(names))
                  if min((Ytr[:, j] == 1).sum(), (Ytr[:, j] == 0).sum()) >= k_shot]
        skipped = [names[j] for j in range(len(names)) if j not in usable]
        if not usable:
            warnings.warn(f"kshot_probe: k={k_shot} skipped: no finding has {k_shot} positives and {k_shot} negatives "
                          f"in the train rows", RuntimeWarning, stacklevel=2)
            out[int(k_shot)] = {"auc_mean": float("nan"), "auc_std": float("nan"), "n_findings": 0, "skipped": skipped}
            continue
        per_draw = []
        for draw in range(n_seeds):
            rng = np.random.default_rng([seed, int(k_shot), draw])
            aucs = []
            for j in usable:
                pos = rng.choice(np.flatnonzero(Ytr[:, j] == 1), size=k_shot, replace=False)
                neg = rng.choice(np.flatnonzero(Ytr[:, j] == 0), size=k_shot, replace=False)
                rows = np.r_[pos, neg]
                y = np.r_[np.ones(k_shot, int), np.zeros(k_shot, int)]
                aucs.append(roc_auc(Yte[:, j], _fit_score(Ztr[rows], y, Zte, C, seed, max_iter), warn=False))
            finite = [a for a in aucs if np.isfinite(a)]
            per_draw.append(float(np.mean(finite)) if finite else float("nan"))
        arr = np.asarray(per_draw)
        ok = arr[np.isfinite(arr)]
        out[int(k_shot)] = {"auc_mean": float(ok.mean()) if len(ok) else float("nan"),
                            "auc_std": float(ok.std()) if len(ok) else float("nan"),
                            "n_findings": len(usable), "skipped": skipped}
    return out
