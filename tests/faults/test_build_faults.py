"""Shard builds under faults: the builder SIGKILLed mid-build (its workers must not go on writing) and a disk that
fills up (a per-process file-size limit stands in for a full volume). Both end in one clear error or a dead
process, leave no half-written shard under a final name, and a rerun finishes with the same shards."""
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.faults.conftest import REPO, clean_env, cli_here, one_line_error


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    d = tmp_path_factory.mktemp("build_src")
    rng = np.random.default_rng(0)
    rows = ["image,report,patient_id"]
    for i in range(240):
        Image.fromarray(rng.integers(0, 255, (96, 96), dtype=np.uint8), mode="L").save(d / f"i{i}.png")
        rows.append(f"i{i}.png,report {i},p{i}")
    (d / "m.csv").write_text("\n".join(rows) + "\n")
    return d / "m.csv"


def _args(manifest, out, workers):
    return ["shards", "build", "--manifest", str(manifest), "--out", str(out), "--workers", str(workers),
            "--maxcount", "8", "--image-size", "96"]


def _shas(out):
    import json
    return [sh["sha256"] for sh in json.loads((Path(out) / "index.json").read_text())["shards"]]


def _children(pid):
    kids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    kids.append(int(d.name))
            except (OSError, IndexError, ValueError):
                pass
    return kids


def _alive(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def test_killed_builder_takes_its_workers_along_and_rerun_completes(manifest, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "medvlp.launch.cli", *_args(manifest, out, 2)], cwd=REPO,
                            env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not list(out.glob("*.tar*")):
            time.sleep(0.05)
        workers = [k for k in _children(proc.pid) if "multiprocessing" in Path(f"/proc/{k}/cmdline").read_text()]
        assert workers and not (out / "index.json").exists(), "the build ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_alive(w) for w in workers):
            time.sleep(0.1)
        assert not any(_alive(w) for w in workers), "build workers outlived their killed builder"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert not (out / "index.json").exists()
    done = cli_here(*_args(manifest, out, 1))
    assert done.returncode == 0, done.stderr
    assert not list(out.glob("*.tmp")) and not list((out / ".build").glob("*.tmp"))
    fresh = cli_here(*_args(manifest, tmp_path / "fresh", 1))
    assert fresh.returncode == 0 and _shas(out) == _shas(tmp_path / "fresh")  # nothing lost, nothing doubled


def _limit_files(nbytes):
    def pre():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))
    return pre


def test_full_disk_is_one_clear_error_and_rerun_reuses_finished_shards(manifest, tmp_path):
    out = tmp_path / "out"
    full = subprocess.run([sys.executable, "-m", "medvlp.launch.cli", *_args(manifest, out, 1)], cwd=REPO, env=clean_env(),
                          capture_output=True, text=True, timeout=300, preexec_fn=_limit_files(64 << 10))
    assert full.returncode == 2, full.stdout + full.stderr[-3000:]
    err = one_line_error(full)
    assert "File too large" in err and "rerun" in err
    assert not list(out.glob("*.tar.tmp")) and not (out / "index.json").exists()
    done = cli_here(*_args(manifest, out, 1))
    assert done.returncode == 0, done.stderr
    fresh = cli_here(*_args(manifest, tmp_path / "fresh", 1))
    assert fresh.returncode == 0, fresh.stderr
    assert _shas(out) == _shas(tmp_path / "fresh")
