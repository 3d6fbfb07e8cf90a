import math

import numpy as np
import pytest

from medvlp.finetune.sweep import paired_bootstrap_diff, pm, seed_summary, write_table
from medvlp.pretrain.metrics import roc_auc

pytestmark = pytest.mark.timeout(120)


def test_seed_summary_is_sample_sd_and_t_interval():
    s = seed_summary([1.0, 2.0, 3.0, float("nan")])
    assert s["n"] == 3 and s["mean"] == 2.0 and s["sd"] == pytest.approx(1.0)  # ddof=1, not sqrt(2/3)
    assert s["ci_hi"] - 2.0 == pytest.approx(4.302652729911275 / math.sqrt(3))  # t(0.975, 2)
    assert pm(s) == "2.000 ± 1.000" and pm(seed_summary([0.5])) == "0.500" and pm(seed_summary([])) == "—"


def test_paired_bootstrap_separates_a_real_gain_from_none():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    good = np.stack([y + rng.normal(0, 0.6, 300) for _ in range(3)])
    bad = np.stack([y + rng.normal(0, 1.5, 300) for _ in range(3)])
    d = paired_bootstrap_diff(roc_auc, y, good, bad, n_boot=300)
    assert d["ci_lo"] > 0.05 and d["diff"] > d["ci_lo"] and d["p_le_0"] == 0.0
    same = paired_bootstrap_diff(roc_auc, y, good, good, n_boot=50)
    assert same["diff"] == 0.0 and same["ci_lo"] == 0.0 == same["ci_hi"]
    # per-seed labels (S, N) are accepted too, and shapes must agree
    d2 = paired_bootstrap_diff(roc_auc, np.stack([y] * 3), good, bad, n_boot=50)
    assert d2["diff"] == pytest.approx(d["diff"])
    with pytest.raises(ValueError, match="score_a and score_b"):
        paired_bootstrap_diff(roc_auc, y, good, bad[:2])


def test_write_table_markdown_and_csv(tmp_path):
    md, cs = write_table([{"arm": "a", "auc": 0.91234}, {"arm": "b", "auc": 0.5}], tmp_path / "t", title="T")
    assert "| a | 0.912 |" in md.read_text() and "0.91234" in cs.read_text()
