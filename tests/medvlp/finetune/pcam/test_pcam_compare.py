"""Threshold choice on one split, case export, paired pooling differences and the lesion-size sweep (no training)."""
import json

import numpy as np
import pytest
import torch

from medvlp.finetune.pcam.metrics import LocalisationMeter, box_iou

pytestmark = pytest.mark.timeout(300)


def _square_heat(S, x0, y0, x1, y1, halo):
    """A heatmap 1 inside [x0, x1) x [y0, y1), `halo` in a 4-px ring around it, 0 elsewhere."""
    h = torch.zeros(S, S)
    h[max(0, y0 - 4):y1 + 4, max(0, x0 - 4):x1 + 4] = halo
    h[y0:y1, x0:x1] = 1.0
    return h


def test_meter_scores_every_threshold_and_picks_the_best():
    S = 32
    heat = _square_heat(S, 10, 10, 20, 20, 0.4)[None, None]  # (1, 1, S, S)
    gt = [[(0, [10.0, 10.0, 20.0, 20.0])]]
    m = LocalisationMeter(["a"], threshold=0.5, thresholds=[0.3, 0.5])
    m.update(torch.tensor([[1.0]]), torch.tensor([[1.0]]), heat, gt, keys=["img0"])
    assert m.thresholds == (0.3, 0.5)
    # at 0.3 the halo is inside the box: 18 x 18 predicted vs 10 x 10 true
    assert m.summary(0.3)["iou/a"] == pytest.approx(box_iou([6, 6, 24, 24], [10, 10, 20, 20]))
    assert m.summary(0.3)["area_ratio/a"] == pytest.approx(18 * 18 / 100)
    assert m.summary(0.5)["iou/a"] == 1.0 and m.summary()["area_ratio/a"] == 1.0
    assert m.best_threshold() == 0.5
    c = m.cases()
    assert c["keys"].tolist() == ["img0"] and c["case_iou"].shape == (1, 2)
    assert c["case_area"][0].tolist() == [324.0, 100.0] and c["case_gt_w"][0] == 10.0
    with pytest.raises(ValueError, match="threshold 0.7 was not scored"):
        m.summary(0.7)
    with pytest.raises(ValueError, match="threshold: must be in"):
        LocalisationMeter(["a"], thresholds=[1.5])


def _items(path, keys, names, hits, ious, areas, gt_side, logits, labels, threshold=0.5):
    """An eval_items.npz with one case per (image, finding) where labels == 1."""
    rows, ks = np.nonzero(labels == 1)
    np.savez(path, keys=np.asarray(keys), names=np.asarray(names), labels=labels.astype(np.float32),
             logits=logits.astype(np.float32), thresholds=np.asarray([threshold]),
             case_row=rows, case_finding=ks, case_hit=hits[rows, ks].astype(bool),
             case_iou=ious[rows, ks][:, None], case_area=areas[rows, ks][:, None],
             case_gt_w=gt_side[rows, ks], case_gt_h=gt_side[rows, ks], threshold=np.float64(threshold),
             threshold_from_val=np.float64(1.0), split=np.asarray("test"))


