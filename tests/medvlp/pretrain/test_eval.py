"""Evaluation driver on a stand-in model whose embeddings are built by hand (finding a separable, b random)."""
from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from medvlp.data_shards.config import DataConfig
from medvlp.pretrain import eval as E
from medvlp.pretrain.config import EvalConfig

EMB = 4  # e0: finding a, e2: finding b's prompt direction, e1/e3: noise
NAMES = ["a", "b"]


class StandIn(nn.Module):
    """Same methods as MedCLIP: images carry their embedding in x[:, 0, 0, :E]; texts look up a fixed table."""

    def __init__(self, text_table: dict[str, np.ndarray]):
        super().__init__()
        self.vocab = {t: i for i, t in enumerate(sorted(text_table))}
        table = np.stack([text_table[t] for t in sorted(text_table)])
        self.table = nn.Parameter(torch.tensor(table, dtype=torch.float32), requires_grad=False)
        self.logit_scale = nn.Parameter(torch.tensor([math.log(10.0)]))
        self.image_kind = "2d"

    def tokenize(self, texts):
        return torch.tensor([[self.vocab[t]] for t in texts], dtype=torch.long)

    def encode_image(self, x, normalize=True):
        e = x[:, 0, 0, :EMB].float()
        return F.normalize(e, dim=-1) if normalize else e

    def encode_text(self, tok, normalize=True):
        e = self.table[tok[:, 0]]
        return F.normalize(e, dim=-1) if normalize else e


