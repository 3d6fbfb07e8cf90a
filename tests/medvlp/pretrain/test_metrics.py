"""Metrics against hand-computed values and sklearn references."""
from __future__ import annotations

import numpy as np
import pytest

from medvlp.pretrain import metrics as M


def test_auc_hand_computed_with_ties():
    assert M.roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    # pairs (pos, neg): (.5,.5) tie = 1/2, (.5,.1) = 1, (.9,.5) = 1, (.9,.1) = 1 -> 3.5 / 4
    assert M.roc_auc([1, 0, 1, 0], [0.5, 0.5, 0.9, 0.1]) == pytest.approx(0.875)
    # every score tied -> exactly chance
    assert M.roc_auc([1, 0, 1, 0, 0], [2.0] * 5) == pytest.approx(0.5)
    # uncertain labels are ignored (the -1 row would otherwise flip the order)
    assert M.roc_auc([1, 0, -1], [0.9, 0.1, 0.0]) == pytest.approx(1.0)


def test_auc_matches_sklearn_on_discrete_scores():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    s = rng.integers(0, 7, 300) + 0.5 * y  # many ties
    assert M.roc_auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_auc_single_class_is_nan_with_warning():
    with pytest.warns(RuntimeWarning, match="only one class"):
        assert np.isnan(M.roc_auc([1, 1, -1], [0.2, 0.3, 0.4]))
    with pytest.raises(ValueError, match="differ in length"):
        M.roc_auc([0, 1], [0.1])


def test_bootstrap_ci_contains_point_and_is_deterministic():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 200)
    s = y + rng.normal(0, 1.0, 200)
    point = M.roc_auc(y, s)
    lo, hi = M.bootstrap_ci(M.roc_auc, y, s, n=200, seed=3)
    assert lo < point < hi and 0.5 < lo and hi < 1.0
    assert M.bootstrap_ci(M.roc_auc, y, s, n=200, seed=3) == (lo, hi)
    assert M.bootstrap_ci(M.roc_auc, y, s, n=200, seed=4) != (lo, hi)
    # a 2-D (N, K) metric resamples rows jointly
    lo2, hi2 = M.bootstrap_ci(M.macro_auc, np.c_[y, y], np.c_[s, s], n=50, seed=3)
    assert lo2 <= point <= hi2


def test_recall_at_k_hand_built():
    sim = np.array([[0.9, 0.1, 0.0, 0.2],   # correct (0) first
                    [0.8, 0.5, 0.1, 0.0],   # correct (1) second
                    [0.3, 0.3, 0.3, 0.9],   # correct (2) tied with 0 and 1 below 3: pessimistic rank 4
                    [0.1, 0.2, 0.3, 0.0]])  # correct (3) last
    r = M.recall_at_k(sim, ks=(1, 2, 3, 4))
    assert r == {1: 0.25, 2: 0.5, 3: 0.5, 4: 1.0}
    # the other direction: rows 0, 1 first; row 2 ties with a wrong candidate (pessimistic miss); row 3 misses
    assert M.recall_at_k(sim.T, gt=np.arange(4), ks=(1,))[1] == pytest.approx(0.5)
    # a mask with two correct candidates for query 2: its best correct (3) is first
    mask = np.eye(4, dtype=bool)
    mask[2, 3] = True
    assert M.recall_at_k(sim, gt=mask, ks=(1,))[1] == pytest.approx(0.5)
    # collapsed model: constant similarity never gives a perfect score
    assert M.recall_at_k(np.zeros((5, 5)), ks=(1, 5)) == {1: 0.0, 5: 1.0}
    with pytest.raises(ValueError, match="no correct candidate"):
        M.recall_at_k(sim, gt=np.zeros((4, 4), bool))


def test_operating_point_nearest_top_left():
    y = np.array([0, 0, 0, 1, 1, 1])
    s = np.array([0.1, 0.2, 0.6, 0.4, 0.7, 0.9])
    op = M.operating_point(y, s)
    # thresholds 0.4 -> (fpr 1/3, tpr 1) and 0.7 -> (0, 2/3): both at distance 1/3, the higher one wins
    assert op["threshold"] == pytest.approx(0.7)
    assert op["sensitivity"] == pytest.approx(2 / 3) and op["specificity"] == pytest.approx(1.0)
    assert op["accuracy"] == pytest.approx(5 / 6)
    fpr, tpr, thr = M.roc_curve(y, s)
    assert fpr[0] == 0 and tpr[-1] == 1 and fpr[-1] == 1 and np.isinf(thr[0])


