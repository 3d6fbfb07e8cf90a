"""An MLflow store that cannot be written: one line naming the store, never SQLAlchemy's traceback. A training run
refuses to start (exit 2, its run folder untouched) unless tracking is switched off; other commands warn in one
line and go on without MLflow."""
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import tiny_overrides
from tests.faults.conftest import clean_env, cli_here, one_line_error

pytestmark = pytest.mark.timeout(180)


def test_store_problem_names_what_is_wrong(tmp_path):
    from medvlp.pretrain.tracking import store_problem

    afile = tmp_path / "afile"
    afile.write_text("x")
    assert store_problem(f"sqlite:///{afile}/mlruns.db") == f"{afile} is a file, so {afile}/mlruns.db cannot be created"
    assert store_problem(f"sqlite:///{afile}/a/b/mlruns.db").startswith(f"{afile} is a file")
    assert store_problem(f"sqlite:///{tmp_path}") == f"{tmp_path} is a folder, not an SQLite file"
    assert store_problem(f"{afile.as_uri()}") == f"{afile} is a file, not a store folder"
    assert store_problem(f"sqlite:///{tmp_path}/new/mlruns.db") is None  # created on first use
    assert store_problem(tmp_path.as_uri()) is None
    locked = tmp_path / "locked"
    locked.mkdir()
    if os.geteuid() != 0:  # root looks into any folder
        locked.chmod(0o000)
        assert "Permission denied" in store_problem(f"sqlite:///{locked}/mlruns.db")
        locked.chmod(0o755)
    assert store_problem("sqlite:///:memory:") is None and store_problem("http://127.0.0.1:9/") is None


def _train_sets(shards, out, uri, loop):
    if loop == "pretrain":
        return ["pretrain", "debug"] + [x for s in tiny_overrides(shards, out, steps=2, **{"tracking.uri": uri})
                                        for x in ("--set", s)]
    return ["finetune", "pcam", "--set", f"finetune.out_dir={out}", "--set", f"tracking.uri={uri}"]


@pytest.mark.parametrize("loop", ["pretrain", "finetune"])
def test_training_refuses_an_unwritable_store_before_touching_its_folder(loop, tmp_path, cxr_shards):
    """Both loops: exit 2 with one line naming the store, the run folder not created (nothing trained, nothing to
    lose); with tracking.enabled=false the same store is not looked at."""
    afile = tmp_path / "afile"
    afile.write_text("x")
    uri, out = f"sqlite:///{afile}/mlruns.db", tmp_path / "run"
    proc = cli_here(*_train_sets(cxr_shards, out, uri, loop))
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = one_line_error(proc)
    assert len(err.strip().splitlines()) == 1, err
    assert f"error: MLflow store {uri} cannot be written: {afile} is a file" in err and "tracking.enabled=false" in err
    assert not out.exists()
    if loop == "pretrain":
        from medvlp.pretrain.config import TrackingConfig
        from medvlp.pretrain.tracking import check_store

        check_store(TrackingConfig(uri=uri, enabled=False))  # off: nothing to check
        check_store(TrackingConfig(uri=uri), rank=1)  # only rank 0 logs


_READ_ONLY = r'''
import json, os, sys, warnings
import sqlite3, mlflow, sqlalchemy, mlflow.store.tracking.sqlalchemy_store, mlflow.entities  # before the ids drop
from medvlp.pretrain import tracking
from medvlp.pretrain.config import TrackingConfig
db = sys.argv[1]
if os.geteuid() == 0:  # root writes anything: act as nobody so the file system judges the modes
    os.setegid(65534); os.seteuid(65534)
out = {"problem": tracking.store_problem("sqlite:///" + db)}
try:
    tracking.check_store(TrackingConfig(uri="sqlite:///" + db))
except tracking.TrackingStoreError as e:
    out["refused"] = str(e)
cfg = TrackingConfig(uri="sqlite:///" + db, fallback_uri="sqlite:///" + db, system_metrics=False)
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    t = tracking.Tracker(cfg, 0, {"a": 1}).start()
    out["warnings"] = [str(x.message) for x in w]
out["run_id"] = t.run_id
tracking.store_problem = lambda uri: None  # past the pre-check: MLflow's own error, as a store failing mid-run gives
t = tracking.Tracker(cfg, 0, {"a": 1}).start()
out["run_id_2"] = t.run_id
print("RESULT " + json.dumps(out))
'''


def test_a_read_only_sqlite_store_is_one_line_not_a_traceback(tmp_path):
    """A real read-only store (file 0444 in a 0555 folder; root acts as nobody): the pre-check names it; a Tracker
    (eval, tools) warns in one line and goes on without MLflow; and where MLflow itself hits the read-only database
    its ERROR record is one line, not ~85 lines of SQLAlchemy traceback."""
    from medvlp.pretrain.config import TrackingConfig
    from medvlp.pretrain.tracking import Tracker

    import shutil
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="medvlp-ro-"))  # pytest's tmp folders are 0700: nobody could not look in
    base.chmod(0o755)
    store = base / "ro"
    store.mkdir()
    db = store / "mlruns.db"
    with Tracker(TrackingConfig(uri=f"sqlite:///{db}", system_metrics=False), 0, {"a": 1}) as tr:
        tr.log_metrics({"x": 1.0}, step=1)
    db.chmod(0o444)
    store.chmod(0o555)
    try:
        proc = subprocess.run([sys.executable, "-c", _READ_ONLY, str(db)], capture_output=True, text=True,
                              env=clean_env(GIT_PYTHON_REFRESH="quiet"), cwd=tmp_path, timeout=150)
    finally:
        store.chmod(0o755)
        db.chmod(0o644)
        shutil.rmtree(base, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.split("RESULT ", 1)[1])
    assert res["problem"] == f"{db} is read-only"
    assert res["refused"].startswith(f"MLflow store sqlite:///{db} cannot be written: {db} is read-only")
    assert res["run_id"] is None and res["run_id_2"] is None
    assert res["warnings"][0] == f"MLflow: cannot write the store sqlite:///{db}: {db} is read-only"
    assert "Traceback" not in proc.stderr and "[SQL:" not in proc.stderr, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if "ERROR mlflow" in ln]
    assert errors and all("attempt to write a readonly database" in ln for ln in errors), proc.stderr[-3000:]
    assert sum("sqlalchemy" in ln.lower() for ln in proc.stderr.splitlines()) <= 2, proc.stderr


def test_store_error_records_keep_one_line_unless_verbose():
    from medvlp.pretrain import tracking

    try:
        raise RuntimeError("(raised as a result of autoflush)\n(sqlite3.OperationalError) attempt to write a "
                           "readonly database\n[SQL: INSERT INTO runs ...]")
    except RuntimeError:
        rec = logging.LogRecord("mlflow.store.db.utils", logging.ERROR, __file__, 1,
                                "SQLAlchemy database error. The following exception is caught.\nmore", None,
                                sys.exc_info())
    assert tracking._STORE_FILTER.filter(rec) and rec.exc_info is None
    assert rec.getMessage() == ("SQLAlchemy database error. The following exception is caught. RuntimeError: "
                                "(sqlite3.OperationalError) attempt to write a readonly database")
