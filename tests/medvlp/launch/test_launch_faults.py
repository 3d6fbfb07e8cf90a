"""`medvlp launch` under faults: SIGTERM to the launcher reaches the training worker through torchrun (it writes a
checkpoint and the job exits 0), and SLURM values that would break or inject #SBATCH lines are refused."""
import json
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import tiny_overrides
from tests.faults.conftest import REPO, clean_env, cli_here


@pytest.mark.parametrize("flag,value", [("--job-name", "x\n#SBATCH --wrap=reboot"), ("--job-name", "my job"),
                                        ("--partition", "gpu;rm -rf ~"), ("--time", "1 day")])
def test_slurm_values_that_break_sbatch_lines_are_refused(tmp_path, flag, value):
    proc = cli_here("launch", "--slurm", flag, value, "--script", tmp_path / "x.sbatch", "--dry-run", "--",
                    "shards", "inspect", "x")
    assert proc.returncode != 0
    assert f"medvlp launch: {flag} {value!r}: expected" in proc.stdout + proc.stderr
    assert not (tmp_path / "x.sbatch").exists()


def test_plain_slurm_values_pass(tmp_path):
    proc = cli_here("launch", "--slurm", "--job-name", "ct-v2.1_base", "--partition", "gpu,gpu-long", "--time",
                    "2-00:00:00", "--script", tmp_path / "x.sbatch", "--dry-run", "--", "shards", "inspect", "x")
    assert proc.returncode == 0, proc.stderr
    assert "#SBATCH --job-name=ct-v2.1_base" in proc.stdout and "#SBATCH --partition=gpu,gpu-long" in proc.stdout


@pytest.mark.dist
def test_sigterm_to_launcher_checkpoints_and_exits_cleanly(cxr_shards, tmp_path):
    sets = tiny_overrides(cxr_shards, tmp_path, steps=400, **{"train.ckpt_every": 0, "tracking.enabled": "false",
                                                               "train.final_eval": "false"})
    cmd = [sys.executable, "-m", "medvlp.launch.cli", "launch", "--cpu", "--nodes", "1", "--gpus-per-node", "1", "--",
           "pretrain", "debug", *[x for s in sets for x in ("--set", s)]]
    log_path = tmp_path / "launch.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=clean_env(), stdout=log, stderr=subprocess.STDOUT)
        try:
            train_log = tmp_path / "train_log.jsonl"
            deadline = time.monotonic() + 240
            while time.monotonic() < deadline and proc.poll() is None and not (
                    train_log.exists() and len(train_log.read_text().splitlines()) >= 2):
                time.sleep(0.2)
            assert proc.poll() is None, log_path.read_text()[-3000:]
            proc.send_signal(signal.SIGTERM)  # the launcher only: it must pass the signal on
            rc = proc.wait(timeout=180)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    out = log_path.read_text()
    assert rc == 0, out[-3000:]
    assert "stopped by signal" in out
    from medvlp.pretrain.engine import latest_complete
    ck = latest_complete(tmp_path)
    assert ck is not None
    step = json.loads((ck / "COMPLETE").read_text())["step"]
    assert 2 <= step < 400
