"""Real slide feature bags (.h5 / .npz per slide + a manifest) -> slide-bag shards -> stage 1, stage 2 and generation;
bad manifests fail with one line naming the row and the column."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from medvlp.finetune.report.bags import BagManifestError, bags_to_shards, main

pytestmark = pytest.mark.timeout(300)
torch.set_num_threads(1)
DIAG = ["adenoma", "carcinoma"]


def _fabricate(root, n=12, d=24):
    """n fabricated bags (half .h5 written like TRIDENT, half .npz) and a CSV manifest; returns the rows."""
    import csv

    import h5py

    rng = np.random.default_rng(0)
    rows = []
    (root / "bags").mkdir(parents=True)
    for i in range(n):
        k = int(rng.integers(20, 60))
        feats = rng.standard_normal((k, d)).astype(np.float32) + (2.0 if i % 2 else 0.0)
        coords = (rng.permutation(400)[:k, None] * np.array([[256, 0]]) + 512).astype(np.int64)
        coords[:, 1] = rng.integers(0, 10, k) * 256
        if i % 2:
            path = root / "bags" / f"s{i}.h5"
            with h5py.File(path, "w") as f:
                f["features"] = feats[None]  # (1, n, d) as some extractors write
                f["coords"] = coords
        else:
            path = root / "bags" / f"s{i}.npz"
            np.savez(path, features=feats, coords=coords)
        diag = DIAG[i % 2]
        rows.append({"bag": f"bags/{path.name}", "diagnosis": diag,
                     "report": f"Sections show {'an invasive' if i % 2 else 'a tubular'} lesion with {i} foci.",
                     "split": (["train"] * 8 + ["val", "val", "test", "test"])[i], "feats": feats, "coords": coords})
    with open(root / "slides.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["bag", "diagnosis", "report", "split"])
        w.writeheader()
        for r in rows:
            w.writerow({k: r[k] for k in ("bag", "diagnosis", "report", "split")})
    return rows


def test_bags_become_shards_with_features_coords_and_reports(tmp_path):
    from medvlp.data_shards.config import DataConfig
    from medvlp.finetune.report.data import load_split

    rows = _fabricate(tmp_path)
    doc = bags_to_shards(tmp_path / "slides.csv", tmp_path / "shards")
    assert doc["modality"] == "slide" and doc["label_names"] == DIAG and doc["num_samples"] == len(rows)
    dc = DataConfig(modality="slide", train_shards=str(tmp_path / "shards"))
    got = {}
    for split in ("train", "val", "test"):
        sp = load_split(dc, split)
        for k, f, c, t, y in zip(sp.keys, sp.feats, sp.coords, sp.texts, sp.class_index):
            got[k] = (f, c, t, y)
    assert len(got) == len(rows)
    for i, r in enumerate(rows):
        f, c, t, y = got[f"slide-s{i}"]
        np.testing.assert_allclose(f.numpy(), r["feats"].astype(np.float16).astype(np.float32))
        assert torch.equal(c, torch.from_numpy(r["coords"]).long())
        assert t == f"{r['report']} Final diagnosis: {r['diagnosis']}." and DIAG[int(y)] == r["diagnosis"]


@pytest.mark.parametrize("bad,msg", [
    ({"bag": "../outside.npz"}, "m.jsonl line 1: column 'bag': '../outside.npz' leaves the manifest's folder"),
    ({"bag": "/etc/passwd"}, "is absolute"),
    ({"bag": "bags/missing.npz"}, "does not exist"),
    ({"split": "holdout"}, "column 'split'"),
    ({"diagnosis": ""}, "column 'diagnosis' is empty"),
    ({"bag": "bags/pickled.npz"}, "cannot read pickled.npz"),
    ({"bag": "bags/short.npz"}, "coords (3, 2) do not match features (4, 24)"),
])
def test_bad_manifest_rows_are_named(tmp_path, bad, msg):
    (tmp_path / "bags").mkdir()
    np.savez(tmp_path / "bags" / "ok.npz", features=np.zeros((4, 24), np.float32), coords=np.zeros((4, 2)))
    np.savez(tmp_path / "bags" / "pickled.npz", features=np.array([{"a": 1}], dtype=object), coords=np.zeros((1, 2)))
    np.savez(tmp_path / "bags" / "short.npz", features=np.zeros((4, 24)), coords=np.zeros((3, 2)))
    (tmp_path.parent / "outside.npz").write_bytes((tmp_path / "bags" / "ok.npz").read_bytes())
    row = {"bag": "bags/ok.npz", "diagnosis": "carcinoma", "report": "A report.", "split": "train", **bad}
    (tmp_path / "m.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(BagManifestError) as e:
        bags_to_shards(tmp_path / "m.jsonl", tmp_path / "out")
    assert msg in str(e.value)


def test_command_exits_2_with_one_line(tmp_path, capsys):
    (tmp_path / "m.jsonl").write_text(json.dumps({"bag": "../x.npz", "diagnosis": "a", "report": "r",
                                                  "split": "train"}) + "\n")
    assert main(["--manifest", str(tmp_path / "m.jsonl"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: m.jsonl line 1: column 'bag'") and "\n" not in err


def test_stage1_stage2_and_generation_run_from_real_bags(tmp_path):
    from medvlp.data_shards.config import DataConfig
    from medvlp.finetune.report import ReportConfig, ReportStage
    from medvlp.finetune.report.config import ReportModelConfig, ReportRunnerConfig
    from medvlp.finetune.report.run import load_report_run, write_generations
    from medvlp.finetune.runner import run_stage
    from medvlp.pretrain.config import TrackingConfig

    _fabricate(tmp_path)
    bags_to_shards(tmp_path / "slides.csv", tmp_path / "shards")

    def cfg(stage, out, **kw):
        return ReportConfig(data=DataConfig(modality="slide", train_shards=str(tmp_path / "shards"), shuffle_buffer=4),
                            model=ReportModelConfig(train_lm=True, lm_hidden=32, width=32, latents=4, vocab_size=200,
                                                    context_length=48),
                            tracking=TrackingConfig(enabled=False),
                            finetune=ReportRunnerConfig(stage=stage, out_dir=str(out), steps=3, batch_size=4,
                                                        progress=False, seed=0, **kw))

    run_stage(ReportStage(), cfg(1, tmp_path / "s1"))
    c2 = cfg(2, tmp_path / "s2", init=str(tmp_path / "s1"))
    c2.gen.max_new_tokens = 8
    r2 = run_stage(ReportStage(), c2)
    assert "bleu4" in r2.metrics and r2.metrics["diag_acc"] == r2.metrics["clinical"]  # no composition truth
    model, tok = load_report_run(tmp_path / "s2", c2)
    rows = write_generations(model, tok, c2, str(tmp_path / "shards"), tmp_path / "gen.jsonl", split="test")
    assert len(rows) == 2 and all(r["predicted_class"] in DIAG for r in rows)
    assert [json.loads(x)["key"] for x in (tmp_path / "gen.jsonl").read_text().splitlines()] == [r["key"] for r in rows]
