"""Training under faults: every shard unreadable (one clear error, no endless loop), the trainer SIGKILLed in the
middle of writing a checkpoint (the resume starts from the last COMPLETE one, nothing half-written is loaded), and
the MLflow server dying mid-run (training goes on; what the server did not get is kept in a file)."""
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from medvlp.launch.config import flatten, load_config, to_dict
from tests.conftest import tiny_overrides
from tests.faults.conftest import REPO, clean_env, cli_here, one_line_error, tars

QUIET = {"tracking.enabled": "false", "train.final_eval": "false"}


def _run(cfg):
    from medvlp.pretrain.train import run_pretrain
    return run_pretrain(cfg, flatten(to_dict(cfg)), progress=False)


def test_pretrain_on_unreadable_shards_stops_with_one_error(shards, tmp_path):
    for t in tars(shards):
        t.write_bytes(b"\0garbage" * 64)
    sets = tiny_overrides(shards, tmp_path / "run", steps=3, **QUIET, **{"data.max_bad_in_row": 50,
                                                                          "data.image_size": 64})
    t0 = time.monotonic()
    proc = cli_here("pretrain", "debug", *[x for s in sets for x in ("--set", s)])
    assert proc.returncode == 2
    assert "unreadable shards in a row" in one_line_error(proc) and "max_bad_in_row=50" in proc.stderr
    assert time.monotonic() - t0 < 120


def _pending_save(out_dir: Path, min_step: int) -> Path | None:
    root = out_dir / "checkpoints"
    for p in sorted(root.glob("step_*")) if root.exists() else []:
        if int(p.name[5:]) >= min_step and not (p / "COMPLETE").exists():
            return p
    return None


def test_killed_during_checkpoint_write_resumes_from_last_complete(cxr_shards, tmp_path):
    from medvlp.pretrain.engine import complete_checkpoints

    out = tmp_path / "run"
    sets = tiny_overrides(cxr_shards, out, steps=12, **QUIET, **{"train.ckpt_every": 1, "train.keep_ckpts": 3})
    proc = subprocess.Popen([sys.executable, "-m", "medvlp.launch.cli", "pretrain", "debug",
                             *[x for s in sets for x in ("--set", s)]], cwd=REPO, env=clean_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    killed_in = None
    try:
        deadline = time.monotonic() + 240
        while proc.poll() is None and time.monotonic() < deadline:
            if (killed_in := _pending_save(out, 3)) is not None:
                os.killpg(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.005)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert killed_in is not None, "the run ended before a checkpoint write could be interrupted"
    done = complete_checkpoints(out)
    last = int(done[-1].name[5:])
    assert done and last == int(killed_in.name[5:]) - 1 and not (killed_in / "COMPLETE").exists()
    res = _run(load_config("debug", sets + ["train.resume=true"]))
    assert res.steps_done == 12
    new_steps = [s for s, _ in res.losses if s > last]
    assert new_steps == list(range(last + 1, 13))  # continued right after the last complete checkpoint
    assert int(complete_checkpoints(out)[-1].name[5:]) == 12


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SERVER = """
import os, sys
os.environ.update(MLFLOW_ALLOW_FILE_STORE="true", _MLFLOW_SERVER_FILE_STORE=sys.argv[2],
                  _MLFLOW_SERVER_ARTIFACT_ROOT=sys.argv[2] + "-artifacts", _MLFLOW_SERVER_SERVE_ARTIFACTS="false")
from mlflow.server import app
from werkzeug.serving import make_server
make_server("127.0.0.1", int(sys.argv[1]), app, threaded=True).serve_forever()
"""


def _wait_up(port, proc, timeout=180):
    import urllib.request
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
            return
        except OSError:
            time.sleep(0.25)
    raise AssertionError("MLflow server did not start")


def test_mlflow_server_dying_mid_run_loses_no_metric(cxr_shards, tmp_path, monkeypatch):
    """A real MLflow tracking server (its Flask app) dies after step 3; the run finishes all steps and every
    train/loss point is either on the server or in the unsent-items file."""
    monkeypatch.chdir(tmp_path)
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(port), str(tmp_path / "store")],
                              env=clean_env(MLFLOW_ALLOW_FILE_STORE="true"), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_up(port, server)
        out = tmp_path / "run"
        sets = tiny_overrides(cxr_shards, out, steps=8, **{
            "train.final_eval": "false", "train.ckpt_every": 0, "tracking.uri": f"http://127.0.0.1:{port}",
            "tracking.fallback_uri": f"sqlite:///{tmp_path}/fallback.db", "tracking.experiment": "dies"})

        def kill_after_step_3():
            log = out / "train_log.jsonl"
            while server.poll() is None:
                if log.exists() and len(log.read_text().splitlines()) >= 3:
                    os.killpg(server.pid, signal.SIGKILL)
                    return
                time.sleep(0.02)

        threading.Thread(target=kill_after_step_3, daemon=True).start()
        with pytest.warns(RuntimeWarning):
            res = _run(load_config("debug", sets))
        assert res.steps_done == 8
        assert server.poll() is not None, "the server was never killed"
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
        server.wait()
    from mlflow.store.tracking.file_store import FileStore
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    store = FileStore(str(tmp_path / "store"))
    on_server = {m.step for m in store.get_metric_history(res.run_id, "train/loss")}
    unsent = list(tmp_path.glob("mlflow_unsent_*.json"))
    assert len(unsent) == 1, "the items the dead server did not get were not kept"
    doc = json.loads(unsent[0].read_text())
    kept = {m[2] for item in doc["items"] for m in item.get("metrics", []) if m[0] == "train/loss"}
    assert on_server and on_server | kept == set(range(1, 9)), (sorted(on_server), sorted(kept))
