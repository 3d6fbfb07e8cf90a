"""Two gloo ranks through `run_pretrain`: ZeRO 0/1/2/3 give the same per-step losses, a ZeRO-3 resume continues
exactly, and a NaN loss on one rank only makes both ranks skip the step and keep identical parameters.

All runs share one torchrun launch (tests/medvlp/pretrain/_dist_runs.py) to pay the process-group start once."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.dist

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def runs(cxr_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("dist_runs")
    drop = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"}
    env = {**{k: v for k, v in os.environ.items() if k not in drop}, "OMP_NUM_THREADS": "1",
           "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "tests" / "medvlp" / "pretrain" / "_dist_runs.py"), str(cxr_shards), str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads((out / f"result_rank{r}.json").read_text()) for r in (0, 1)]


def test_zero_stages_give_the_same_losses(runs):
    ref = runs[0]["zero0"]
    assert len(ref) == 4 and all(math.isfinite(v) for v in ref)
    for stage in (1, 2, 3):
        got = runs[0][f"zero{stage}"]
        for step, (a, b) in enumerate(zip(got, ref), start=1):
            assert a == pytest.approx(b, rel=1e-5, abs=1e-6), f"ZeRO-{stage} step {step}: {a} vs ZeRO-0 {b}"
    assert runs[1]["zero3"] == runs[0]["zero3"]  # the reported loss is the global mean: same on both ranks


def test_zero3_resume_continues_exactly(runs):
    r = runs[0]["resume3"]
    assert r["first_steps"] == 2 and r["steps"] == 4
    for step, (a, b) in enumerate(zip(r["losses"], runs[0]["zero3"]), start=1):
        assert a == pytest.approx(b, rel=1e-6, abs=1e-7), f"resumed step {step}: {a} vs uninterrupted {b}"


def test_nan_on_one_rank_skips_on_both(runs):
    for rank in (0, 1):
        n = runs[rank]["nan_rank1"]
        assert n["steps"] == 3 and len(n["losses"]) == 3, n
        assert n["forwards"] == 4, f"rank {rank} ran {n['forwards']} forwards: it did not skip with rank 1"
        assert n["finite"] and all(math.isfinite(v) for v in n["losses"])
        assert n["param_diff"] == 0.0, f"parameters differ across ranks by {n['param_diff']}"
    assert runs[0]["nan_rank1"]["losses"][0] == pytest.approx(runs[0]["zero0"][0], rel=1e-6)