def _separable(n: int, seed: int):
    rng = np.random.default_rng(seed)
    Y = rng.integers(0, 2, (n, 2))
    X = rng.normal(0, 1, (n, 6))
    X[:, 0] += 4.0 * Y[:, 0]   # finding 0 is linearly separable on feature 0
    X[:, 1] += 4.0 * Y[:, 1]
    return X, Y


def test_linear_probe_separable_features():
    Xtr, Ytr = _separable(120, 0)
    Xte, Yte = _separable(80, 1)
    Ytr[:5, 1] = -1  # uncertain labels are dropped, not treated as negatives
    res = M.linear_probe(Xtr, Ytr, Xte, Yte, ["a", "b"])
    assert res["auc"]["a"] > 0.95 and res["auc"]["b"] > 0.95 and res["auc_macro"] > 0.95
    assert set(res["C"].values()) <= set(M.PROBE_CS)
    assert M.linear_probe(Xtr, Ytr, Xte, Yte, ["a", "b"]) == res  # deterministic
    Ytr1 = Ytr.copy()
    Ytr1[:, 1] = 1  # one class in train -> NaN for that finding only
    res1 = M.linear_probe(Xtr, Ytr1, Xte, Yte, ["a", "b"], C=1.0)
    assert np.isnan(res1["auc"]["b"]) and res1["auc_macro"] == pytest.approx(res1["auc"]["a"])


def test_kshot_mean_std_per_k_and_skips():
    Xtr, Ytr = _separable(40, 2)
    Xte, Yte = _separable(60, 3)
    Ytr[:, 1] = np.r_[np.ones(3), np.zeros(37)]  # finding b has only 3 positives
    with pytest.warns(RuntimeWarning, match="k=64 skipped"):
        res = M.kshot_probe(Xtr, Ytr, Xte, Yte, ["a", "b"], ks=(1, 2, 4, 64), n_seeds=3)
    assert sorted(res) == [1, 2, 4, 64]
    for k in (1, 2, 4):
        assert 0.5 < res[k]["auc_mean"] <= 1.0 and res[k]["auc_std"] >= 0.0
    assert res[1]["n_findings"] == 2 and res[4]["n_findings"] == 1 and res[4]["skipped"] == ["b"]
    assert np.isnan(res[64]["auc_mean"]) and res[64]["n_findings"] == 0
    assert res[4]["auc_mean"] > 0.9  # separable finding a with 4+4 shots
    res2 = M.kshot_probe(Xtr, Ytr, Xte, Yte, ["a", "b"], ks=(1, 2, 4), n_seeds=3)
    assert all(res2[k] == res[k] for k in (1, 2, 4))


def test_stratified_indices_single_and_multi_label():
    # class-sorted single-label split (one-hot): 90 of class 0, 8 of class 1, 2 of class 2
    Y = np.zeros((100, 3))
    Y[:90, 0], Y[90:98, 1], Y[98:, 2] = 1, 1, 1
    idx = M.stratified_indices(Y, 20, seed=0)
    assert len(idx) == 20 and len(set(idx)) == 20 and list(idx) == sorted(idx)
    per_class = Y[idx].sum(0)
    assert per_class[1] >= 2 and per_class[2] == 2 and per_class.sum() == 20  # rare classes kept, proportional
    assert not np.array_equal(idx, np.arange(20))  # never "the first N"
    assert np.array_equal(M.stratified_indices(Y, 20, seed=0), idx)  # seeded
    assert not np.array_equal(M.stratified_indices(Y, 20, seed=1), idx)
    assert np.array_equal(M.stratified_indices(Y, 0), np.arange(100))  # 0 = all
    # multi-label: a rare finding (3 positives in 200) still gets 2 positives in a draw of 10
    Ym = np.zeros((200, 2))
    Ym[:3, 1] = 1
    Ym[::2, 0] = 1
    idx = M.stratified_indices(Ym, 10, seed=0)
    assert len(idx) == 10 and Ym[idx, 1].sum() >= 2 and 0 < Ym[idx, 0].sum() < 10
    assert M.single_class_columns(Ym[10:], ["a", "b"]) == ["b"]