def test_paired_differences_and_lesion_sweep_from_items(tmp_path):
    from medvlp.finetune.pcam import compare as C
    from medvlp.finetune.pcam.config import PcamConfig

    rng = np.random.default_rng(0)
    N, names = 60, ["nodule", "effusion"]
    keys = [f"k{i:03d}" for i in range(N)]
    labels = (rng.random((N, 2)) < 0.5).astype(float)
    side = np.where(np.arange(N)[:, None] < 30, 3.0, 8.0) * np.ones((1, 2))  # px at 64: 0.047 and 0.125 of the side
    runs = {}
    for pooling, iou_mu, over in (("avg", 0.3, 4.0), ("pcam", 0.5, 2.0)):
        runs[pooling] = []
        for seed in range(3):
            order = rng.permutation(N)  # runs list rows in their own order: alignment is by key
            ious = np.clip(iou_mu + 0.05 * rng.standard_normal((N, 2)), 0, 1)
            hits = rng.random((N, 2)) < iou_mu + 0.3
            areas = side ** 2 * over
            logits = labels + rng.standard_normal((N, 2))
            d = tmp_path / f"{pooling}-s{seed}"
            d.mkdir()
            _items(d / C.ITEMS_FILE, [keys[i] for i in order], names, hits[order], ious[order], areas[order],
                   side[order], logits[order], labels[order])
            runs[pooling].append({"auc_mean": 0.8, "iou_mean": float(ious[labels == 1].mean()), "threshold": 0.5,
                                  "dir": d.name})
    cfg = PcamConfig()
    cfg.data.image_size = 64
    C.write_tables(tmp_path, runs, cfg, [0, 1, 2], "cmd", reference="avg", n_boot=200)
    paired = list(json.loads((tmp_path / "poolings.json").read_text())["paired"])
    iou = next(r for r in paired if r["metric"] == "IoU")
    assert iou["comparison"] == "pcam - avg" and iou["diff"] == pytest.approx(0.2, abs=0.03)
    assert iou["ci_lo"] > 0.1 and iou["held (CI > 0)"] == "yes" and iou["seeds"] == 3 and iou["images"] == N
    sweep = json.loads((tmp_path / "poolings.json").read_text())["lesion_size"]
    small = next(r for r in sweep if r["pooling"] == "avg" and r["nodule side / image"] == "0.00-0.06")
    assert small["box area / lesion area"] == pytest.approx(4.0) and small["cases"] == int((labels[:30, 0]).sum())
    md = (tmp_path / "poolings.md").read_text()
    assert "Paired differences vs avg" in md and "Lesion-size sweep" in md and "± " in md
    assert (tmp_path / "paired.csv").is_file() and (tmp_path / "summary.csv").is_file()
    # one pooling on its own (one run per process into a shared folder): no paired rows, no stale paired table
    C.write_tables(tmp_path, {"avg": runs["avg"]}, cfg, [0, 1, 2], "cmd", reference="avg", n_boot=50)
    assert not (tmp_path / "paired.md").exists() and not (tmp_path / "paired.csv").exists()
    assert json.loads((tmp_path / "poolings.json").read_text())["paired"] == []
    assert "Paired differences" not in (tmp_path / "poolings.md").read_text()
    assert "lse pooling r" not in md  # the sharpness is named only when lse is compared
    C.write_tables(tmp_path, {"avg": runs["avg"], "lse": runs["pcam"]}, cfg, [0, 1, 2], "cmd", n_boot=50)
    assert f"lse pooling r = {cfg.head.lse_r:g}" in (tmp_path / "poolings.md").read_text()
    # tables only: finished runs are tabulated, a missing one is named, and differences pair runs by seed
    for pooling, ms in runs.items():
        for seed, m in enumerate(ms):
            if (pooling, seed) != ("pcam", 1):
                (tmp_path / m["dir"] / "result.json").write_text(json.dumps({"metrics": m}))
    got = C.compare_poolings(cfg, tmp_path, ["avg", "pcam"], [0, 1, 2], train=False, n_boot=50)
    assert [m["seed"] for m in got["pcam"]] == [0, 2] and len(got["avg"]) == 3
    doc = json.loads((tmp_path / "poolings.json").read_text())
    assert doc["missing"] == ["pcam-s1"] and all(r["seeds"] == 2 for r in doc["paired"])
    assert "not run (left out of every table): pcam-s1" in (tmp_path / "poolings.md").read_text()
    with pytest.raises(ValueError, match="reference pooling 'avg'"):
        C.compare_poolings(cfg, tmp_path / "empty", ["avg", "pcam"], [0], train=False)


def test_loc_macro_ignores_missing_cases():
    from medvlp.finetune.pcam.compare import loc_macro

    v = np.array([[1.0, np.nan], [0.0, 0.5], [np.nan, np.nan]])
    assert loc_macro(None, v) == pytest.approx((0.5 + 0.5) / 2)
    assert np.isnan(loc_macro(None, np.full((2, 2), np.nan)))


def test_nodule_radius_knob_changes_only_the_nodule():
    from medvlp.data_shards.synth.cxr import check_nodule_radius, cxr_sample
    from medvlp.data_shards.synth.util import iter_studies

    study = next(s for s in iter_studies(0, "cxr", 50, (1.0,)) if True)
    a = cxr_sample(0, study, 64)
    b = cxr_sample(0, study, 64, nodule_radius=(0.04, 0.06))
    assert np.array_equal(a.image, b.image) and a.text == b.text  # the default range is the old one
    c = cxr_sample(0, study, 64, nodule_radius=(0.10, 0.12))
    assert c.labels == a.labels
    if a.labels["nodule"] != 1:  # only a drawn nodule changes the image
        assert np.array_equal(a.image, c.image)
    for bad in [(0.0, 0.1), (0.1, 0.05), (0.1, 0.3), "x"]:
        with pytest.raises(ValueError, match="nodule_radius"):
            check_nodule_radius(bad)


def test_lesion_corpus_spans_the_radius_range(tmp_path):
    from medvlp.data_shards.inspect import iter_samples
    from medvlp.finetune.pcam.lesions import write_lesion_corpus

    doc = write_lesion_corpus(tmp_path / "c", n=60, seed=0, nodule_radius=(0.02, 0.12), size=64)
    assert doc["nodule_radius"] == [0.02, 0.12] and "--nodule-radius 0.02,0.12" in doc["command"]
    sides = [max(b["box"][2] - b["box"][0], b["box"][3] - b["box"][1]) / 64 for s in iter_samples(tmp_path / "c")
             for b in s.extra["boxes"] if b["finding"] == "nodule"]
    assert sides and min(sides) >= 2 * 0.02 * 0.8 and max(sides) <= 2 * 0.12 + 2 / 64


def test_fast_macro_auc_matches_sklearn():
    from medvlp.finetune.pcam.compare import _auc_macro
    from medvlp.pretrain.metrics import macro_auc

    rng = np.random.default_rng(1)
    y = (rng.random((80, 3)) < 0.4).astype(float)
    y[:5, 1] = -1  # uncertain: left out by both
    s = np.round(y + rng.standard_normal((80, 3)), 1)  # rounded: ties
    y[:, 2] = 0  # one class only: skipped by both
    assert _auc_macro(y, s) == pytest.approx(macro_auc(y, s), abs=1e-12)