def _split(n: int, seed: int):
    """Images whose e0 sign is label a; labels b independent of everything. Unique reports = image embedding."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, (n, 2)).astype(np.float32)
    emb = rng.normal(0, 0.3, (n, EMB)).astype(np.float32)
    emb[:, 0] = np.where(y[:, 0] == 1, 1.0, -1.0) + rng.normal(0, 0.1, n)
    emb[:, 2] = rng.normal(0, 1.0, n)  # b's prompt axis carries no information about b
    img = np.zeros((n, 3, EMB, EMB), np.float32)
    img[:, 0, 0, :] = emb
    texts = [f"report {seed}-{i}" for i in range(n)]
    return img, y, texts, emb


def _world(n_test=200, n_train=160, n_val=120):
    from medvlp.pretrain.zeroshot import PARAPHRASE_NEGATIVE, PARAPHRASE_POSITIVE

    splits = {"test": _split(n_test, 1), "train": _split(n_train, 2)}
    if n_val:
        splits["val"] = _split(n_val, 3)
    table = {"a.": np.eye(EMB)[0], "No a.": -np.eye(EMB)[0], "b.": np.eye(EMB)[2], "No b.": -np.eye(EMB)[2]}
    for c, axis in (("a", 0), ("b", 2)):  # held-out paraphrases: a's are half as aligned with its axis
        table.update({t.format(c=c): 0.5 * np.eye(EMB)[axis] + 0.5 * np.eye(EMB)[1] for t in PARAPHRASE_POSITIVE})
        table.update({t.format(c=c): -0.5 * np.eye(EMB)[axis] + 0.5 * np.eye(EMB)[1] for t in PARAPHRASE_NEGATIVE})
    for _, _, texts, emb in splits.values():
        table.update(dict(zip(texts, emb)))

    def loader_fn(cfg, rank=0, world_size=1, tokenizer=None, train=False, split="test", shards=None):
        assert not train and rank == 0 and world_size == 1 and not cfg.augment
        if split not in splits:
            raise ValueError(f"split {split!r} has no samples")
        img, y, texts, _ = splits[split]
        for i in range(0, len(img), cfg.batch_size):
            sl = slice(i, i + cfg.batch_size)
            yield {"image": torch.tensor(img[sl]), "text": texts[sl], "labels": torch.tensor(y[sl]),
                   "label_names": list(NAMES), "key": [f"k{j}" for j in range(i, i + len(texts[sl]))]}

    return StandIn(table), loader_fn, splits


FAST = EvalConfig(kshot=[1, 2, 4], kshot_seeds=2, bootstrap=50, batch_size=32, max_samples=0)


def test_evaluate_separable_and_random_findings():
    model, loader_fn, _ = _world()
    model.train()
    m = E.evaluate(model, DataConfig(), FAST, modality="cxr", label_names=None, loader_fn=loader_fn)
    assert model.training  # mode restored
    assert m["eval/n_samples"] == 200
    assert m["zeroshot/auc/a"] == 1.0
    assert abs(m["zeroshot/auc/b"] - 0.5) < 0.15
    assert m["zeroshot/auc_macro"] == pytest.approx((m["zeroshot/auc/a"] + m["zeroshot/auc/b"]) / 2)
    assert m["zeroshot/auc_macro_ci_lo"] <= m["zeroshot/auc_macro"] <= m["zeroshot/auc_macro_ci_hi"]
    assert m["zeroshot/sens/a"] == 1.0 and m["zeroshot/spec/a"] == 1.0 and m["zeroshot/acc/a"] == 1.0
    for d in ("i2t", "t2i"):  # report embedding == image embedding: every query finds its own report first
        assert m[f"retrieval/{d}_r1"] == 1.0 and m[f"retrieval/{d}_r10"] == 1.0
    assert m["probe/auc/a"] > 0.95 and abs(m["probe/auc/b"] - 0.5) < 0.2
    for k in (1, 2, 4):
        assert m[f"kshot/{k}/auc_std"] >= 0 and m[f"kshot/{k}/n_findings"] == 2
        assert 0.5 < m[f"kshot/{k}/auc_mean"] <= 1.0
    # deterministic, and max_samples limits the stream
    assert E.evaluate(model, DataConfig(), FAST, loader_fn=loader_fn) == m
    m50 = E.evaluate(model, DataConfig(), FAST, loader_fn=loader_fn, max_samples=50)
    assert m50["eval/n_samples"] == 50 and m50["probe/n_train"] == 50


def test_uncertain_labels_are_skipped_and_label_subset():
    model, loader_fn, splits = _world()
    img, y, texts, _ = splits["test"]
    y[:20, 0] = -1
    img[:20, 0, 0, 0] = -img[:20, 0, 0, 0]  # these would be mis-scored, but they are uncertain
    cfg = EvalConfig(retrieval=False, linear_probe=False, kshot=[], bootstrap=0, max_samples=0)
    m = E.evaluate(model, DataConfig(), cfg, label_names=["b", "a"], loader_fn=loader_fn)
    assert m["zeroshot/auc/a"] == 1.0 and m["zeroshot/n_pos/a"] + m["zeroshot/n_neg/a"] == 180
    assert not any(k.startswith(("retrieval/", "probe/", "kshot/")) for k in m)
    with pytest.raises(ValueError, match="not all in the split"):
        E.evaluate(model, DataConfig(), cfg, label_names=["zzz"], loader_fn=loader_fn)


def test_prompt_ensemble_and_pair_softmax():
    table = {"p1": np.eye(EMB)[0], "p2": np.eye(EMB)[1] * 3.0, "n1": -np.eye(EMB)[0]}
    model = StandIn(table)
    pos_KE, neg_KE = E.prompt_embeddings(model, ["x"], "cxr", lambda mod, f: (["p1", "p2"], ["n1"]), "cpu")
    np.testing.assert_allclose(pos_KE[0], np.array([1, 1, 0, 0]) / math.sqrt(2), atol=1e-6)  # mean of normalised
    img_NE = F.normalize(torch.randn(5, EMB, generator=torch.Generator().manual_seed(0)), dim=-1).numpy()
    score = E.zero_shot_scores(img_NE, pos_KE, neg_KE, 10.0)
    logits = torch.stack([10 * torch.tensor(img_NE @ pos_KE.T), 10 * torch.tensor(img_NE @ neg_KE.T)], -1)
    np.testing.assert_allclose(score, torch.softmax(logits.double(), -1)[..., 0].numpy(), atol=1e-12)
    assert E.default_prompts("pleural_effusion") == (["pleural effusion."], ["No pleural effusion."])


def test_format_table_deterministic_and_outputs(tmp_path):
    model, loader_fn, _ = _world(60, 60)
    cfg = EvalConfig(kshot=[1, 64], kshot_seeds=2, bootstrap=20, batch_size=32, max_samples=0, retrieval_examples=2)
    with pytest.warns(RuntimeWarning, match="k=64 skipped"):
        rep = E.evaluate_detailed(model, DataConfig(), cfg, loader_fn=loader_fn)
    t1 = E.format_table(rep.metrics)
    t2 = E.format_table(dict(reversed(list(rep.metrics.items()))))
    assert t1 == t2
    lines = t1.splitlines()
    assert lines[0] == "Zero-shot protocol: multi-label: per finding, softmax over its positive / negative prompt pair."
    assert lines[2].startswith("Prompts: zero-shot AUC = the data set's own prompts")
    assert "picked on the validation split" in lines[2]
    assert lines[4].startswith("| finding | zero-shot AUC | 95% CI | held-out prompts AUC |")
    assert lines[6].startswith("| a | 1.000 |")
    assert any(l.startswith("| **macro** |") for l in lines)
    assert "| image → text | 1.000 | 1.000 | 1.000 |" in t1
    assert "| 64 | skipped (too few samples) | 0 |" in t1
    files = E.write_outputs(rep, tmp_path, n_examples=2)
    assert sorted(p.name for p in files.values()) == ["eval_metrics.json", "eval_scores.npz", "eval_table.md",
                                                      "retrieval_examples.png", "roc.png"]
    doc = json.loads((tmp_path / "eval_metrics.json").read_text())
    assert doc["zeroshot/auc/a"] == 1.0 and doc["kshot/64/auc_mean"] is None  # NaN -> null
    assert (tmp_path / "roc.png").read_bytes()[:4] == b"\x89PNG"


def test_run_eval_cli_rejects_bad_override(tmp_path, capsys):
    (tmp_path / "model.pt").write_bytes(b"")
    (tmp_path / "config.json").write_text(json.dumps({"data.train_shards": "x", "eval.bootstrap": 5}))
    a = argparse.Namespace(model_dir=str(tmp_path), shards=None, split="test", out=None, set=["eval.bogus=1"])
    assert E.run_eval_cli(a) == 2
    assert "eval.bogus: unknown key" in capsys.readouterr().err
    a.set = ["eval.bootstrap=many"]
    assert E.run_eval_cli(a) == 2
    assert "eval.bootstrap: expected an integer" in capsys.readouterr().err
    assert E.load_run_config(tmp_path).eval.bootstrap == 5  # typed, from the legacy flat config.json
    (tmp_path / "config.yaml").write_text("eval:\n  bootstrap: 7\n  bogus: 1\n")
    with pytest.raises(ValueError, match="eval.bogus: unknown key"):  # strict: a stored unknown key names its path
        E.load_run_config(tmp_path)
    (tmp_path / "config.yaml").write_text("kind: pretrain\neval:\n  bootstrap: 7\n")
    assert E.load_run_config(tmp_path).eval.bootstrap == 7  # config.yaml wins over config.json
    (tmp_path / "config.yaml").unlink()
    assert E.run_eval_cli(argparse.Namespace(model_dir=str(tmp_path / "none"), shards=None, split="test", out=None,
                                             set=[])) == 2
    assert "no such file or folder" in capsys.readouterr().err
    a.set = []  # the empty model.pt: a clear one-line error naming it, no traceback
    assert E.run_eval_cli(a) == 2
    assert "model.pt: not a readable torch file" in capsys.readouterr().err


def test_plots_write_pngs(tmp_path):
    from medvlp.pretrain import plots

    plots.loss_curve_png(list(range(30)), list(np.linspace(2, 1, 30)), tmp_path / "l.png",
                         extra_series={"lr": ([0, 29], [1e-3, 0.0])})
    runs = [{"run_name": "r1", "history": {"train/loss": [(1, 2.0), (2, 1.5)]}}, {"run_name": "r2", "history": {}}]
    plots.overlay_curves_png(runs, "train/loss", tmp_path / "o.png")
    vol = torch.randn(1, 6, 8, 8)  # a CT volume shows its middle slice
    plots.retrieval_examples_png([vol], ["t0", "t1", "t2"], [[2, 0, 1]], tmp_path / "r.png", gt_texts=["t0"])
    for name in ("l.png", "o.png", "r.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="topk_idx"):
        plots.retrieval_examples_png([vol], ["t0"], [[0], [0]], tmp_path / "x.png")


def _write_tiny_shards(out, n=64, size=32):
    """A tiny two-split corpus through the real writer: a bright blob <=> "nodule"."""
    from medvlp.data_shards.schema import Sample
    from medvlp.data_shards.writer import write_index, write_shards

    rng = np.random.default_rng(0)
    samples = []
    for i in range(n):
        y = int(rng.integers(0, 2))
        img = (rng.random((size, size)) * 60).astype(np.uint8)
        if y:
            img[8:16, 8:16] = 250
        samples.append(Sample(key=f"tiny/{i:04d}", text="Nodule." if y else "No nodule.", image=img,
                              labels={"nodule": y}, meta={"modality": "cxr", "split": "test" if i % 2 else "train",
                                                          "patient_id": f"p{i}"}))
    write_index(out, write_shards(samples, out, maxcount=n // 2), "cxr", ["nodule"], command="test")


def test_integration_real_model_and_shards(tmp_path):
    """The real loader and model end to end. The images carry a bright square exactly when the label is 1, so a
    linear probe on any working image path separates them; zero-shot is recomputed here from the embeddings."""
    import medvlp.pretrain.model as model_mod
    from medvlp.pretrain.config import ModelConfig

    shards = tmp_path / "shards"
    _write_tiny_shards(shards)
    model = model_mod.build_model(ModelConfig(name="debug"))
    torch.save(model.state_dict(), tmp_path / "model.pt")
    size = model.image_size if isinstance(model.image_size, int) else 32
    cfg = EvalConfig(kshot=[1, 2], kshot_seeds=1, bootstrap=10, batch_size=16, max_samples=24)
    m = E.run_eval("debug", tmp_path / "model.pt", str(shards), "cxr", cfg, tmp_path / "eval",
                   data_cfg=DataConfig(train_shards=str(shards), modality="cxr", image_size=size))
    assert m["eval/n_samples"] == 24 and m["probe/n_train"] == 24
    assert m["zeroshot/n_pos/nodule"] + m["zeroshot/n_neg/nodule"] == 24 and m["retrieval/unique_texts"] == 2
    assert m["zeroshot/n_pos/nodule"] > 0 and m["zeroshot/n_neg/nodule"] > 0
    zs, lo, hi = m["zeroshot/auc/nodule"], m["zeroshot/auc_ci_lo/nodule"], m["zeroshot/auc_ci_hi/nodule"]
    assert np.isfinite(zs) and lo <= zs <= hi and zs == m["zeroshot/auc_macro"]
    # the label is visible in the pixels: a probe on the real loader + tower must find it (0.5 = a broken path)
    assert m["probe/auc/nodule"] >= 0.9 and m["kshot/2/auc_mean"] >= 0.75
    assert {p.name for p in (tmp_path / "eval").iterdir()} >= {"eval_table.md", "eval_metrics.json", "roc.png",
                                                               "retrieval_examples.png"}


# ------------------------------------------------------------------------------- single-label, class-sorted
OCT = ["choroidal neovascularization", "diabetic macular edema", "drusen", "normal"]


class BandModel(nn.Module):
    """Stand-in CLIP whose image embedding is the brightness of 4 horizontal bands (class k = bright band k) and
    whose text table knows only the importer's caption template: "a retinal OCT scan: <class>."."""

    def __init__(self):
        super().__init__()
        from medvlp.pretrain.zeroshot import PARAPHRASE_CLASS

        self.prompts = {f"a retinal OCT scan: {c}.": k for k, c in enumerate(OCT)}
        self.prompts.update({t.format(c=c): k for k, c in enumerate(OCT) for t in PARAPHRASE_CLASS})
        self.logit_scale = nn.Parameter(torch.tensor([math.log(20.0)]))

    def tokenize(self, texts):
        return torch.tensor([[self.prompts.get(t, -1)] for t in texts], dtype=torch.long)

    def encode_image(self, x, normalize=True):
        g = x.float().mean(1)  # (B, S, S)
        bands = torch.stack([b.mean((1, 2)) for b in g.chunk(4, dim=1)], -1)
        e = bands - bands.mean(-1, keepdim=True)
        return F.normalize(e, dim=-1) if normalize else e

    def encode_text(self, tok, normalize=True):
        idx = tok[:, 0]
        if (idx < 0).any():
            raise KeyError("a prompt the model was never trained on")  # e.g. the old "X." / "No X." pair
        e = F.one_hot(idx, 4).float() - 0.25
        return F.normalize(e, dim=-1) if normalize else e


