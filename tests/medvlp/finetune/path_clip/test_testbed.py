"""The Path-CLIP testbed and the protocol's new arms: the lab2 patches cannot be told apart by their mean colour,
tau comes from the frozen views, the residual adapter sees the strong view, the tower arms train a copy of the
tower and FixMatch never reads the labels of its unlabelled images."""
import copy
import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medvlp.data_shards.synth import synth_samples
from medvlp.finetune.path_clip.loss import path_clip_loss
from medvlp.finetune.path_clip.model import PathCLIPHead, view_agreement

pytestmark = pytest.mark.timeout(300)


def _one_shot_nn_mean_rgb(X: np.ndarray, y: np.ndarray, draws: int = 400, seed: int = 0) -> float:
    """Mean accuracy of a 1-shot nearest neighbour (one labelled patch per class) on patch-mean RGB."""
    rng = np.random.default_rng(seed)
    accs = []
    for _ in range(draws):
        i, j = rng.choice(np.flatnonzero(y == 1)), rng.choice(np.flatnonzero(y == 0))
        pred = (((X - X[i]) ** 2).sum(1) < ((X - X[j]) ** 2).sum(1)).astype(int)
        keep = np.ones(len(y), bool)
        keep[[i, j]] = False
        accs.append(float((pred == y)[keep].mean()))
    return float(np.mean(accs))


def test_lab2_mean_colour_shortcut_is_closed():
    """The gate of the testbed: a 1-shot nearest neighbour on patch-mean RGB scores <= 0.65 on lab2 (it scored
    0.999 when the tumour tint covered the whole patch); on the source domain the same statistic still works."""
    lab2 = list(synth_samples("patho", 240, seed=1, size=64, domain="lab2"))
    X = np.array([s.image.reshape(-1, 3).mean(0) for s in lab2])
    y = np.array([s.labels["tumor"] for s in lab2])
    acc = _one_shot_nn_mean_rgb(X, y)
    assert 0.45 <= acc <= 0.65, acc
    he = list(synth_samples("patho", 240, seed=1, size=64))
    Xh = np.array([s.image.reshape(-1, 3).mean(0) for s in he])
    assert _one_shot_nn_mean_rgb(Xh, y) > 0.85  # same classes, same draw: the he look keeps its global tint


def test_lab2_stain_varies_more_between_slides_than_between_classes():
    lab2 = list(synth_samples("patho", 300, seed=2, size=64, domain="lab2"))
    X = np.array([s.image.reshape(-1, 3).mean(0) for s in lab2])
    y = np.array([s.labels["tumor"] for s in lab2])
    gap = np.abs(X[y == 1].mean(0) - X[y == 0].mean(0))
    within = X[y == 0].std(0)  # slide-to-slide spread of the patch-mean colour within one class
    assert np.linalg.norm(gap) < np.linalg.norm(within), (gap, within)  # about 32 vs 39 in RGB units
    assert (gap[:2] < within[:2]).all(), (gap, within)  # red and green; blue about equal (25 vs 22)


