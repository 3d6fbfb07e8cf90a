"""The Path-CLIP stage on the fine-tune runner, on a tiny fabricated PCam release imported with the PCam importer:
class ids from the shards, frozen towers (no gradient, weights bit-identical), reproducible cells, bad input."""
import copy
import dataclasses
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
import torch

from medvlp.data_shards.importers import import_dataset
from medvlp.finetune.path_clip.config import (FewShotData, FewShotRunnerConfig, PathCLIPConfig,
                                       ProtocolConfig, TaskConfig)
from medvlp.finetune.path_clip.data import TaskSpec
from medvlp.finetune.path_clip.protocol import run_cell
from medvlp.finetune.path_clip.stage import PathCLIPStage, TaskContext, draw_budget
from medvlp.finetune.runner import run_stage
from medvlp.pretrain.config import ModelConfig, TrackingConfig
from medvlp.pretrain.model import build_model

PROMPTS = {"normal": ["this is a photo of healthy lymph node tissue"],
           "tumor": ["this is a photo of lymph node tumor tissue"]}


def _fake_pcam(folder, n_per_split=(24, 8, 16), seed=0):
    """PCam-format HDF5 files whose 'tumour' patches are darker with a bright centre square."""
    rng = np.random.default_rng(seed)
    for name, n in zip(("train", "valid", "test"), n_per_split):
        y = (np.arange(n) % 2).astype(np.uint8)
        x = rng.integers(120, 200, (n, 96, 96, 3)).astype(np.uint8)
        x[y == 1] //= 2
        x[y == 1, 32:64, 32:64] = 230
        with h5py.File(folder / f"camelyonpatch_level_2_split_{name}_x.h5", "w") as f:
            f.create_dataset("x", data=x)
        with h5py.File(folder / f"camelyonpatch_level_2_split_{name}_y.h5", "w") as f:
            f.create_dataset("y", data=y.reshape(n, 1, 1, 1))
    return folder


@pytest.fixture(scope="module")
def pcam(tmp_path_factory):
    root = tmp_path_factory.mktemp("pcam")
    raw = root / "raw"
    raw.mkdir()
    _fake_pcam(raw)
    import_dataset("pcam", raw, root / "shards")
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="debug")).eval()
    return root / "shards", SimpleNamespace(model=model, modality="patho")


def _cfg(shards, out, **ft):
    kw = dict(out_dir=str(out), steps=6, batch_size=8, lr=1e-2, log_every=2, progress=False, shots=4, views=3)
    kw.update(ft)
    return PathCLIPConfig(data=FewShotData(shards=str(shards)),
                          task=TaskConfig(label="tumor", class_names=["normal", "tumor"], prompts=PROMPTS),
                          finetune=FewShotRunnerConfig(**kw), protocol=ProtocolConfig(alpha_grid=[0.5, 1.0]),
                          tracking=TrackingConfig(enabled=False))


def test_pcam_layout_reaches_the_stage_and_towers_stay_frozen(pcam, tmp_path):
    shards, pre = pcam
    cfg = _cfg(shards, tmp_path / "run")
    ctx = TaskContext(pre, cfg)
    assert ctx.task.class_names == ["normal", "tumor"]
    assert ctx.train.y_N.tolist() == [i % 2 for i in range(24)]  # PCam's y, in file order
    assert len(ctx.eval_split) == 16 and ctx.f_eval.shape == (16, 64)
    before = copy.deepcopy(pre.model.state_dict())
    stage = PathCLIPStage(ctx)
    res = run_stage(stage, cfg)
    assert res.steps_done == 6 and np.bincount(ctx.train.y_N[stage.budget.idx]).tolist() == [4, 4]
    assert stage.budget.f_weak.shape == (3, 8, 64) and stage.budget.f_strong.shape == (3, 8, 64)
    # only the adapter and alpha's theta train; the towers are not in the trained module and never get a gradient
    assert set(res.trainable) == {"head.rfr.net.0.weight", "head.rfr.net.2.weight", "head.rfr.net.4.weight",
                                  "head.rfr.net.6.weight", "head.ratio.theta"}
    after = pre.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in pre.model.parameters())
    assert set(res.metrics) >= {"acc", "f1_macro", "auc", "alpha", "tau"}
    # alpha = sigmoid(g theta) * tau, tau the running agreement of the frozen weak / strong embeddings
    from safetensors.torch import load_file

    w = load_file(res.weights)
    theta, tau = float(w["head.ratio.theta"]), float(w["head.ratio.tau"])
    assert res.metrics["tau"] == pytest.approx(tau) and 0.5 < tau <= 1.0
    assert res.metrics["alpha"] == pytest.approx(tau / (1 + np.exp(-10 * theta)), rel=1e-5)
    assert res.metrics["acc"] == pytest.approx(float(np.mean(stage.preds["eval"] == ctx.eval_split.y_N)))


