"""Label budgets (stratified, seeded) and the sklearn-backed metrics."""
import math

import numpy as np
import pytest

from medvlp.finetune.path_clip.metrics import classification_metrics
from medvlp.finetune.path_clip.sampling import budget_name, label_budget


Y = np.array([0] * 700 + [1] * 250 + [2] * 50)


def test_kshot_is_stratified_and_seeded():
    a = label_budget(Y, shots=4, seed=7)
    assert np.bincount(Y[a], minlength=3).tolist() == [4, 4, 4]
    assert np.array_equal(a, label_budget(Y, shots=4, seed=7))  # same seed, same subset
    assert not np.array_equal(a, label_budget(Y, shots=4, seed=8))
    assert np.all(np.diff(a) > 0)


def test_label_fraction_is_proportional_with_every_class():
    a = label_budget(Y, label_fraction=0.02, seed=0)  # 20 samples: 14 / 5 / 1
    assert np.bincount(Y[a], minlength=3).tolist() == [14, 5, 1]
    b = label_budget(Y, label_fraction=0.001, seed=0)  # round(1.0) -> at least one per class
    assert np.bincount(Y[b], minlength=3).tolist() == [1, 1, 1]
    assert np.array_equal(b, label_budget(Y, label_fraction=0.001, seed=0))


def test_short_class_warns_and_bad_budgets_fail():
    with pytest.warns(RuntimeWarning, match="fewer samples"):
        a = label_budget(Y, shots=60, seed=0)
    assert np.bincount(Y[a]).tolist() == [60, 60, 50]
    with pytest.raises(ValueError, match="exactly one of shots"):
        label_budget(Y, shots=2, label_fraction=0.1)
    with pytest.raises(ValueError, match="exactly one of shots"):
        label_budget(Y)
    with pytest.raises(ValueError, match="label_fraction: must be in"):
        label_budget(Y, label_fraction=1.5)
    assert budget_name(shots=4) == "4-shot" and budget_name(label_fraction=0.005) == "0.5%"
    assert budget_name(label_fraction=0.02) == "2%" and budget_name(label_fraction=0.001) == "0.1%"


@pytest.mark.timeout(60)
def test_recipe_fraction_budgets_on_the_lab2_split():
    """The recipe's 0.1 / 0.5 / 2 % budgets on the lab2 train split (1616 images, 972 normal / 644 tumour) are
    n = 2, 8 and 32 labels, stratified: 1 / 1 (the 1-shot subset itself), 5 / 3 and 19 / 13."""
    from medvlp.finetune.path_clip.protocol import budgets_of
    from medvlp.launch.config import load_config

    cfg = load_config("path-clip-patho", [])
    assert cfg.protocol.seeds == 5 and cfg.protocol.label_fractions == [0.001, 0.005, 0.02]
    assert [b[0] for b in budgets_of(cfg)] == ["0.1%", "0.5%", "2%", "1-shot", "4-shot", "16-shot"]
    y = np.random.default_rng(0).permutation(np.array([0] * 972 + [1] * 644))
    want = {0.001: [1, 1], 0.005: [5, 3], 0.02: [19, 13]}
    for f, k in zip(cfg.protocol.label_fractions, cfg.protocol.shots):
        for seed in range(cfg.protocol.seeds):
            a = label_budget(y, label_fraction=f, seed=seed, num_classes=2)
            shot = label_budget(y, shots=k, seed=seed, num_classes=2)
            assert np.bincount(y[a], minlength=2).tolist() == want[f] and len(a) == len(shot)
            assert np.array_equal(a, shot) == (f == 0.001)  # one per class: the same draw as 1-shot


def test_metrics_against_hand_values():
    y = np.array([0, 0, 1, 1])
    logits = np.array([[2.0, 0.0], [0.0, 1.0], [0.0, 3.0], [1.0, 0.5]])  # preds 0, 1, 1, 0
    m = classification_metrics(y, logits)
    assert m["acc"] == pytest.approx(0.5) and m["f1_macro"] == pytest.approx(0.5)
    # P(1) ranks: sample 2 > 1 > 3 > 0 -> positives {2, 3}: pairs (2>0, 2>1, 3>0, 3<1) = 3/4
    assert m["auc"] == pytest.approx(0.75)
    m3 = classification_metrics(np.array([0, 1, 2]), np.eye(3))
    assert m3["acc"] == 1.0 and m3["auc"] == 1.0
    assert math.isnan(classification_metrics(np.array([0, 0]), np.eye(2))["auc"])
    with pytest.raises(ValueError, match="do not match"):
        classification_metrics(np.array([0, 1, 1]), np.eye(2))


def test_task_classes_from_the_class_index_member():
    from medvlp.finetune.path_clip.data import TaskSpec

    t = TaskSpec.build(["tumor"], classes="class_index", class_names=["normal", "tumor", "inflamed"])
    assert t.class_of({}, {"meta": {"class_index": 2}}, "k") == 2
    with pytest.raises(ValueError, match="class_index 5 is outside"):
        t.class_of({}, {"meta": {"class_index": 5}}, "k")
    b = TaskSpec.build(["tumor"], label="tumor")
    assert b.class_names == ["no tumor", "tumor"] and b.class_of({"tumor": -1}) == -1
    m = TaskSpec.build(["a", "b", "c"])
    assert m.class_of({"a": 0, "b": 1, "c": 0}) == 1 and m.class_of({"a": 1, "b": 1}) == -1
