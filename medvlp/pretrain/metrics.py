"""Evaluation metrics as pure functions: ROC AUC (+ bootstrap CI), operating point, retrieval R@K, linear probes,
paired bootstrap comparison of two models, stratified sample selection.

The numbers come from the libraries people check them against: `sklearn.metrics.roc_auc_score` / `roc_curve`
for AUC and ROC, `sklearn.linear_model.LogisticRegressionCV` for the probe's C, `scipy.stats.bootstrap` (BCa)
for confidence intervals. This module adds the conventions around them (uncertain labels, NaN for one class).
Everything here is deterministic given its `seed` and takes numpy arrays (torch tensors are converted).
Legend: N train / M test samples, K findings, Q queries, C candidates, E embedding width.
Labels are 1 (positive), 0 (negative) or -1 (uncertain); uncertain labels are left out of every AUC and probe.
"""
from __future__ import annotations

import math
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
def _keep(y, score) -> tuple[np.ndarray, np.ndarray]:
    """(binary labels, float scores) of the entries that are not uncertain and have a finite score."""
    y_N, s_N = _np(y).reshape(-1), _np(score).astype(np.float64).reshape(-1)
    if y_N.shape != s_N.shape:
        raise ValueError(f"labels {y_N.shape} and scores {s_N.shape} differ in length")
    keep = (y_N != UNCERTAIN) & np.isfinite(s_N)
    return (y_N[keep] > 0).astype(np.int64), s_N[keep]


def roc_auc(y, score, *, warn: bool = True) -> float:
    """Area under the ROC curve (`sklearn.metrics.roc_auc_score`; tied scores count one half).

    Entries with label -1 (uncertain) or a non-finite score are ignored. With a single class left the AUC is
    undefined: returns NaN (with a RuntimeWarning unless `warn=False`).
    """
    from sklearn.metrics import roc_auc_score

    try:
        y_N, s_N = _keep(y, score)
    except ValueError as e:
        raise ValueError(f"roc_auc: {e}") from None
    n_pos = int(y_N.sum())
    n_neg = len(y_N) - n_pos
    if n_pos == 0 or n_neg == 0:
        if warn:
            warnings.warn(f"roc_auc: only one class present ({n_pos} positives, {n_neg} negatives); AUC is NaN",
                          RuntimeWarning, stacklevel=2)
        return float("nan")
    return float(roc_auc_score(y_N, s_N))


