"""`medvlp runs compare` over two real tiny runs, and `medvlp runs ui` as a live MLflow server: its REST API lists
the runs, and a training run pointed at it with MLFLOW_TRACKING_URI logs there (params, metrics, artifacts)."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from medvlp.launch.cli import main as cli_main
from tests.conftest import tiny_overrides

REPO = Path(__file__).resolve().parents[3]
EXPERIMENT = "cmp-lr"
LRS = {"lr-small": "0.001", "lr-large": "0.003"}


def _clean_env(**extra):
    drop = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE",
            "MLFLOW_TRACKING_URI"}
    return {**{k: v for k, v in os.environ.items() if k not in drop}, "OMP_NUM_THREADS": "1", **extra}


def _sets(shards, out_dir, **extra):
    """A 3-step debug run, no checkpoints or final eval; tracking keys come from `extra`."""
    base = {"train.ckpt_every": 0, "train.final_eval": "false", **extra}
    return [s for s in tiny_overrides(shards, out_dir, steps=3, **base) if not s.startswith("tracking.uri=")] + (
        [f"tracking.uri={extra['tracking.uri']}"] if "tracking.uri" in extra else [])


@pytest.fixture(scope="module")
def store(tmp_path_factory, cxr_shards):
    """A SQLite store with two tiny runs of experiment EXPERIMENT that differ only in optim.lr."""
    from medvlp.launch.config import flatten, load_config, to_dict
    from medvlp.pretrain.train import run_pretrain

    root = tmp_path_factory.mktemp("store")
    db = root / "runs.db"
    cwd = os.getcwd()
    os.chdir(root)  # anything MLflow writes relative to the CWD stays in the temp dir
    try:
        for name, lr in LRS.items():
            cfg = load_config("debug", _sets(cxr_shards, root / name, **{
                "optim.lr": lr, "tracking.uri": f"sqlite:///{db}", "tracking.experiment": EXPERIMENT,
                "tracking.run_name": name}))
            run_pretrain(cfg, flatten(to_dict(cfg)), progress=False)
    finally:
        os.chdir(cwd)
    return db


def test_compare_table_shows_differing_lr_and_writes_png(store, tmp_path, capsys):
    png = tmp_path / "overlay.png"
    rc = cli_main(["runs", "compare", "--experiment", EXPERIMENT, "--uri", f"sqlite:///{store}",
                   "--metric", "train/loss", "--out", str(png)])
    out = capsys.readouterr().out
    assert rc == 0
    lines = [ln for ln in out.splitlines() if ln.startswith("|")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    assert head[:2] == ["run", "status"] and "optim.lr" in head and head[-1] == "train/loss"
    assert "data.batch_size" not in head  # same in both runs: not a column
    rows = {r[0]: r for r in ([c.strip() for c in ln.strip("|").split("|")] for ln in lines[2:])}
    assert set(rows) == set(LRS)
    for name, lr in LRS.items():
        assert float(rows[name][head.index("optim.lr")]) == float(lr)
        assert rows[name][1] == "FINISHED"
        assert float(rows[name][head.index("train/loss")]) > 0
    assert "2 runs from sqlite:///" in out
    from PIL import Image
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] > 100


def test_compare_errors_name_the_experiment_and_metric(store):
    with pytest.raises(SystemExit, match="'nope' not found .* known: .*cmp-lr"):
        cli_main(["runs", "compare", "--experiment", "nope", "--uri", f"sqlite:///{store}"])
    with pytest.raises(SystemExit, match=r"logged \['val/none'\]"):
        cli_main(["runs", "compare", "--experiment", EXPERIMENT, "--uri", f"sqlite:///{store}",
                  "--metric", "val/none"])


def test_ui_command_is_loopback_with_artifacts_beside_the_store(tmp_path):
    from medvlp.launch.runs import ui_command

    cmd = ui_command(5123, f"sqlite:///{tmp_path}/x.db")
    val = lambda flag: cmd[cmd.index(flag) + 1]  # noqa: E731
    assert cmd[1:4] == ["-m", "mlflow", "ui"] and val("--host") == "127.0.0.1" and val("--port") == "5123"
    assert val("--artifacts-destination") == str(tmp_path / "mlartifacts") and val("--workers") == "1"
    with pytest.raises(SystemExit, match="already a tracking server"):
        ui_command(5123, "http://127.0.0.1:5000")


# ----------------------------------------------------------------------------------------------- live server
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url, timeout=10):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read() or b"{}")


def _post(url, doc, timeout=10):
    req = urllib.request.Request(url, data=json.dumps(doc).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read() or b"{}")


def _wait_up(base, proc, log, timeout_s=150):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        assert proc.poll() is None, f"mlflow ui exited:\n{log.read_text()[-3000:]}"
        try:
            with urllib.request.urlopen(base + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise AssertionError(f"mlflow ui not up after {timeout_s} s:\n{log.read_text()[-3000:]}")


def _runs_of(base, experiment):
    exp = _get(f"{base}/api/2.0/mlflow/experiments/get-by-name?experiment_name={experiment}")["experiment"]
    return _post(f"{base}/api/2.0/mlflow/runs/search", {"experiment_ids": [exp["experiment_id"]]}).get("runs", [])


def _kv(items):
    return {x["key"]: x["value"] for x in items or []}


@pytest.mark.slow
def test_ui_serves_the_store_and_training_logs_to_it(store, cxr_shards, tmp_path):
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "ui.log"
    with open(log, "w") as f:
        ui = subprocess.Popen([sys.executable, "-m", "medvlp.launch.cli", "runs", "ui", "--port", str(port), "--uri",
                               f"sqlite:///{store}"], cwd=tmp_path, stdout=f, stderr=subprocess.STDOUT,
                              env=_clean_env(PYTHONPATH=str(REPO)), start_new_session=True)
    try:
        _wait_up(base, ui, log)
        runs = _runs_of(base, EXPERIMENT)  # the UI reads the training store
        by_name = {r["info"]["run_name"]: r for r in runs}
        assert set(by_name) == set(LRS)
        for name, lr in LRS.items():
            assert _kv(by_name[name]["data"]["params"])["optim.lr"] == lr

        work = tmp_path / "work"  # a run that fell back to the local store would create work/mlruns.db
        work.mkdir()
        sets = _sets(cxr_shards, work / "run", **{"tracking.experiment": "served", "tracking.run_name": "via-http"})
        cmd = [sys.executable, "-m", "medvlp.launch.cli", "pretrain", "debug"] + [x for s in sets for x in ("--set", s)]
        out = subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=300,
                             env=_clean_env(PYTHONPATH=str(REPO), MLFLOW_TRACKING_URI=base))
        assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
        assert not (work / "mlruns.db").exists(), "the run went to the fallback store, not the server"

        (run,) = _runs_of(base, "served")
        assert run["info"]["run_name"] == "via-http" and run["info"]["status"] == "FINISHED"
        assert _kv(run["data"]["params"])["data.batch_size"] == "8"
        assert float(_kv(run["data"]["metrics"])["train/loss"]) > 0
        run_id = run["info"]["run_id"]
        hist = _get(f"{base}/api/2.0/mlflow/metrics/get-history?run_id={run_id}&metric_key=train/loss")
        assert sorted(m["step"] for m in hist["metrics"]) == [1, 2, 3]
        arts = _get(f"{base}/api/2.0/mlflow/artifacts/list?run_id={run_id}").get("files", [])
        assert "loss_curve.png" in {a["path"] for a in arts}
        assert list((store.parent / "mlartifacts").rglob("loss_curve.png")), "artifact not beside the store"
    finally:
        if ui.poll() is None:
            os.killpg(ui.pid, signal.SIGTERM)
            try:
                ui.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(ui.pid, signal.SIGKILL)
                ui.wait()


def test_compare_ci_pairs_eval_scores_and_filters(tmp_path):
    """Three runs logged through the real Tracker into SQLite with hand-made eval_scores.npz: the paired table
    compares each with the baseline on the shared samples; --filter goes through mlflow.search_runs."""
    import numpy as np

    from medvlp.launch.runs import compare_runs
    from medvlp.pretrain import metrics as M
    from medvlp.pretrain.config import TrackingConfig
    from medvlp.pretrain.tracking import Tracker

    uri = f"sqlite:///{tmp_path}/ci.db"
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, (60, 2)).astype(np.float32)
    keys = np.array([f"s{i}" for i in range(60)])
    scores = {"base": rng.random((60, 2)), "good": y + rng.normal(0, 0.3, (60, 2))}
    scores["good-shuffled"] = scores["good"]
    for name, sc in scores.items():
        order = rng.permutation(60) if name == "good-shuffled" else np.arange(60)  # pairing is by key, not row
        f = tmp_path / name / "eval_scores.npz"
        f.parent.mkdir()
        np.savez(f, keys=keys[order], labels=y[order], scores=sc[order], label_names=np.array(["a", "b"]),
                 protocol=np.array("multi-label"), split=np.array("test"))
        with Tracker(TrackingConfig(uri=uri, experiment="ci", run_name=name, system_metrics=False), 0,
                     {"optim": {"lr": 0.001 if name == "base" else 0.003}}) as tr:
            tr.log_metrics({"zeroshot/auc_macro": M.macro_auc(y, sc)}, 1)
            tr.log_artifact(str(f), "eval")
    text = compare_runs("ci", uri=uri, out=str(tmp_path / "o.png"), ci=True, n_boot=300)
    rows = {ln.split("|")[1].strip(): [c.strip() for c in ln.strip("|").split("|")]
            for ln in text.splitlines() if ln.startswith("| good")}
    assert set(rows) == {"good", "good-shuffled"} and "vs `base`" in text
    ref = M.paired_bootstrap(M.macro_auc, y, scores["good"], scores["base"], n=300, seed=0)
    for r in rows.values():
        assert float(r[3]) == pytest.approx(ref["delta"], abs=1e-3) and r[6] == "60"
        lo, hi = (float(v) for v in r[4].strip("[]").split(","))
        assert 0 < lo < ref["delta"] < hi and float(r[5]) < 0.05
    text = compare_runs("ci", uri=uri, out=str(tmp_path / "o.png"), filter_string="params.`optim.lr` = '0.003'")
    assert "2 runs from" in text and "| base |" not in text
    with pytest.raises(SystemExit, match="baseline 'zzz'"):
        compare_runs("ci", uri=uri, out=str(tmp_path / "o.png"), ci=True, baseline="zzz")