def test_tau_from_frozen_views_ignores_the_adapter():
    torch.manual_seed(0)
    text = F.normalize(torch.randn(2, 16), dim=-1)
    f_w1, f_w2, f_s = (F.normalize(torch.randn(6, 16), dim=-1) for _ in range(3))
    y = torch.tensor([0, 1, 0, 1, 0, 1])
    taus = []
    for seed in (1, 2):  # two different adapters: the same tau
        torch.manual_seed(seed)
        head = PathCLIPHead(text, 10.0, noise_std=0.0).train()
        _, m = path_clip_loss(head, f_w1, f_w2, f_s, y)
        taus.append(m["tau_batch"])
        theta = float(head.ratio.theta)
        assert m["alpha"] == pytest.approx(1 / (1 + np.exp(-10 * theta)) * m["tau_batch"], rel=1e-5)
    assert taus[0] == taus[1] == pytest.approx(float(view_agreement(f_w1, f_s)))
    torch.manual_seed(1)
    refined = PathCLIPHead(text, 10.0, noise_std=0.0, tau_source="refined").train()
    _, m = path_clip_loss(refined, f_w1, f_w2, f_s, y)
    assert m["tau_batch"] == pytest.approx(float(view_agreement(refined.refine(f_w1), refined.refine(f_s))))
    with pytest.raises(ValueError, match="tau_source: 'both' is not one of"):
        PathCLIPHead(text, 10.0, tau_source="both")


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    from types import SimpleNamespace

    from medvlp.data_shards.synth import synth_to_shards
    from medvlp.finetune.path_clip.config import (FewShotData, FewShotRunnerConfig, PathCLIPConfig, ProtocolConfig,
                                                  TaskConfig)
    from medvlp.finetune.path_clip.stage import TaskContext
    from medvlp.pretrain.config import ModelConfig, TrackingConfig
    from medvlp.pretrain.model import build_model

    root = tmp_path_factory.mktemp("testbed")
    synth_to_shards(root / "lab2", modality="patho", n=120, seed=1, shard_size=64, domain="lab2")
    synth_to_shards(root / "he", modality="patho", n=60, seed=0, shard_size=64)
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="debug")).eval()
    cfg = PathCLIPConfig(
        data=FewShotData(shards=str(root / "lab2")),
        task=TaskConfig(label="tumor", class_names=["normal", "tumor"],
                        prompts={"normal": ["healthy lymph node tissue"], "tumor": ["lymph node tumor tissue"]}),
        finetune=FewShotRunnerConfig(steps=4, batch_size=8, lr=1e-2, progress=False, views=2),
        protocol=ProtocolConfig(shots=[2], seeds=1, full_lrs=[1e-3], full_eval_steps=[1, 2], fixmatch_unlabelled=4,
                                source_shards=str(root / "he"), out_dir=str(root / "fs")),
        tracking=TrackingConfig(enabled=False))
    ctx = TaskContext(SimpleNamespace(model=model, modality="patho"), cfg)
    ctx.load_source(str(root / "he"), "test")
    return ctx, cfg


def test_tower_arms_train_a_copy_and_fixmatch_reads_no_unlabelled_label(task):
    from medvlp.finetune.path_clip.stage import draw_budget
    from medvlp.finetune.path_clip.tower import TowerArms

    ctx, cfg = task
    before = copy.deepcopy(ctx.model.state_dict())
    tower = TowerArms(ctx)
    b = draw_budget(ctx, 2, 0.0, seed=0, views=0)
    m, preds = tower.cell("full_finetune", b, cfg, 0)
    assert m["steps"] in (1.0, 2.0) and m["lr"] == 1e-3 and len(preds["eval"]) == len(ctx.eval_split)
    assert m["acc"] == pytest.approx(float(np.mean(preds["eval"] == ctx.eval_split.y_N)))
    assert m["source_acc"] == pytest.approx(float(np.mean(preds["source"] == ctx.source.y_N)))
    assert all(torch.equal(before[k], v) for k, v in ctx.model.state_dict().items())  # the shared tower is untouched
    m1, p1 = tower.cell("fixmatch", b, cfg, 0)
    y_true = ctx.train.y_N.copy()
    free = np.setdiff1d(np.arange(len(y_true)), b.idx)
    ctx.train.y_N[free] = 1 - ctx.train.y_N[free]  # flip every unlabelled image's label: nothing may change
    try:
        m2, p2 = tower.cell("fixmatch", b, cfg, 0)
    finally:
        ctx.train.y_N[:] = y_true
    assert np.array_equal(p1["eval"], p2["eval"]) and m1 == m2
    with pytest.raises(ValueError, match="tower arm 'probe' is not one of"):
        tower.cell("probe", b, cfg, 0)


def test_residual_adapter_trains_on_the_strong_view_too(task, tmp_path):
    from medvlp.finetune.path_clip.protocol import run_cell
    from medvlp.finetune.path_clip.stage import draw_budget

    ctx, cfg = task
    b = draw_budget(ctx, 2, 0.0, seed=0, views=2)
    m, p = run_cell("residual_adapter", ctx, b, cfg, 0, tmp_path / "a")
    b2 = dataclasses.replace(b, f_strong=b.f_strong + 0.5 * torch.randn_like(b.f_strong))
    m2, p2 = run_cell("residual_adapter", ctx, b2, cfg, 0, tmp_path / "b")
    assert m["alpha"] in cfg.protocol.alpha_grid and m != m2  # the strong views enter its loss
    assert m["acc"] == pytest.approx(float(np.mean(p["eval"] == ctx.eval_split.y_N)))