def test_cells_reproduce_with_the_same_seed(pcam, tmp_path):
    shards, pre = pcam
    cfg = _cfg(shards, tmp_path / "unused")
    ctx = TaskContext(pre, cfg)
    b = draw_budget(ctx, 2, 0.0, seed=1, views=3)
    b2 = draw_budget(ctx, 2, 0.0, seed=1, views=3)
    assert np.array_equal(b.idx, b2.idx) and torch.equal(b.f_weak, b2.f_weak)
    for method in ("path_clip", "residual_adapter", "tip_adapter", "shortcut_rgb"):
        m1, p1 = run_cell(method, ctx, b, cfg, seed=1, out=tmp_path / f"{method}1")
        m2, p2 = run_cell(method, ctx, b2, cfg, seed=1, out=tmp_path / f"{method}2")
        assert m1 == m2 and np.array_equal(p1["eval"], p2["eval"]), method
    assert run_cell("residual_adapter", ctx, b, cfg, 1, tmp_path / "r")[0]["alpha"] in (0.5, 1.0)


def test_bad_task_settings_fail_clearly(pcam, tmp_path):
    shards, pre = pcam
    with pytest.raises(ValueError, match="task.label: 'tumour' is not a label of the shards"):
        TaskContext(pre, dataclasses.replace(_cfg(shards, tmp_path), task=TaskConfig(label="tumour")))
    with pytest.raises(ValueError, match="task.prompts: \\['cancer'\\] are not class names"):
        TaskSpec.build(["tumor"], label="tumor", prompts={"cancer": ["x"]})
    with pytest.raises(FileNotFoundError, match="data.shards: .* is not a shard dir"):
        TaskContext(pre, _cfg(tmp_path / "nope", tmp_path))
    with pytest.raises(ValueError, match="finetune: set exactly one of shots"):
        run_stage(PathCLIPStage(TaskContext(pre, _cfg(shards, tmp_path))), _cfg(shards, tmp_path / "r", shots=0))
    with pytest.raises(Exception, match="method: 'adapter' is not one of"):
        from medvlp.launch.config import build
        build(PathCLIPConfig, {"adapter": {"method": "adapter"}})


def test_protocol_table_figure_and_mlflow_runs(pcam, tmp_path):
    from mlflow import MlflowClient

    from medvlp.finetune.path_clip.config import METHODS
    from medvlp.finetune.path_clip.protocol import run_protocol

    shards, pre = pcam
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    cfg = dataclasses.replace(
        _cfg(shards, tmp_path / "unused"),
        protocol=ProtocolConfig(label_fractions=[], shots=[2], seeds=2, alpha_grid=[0.5, 1.0], full_lrs=[1e-3],
                                full_eval_steps=[1], fixmatch_unlabelled=4, methods=list(METHODS), bootstrap=50,
                                out_dir=str(tmp_path / "fs")),
        tracking=TrackingConfig(uri=uri, experiment="fewshot-test"))
    res = run_protocol(cfg, pretrained=pre, command="medvlp eval few-shot test")
    assert {r["method"] for r in res["rows"]} == set(METHODS) | {"probe_all", "shortcut_all"}
    assert res["budgets"] == ["2-shot"]
    table = (tmp_path / "fs" / "fewshot.md").read_text()
    assert "**Path-CLIP**" in table and "2-shot (n=4)" in table and "Path-CLIP minus" in table and "AUC" in table
    assert (tmp_path / "fs" / "fewshot.png").stat().st_size > 1000
    assert (tmp_path / "fs" / "table_accuracy.csv").is_file() and (tmp_path / "fs" / "table_diff.md").is_file()
    zs = [r for r in res["rows"] if r["method"] == "zero_shot"][0]
    tip = [r for r in res["rows"] if r["method"] == "tip_adapter"][0]
    assert tip["tip_alpha"] in (1.0, 3.0, 10.0)
    ctx = TaskContext(pre, cfg)
    y = ctx.eval_split.y_N
    zs_pred = (ctx.f_eval @ ctx.text_CE.t()).argmax(1).numpy()
    assert zs["acc"] == pytest.approx(float(np.mean(zs_pred == y)))  # the zero-shot row, by hand
    # the "±" is the sample sd over the two seeds (ddof=1), the same number as the cells' own
    pc = sorted((r for r in res["rows"] if r["method"] == "path_clip"), key=lambda r: r["seed"])
    summ = [s for s in res["summary"] if s["method"] == "path_clip"][0]
    assert summ["acc"]["sd"] == pytest.approx(float(np.std([r["acc"] for r in pc], ddof=1)))
    d = [d for d in res["diffs"] if d["arm"] == "linear_probe"][0]
    lp = sorted((r for r in res["rows"] if r["method"] == "linear_probe"), key=lambda r: r["seed"])
    assert d["diff"] == pytest.approx(np.mean([a["acc"] - b["acc"] for a, b in zip(pc, lp)]))
    assert d["ci_lo"] <= d["diff"] <= d["ci_hi"]
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("fewshot-test")
    runs = client.search_runs([exp.experiment_id])
    parent = [r for r in runs if r.info.run_id == res["run_id"]][0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 2 * (len(METHODS) - 1)  # a child per trained cell (zero-shot has no budget)
    assert "acc/path_clip/2-shot" in parent.data.metrics
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"fewshot.md", "fewshot.png"}


