"""MLflow tracking against a real local sqlite store (no server, no network)."""
from __future__ import annotations

import socket
import time
import warnings

import pytest

pytest.importorskip("mlflow")

from medvlp.pretrain.config import TrackingConfig  # noqa: E402
from medvlp.pretrain.tracking import Tracker, absolute_uri, read_runs, sanitize_key, server_reachable  # noqa: E402


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there any more
    return port


def test_run_logged_and_read_back(tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/x.db"
    cfg = TrackingConfig(uri=uri, experiment="exp-a", run_name="r1")
    art = tmp_path / "curve.txt"
    art.write_text("hello")
    config = {"data": {"batch_size": 8, "shards": "a" * 7000}, "optim": {"lr": 1e-3, "betas": [0.9, 0.98]}}
    with Tracker(cfg, rank=0, config_dict=config) as tr:
        for step in (1, 2, 3):
            tr.log_metrics({"train/loss": 1.0 / step, "note": "not a number"}, step)
        tr.log_artifact(art)
        tr.log_text("| a |\n", "eval/table.md")
        tr.set_tags({"kind": "test"})
        run_id = tr.run_id
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "r1"
    assert run.data.params["data.batch_size"] == "8" and run.data.params["optim.betas"] == "[0.9, 0.98]"
    assert len(run.data.params["data.shards"]) == 6000  # capped, not rejected
    hist = client.get_metric_history(run_id, "train/loss")
    assert [(m.step, m.value) for m in hist] == [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3))]
    assert "note" not in run.data.metrics
    names = {a.path for a in client.list_artifacts(run_id)} | {a.path for a in client.list_artifacts(run_id, "eval")}
    assert {"curve.txt", "eval/table.md"} <= names
    runs = read_runs("exp-a", uri)
    assert len(runs) == 1 and runs[0]["run_id"] == run_id and runs[0]["tags"]["kind"] == "test"
    assert runs[0]["history"]["train/loss"][0] == (1, 1.0) and runs[0]["metrics"]["train/loss"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="experiment 'nope' not found.*exp-a"):
        read_runs("nope", uri)


def test_other_ranks_and_disabled_log_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for cfg, rank in ((TrackingConfig(uri=f"sqlite:///{tmp_path}/r.db"), 1), (TrackingConfig(enabled=False), 0)):
        with Tracker(cfg, rank=rank, config_dict={"a": 1}) as tr:
            tr.log_metrics({"x": 1.0}, 1)
            tr.log_text("t", "t.txt")
            assert tr.run_id is None
    assert list(tmp_path.iterdir()) == []  # no store was even created


