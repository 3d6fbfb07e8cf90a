"""Retrieval with bootstrap CIs and chance levels, and label-group zero-shot, on real-caption-shaped data."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from medvlp.pretrain import retrieval as R

pytestmark = pytest.mark.timeout(180)


def test_ranks_perfect_and_pessimistic_ties():
    sim = np.eye(4)
    same = np.eye(4, dtype=bool)
    assert R.ranks(sim, same).tolist() == [1, 1, 1, 1]
    assert R.ranks(np.zeros((4, 4)), same).tolist() == [4, 4, 4, 4]  # a constant model ranks last, never first
    same2 = same.copy()
    same2[0, 3] = True
    sim2 = np.array([[0.1, 0.5, 0.2, 0.9], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    assert R.ranks(sim2, same2)[0] == 1  # the best of two correct candidates counts


def test_chance_levels_match_random_orderings():
    n = 30
    c_Q = np.array([1] * 20 + [3] * 10)
    got = R.chance_levels(c_Q, n)
    assert got["r1"] == pytest.approx((20 * 1 / 30 + 10 * 3 / 30) / 30)
    rng = np.random.default_rng(0)
    hits = {k: [] for k in R.KS}
    meds = []
    for _ in range(4000):
        rank_Q = np.array([np.flatnonzero(rng.permutation(n) < c).min() + 1 for c in c_Q])
        for k in R.KS:
            hits[k].append((rank_Q <= k).mean())
        meds.append(rank_Q)
    for k in R.KS:
        assert got[f"r{k}"] == pytest.approx(np.mean(hits[k]), abs=0.01)
    per_query_median = [np.median(np.array(meds)[:, i]) for i in (0, 25)]
    assert R.chance_levels(np.array([1]), n)["median_rank"] == 15  # P(rank <= 15) = 1/2 with one correct of 30
    assert per_query_median[0] == pytest.approx(15.5, abs=1)
    assert R.chance_levels(np.array([3]), n)["median_rank"] == pytest.approx(per_query_median[1], abs=1)


def test_retrieval_with_ci_values_and_determinism():
    rng = np.random.default_rng(1)
    e = rng.normal(size=(40, 8))
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    noisy = e + 0.6 * rng.normal(size=e.shape)
    texts = [f"t{i}" for i in range(38)] + ["t0", "t1"]  # two texts shared by two images each
    m = R.retrieval_with_ci(e, noisy, texts, n_boot=300, seed=0)
    m2 = R.retrieval_with_ci(e, noisy, texts, n_boot=300, seed=0)
    assert m == m2
    for d in ("i2t", "t2i"):
        for k in R.KS:
            assert m[f"retrieval/{d}_r{k}_ci_lo"] <= m[f"retrieval/{d}_r{k}"] <= m[f"retrieval/{d}_r{k}_ci_hi"]
            assert m[f"retrieval/{d}_r{k}"] > m[f"retrieval/{d}_r{k}_chance"]
        assert m[f"retrieval/{d}_median_rank"] < m[f"retrieval/{d}_median_rank_chance"]
    from medvlp.pretrain.metrics import recall_at_k

    same = np.array([[a == b for b in texts] for a in texts])
    assert m["retrieval/i2t_r5"] == pytest.approx(recall_at_k(e @ noisy.T, same, (5,))[5])
    table, used = R.format_tables({**m, "retrieval/n": 40.0, "retrieval/unique_texts": 38.0})
    assert "| image → text |" in table and "(chance " in table and "retrieval/i2t_r1_chance" in used


class _PromptModel(torch.nn.Module):
    """encode_text returns a fixed vector per known prompt: a stand-in whose zero-shot answer is known."""

    def __init__(self, vecs: dict[str, np.ndarray]):
        super().__init__()
        self.names = list(vecs)
        self.table = torch.tensor(np.stack(list(vecs.values())), dtype=torch.float32)
        self.logit_scale = torch.nn.Parameter(torch.tensor([np.log(50.0)]))

    def tokenize(self, texts):
        return torch.tensor([self.names.index(t) for t in texts])

    def encode_text(self, tok, normalize=True):
        return torch.nn.functional.normalize(self.table[tok], dim=-1)


def test_group_zero_shot_known_answer_and_chance():
    spec = {"kind": "single-label", "class_names": ["AP", "L", "PA"], "templates": ["a {c} x-ray."]}
    vec = {"a AP x-ray.": np.array([1.0, 0, 0]), "a L x-ray.": np.array([0, 1.0, 0]),
           "a PA x-ray.": np.array([0, 0, 1.0])}
    model = _PromptModel(vec)
    views = ["PA"] * 6 + ["AP"] * 3 + ["L"] * 2 + ["CT-axial"]
    img = np.stack([vec[f"a {v} x-ray."] if v != "CT-axial" else np.ones(3) / 3 ** 0.5 for v in views])
    img[0] = vec["a AP x-ray."]  # one PA image looks like AP: top-1 = 10/11
    metas = [{"view": v} for v in views]
    m = R.group_zero_shot(model, img, metas, {"view": {"field": "view", "spec": spec}}, "cpu", n_boot=200)
    assert m["zeroshot_group/view/n"] == 11 and m["zeroshot_group/view/top1"] == pytest.approx(10 / 11)
    assert m["zeroshot_group/view/balanced_acc"] == pytest.approx((1 + 1 + 5 / 6) / 3)
    assert m["zeroshot_group/view/chance_top1"] == pytest.approx(6 / 11)
    assert m["zeroshot_group/view/chance_balanced"] == pytest.approx(1 / 3)
    assert m["zeroshot_group/view/top1_ci_lo"] <= 10 / 11 <= m["zeroshot_group/view/top1_ci_hi"]
    metas2 = [{"view": v} for v in ["PA"] * 4 + ["AP"] * 2]  # L absent: a constant answer gets 1/2, not 1/3
    m2 = R.group_zero_shot(model, img[[1, 2, 3, 4, 6, 7]], metas2, {"view": {"field": "view", "spec": spec}}, "cpu",
                           n_boot=10)
    assert m2["zeroshot_group/view/chance_balanced"] == 0.5 and m2["zeroshot_group/view/n_classes"] == 3


def _covid_like(root, n_patients=16):
    (root / "images").mkdir(parents=True)
    rows = []
    for p in range(n_patients):
        for i, view in enumerate(("PA", "L")):
            name = f"p{p}-{i}.png"
            Image.fromarray(np.full((48, 40), 8 * p + 3 * i, np.uint8)).save(root / "images" / name)
            rows.append([str(p), ["COVID-19", "SARS"][p % 2], view, "X-ray", "images", name, "CC BY",
                         f"Patient {p}: {'fever and cough' if p % 2 else 'dyspnoea'} day {i}."])
    with open(root / "metadata.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["patientid", "finding", "view", "modality", "folder", "filename", "license", "clinical_notes"])
        w.writerows(rows)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_evaluate_on_imported_captions_reports_cis_chance_and_groups(tmp_path):
    from medvlp.data_shards.config import DataConfig
    from medvlp.data_shards.importers import import_dataset
    from medvlp.pretrain.config import EvalConfig, ModelConfig
    from medvlp.pretrain.eval import evaluate_detailed, format_table, write_outputs
    from medvlp.pretrain.model import build_model

    _covid_like(tmp_path / "src")
    import_dataset("covid_chestxray", tmp_path / "src", tmp_path / "shards", min_count="2", test_frac="0.5",
                   val_frac="0", progress="false", workers="1", image_size="64")
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="debug"))
    data = DataConfig(train_shards=str(tmp_path / "shards"), image_size=64, batch_size=8)
    cfg = EvalConfig(linear_probe=False, kshot=[], bootstrap=50, max_samples=0, retrieval_examples=0)
    report = evaluate_detailed(model, data, cfg, split="test")
    m = report.metrics
    n = m["eval/n_samples"]
    assert n >= 4 and m["retrieval/n"] == n
    assert m["retrieval/i2t_r1_chance"] == pytest.approx(1 / n)  # every note is distinct here
    assert m["retrieval/t2i_median_rank_chance"] == np.ceil(n / 2)
    assert m["zeroshot_group/view/n"] == n and m["zeroshot_group/view/chance_balanced"] == 0.5
    assert 0 <= m["zeroshot_group/view/top1"] <= 1 and "zeroshot/auc/COVID-19" in m
    table = format_table(m)
    assert "| label group (zero-shot, single-label) |" in table and "median rank" in table
    files = write_outputs(report, tmp_path / "eval")
    saved = json.loads(files["metrics"].read_text())
    assert "retrieval/i2t_median_rank_ci_hi" in saved and "zeroshot_group/view/balanced_acc" in saved