def test_tip_adapter_and_probe_by_hand(pcam, tmp_path):
    from medvlp.finetune.path_clip.protocol import linear_probe_logits, tip_adapter_logits

    shards, pre = pcam
    ctx = TaskContext(pre, _cfg(shards, tmp_path))
    b = draw_budget(ctx, 2, 0.0, seed=0, views=0)
    f = ctx.f_eval[:3]
    got = tip_adapter_logits(ctx, b, f, 2.0, 5.5)
    for i in range(3):
        for c in range(2):
            cache = sum(np.exp(-5.5 * (1 - float(f[i] @ b.f_eval[j]))) for j in range(len(b.y)) if int(b.y[j]) == c)
            assert got[i, c] == pytest.approx(ctx.scale * float(f[i] @ ctx.text_CE[c]) + 2.0 * cache, rel=1e-5)
    lp = linear_probe_logits(b, f, 10.0, 2)
    assert lp.shape == (3, 2) and np.allclose(np.exp(lp).sum(1), 1.0)


def test_pathmnist_layout_gives_one_class_per_label_name(pcam, tmp_path):
    _, pre = pcam
    rng = np.random.default_rng(3)
    arrays = {}
    for split, n in {"train": 27, "val": 9, "test": 18}.items():
        arrays[f"{split}_images"] = rng.integers(0, 255, (n, 28, 28, 3), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 9).reshape(n, 1).astype(np.uint8)
    np.savez(tmp_path / "pathmnist.npz", **arrays)
    import_dataset("medmnist", tmp_path / "pathmnist.npz", tmp_path / "shards")
    cfg = dataclasses.replace(_cfg(tmp_path / "shards", tmp_path / "run"), task=TaskConfig())
    ctx = TaskContext(pre, cfg)
    assert ctx.task.num_classes == 9 and "colorectal adenocarcinoma epithelium" in ctx.task.class_names
    assert np.bincount(ctx.train.y_N, minlength=9).tolist() == [3] * 9  # one class per sample, from the one-hot labels
    b = draw_budget(ctx, 1, 0.0, seed=0, views=2)
    assert np.bincount(ctx.train.y_N[b.idx], minlength=9).tolist() == [1] * 9
    m, p = run_cell("path_clip", ctx, b, dataclasses.replace(cfg, finetune=dataclasses.replace(cfg.finetune, views=2)),
                    seed=0, out=tmp_path / "cell")
    assert set(m) >= {"acc", "f1_macro", "auc"}
    assert len(p["eval"]) == 18 and m["acc"] == pytest.approx(float(np.mean(p["eval"] == ctx.eval_split.y_N)))


def test_recipe_builds_the_path_clip_root_and_round_trips():
    from medvlp.launch.config import build, dump_yaml, load_config, to_dict

    cfg = load_config("path-clip-patho", ["finetune.shots=8"])
    assert isinstance(cfg, PathCLIPConfig) and cfg.finetune.shots == 8 and cfg.task.label == "tumor"
    assert to_dict(build(PathCLIPConfig, to_dict(cfg))) == to_dict(cfg) and "kind: path_clip" in dump_yaml(cfg)
    with pytest.raises(Exception, match="finetune.shots: must be >= 0"):
        load_config("path-clip-patho", ["finetune.shots=-1"])