def _class_sorted_octmnist(path, n_train=80, n_test=40, seed=0):
    """An octmnist.npz in MedMNIST's format ((N, 28, 28) uint8, (N, 1) labels) whose splits are sorted by class
    (as some official splits are); class k has a bright band k (rows 7k..7k+6)."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in (("train", n_train), ("val", 8), ("test", n_test)):
        y = np.sort(rng.integers(0, 4, n))
        y[:4] = np.arange(4)
        y = np.sort(y)
        img = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
        for i, k in enumerate(y):
            img[i, 7 * k:7 * k + 7] = 230
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = img, y.reshape(n, 1).astype(np.uint8)
    np.savez_compressed(path, **arrays)
    return arrays


def test_single_label_softmax_on_class_sorted_medmnist(tmp_path):
    from medvlp.data_shards.importers import import_dataset
    from medvlp.data_shards.inspect import iter_samples

    arrays = _class_sorted_octmnist(tmp_path / "octmnist.npz")
    doc = import_dataset("medmnist", tmp_path / "octmnist.npz", tmp_path / "shards", maxcount="20")
    assert doc["labels"]["kind"] == "single-label" and doc["labels"]["class_names"] == OCT
    assert doc["labels"]["templates"] == ["a retinal OCT scan: {c}."]
    # written in a seeded random order: the first train shard is not one class
    first = [s for s in iter_samples(tmp_path / "shards") if s.meta["split"] == "train"][:20]
    assert len({s.meta["class_index"] for s in first}) > 1
    assert sorted(s.meta["index"] for s in first) != list(range(20))

    cfg = EvalConfig(kshot=[1, 2], kshot_seeds=2, bootstrap=20, batch_size=16, max_samples=24, retrieval=False)
    data = DataConfig(train_shards=str(tmp_path / "shards"), modality="cxr", image_size=28)
    rep = E.evaluate_detailed(BandModel(), data, cfg)
    m = rep.metrics
    assert rep.protocol.startswith("single-label: softmax over the 4 class prompts")
    assert m["zeroshot/single_label"] == 1.0
    assert m["eval/n_samples"] == 24 and m["probe/n_train"] == 24
    for c in OCT:  # no inverted class, every class scored
        assert m[f"zeroshot/auc/{c}"] > 0.9 and np.isfinite(m[f"probe/auc/{c}"])
    assert m["zeroshot/auc_macro"] > 0.95 and m["zeroshot/top1"] > 0.9
    assert np.isfinite(m["probe/auc_macro"]) and np.isfinite(m["kshot/1/auc_mean"]) and np.isfinite(
        m["kshot/2/auc_mean"])
    # the 24 probe samples were a stratified draw from the whole class-sorted train split: every class is there
    assert min(m[f"zeroshot/n_pos/{c}"] for c in OCT) >= 2
    table = E.format_table(m, rep.protocol)
    assert table.splitlines()[0].startswith("Zero-shot protocol: single-label: softmax over the 4 class prompts")
    assert "n/a" not in table.split("| **macro** |")[0]
    files = E.write_outputs(rep, tmp_path / "eval", n_examples=0)
    z = np.load(files["scores"])
    assert z["scores"].shape == (24, 4) and np.allclose(z["scores"].sum(1), 1.0) and len(set(z["keys"])) == 24
    assert str(z["protocol"]).startswith("single-label")


def test_single_class_split_warns_naming_it(tmp_path):
    from medvlp.data_shards.importers import import_dataset

    rng = np.random.default_rng(0)
    arrays = {"train_images": rng.integers(0, 255, (12, 28, 28), dtype=np.uint8),
              "train_labels": np.zeros((12, 1), np.uint8),  # every sample "choroidal neovascularization"
              "test_images": rng.integers(0, 255, (8, 28, 28), dtype=np.uint8),
              "test_labels": (np.arange(8) % 4).reshape(8, 1).astype(np.uint8)}
    np.savez(tmp_path / "octmnist.npz", **arrays)
    import_dataset("medmnist", tmp_path / "octmnist.npz", tmp_path / "shards")
    data = DataConfig(train_shards=str(tmp_path / "shards"), modality="cxr", image_size=28)
    cfg = EvalConfig(kshot=[], bootstrap=0, batch_size=8, max_samples=0, retrieval=False)
    with pytest.warns(RuntimeWarning, match=r"split 'train': every label has a single class"):
        m = E.evaluate(BandModel(), data, cfg)
    assert np.isnan(m["probe/auc_macro"]) and np.isfinite(m["zeroshot/auc_macro"])


# ------------------------------------------------------------------------------- protocol hygiene
@pytest.mark.timeout(300)
def test_operating_points_come_from_validation_not_test():
    """acc / sens / spec use the per-finding threshold of the ROC point nearest (0, 1) on val, applied to test;
    without a val split they are not reported at all."""
    from medvlp.pretrain import metrics as M

    model, loader_fn, splits = _world()
    cfg = EvalConfig(retrieval=False, linear_probe=False, kshot=[], bootstrap=0, max_samples=0)
    m = E.evaluate(model, DataConfig(), cfg, loader_fn=loader_fn)
    assert m["zeroshot/op_from_val"] == 1.0
    _, _, _, emb_val = splits["val"]
    img_v = F.normalize(torch.tensor(emb_val), dim=-1).numpy()
    pos, neg = E.prompt_embeddings(model, NAMES, "cxr", None, "cpu")
    val_NK = E.zero_shot_scores(img_v, pos, neg, 10.0)
    for k, n in enumerate(NAMES):
        thr = M.operating_point(splits["val"][1][:, k], val_NK[:, k])["threshold"]
        assert m[f"zeroshot/threshold/{n}"] == pytest.approx(thr)
        emb_t = F.normalize(torch.tensor(splits["test"][3]), dim=-1).numpy()
        test_k = E.zero_shot_scores(emb_t, pos, neg, 10.0)[:, k]
        want = M.at_threshold(splits["test"][1][:, k], test_k, thr)
        assert m[f"zeroshot/sens/{n}"] == pytest.approx(want["sensitivity"])
        assert m[f"zeroshot/spec/{n}"] == pytest.approx(want["specificity"])
    # b carries no signal: the val-picked threshold is not the test-optimal one, so test accuracy is near chance
    test_opt = M.operating_point(splits["test"][1][:, 1], E.zero_shot_scores(
        F.normalize(torch.tensor(splits["test"][3]), dim=-1).numpy(), pos, neg, 10.0)[:, 1])
    assert m["zeroshot/acc/b"] < test_opt["accuracy"]
    model, loader_fn, _ = _world(n_val=0)
    with pytest.warns(RuntimeWarning, match="validation split 'val' unavailable"):
        m0 = E.evaluate(model, DataConfig(), cfg, loader_fn=loader_fn)
    assert m0["zeroshot/op_from_val"] == 0.0 and "zeroshot/acc/a" not in m0
    assert "not reported (no validation split" in E.format_table(m0)


@pytest.mark.timeout(300)
def test_held_out_paraphrases_are_scored_beside_the_corpus_prompts():
    model, loader_fn, _ = _world()
    cfg = EvalConfig(retrieval=False, linear_probe=False, kshot=[], bootstrap=20, max_samples=0)
    m = E.evaluate(model, DataConfig(), cfg, loader_fn=loader_fn)
    # a's paraphrases share its axis (plus a common direction that cancels in the pair): still separable
    assert m["zeroshot_para/auc/a"] == 1.0 and abs(m["zeroshot_para/auc/b"] - 0.5) < 0.15
    assert m["zeroshot_para/auc_ci_lo/a"] <= 1.0 and "zeroshot_para/auc_macro" in m
    row = next(l for l in E.format_table(m).splitlines() if l.startswith("| a |"))
    assert row.split("|")[4].strip() == "1.000"  # the held-out prompts column


@pytest.mark.timeout(300)
def test_seed_rows_mean_sd_and_spread_line(tmp_path):
    from medvlp.finetune.sweep import seed_summary

    runs = [(f"run{i}", {"zeroshot/auc/a": a, "zeroshot/auc_ci_lo/a": a - 0.05, "zeroshot/auc_ci_hi/a": a + 0.03,
                         "zeroshot/auc/b": b, "zeroshot/auc_ci_lo/b": b - 0.1, "zeroshot/auc_ci_hi/b": b + 0.1,
                         "zeroshot/auc_macro": (a + b) / 2, "zeroshot_para/auc/a": 0.7})
            for i, (a, b) in enumerate([(0.90, 0.60), (0.92, 0.80), (0.91, 0.70)])]
    rows = E.seed_rows(runs)
    ra = next(r for r in rows if r["finding"] == "a")
    s = seed_summary([0.90, 0.92, 0.91])
    assert ra["zero-shot AUC (mean ± sd over runs)"] == f"{s['mean']:.3f} ± {s['sd']:.3f}" == "0.910 ± 0.010"
    assert ra["range over runs"] == "0.900-0.920" and ra["runs"] == 3
    assert ra["test-resampling 95% CI width (mean per run)"] == pytest.approx(0.08)
    assert ra["held-out prompts AUC"] == "0.700 ± 0.000"
    line = E.spread_line(runs)
    assert line.startswith("Between 3 training runs the zero-shot AUC moves most for b: 0.600-0.800")
    text = E.write_seed_table(runs, tmp_path)
    assert (tmp_path / "eval_seeds.csv").is_file() and "| macro | 3 |" in text and line in text


@pytest.mark.timeout(300)
def test_eval_cli_several_runs_need_out_and_existing_dirs(tmp_path, capsys):
    a = argparse.Namespace(model_dir=[str(tmp_path), str(tmp_path / "missing")], shards=None, split="test",
                           out=None, set=[])
    assert E.run_eval_cli(a) == 2
    assert "--out: needed with several --model-dir runs" in capsys.readouterr().err
    a.out = str(tmp_path / "o")
    assert E.run_eval_cli(a) == 2
    assert "missing: no such file or folder" in capsys.readouterr().err
