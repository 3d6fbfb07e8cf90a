"""Runs you can tell apart: names RECIPE-SUFFIX that a seeded RNG cannot fix, evaluation runs named after the run
they evaluate and joined to its row in `runs compare`, the compare PNG under the store (never over a file)."""
import random
import re

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.timeout(180)


def _train_run(uri, out_dir, experiment="names", seed=0, name=""):
    from medvlp.pretrain.config import TrackingConfig
    from medvlp.pretrain.tracking import Tracker

    random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)  # what a seeded training run does first
    with Tracker(TrackingConfig(uri=uri, experiment=experiment, system_metrics=False, run_name=name), 0,
                 {"train": {"out_dir": str(out_dir)}, "optim": {"lr": 0.001}}) as tr:
        tr.log_metrics({"train/loss": 0.5}, 1)
    return tr


def test_same_seed_runs_get_distinct_recipe_names(tmp_path):
    uri = f"sqlite:///{tmp_path}/m.db"
    names = [_train_run(uri, tmp_path / "rn50-cxr", seed=0).run_name for _ in range(3)]
    assert all(re.fullmatch(r"rn50-cxr-[0-9a-f]{6}", n) for n in names), names
    assert len(set(names)) == 3  # the seeded RNG no longer picks the name
    assert _train_run(uri, tmp_path / "x", name="my-exact-name").run_name == "my-exact-name"


def test_eval_child_is_named_after_its_run_and_joined_in_compare(tmp_path, monkeypatch):
    from medvlp.launch.runs import compare_runs
    from medvlp.pretrain.config import TrackingConfig
    from medvlp.pretrain.tracking import log_eval_run

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    store = tmp_path / "store"
    store.mkdir()
    uri = f"sqlite:///{store}/m.db"
    a = _train_run(uri, tmp_path / "runs" / "debug")
    b = _train_run(uri, tmp_path / "runs" / "other")
    ev = tmp_path / "eval"
    ev.mkdir()
    (ev / "eval_table.md").write_text("| x |\n")
    rid = log_eval_run(TrackingConfig(uri=uri, experiment="names"), tmp_path / "runs" / "debug", ev,
                       {"zeroshot/auc_macro": 0.8125}, tags={"eval.split": "test"})
    from mlflow import MlflowClient

    child = MlflowClient(tracking_uri=uri).get_run(rid)
    assert child.info.run_name == f"eval-{a.run_name}-test"
    assert child.data.tags["mlflow.parentRunId"] == a.run_id

    text = compare_runs("names", uri=uri)
    rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in text.splitlines() if ln.startswith("|")]
    head, body = rows[0], {r[0]: r for r in rows[2:]}
    assert set(body) == {a.run_name, b.run_name}  # the evaluation is not a row of its own
    assert head[:3] == ["run", "status", "eval runs"] and "zeroshot/auc_macro" in head
    assert body[a.run_name][2] == child.info.run_name
    assert body[a.run_name][head.index("zeroshot/auc_macro")] == "0.8125"
    assert body[b.run_name][head.index("zeroshot/auc_macro")] == ""
    # the overlay goes beside the store's database, a new file each time, nothing into the CWD
    pngs = re.findall(r"overlay -> (\S+\.png)", text)
    again = re.findall(r"overlay -> (\S+\.png)", compare_runs("names", uri=uri))
    assert pngs and again and pngs[0] != again[0]
    assert all(p.startswith(str(store / "medvlp-outputs")) for p in pngs + again)
    assert not list(tmp_path.glob("*.png"))
    # an explicit --out that exists is replaced, and the output says so
    out = tmp_path / "mine.png"
    out.write_bytes(b"old")
    assert "(replaced the file that was there)" in compare_runs("names", uri=uri, out=str(out))