def roc_curve(y, score) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) at every distinct score (`sklearn.metrics.roc_curve`, no point dropped), from (0, 0)
    at threshold +inf; uncertain labels ignored. A sample is called positive when score >= threshold."""
    from sklearn.metrics import roc_curve as sk_roc_curve

    y_N, s_N = _keep(y, score)
    if len(y_N) == 0 or y_N.min() == y_N.max():  # sklearn needs both classes
        return np.zeros(1), np.zeros(1), np.array([np.inf])
    fpr, tpr, thr = sk_roc_curve(y_N, s_N, drop_intermediate=False)
    thr = thr.astype(np.float64)
    thr[0] = np.inf  # sklearn versions differ (max + 1 or inf) for the "nothing positive" point
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


def at_threshold(y, score, threshold: float) -> dict[str, float]:
    """Accuracy, sensitivity and specificity of `score >= threshold` (a threshold chosen elsewhere, e.g. by
    `operating_point` on a validation split). Uncertain labels and non-finite scores are left out; a metric whose
    class is missing (or a NaN threshold) is NaN."""
    y_N = _np(y).reshape(-1)
    s_N = _np(score).astype(np.float64).reshape(-1)
    keep = (y_N != UNCERTAIN) & np.isfinite(s_N)
    y_N, s_N = y_N[keep] > 0, s_N[keep]
    nan = float("nan")
    if not math.isfinite(float(threshold)) or y_N.size == 0:
        return {"threshold": float(threshold), "accuracy": nan, "sensitivity": nan, "specificity": nan}
    pred = s_N >= float(threshold)
    return {"threshold": float(threshold), "accuracy": float((pred == y_N).mean()),
            "sensitivity": float(pred[y_N].mean()) if y_N.any() else nan,
            "specificity": float((~pred[~y_N]).mean()) if (~y_N).any() else nan}


def macro_auc(y_NK, score_NK) -> float:
    """Mean AUC over findings that have both classes (NaN if none has)."""
    y_NK, s_NK = _np(y_NK), _np(score_NK)
    aucs = [roc_auc(y_NK[:, k], s_NK[:, k], warn=False) for k in range(y_NK.shape[1])]
    finite = [a for a in aucs if np.isfinite(a)]
    return float(np.mean(finite)) if finite else float("nan")


def _nan_safe(metric_fn: Callable[..., float]) -> Callable[..., float]:
    def fn(*arrays):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return metric_fn(*arrays)
    return fn


def _scipy_bootstrap(stat, data: tuple, n: int, seed: int, alpha: float, method: str):
    from scipy.stats import bootstrap

    with warnings.catch_warnings():  # BCa on a degenerate distribution warns and returns NaN: handled by callers
        warnings.simplefilter("ignore")
        return bootstrap(data, stat, n_resamples=n, paired=True, vectorized=False, confidence_level=1 - alpha,
                         method=method, rng=np.random.default_rng(seed))


def bootstrap_ci(metric_fn: Callable[[np.ndarray, np.ndarray], float], y, score, n: int = 200, seed: int = 0,
                 alpha: float = 0.05, method: str = "BCa") -> tuple[float, float]:
    """(1 − alpha) bootstrap CI of `metric_fn(y, score)` from `scipy.stats.bootstrap` (BCa by default), resampling
    rows (axis 0, labels and scores together) with replacement.

    A resample whose metric is NaN (e.g. one class drawn) makes BCa undefined; then the percentile interval of
    the finite resamples is returned, and (NaN, NaN) if fewer than half of them are finite. Same seed, same CI.
    """
    y, score = _np(y), _np(score)
    if len(y) != len(score):
        raise ValueError(f"bootstrap_ci: labels ({len(y)}) and scores ({len(score)}) differ in length")
    if n < 1 or len(y) < 2:
        return float("nan"), float("nan")
    idx = np.arange(len(y))
    fn = _nan_safe(metric_fn)

    def stat(i):
        i = np.asarray(i, dtype=np.int64)
        return fn(y[i], score[i])

    res = _scipy_bootstrap(stat, (idx,), n, seed, alpha, method)
    lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
    if np.isfinite(lo) and np.isfinite(hi):
        return lo, hi
    dist = np.asarray(res.bootstrap_distribution, dtype=np.float64).reshape(-1)
    dist = dist[np.isfinite(dist)]
    if len(dist) < max(1, n // 2):
        return float("nan"), float("nan")
    lo, hi = np.percentile(dist, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(lo), float(hi)


def paired_bootstrap(metric_fn: Callable[[np.ndarray, np.ndarray], float], y, score_a, score_b, n: int = 1000,
                     seed: int = 0, alpha: float = 0.05) -> dict[str, float]:
    """Compare two models scored on the SAME samples: delta = metric(y, a) − metric(y, b).

    Each bootstrap resample draws the sample rows once and scores both models on them (paired), which cancels
    the sample-to-sample variation the two share. Returns {"delta", "ci_lo", "ci_hi" (BCa, `scipy.stats.bootstrap`,
    percentile when BCa is undefined), "p_value" (two-sided: 2·min(P*(delta* <= 0), P*(delta* >= 0)), at most 1,
    over the finite resamples), "n_resamples" (finite ones), "metric_a", "metric_b"}.
    """
    y, a, b = _np(y), _np(score_a), _np(score_b)
    if not (len(y) == len(a) == len(b)):
        raise ValueError(f"paired_bootstrap: labels ({len(y)}) and the two score sets ({len(a)}, {len(b)}) must "
                         "cover the same samples")
    fn = _nan_safe(metric_fn)
    ma, mb = fn(y, a), fn(y, b)
    out = {"metric_a": float(ma), "metric_b": float(mb), "delta": float(ma - mb)}
    if n < 1 or len(y) < 2:
        return {**out, "ci_lo": float("nan"), "ci_hi": float("nan"), "p_value": float("nan"), "n_resamples": 0.0}

    def stat(i):
        i = np.asarray(i, dtype=np.int64)
        return fn(y[i], a[i]) - fn(y[i], b[i])

    res = _scipy_bootstrap(stat, (np.arange(len(y)),), n, seed, alpha, "BCa")
    dist = np.asarray(res.bootstrap_distribution, dtype=np.float64).reshape(-1)
    dist = dist[np.isfinite(dist)]
    lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
    if not (np.isfinite(lo) and np.isfinite(hi)) and len(dist):
        lo, hi = (float(v) for v in np.percentile(dist, [100 * alpha / 2, 100 * (1 - alpha / 2)]))
    p = float(min(1.0, 2 * min((dist <= 0).mean(), (dist >= 0).mean()))) if len(dist) else float("nan")
    return {**out, "ci_lo": lo, "ci_hi": hi, "p_value": p, "n_resamples": float(len(dist))}


# ----------------------------------------------------------------------------------------------- sampling
def stratified_indices(labels_NK, n: int, seed: int = 0, min_per_class: int = 2) -> np.ndarray:
    """A seeded random subset of `n` row indices (sorted) of a label matrix, stratified where labels allow.

    Single-label (one-hot rows): each class gets its share of `n` in proportion to its frequency, at least
    `min_per_class` (or all it has). Multi-label: every finding first gets `min_per_class` positives and as many
    negatives (or all it has), the rest is filled uniformly at random. Rows are never chosen twice. `n <= 0` or
    `n >= N`: every row.
    """
    Y = _np(labels_NK)
    N = len(Y)
    if n <= 0 or n >= N:
        return np.arange(N)
    rng = np.random.default_rng(seed)
    Y = Y.reshape(N, -1)
    one_hot = Y.shape[1] > 1 and np.all((Y == 1).sum(axis=1) == 1) and np.all((Y == 0) | (Y == 1))
    chosen = np.zeros(N, dtype=bool)
    if one_hot:
        cls = Y.argmax(axis=1)
        counts = np.bincount(cls, minlength=Y.shape[1])
        want = np.floor(n * counts / N).astype(int)
        want = np.minimum(np.maximum(want, np.minimum(counts, min_per_class)), counts)
        # hand out what rounding left over to the classes with the largest remainders (ties: lower index)
        frac = n * counts / N - np.floor(n * counts / N)
        for c in np.argsort(-frac, kind="stable"):
            if want.sum() >= n:
                break
            if want[c] < counts[c]:
                want[c] += 1
        for c in range(Y.shape[1]):
            rows = np.flatnonzero(cls == c)
            chosen[rng.permutation(rows)[: want[c]]] = True
    else:
        for k in range(Y.shape[1]):
            for v in (1, 0):
                rows = np.flatnonzero((Y[:, k] == v) & ~chosen)
                have = int(((Y[:, k] == v) & chosen).sum())
                take = max(0, min(min_per_class - have, len(rows)))
                chosen[rng.permutation(rows)[:take]] = True
    left = n - int(chosen.sum())
    if left > 0:
        chosen[rng.permutation(np.flatnonzero(~chosen))[:left]] = True
    elif left < 0:  # the per-class minimums overshot a tiny n: drop random extras
        chosen[rng.permutation(np.flatnonzero(chosen))[:-left]] = False
    return np.flatnonzero(chosen)


def single_class_columns(labels_NK, names: Sequence[str]) -> list[str]:
    """Names of the label columns that have only one class (no 1s or no 0s among the certain labels)."""
    Y = _np(labels_NK).reshape(len(labels_NK), -1) if len(labels_NK) else np.zeros((0, len(names)))
    return [n for k, n in enumerate(names) if not ((Y[:, k] == 1).any() and (Y[:, k] == 0).any())]


# ----------------------------------------------------------------------------------------------- retrieval
def retrieval_ranks(sim_QC, gt=None) -> np.ndarray:
    """1-based rank of each query's best correct candidate: 1 + the number of *wrong* candidates scoring >= it (ties
    are pessimistic, so a collapsed model with constant similarities ranks last, never first).

    `gt`: None (query q's correct candidate is candidate q), an int array (Q,) of correct candidate indices, or a
    boolean matrix (Q, C) marking every correct candidate (e.g. identical report texts).
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
    return 1 + ((sim_QC >= best_Q[:, None]) & ~mask_QC).sum(axis=1)


def recall_at_k(sim_QC, gt=None, ks: Sequence[int] = (1, 5, 10)) -> dict[int, float]:
    """Fraction of queries whose correct candidate is among the top k by similarity (`retrieval_ranks` <= k; `gt`
    as there)."""
    rank_Q = retrieval_ranks(sim_QC, gt)
    return {int(k): float((rank_Q <= k).mean()) for k in ks}


# ----------------------------------------------------------------------------------------------- probes
PROBE_CS = (0.01, 0.1, 1.0, 10.0)  # inverse L2 strengths LogisticRegressionCV chooses from
PROBE_FOLDS = 5  # stratified folds of the C search (fewer when a class has fewer samples)


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


def _fit_score_cv(X_fit, y_fit, X_eval, Cs, seed: int, max_iter: int) -> tuple[np.ndarray, float]:
    """`LogisticRegressionCV` over `Cs` (stratified, shuffled folds, scored by ROC AUC), refit on all rows.

    Needs >= 2 samples of each class for 2 folds; below that the fixed C = 1.0 is used."""
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.model_selection import StratifiedKFold

    folds = min(PROBE_FOLDS, int(np.bincount(y_fit, minlength=2).min()))
    if folds < 2:
        return _fit_score(X_fit, y_fit, X_eval, 1.0, seed, max_iter), 1.0
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    clf = LogisticRegressionCV(Cs=list(Cs), cv=cv, scoring="roc_auc", max_iter=max_iter, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence chatter at large C on separable folds
        clf.fit(X_fit, y_fit)
    return clf.decision_function(X_eval), float(np.ravel(clf.C_)[0])


def linear_probe(train_X_NE, train_Y_NK, test_X_ME, test_Y_MK, label_names: Sequence[str] | None = None, *,
                 C: float | None = None, Cs: Sequence[float] = PROBE_CS, seed: int = 0,
                 max_iter: int = 1000) -> dict:
    """One-vs-rest logistic regression per finding on frozen, standardised features; AUC on the test rows.

    Features are z-scored with train statistics. `C=None` picks C per finding from `Cs` with
    `sklearn.linear_model.LogisticRegressionCV` (stratified 5-fold ROC AUC, fewer folds for rare classes; C = 1
    with < 2 train samples of a class), refitted on all train rows. Uncertain (-1) labels are dropped per
    finding. A finding with one class in train or test gets AUC NaN.
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
        if C is not None:
            score, c = _fit_score(Ztr[rows], y, Zte, float(C), seed, max_iter), float(C)
        else:
            score, c = _fit_score_cv(Ztr[rows], y, Zte, Cs, seed, max_iter)
        chosen[name] = c
        aucs[name] = roc_auc(Yte[:, k], score, warn=False)
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
