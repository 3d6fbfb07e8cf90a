"""The pretraining loop end to end on CPU: smoke run tracked in MLflow, exact resume, SIGTERM, NaN guard, ZeRO 2/3."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import pytest

from medvlp.launch.config import flatten, load_config, to_dict
from tests.conftest import tiny_overrides

REPO = Path(__file__).resolve().parents[3]


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
    from medvlp.pretrain.train import run_pretrain
    return run_pretrain(cfg, flatten(to_dict(cfg)), progress=False)


def test_smoke_run_tracks_and_checkpoints(cxr_shards, tmp_path):
    cfg = load_config("debug", tiny_overrides(cxr_shards, tmp_path, steps=6, **{"tracking.log_model": "true"}))
    res = _run(cfg)
    assert res.steps_done == 6 and len(res.losses) == 6
    assert all(math.isfinite(v) for _, v in res.losses)
    assert (tmp_path / "model.safetensors").exists() and not (tmp_path / "model.pt").exists() and (tmp_path / "loss_curve.png").exists()
    from medvlp.pretrain.engine import complete_checkpoints
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step_00000003", "step_00000006"]
    assert "zeroshot/auc_macro" in res.metrics
    import mlflow
    client = mlflow.tracking.MlflowClient(tracking_uri=cfg.tracking.uri)
    run = client.get_run(res.run_id)
    assert run.data.params["data.batch_size"] == "8"
    assert len(client.get_metric_history(res.run_id, "train/loss")) == 6
    arts = {a.path for a in client.list_artifacts(res.run_id)}
    assert "loss_curve.png" in arts
    assert res.model_uri == f"runs:/{res.run_id}/model" and "model" in arts  # a registrable MLflow model
    model = mlflow.pyfunc.load_model(client.download_artifacts(res.run_id, "model", str(tmp_path / "dl")))
    assert np.asarray(model.predict(["No effusion."])).shape == (1, 64)  # text embeddings of the debug model


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

    from medvlp.pretrain import loss as loss_mod
    from medvlp.pretrain.train import NonFiniteLossError

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
    from medvlp.pretrain import loss as loss_mod

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
    cmd = [sys.executable, "-m", "medvlp.launch.cli", "pretrain", "debug"] + [x for s in sets for x in ("--set", s)]
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
    from medvlp.pretrain.engine import latest_complete
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
           "-m", "medvlp.launch.cli", "pretrain", "debug"] + [x for s in sets for x in ("--set", s)]
    env = {**_clean_env(), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=420)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    losses = _losses(tmp_path)
    assert sorted(losses) == list(range(1, 21))
    early = sum(losses[s] for s in range(1, 4)) / 3
    late = sum(losses[s] for s in range(18, 21)) / 3
    assert late < early - 0.05, f"loss did not fall under ZeRO-{stage}: {early:.3f} -> {late:.3f}"


# ------------------------------------------------------------------------------------------------ run folder safety
def _quiet(**extra):
    return {"tracking.enabled": "false", "train.final_eval": "false", **extra}


def test_out_dir_refused_resume_checked_unreadable_checkpoint_skipped_overwrite(cxr_shards, tmp_path, caplog):
    from medvlp.pretrain.engine import complete_checkpoints
    from medvlp.pretrain.train import RunDirError, run_pretrain

    out = tmp_path / "run"
    sets = lambda **e: tiny_overrides(cxr_shards, out, steps=6, **_quiet(**{"train.ckpt_every": 2, **e}))  # noqa: E731
    first = _run(load_config("debug", sets(**{"train.stop_after": 4})))
    assert first.steps_done == 4 and (out / "config.yaml").is_file()
    ref = _losses(out)
    # a new run into the same folder is refused (nothing is touched)
    with pytest.raises(RunDirError, match="already holds a run .*--resume.*--overwrite"):
        _run(load_config("debug", sets()))
    assert [p.name for p in complete_checkpoints(out)] == ["step_00000002", "step_00000004"]
    # a resume with a changed recipe names each changed key
    with pytest.raises(RunDirError, match=r"optim.lr: 0.001 -> 0.002; optim.warmup_steps: 2 -> 3"):
        _run(load_config("debug", sets(**{"train.resume": "true", "optim.lr": 0.002, "optim.warmup_steps": 3})))
    # the latest checkpoint is unreadable: a warning, then the previous complete one
    states = sorted((out / "checkpoints" / "step_00000004").glob("*model_states.pt"))
    assert states
    states[0].write_bytes(states[0].read_bytes()[:100])
    with caplog.at_level("WARNING", logger="medvlp.pretrain"):
        second = _run(load_config("debug", sets(**{"train.resume": "true", "train.log_every": 2})))
    assert "step_00000004 is unreadable" in caplog.text and "falling back" in caplog.text
    assert second.steps_done == 6 and [s for s, _ in second.losses] == [1, 2, 3, 4, 5, 6]
    import yaml
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["kind"] == "pretrain" and saved["train"]["resume"] is False  # the saved recipe starts afresh
    for s, v in second.losses[2:4]:  # steps 3, 4 replayed from step 2's checkpoint: the same losses
        assert v == pytest.approx(ref[s], rel=1e-6, abs=1e-7)
    # --overwrite replaces the run: only the new run's checkpoints and log lines remain
    third = run_pretrain(load_config("debug", tiny_overrides(cxr_shards, out, steps=2, **_quiet())), progress=False,
                         overwrite=True)
    assert third.steps_done == 2
    assert [p.name for p in complete_checkpoints(out)] == ["step_00000002"]
    assert sorted(_losses(out)) == [1, 2] and len((out / "train_log.jsonl").read_text().splitlines()) == 2


def test_run_config_yaml_is_a_recipe_and_cli_refuses_the_used_folder(cxr_shards, tmp_path):
    out = tmp_path / "a"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the CLI run below uses one thread: equal thread counts give equal float reductions
    try:
        res = _run(load_config("debug", tiny_overrides(cxr_shards, out, steps=3, **_quiet())))
    finally:
        torch.set_num_threads(threads)
    cmd = [sys.executable, "-m", "medvlp.launch.cli", "pretrain", str(out / "config.yaml")]
    env = {**_clean_env(), "OMP_NUM_THREADS": "1"}
    bad = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode == 2 and "already holds a run" in bad.stderr and "Traceback" not in bad.stderr
    again = subprocess.run(cmd + ["--set", f"train.out_dir={tmp_path / 'b'}"], cwd=REPO, capture_output=True,
                           text=True, env=env, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    b = _losses(tmp_path / "b")
    assert [b[s] for s in (1, 2, 3)] == [v for _, v in res.losses]  # the same run, bit for bit


def test_resume_is_exact_with_a_dropout_tower(cxr_shards, tmp_path):
    """debug-bert has dropout: a resume must keep the restored RNG (not reseed), or its masks differ."""
    from medvlp.pretrain.tokenizer import train_tokenizer_from_shards

    tok = train_tokenizer_from_shards(cxr_shards, tmp_path / "tok", vocab_size=200, min_frequency=1)
    sets = lambda out, **e: tiny_overrides(cxr_shards, out, steps=4, **_quiet(**{  # noqa: E731
        "model.name": "debug-bert", "model.tokenizer": str(tok), "train.ckpt_every": 2, **e}))
    full = _run(load_config("debug", sets(tmp_path / "full")))
    first = _run(load_config("debug", sets(tmp_path / "part", **{"train.stop_after": 2})))
    assert first.steps_done == 2
    second = _run(load_config("debug", sets(tmp_path / "part", **{"train.resume": "true"})))
    a, b = dict(full.losses), dict(second.losses)
    assert sorted(b) == [1, 2, 3, 4]
    for s in (3, 4):
        assert b[s] == pytest.approx(a[s], rel=1e-6, abs=1e-7), f"step {s}: resumed {b[s]} vs uninterrupted {a[s]}"


class _Hang:
    """A batch source that never yields (like a stream of unreadable shards), swallowing ordinary exceptions."""

    def __init__(self, real=None, good: int = 0) -> None:
        self.real, self.good, self.calls = real, good, 0

    def next(self):
        self.calls += 1
        if self.calls <= self.good:
            return self.real.next()
        if self.calls == self.good + 1 and self.good:
            os.kill(os.getpid(), signal.SIGTERM)
        while True:
            try:
                time.sleep(0.01)
            except Exception:  # noqa: BLE001 - what a skip-corrupt-sample loop does
                pass

    def position(self):
        return self.real.position() if self.real else {"epoch": 0, "step": 0}

    def rewind(self, pos):
        if self.real:
            self.real.rewind(pos)


def test_signal_while_waiting_for_data_before_the_first_step_exits_at_once(cxr_shards, tmp_path):
    import threading

    from medvlp.pretrain.train import Trainer, TrainingInterrupted

    trainer = Trainer(load_config("debug", tiny_overrides(cxr_shards, tmp_path, steps=4, **_quiet())), progress=False)
    trainer.batches = _Hang()
    timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM))
    t0 = time.time()
    timer.start()
    with pytest.raises(TrainingInterrupted, match="before the first step"):
        trainer.fit()
    assert time.time() - t0 < 60 and trainer.batches.calls == 1


def test_signal_while_waiting_for_data_checkpoints_the_last_full_step(cxr_shards, tmp_path):
    from medvlp.pretrain.engine import latest_complete
    from medvlp.pretrain.train import Trainer

    cfg = load_config("debug", tiny_overrides(cxr_shards, tmp_path, steps=6, **_quiet(**{"train.ckpt_every": 0,
                                                                                        "train.grad_accum": 2})))
    trainer = Trainer(cfg, progress=False)
    real = trainer._batch_source()
    trainer.batches = _Hang(real, good=5)  # steps 1, 2 (4 micro batches), then one good micro batch, then a hang
    res = trainer.fit()
    assert res.stopped_by_signal and res.steps_done == 2
    ck = latest_complete(tmp_path)
    assert ck.name == "step_00000002"
    assert json.loads((ck / "COMPLETE").read_text())["data"]["step"] == 4  # the partial step's batch is not counted


def test_second_signal_exits_at_once():
    from medvlp.pretrain.train import TrainingInterrupted, _StopFlag

    flag = _StopFlag()
    with pytest.raises(TrainingInterrupted, match="before the first step"):
        flag._handler(signal.SIGTERM, None)
    flag.armed = True
    flag._handler(signal.SIGTERM, None)
    assert flag.stop
    with pytest.raises(TrainingInterrupted, match="received twice"):
        flag._handler(signal.SIGINT, None)


@pytest.mark.timeout(300)
def test_persistent_workers_train_the_same_weights_across_epochs(cxr_shards, tmp_path, monkeypatch):
    """Two DataLoader workers, 20 steps over a 16-batch epoch: the run whose workers live across the epoch boundary
    (next_epoch: one loader made) trains the same weights as the run that makes a loader per epoch (two made)."""
    from safetensors.torch import load_file

    from medvlp.data_shards import stream

    made = []
    real = stream.make_loader
    monkeypatch.setattr(stream, "make_loader", lambda *a, **k: made.append(k["epoch"]) or real(*a, **k))
    runs = {}
    for persistent in ("true", "false"):
        made.clear()
        out = tmp_path / persistent
        cfg = load_config("debug", tiny_overrides(cxr_shards, out, steps=20, **{
            "data.workers": 2, "data.persistent_workers": persistent, "tracking.enabled": "false",
            "train.final_eval": "false", "train.ckpt_every": 20}))
        res = _run(cfg)
        assert res.steps_done == 20
        assert made == ([0] if persistent == "true" else [0, 1])
        runs[persistent] = (_losses(out), load_file(str(out / "model.safetensors")))
    (la, wa), (lb, wb) = runs["true"], runs["false"]
    assert la == lb
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