def test_paired_bootstrap_against_exact_enumeration():
    """delta AUC of two scorers on 4 samples; the bootstrap distribution is compared with the exact one over all
    4^4 equally likely resamples (hand-enumerable), and the point values with hand-computed AUCs."""
    import itertools

    y = np.array([0, 1, 0, 1])
    a = np.array([0.1, 0.9, 0.2, 0.8])  # perfect: AUC 1
    b = np.array([0.6, 0.9, 0.2, 0.3])  # pairs (pos, neg): (.9,.6) (.9,.2) (.3,.2) win, (.3,.6) loses: AUC 3/4
    res = M.paired_bootstrap(M.roc_auc, y, a, b, n=4000, seed=0)
    assert res["metric_a"] == 1.0 and res["metric_b"] == 0.75 and res["delta"] == 0.25
    deltas = []
    for idx in itertools.product(range(4), repeat=4):
        i = np.array(idx)
        if y[i].min() == y[i].max():
            continue  # one class drawn: AUC undefined, dropped (as the bootstrap drops it)
        deltas.append(M.roc_auc(y[i], a[i]) - M.roc_auc(y[i], b[i]))
    deltas = np.array(deltas)
    exact_p = min(1.0, 2 * min((deltas <= 0).mean(), (deltas >= 0).mean()))
    assert (deltas >= 0).all()  # A is never worse on any resample: delta* <= 0 only where it is exactly 0
    assert res["p_value"] == pytest.approx(exact_p, abs=0.03)
    assert res["ci_lo"] <= 0.25 <= res["ci_hi"] and res["ci_lo"] >= 0.0
    # identical scorers: delta 0 on every resample, p = 1
    same = M.paired_bootstrap(M.roc_auc, y, a, a, n=200, seed=0)
    assert same["delta"] == 0.0 and same["p_value"] == 1.0
    with pytest.raises(ValueError, match="same samples"):
        M.paired_bootstrap(M.roc_auc, y, a, b[:3])


def test_bootstrap_ci_is_scipy_bca():
    from scipy.stats import bootstrap

    rng = np.random.default_rng(5)
    y = rng.integers(0, 2, 80)
    s = y + rng.normal(0, 1.0, 80)
    lo, hi = M.bootstrap_ci(M.roc_auc, y, s, n=300, seed=7)
    ref = bootstrap((np.arange(80),), lambda i: M.roc_auc(y[i], s[i], warn=False), n_resamples=300, paired=True,
                    vectorized=False, method="BCa", rng=np.random.default_rng(7)).confidence_interval
    assert (lo, hi) == pytest.approx((ref.low, ref.high))


@pytest.mark.timeout(60)
def test_at_threshold_applies_a_threshold_chosen_elsewhere():
    y = np.array([0, 0, 0, 1, 1, 1, -1])
    s = np.array([0.1, 0.2, 0.6, 0.4, 0.7, 0.9, 0.95])  # the uncertain sample is left out
    op = M.at_threshold(y, s, 0.5)
    assert op["sensitivity"] == pytest.approx(2 / 3) and op["specificity"] == pytest.approx(2 / 3)
    assert op["accuracy"] == pytest.approx(4 / 6) and op["threshold"] == 0.5
    val = M.operating_point(y[:6], s[:6])  # picked on one split, applied unchanged to another
    test = M.at_threshold(np.array([1, 1, 0]), np.array([0.8, 0.65, 0.75]), val["threshold"])
    assert test["sensitivity"] == 0.5 and test["specificity"] == 0.0
    assert np.isnan(M.at_threshold(np.array([1, 1]), np.array([0.2, 0.9]), 0.5)["specificity"])
    assert np.isnan(M.at_threshold(y, s, float("nan"))["accuracy"])
