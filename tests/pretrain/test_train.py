"""The pretraining loop end to end on CPU: smoke run tracked in MLflow, exact resume, SIGTERM, NaN guard, ZeRO 2/3."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch.config import flatten, load_config, to_dict
from tests.conftest import tiny_overrides

REPO = Path(__file__).resolve().parents[2]


def _losses(out_dir):
    """step -> loss from train_log.jsonl (a replayed step after a resume keeps its last value)."""
    d = {}
    for line in (Path(out_dir) / "train_log.jsonl").read_text().splitlines():
        r = json.loads(line)
        d[r["step"]] = r["loss"]
    return d


def _clean_env():
    """This process's environment without the process-group variables an in-process run has set."""
    drop = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"}
    return {k: v for k, v in os.environ.items() if k not in drop}


def _run(cfg):
    from pretrain.train import run_pretrain
    return run_pretrain(cfg, flatten(to_dict(cfg)), progress=False)


def test_smoke_run_tracks_and_checkpoints(cxr_shards, tmp_path):
    cfg = load_config("debug", tiny_overrides(cxr_shards, tmp_path, steps=6))
    res = _run(cfg)
    assert res.steps_done == 6 and len(res.losses) == 6
    assert all(math.isfinite(v) for _, v in res.losses)
    assert (tmp_path / "model.safetensors").exists() and not (tmp_path / "model.pt").exists() and (tmp_path / "loss_curve.png").exists()
    from pretrain.engine import complete_checkpoints
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step_00000003", "step_00000006"]
    assert "zeroshot/auc_macro" in res.metrics
    import mlflow
    client = mlflow.tracking.MlflowClient(tracking_uri=cfg.tracking.uri)
    run = client.get_run(res.run_id)
    assert run.data.params["data.batch_size"] == "8"
    assert len(client.get_metric_history(res.run_id, "train/loss")) == 6
    arts = {a.path for a in client.list_artifacts(res.run_id)}
    assert "loss_curve.png" in arts


def test_resume_continues_exactly(cxr_shards, tmp_path):
    full = tmp_path / "full"
    _run(load_config("debug", tiny_overrides(cxr_shards, full, steps=6, **{"tracking.enabled": "false", "train.final_eval": "false"})))
    part = tmp_path / "part"
    first = _run(load_config("debug", tiny_overrides(cxr_shards, part, steps=6, **{"train.stop_after": 3,
                                                                                   "train.final_eval": "false"})))
    assert first.stopped_early and first.steps_done == 3
    second = _run(load_config("debug", tiny_overrides(cxr_shards, part, steps=6, **{"train.resume": "true",
                                                                                    "train.final_eval": "false"})))
    assert second.steps_done == 6
    assert second.run_id == first.run_id  # the resumed job continues its MLflow run
    import mlflow
    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{part}/mlruns.db")
    assert [m.step for m in client.get_metric_history(first.run_id, "train/loss")] == [1, 2, 3, 4, 5, 6]
    a, b = _losses(full), _losses(part)
    assert sorted(b) == [1, 2, 3, 4, 5, 6]
    for s in range(1, 7):
        assert b[s] == pytest.approx(a[s], rel=1e-6, abs=1e-7), f"step {s}: resumed {b[s]} vs uninterrupted {a[s]}"


def test_nan_guard_skips_then_stops(cxr_shards, tmp_path, monkeypatch):
    import torch

    from pretrain import loss as loss_mod
    from pretrain.train import NonFiniteLossError

    real = loss_mod.ContrastiveLoss.forward
    calls = {"n": 0}

    def flaky(self, *a, **k):  # NaN on the 2nd and 3rd calls only
        calls["n"] += 1
        out = real(self, *a, **k)
        return out * float("nan") if calls["n"] in (2, 3) else out

    monkeypatch.setattr(loss_mod.ContrastiveLoss, "forward", flaky)
    res = _run(load_config("debug", tiny_overrides(cxr_shards, tmp_path / "a", steps=4,
                                                   **{"tracking.enabled": "false", "train.final_eval": "false"})))
    assert res.steps_done == 4 and calls["n"] == 6 and all(math.isfinite(v) for _, v in res.losses)

    monkeypatch.setattr(loss_mod.ContrastiveLoss, "forward", lambda self, *a, **k: torch.tensor(float("inf")))
    with pytest.raises(NonFiniteLossError, match="3 consecutive steps"):
        _run(load_config("debug", tiny_overrides(cxr_shards, tmp_path / "b", steps=4,
                                                 **{"train.max_bad_steps": 3, "tracking.enabled": "false", "train.final_eval": "false"})))


def test_skipped_step_keeps_accumulation_aligned(cxr_shards, tmp_path, monkeypatch):
    """A NaN in the 2nd micro batch of a step under gradient accumulation skips that whole step: the run still makes
    every optimizer step and the lr schedule (stepped by DeepSpeed at accumulation boundaries) matches a clean run's."""
    from pretrain import loss as loss_mod

    sets = {"tracking.enabled": "false", "train.final_eval": "false", "train.grad_accum": 2}
    _run(load_config("debug", tiny_overrides(cxr_shards, tmp_path / "clean", steps=4, **sets)))
    real = loss_mod.ContrastiveLoss.forward
    calls = {"n": 0}

    def flaky(self, *a, **k):  # the 2nd micro batch of the 2nd step
        calls["n"] += 1
        out = real(self, *a, **k)
        return out * float("nan") if calls["n"] == 4 else out

    monkeypatch.setattr(loss_mod.ContrastiveLoss, "forward", flaky)
    _run(load_config("debug", tiny_overrides(cxr_shards, tmp_path / "nan", steps=4, **sets)))
    lr = lambda d: {json.loads(x)["step"]: json.loads(x)["lr"] for x in (d / "train_log.jsonl").read_text().splitlines()}  # noqa: E731
    assert lr(tmp_path / "nan") == lr(tmp_path / "clean")


def test_sigterm_checkpoints_and_exits_cleanly(cxr_shards, tmp_path):
    sets = tiny_overrides(cxr_shards, tmp_path, steps=400, **{"train.ckpt_every": 0, "tracking.enabled": "false", "train.final_eval": "false"})
    cmd = [sys.executable, "-m", "launch.cli", "pretrain", "debug"] + [x for s in sets for x in ("--set", s)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_clean_env())
    log = tmp_path / "train_log.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (log.exists() and len(log.read_text().splitlines()) >= 2):
        time.sleep(0.5)
    assert proc.poll() is None, proc.stdout.read()
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, out
    assert "stopped by signal" in out
    from pretrain.engine import latest_complete
    ck = latest_complete(tmp_path)
    assert ck is not None
    step = json.loads((ck / "COMPLETE").read_text())["step"]
    assert 2 <= step < 400


@pytest.mark.dist
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_2proc_cpu_trains(cxr_shards, tmp_path, stage):
    sets = tiny_overrides(cxr_shards, tmp_path, steps=20, **{
        "train.zero_stage": stage, "optim.lr": 2e-3, "train.ckpt_every": 0, "tracking.enabled": "false", "train.final_eval": "false",
        })
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "launch.cli", "pretrain", "debug"] + [x for s in sets for x in ("--set", s)]
    env = {**_clean_env(), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=420)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    losses = _losses(tmp_path)
    assert sorted(losses) == list(range(1, 21))
    early = sum(losses[s] for s in range(1, 4)) / 3
    late = sum(losses[s] for s in range(18, 21)) / 3
    assert late < early - 0.05, f"loss did not fall under ZeRO-{stage}: {early:.3f} -> {late:.3f}"
