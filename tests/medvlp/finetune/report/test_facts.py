"""The slide corpus's position / rare-patch facts, their parsing, fact scoring, the positions in the resampler and
the fact-level baselines (mean-feature regressor, attention-MIL twin, oracle)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from medvlp.data_shards.synth import synth_samples
from medvlp.data_shards.synth.slide import SLIDE_TISSUES, components
from medvlp.finetune.report.metrics import FACT_COLUMNS, fact_correct, fact_summary, group_metric
from medvlp.finetune.report.resampler import PerceiverResampler, cap_bag, coord_features
from medvlp.finetune.report.text import parse_facts

pytestmark = pytest.mark.timeout(300)
torch.set_num_threads(1)


def test_reports_state_the_facts_of_the_bag():
    seen = {"micro": 0, "clear": 0, "involved": 0, "multi": 0}
    for s in synth_samples("slide", 120, seed=4, size=16):
        f = dict(s.extra["facts"])
        diag = f.pop("diagnosis")
        assert parse_facts(s.text) == f, s.text
        tissue = np.array(s.extra["patch_tissue"])
        if diag != "carcinoma":
            assert all(v is None for v in f.values())
            continue
        mal = np.isin(tissue, [SLIDE_TISSUES.index("tumor"), SLIDE_TISSUES.index("necrosis")])
        cells = {tuple(c) for c in s.coords[mal].tolist()}
        assert f["foci"] == len(components(cells))
        assert f["mitoses"] == int(np.sum(s.extra["patch_mitosis"]))
        assert f["grade"] == max(s.extra["patch_grade"])
        edge = np.array(s.extra["patch_edge"], dtype=bool)
        assert (f["margin"] == "involved") == bool((mal & edge).any())
        seen["micro"] += int(tissue.tolist().count(SLIDE_TISSUES.index("tumor")) <= 3)
        seen[f["margin"]] += 1
        seen["multi"] += int(f["foci"] > 1)
    assert min(seen.values()) >= 2, seen  # every kind of case occurs


def test_parse_facts_rules():
    t = ("Two separate tumor foci are present, the largest measuring 7 mm. The tumor is located in the upper left part "
         "of the section. No mitoses are identified. Histological grade 3 (poorly differentiated). The margins are "
         "clear, the closest being 2 mm away. Final diagnosis: carcinoma.")
    assert parse_facts(t) == {"region": "upper left", "foci": 2, "size_mm": 7, "grade": 3, "mitoses": 0,
                              "margin": "clear", "margin_mm": 2}
    t2 = "Carcinoma is seen in the upper part of the section. Mitotic count: 4. The inked margin is involved by tumor."
    assert parse_facts(t2) == {"region": "upper", "foci": None, "size_mm": None, "grade": None, "mitoses": 4,
                               "margin": "involved", "margin_mm": 0}
    assert all(v is None for v in parse_facts("Normal tissue. Final diagnosis: benign tissue.").values())


def _truth(region="left", comp=None, **kw):
    f = {"diagnosis": 2, "composition": comp or {"normal": 80.0, "tumor": 20.0, "inflammation": 0.0,
                                                 "necrosis": 0.0},
         "region": region, "foci": 1, "size_mm": 4, "grade": 2, "mitoses": 3, "margin": "clear", "margin_mm": 2}
    f.update(kw)
    return f


def test_fact_scoring_and_the_oracle_template():
    from medvlp.finetune.report.baselines import fact_report

    classes, tissues = ["benign", "inflammation", "carcinoma"], SLIDE_TISSUES
    truth = [_truth(), _truth(comp={"normal": 97.0, "tumor": 3.0, "inflammation": 0.0, "necrosis": 0.0}),
             {"diagnosis": 0, "composition": {"normal": 100.0, "tumor": 0.0, "inflammation": 0.0, "necrosis": 0.0},
              **{k: None for k in ("region", "foci", "size_mm", "grade", "mitoses", "margin", "margin_mm")}}]
    oracle = [fact_report(t, ["benign tissue", "chronic inflammation", "carcinoma"][t["diagnosis"]]) for t in truth]
    C = fact_correct(oracle, truth, classes, tissues)
    assert np.nanmin(C) == 1.0
    assert np.isnan(C[2, FACT_COLUMNS.index("region")]) and C[2, FACT_COLUMNS.index("diagnosis")] == 1.0
    assert np.isfinite(C[1, FACT_COLUMNS.index("micro")]) and np.isnan(C[0, FACT_COLUMNS.index("micro")])
    # a report that names the diagnosis only gets every carcinoma fact wrong; near misses within 1 count
    bare = ["Final diagnosis: carcinoma."] * 2 + [oracle[2]]
    C2 = fact_correct(bare, truth, classes, tissues)
    assert fact_summary(C2)["position"] == 0.0 and C2[0, FACT_COLUMNS.index("diagnosis")] == 1.0
    near = [fact_report(_truth(size_mm=5, mitoses=4, margin_mm=3, region="right"), "carcinoma")]
    C3 = fact_correct(near, truth[:1], classes, tissues)
    got = dict(zip(FACT_COLUMNS, C3[0]))
    assert got["size_mm"] == got["mitoses"] == got["margin_mm"] == 1.0 and got["region"] == 0.0
    y = np.isfinite(C).astype(float)
    assert group_metric("position")(y, np.nan_to_num(C)) == 1.0
    assert group_metric("position")(y, np.nan_to_num(C2)) == 0.0


def test_positions_reach_the_latents_scale_free():
    torch.manual_seed(0)
    res = PerceiverResampler(feat_dim=8, width=16, latents=4, depth=1, heads=4, pos_freqs=4).eval()
    f = torch.randn(1, 6, 8)
    c = torch.tensor([[[0, 0], [1, 0], [2, 0], [0, 1], [1, 1], [2, 1]]])
    a = res(f, None, c)
    assert not torch.allclose(a, res(f, None, c.flip(1)))  # the same patches elsewhere: other latents
    torch.testing.assert_close(a, res(f, None, c * 256 + 1000))  # pixel vs grid coordinates, any origin
    torch.testing.assert_close(res(f), res(f, None, None))
    no_pos = PerceiverResampler(feat_dim=8, width=16, latents=4, depth=1, heads=4, pos_freqs=0).eval()
    torch.testing.assert_close(no_pos(f, None, c), no_pos(f, None, c.flip(1)))
    # padding neither moves the scaling nor the latents
    fp, cp = torch.cat([f, torch.zeros(1, 3, 8)], 1), torch.cat([c, torch.full((1, 3, 2), 999)], 1)
    m = torch.tensor([[True] * 6 + [False] * 3])
    full = torch.ones(1, 6, dtype=torch.bool)
    torch.testing.assert_close(coord_features(cp, m, 4)[:, :6], coord_features(c, full, 4))
    torch.testing.assert_close(res(fp, m, cp), a, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="coords"):
        res(f, None, c[:, :5])


def test_cap_bag_keeps_coords_with_their_patches():
    f = torch.arange(20.0).view(1, 10, 2)
    c = torch.stack([torch.arange(10), torch.arange(10) * 3], -1)[None]
    for train in (True, False):
        f2, m2, c2 = cap_bag(f, None, 4, train=train, coords_BN2=c, generator=torch.Generator().manual_seed(1))
        assert m2.all() and torch.equal(f2[0, :, 0] / 2, c2[0, :, 0].float())


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    from medvlp.data_shards.config import DataConfig
    from medvlp.data_shards.synth import synth_to_shards
    from medvlp.finetune.report.data import load_split

    d = tmp_path_factory.mktemp("facts") / "slide"
    synth_to_shards(str(d), modality="slide", n=300, seed=5, shard_size=100, size=32)
    dc = DataConfig(modality="slide", train_shards=str(d))
    return {s: load_split(dc, s) for s in ("train", "val", "test")}


def test_mean_regressor_writes_its_predictions_through_the_template(splits):
    from medvlp.finetune.report.baselines import (MeanFeatureRegressor, diagnosis_phrases, reports_of,
                                                  truth_facts)
    from medvlp.finetune.report.text import parse_diagnosis

    tr, va, te = splits["train"], splits["val"], splits["test"]
    reg = MeanFeatureRegressor().fit(tr, va)
    preds = reg.predict(te)
    texts = reports_of(preds, diagnosis_phrases(tr.texts, tr.class_index, tr.classes))
    for p, t in zip(preds, texts):
        assert parse_diagnosis(t, te.classes) == te.classes[p["diagnosis"]]
        got = parse_facts(t)
        assert got["region"] == p["region"] and got["foci"] == p["foci"] and got["grade"] == p["grade"]
    s = fact_summary(fact_correct(texts, truth_facts(te), te.classes, te.tissues))
    assert s["fact_diagnosis"] >= 0.8 and s["fact_composition"] >= 0.8  # what a mean does see


def test_attention_mil_twin_is_seeded(splits):
    from medvlp.finetune.report.baselines import AttentionMIL

    tr, va, te = splits["train"], splits["val"], splits["test"]
    a = AttentionMIL(tr.feats[0].shape[1], seed=3, steps=30, eval_every=10).fit(tr, va).predict(te)
    b = AttentionMIL(tr.feats[0].shape[1], seed=3, steps=30, eval_every=10).fit(tr, va).predict(te)
    assert a == b and len(a) == len(te)
    assert all((p["region"] is None) == (te.classes[p["diagnosis"]] != "carcinoma") for p in a)


def test_seed_table_merge_writes_sd_and_paired_differences(tmp_path):
    """The table driver's merge: per-seed scores -> mean ± sample sd per method and a bootstrap row per baseline."""
    import json
    from argparse import Namespace

    from medvlp.data_shards.synth import synth_to_shards
    from medvlp.finetune.report.experiment import merge

    synth_to_shards(str(tmp_path / "s"), modality="slide", n=40, seed=0, size=8)
    from medvlp.data_shards.config import DataConfig
    from medvlp.finetune.report.data import load_split

    n = len(load_split(DataConfig(modality="slide", train_shards=str(tmp_path / "s")), "test"))
    F = len(FACT_COLUMNS)
    for seed, v in ((0, 0.5), (1, 0.7), (2, 0.9)):
        methods = {}
        for name, c in (("model frozen, greedy", 1.0), ("model frozen, beam", 0.25), ("model tuned, greedy", 0.5),
                        ("retrieval", 0.0)):
            C = np.full((n, F), c)
            row = {k: v for k in ("bleu4", "rougeL", "diag_acc", "comp_acc", "clinical", "position", "rare", "all")}
            row.update({f"fact_{k}": v for k in FACT_COLUMNS})
            methods[name] = {"row": row, "C": C.tolist(), "texts": ["x"] * n}
        (tmp_path / "out" / f"seed{seed}").mkdir(parents=True)
        (tmp_path / "out" / f"seed{seed}" / "scores.json").write_text(json.dumps({"methods": methods,
                                                                                "cpu_seconds": {"stage1": 1.0}}))
    a = Namespace(shards=str(tmp_path / "s"), out=str(tmp_path / "out"), seeds=[0, 1, 2], split="test", also=[],
                  extra_seed_dirs=[], n_boot=50)
    merge(a)
    table = (tmp_path / "out" / "table.md").read_text()
    assert "| model frozen, greedy | 3 | 0.7 ± 0.2 |" in table  # BLEU column: mean ± sample sd (ddof 1)
    diffs = (tmp_path / "out" / "diffs.csv").read_text().splitlines()
    assert any(line.startswith('"model frozen, greedy",retrieval,position,1.0,1.0,1.0,0.0,3,') for line in diffs)
    # a decoding other than greedy is also paired against greedy on the same models (and greedy not with itself)
    assert any(line.startswith('"model frozen, beam","model frozen, greedy",position,-0.75,-0.75,-0.75,1.0,3,')
               for line in diffs)
    assert not any(line.startswith('"model frozen, greedy","model frozen, greedy"') for line in diffs)
    # and a variant against the frozen resampler with the same decoding
    assert any(line.startswith('"model tuned, greedy","model frozen, greedy",position,-0.5,-0.5,-0.5,1.0,3,')
               for line in diffs)