def test_unreachable_server_falls_back_to_local_sqlite(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = TrackingConfig(uri=f"http://127.0.0.1:{_closed_port()}", experiment="fb")
    t0 = time.perf_counter()
    assert not server_reachable(cfg.uri, cfg.probe_timeout_s)
    assert time.perf_counter() - t0 < 3.0  # the decision to fall back (sqlite schema creation comes after)
    with pytest.warns(RuntimeWarning, match="did not answer.*sqlite:///"):
        tr = Tracker(cfg, rank=0).start()
    tr.log_metrics({"m": 2.0}, 5)
    tr.end()
    assert tr.uri == f"sqlite:///{tmp_path.resolve()}/mlruns.db"
    assert read_runs("fb", tr.uri)[0]["history"]["m"] == [(5, 2.0)]


def test_failure_mid_run_buffers_then_flushes(tmp_path):
    cfg = TrackingConfig(uri=f"sqlite:///{tmp_path}/b.db", experiment="buf", retry_every_s=0.0)
    tr = Tracker(cfg, rank=0).start()
    real = tr.client.log_batch

    def dead(*a, **k):
        raise ConnectionError("server went away")

    tr.client.log_batch = dead
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in (1, 2, 3):
            tr.log_metrics({"loss": float(step)}, step)  # must not raise
    assert sum("buffering" in str(w.message) for w in caught) == 1  # warned once
    assert len(tr._pending) == 3
    tr.client.log_batch = real  # the server is back
    tr.log_metrics({"loss": 4.0}, 4)
    tr.end()
    assert [v for _, v in read_runs("buf", cfg.uri)[0]["history"]["loss"]] == [1.0, 2.0, 3.0, 4.0]


def test_uri_helpers(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert absolute_uri("sqlite:///mlruns.db") == f"sqlite:///{tmp_path.resolve()}/mlruns.db"
    assert absolute_uri("sqlite:////abs/x.db") == "sqlite:////abs/x.db"
    assert absolute_uri("http://host:5000") == "http://host:5000"
    assert sanitize_key("eval/auc[nodule]:x") == "eval/auc_nodule__x"


def test_lineage_tags_data_input_system_metrics_and_eval_child_run(tmp_path):
    """Context tags (commit, user, source), the shard set as a dataset input, system metrics, and an evaluation
    logged as a child run found through the out_dir tag, in a real SQLite store."""
    import hashlib
    import json

    from mlflow import MlflowClient

    from medvlp.data_shards.synth import synth_to_shards
    from medvlp.pretrain.tracking import find_training_run, log_eval_run

    shards = tmp_path / "shards"
    synth_to_shards(shards, modality="patho", n=12, shard_size=6, size=32)
    sha = hashlib.sha256((shards / "index.json").read_bytes()).hexdigest()
    uri = f"sqlite:///{tmp_path}/lineage.db"
    cfg = TrackingConfig(uri=uri, experiment="exp-l", system_metrics_every_s=0.5)
    config = {"data": {"train_shards": str(shards)}, "train": {"out_dir": str(tmp_path / "run")}}
    with Tracker(cfg, rank=0, config_dict=config) as tr:
        tr.log_metrics({"train/loss": 1.0}, 1)
        deadline = time.time() + 30
        client = MlflowClient(tracking_uri=uri)
        while time.time() < deadline and not any(k.startswith("system/")
                                                 for k in client.get_run(tr.run_id).data.metrics):
            time.sleep(0.5)
        run_id = tr.run_id
    run = client.get_run(run_id)
    tags = run.data.tags
    assert len(tags["mlflow.source.git.commit"]) == 40 and tags["mlflow.user"] and tags["mlflow.source.name"]
    assert tags["medvlp.out_dir"] == str((tmp_path / "run").resolve())
    assert any(k.startswith("system/cpu_utilization") for k in run.data.metrics)
    (ds_input,) = run.inputs.dataset_inputs
    ds = ds_input.dataset
    assert ds.digest == sha[:32] and ds.name == "synth-patho" and ds.source_type == "local"
    profile = json.loads(ds.profile)
    assert profile["index_sha256"] == sha and profile["num_samples"] == 12 and profile["label_kind"] == "binary"
    assert profile["build_command"].startswith("medvlp shards synth")
    assert {t.key: t.value for t in ds_input.tags}["mlflow.data.context"] == "train"

    assert find_training_run(tmp_path / "run", uri).info.run_id == run_id
    eval_dir = tmp_path / "run" / "eval"
    eval_dir.mkdir(parents=True)
    (eval_dir / "eval_table.md").write_text("| a |\n")
    child_id = log_eval_run(TrackingConfig(uri=uri, experiment="other"), tmp_path / "run", eval_dir,
                            {"zeroshot/auc_macro": 0.9}, shards=str(shards), tags={"eval.split": "test"})
    child = client.get_run(child_id)
    assert child.data.tags["mlflow.parentRunId"] == run_id
    assert child.info.experiment_id == run.info.experiment_id  # beside its parent, whatever the config said
    assert child.data.metrics["zeroshot/auc_macro"] == 0.9 and child.data.tags["eval.split"] == "test"
    assert [a.path for a in client.list_artifacts(child_id, "eval")] == ["eval/eval_table.md"]
    assert child.inputs.dataset_inputs[0].dataset.digest == sha[:32]
    with pytest.warns(RuntimeWarning, match="no training run tagged"):
        assert log_eval_run(TrackingConfig(uri=uri, experiment="exp-l"), tmp_path / "elsewhere", eval_dir, {})
