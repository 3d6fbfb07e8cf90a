"""The run spine, proved once per loop: pretraining (DeepSpeed) and fine-tuning (accelerate) follow the same
run-folder rules, signal guard and non-finite-loss policy."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from medvlp.pretrain import spine
from tests.conftest import tiny_overrides

sys.path.insert(0, str(Path(__file__).parents[1] / "finetune"))  # the fine-tune tests' probe stage

from ft_probe_stage import ProbeConfig, ProbeStage, probe_config  # noqa: E402

pytestmark = pytest.mark.timeout(600)
LOOPS = ["pretrain", "finetune"]


@pytest.fixture(scope="module")
def init_weights(tmp_path_factory):
    from medvlp.pretrain.checkpoint import model_metadata, save_state_dict
    from medvlp.pretrain.config import ModelConfig
    from medvlp.pretrain.model import build_model

    torch.manual_seed(123)
    model = build_model(ModelConfig(name="debug"))
    return save_state_dict(model.state_dict(), tmp_path_factory.mktemp("init") / "model.safetensors",
                           model_metadata(model))


class _Probe(ProbeStage):
    """The probe stage with a hook on every loss call (a signal, a NaN)."""

    def __init__(self, hook=None) -> None:
        self.hook, self.calls = hook, 0

    def loss(self, model, batch):
        loss, metrics = super().loss(model, batch)
        self.calls += 1
        return (self.hook(self.calls, loss) if self.hook else loss), metrics


def _pretrain_sets(shards, out, steps, **kw):
    sets = {"tracking.enabled": "false", "train.final_eval": "false", "train.ckpt_every": kw.get("ckpt_every", 1),
            "train.keep_ckpts": kw.get("keep", 2), "train.stop_after": kw.get("stop_after", 0),
            "train.resume": str(kw.get("resume", False)).lower()}
    if "nonfinite" in kw:
        sets["train.nonfinite_loss"] = kw["nonfinite"]
    if kw.get("accum"):
        sets["train.grad_accum"] = kw["accum"]
    if kw.get("track"):
        sets.update({"tracking.enabled": "true", "tracking.system_metrics": "false",
                     "tracking.log_model": str(kw.get("log_model", False)).lower()})
    return tiny_overrides(shards, out, steps=steps, **sets)


def _run(loop, out, shards, init, steps=4, *, overwrite=False, hook=None, monkeypatch=None, **kw) -> dict:
    """One run of either loop; -> {steps, signal, weights, resumed_from}."""
    if loop == "pretrain":
        from medvlp.launch.config import flatten, load_config, to_dict
        from medvlp.pretrain import loss as loss_mod
        from medvlp.pretrain.train import run_pretrain

        if hook is not None:
            real, calls = loss_mod.ContrastiveLoss.forward, {"n": 0}

            def hooked(self, *a, **k):
                calls["n"] += 1
                return hook(calls["n"], real(self, *a, **k))

            monkeypatch.setattr(loss_mod.ContrastiveLoss, "forward", hooked)
        cfg = load_config("debug", _pretrain_sets(shards, out, steps, **kw))
        try:
            res = run_pretrain(cfg, flatten(to_dict(cfg)), progress=False, overwrite=overwrite)
        finally:
            if hook is not None:
                monkeypatch.undo()
        return {"steps": res.steps_done, "signal": res.stopped_by_signal, "weights": out / "model.safetensors",
                "losses": res.losses}
    from medvlp.finetune.runner import run_stage

    rc = dict(steps=steps, ckpt_every=kw.get("ckpt_every", 1), keep_ckpts=kw.get("keep", 2),
              stop_after=kw.get("stop_after", 0), resume=kw.get("resume", False), final_eval=False)
    if "nonfinite" in kw:
        rc["nonfinite_loss"] = kw["nonfinite"]
    if kw.get("accum"):
        rc["grad_accum"] = kw["accum"]
    cfg = probe_config(out, shards, init, **rc)
    if kw.get("track"):
        from medvlp.pretrain.config import TrackingConfig

        cfg.tracking = TrackingConfig(uri=f"sqlite:///{out}/mlruns.db", experiment="probe", system_metrics=False)
    res = run_stage(_Probe(hook), cfg, overwrite=overwrite)
    return {"steps": res.steps_done, "signal": res.stopped_by_signal, "weights": Path(res.weights or "-"),
            "losses": res.losses, "resumed_from": res.resumed_from}


def _steps(out) -> list[int]:
    return [spine.step_of(p) for p in spine.complete_checkpoints(out)]


# ----------------------------------------------------------------------------------------------- the folder
@pytest.mark.parametrize("loop", LOOPS)
def test_a_folder_holding_another_run_is_refused(loop, tmp_path, cxr_shards, init_weights):
    out = tmp_path / "run"
    _run(loop, out, cxr_shards, init_weights, steps=2)
    before = sorted(p.name for p in out.rglob("*"))
    with pytest.raises(spine.RunDirError, match="already holds a run .*--resume.*--overwrite"):
        _run(loop, out, cxr_shards, init_weights, steps=2)
    assert sorted(p.name for p in out.rglob("*")) == before  # nothing touched
    assert _steps(out) == [1, 2]


@pytest.mark.parametrize("loop", LOOPS)
def test_overwrite_moves_the_old_run_aside(loop, tmp_path, cxr_shards, init_weights):
    out = tmp_path / "run"
    _run(loop, out, cxr_shards, init_weights, steps=2)
    old_uid = spine.read_run_uid(out)
    _run(loop, out, cxr_shards, init_weights, steps=1, overwrite=True)
    (aside,) = (out / spine.REPLACED_DIR).iterdir()
    assert _steps(aside) == [1, 2] and (aside / "config.yaml").is_file()  # the old run, whole, still loadable
    assert spine.read_run_uid(aside) == old_uid != spine.read_run_uid(out)
    assert _steps(out) == [1]  # the new run's own


@pytest.mark.parametrize("loop", LOOPS)
def test_retention_and_resume_only_touch_the_runs_own_checkpoints(loop, tmp_path, cxr_shards, init_weights):
    """The data-loss case: checkpoints of another run (steps 299, 300) sit in the folder. Resuming this run loads its
    own newest checkpoint (step 2, not 300), and keep_ckpts=2 deletes only its own older ones."""
    out = tmp_path / "run"
    first = _run(loop, out, cxr_shards, init_weights, steps=4, stop_after=2)
    assert first["steps"] == 2 and _steps(out) == [1, 2]
    for step in (299, 300):
        tag = out / spine.CKPT_DIR / spine.tag_for(step)
        tag.mkdir()
        spine.write_complete(tag, step, "another-run")
    rest = _run(loop, out, cxr_shards, init_weights, steps=4, resume=True)
    assert rest["steps"] == 4 and rest.get("resumed_from", 2) == 2
    if loop == "pretrain":
        assert [s for s, _ in rest["losses"]] == [1, 2, 3, 4]
    assert _steps(out) == [3, 4, 299, 300]
    uid = spine.read_run_uid(out)
    assert [spine.read_complete(p)["run_uid"] for p in spine.complete_checkpoints(out)] == [uid, uid, "another-run",
                                                                                           "another-run"]


@pytest.mark.parametrize("loop", LOOPS)
def test_exact_resume_gives_equal_weights(loop, tmp_path, cxr_shards, init_weights):
    full = _run(loop, tmp_path / "full", cxr_shards, init_weights, steps=4)
    _run(loop, tmp_path / "part", cxr_shards, init_weights, steps=4, stop_after=2)
    rest = _run(loop, tmp_path / "part", cxr_shards, init_weights, steps=4, resume=True)
    a, b = load_file(str(full["weights"])), load_file(str(rest["weights"]))
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_an_older_six_digit_finetune_checkpoint_still_resumes(tmp_path, cxr_shards, init_weights):
    out = tmp_path / "run"
    full = _run("finetune", tmp_path / "full", cxr_shards, init_weights, steps=4)
    _run("finetune", out, cxr_shards, init_weights, steps=4, stop_after=2)
    for p in spine.complete_checkpoints(out):  # as an older version wrote them: step_NNNNNN, marker "N", no run.json
        (p / spine.COMPLETE).write_text(str(spine.step_of(p)))
        p.rename(p.with_name(f"step_{spine.step_of(p):06d}"))
    (out / spine.RUN_ID_FILE).unlink()
    assert [p.name for p in spine.complete_checkpoints(out)] == ["step_000001", "step_000002"]
    rest = _run("finetune", out, cxr_shards, init_weights, steps=4, resume=True, keep=1)
    assert rest["resumed_from"] == 2
    a, b = load_file(str(full["weights"])), load_file(str(rest["weights"]))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [p.name for p in spine.complete_checkpoints(out)] == ["step_00000004"]  # legacy ones were the run's own


# ----------------------------------------------------------------------------------------------- lock
@pytest.mark.parametrize("loop", LOOPS)
def test_a_folder_in_use_is_refused_in_one_line_and_a_stale_lock_taken_over(loop, tmp_path, cxr_shards,
                                                                             init_weights, capsys):
    import socket

    from medvlp.finetune import STAGES, register_stage
    from medvlp.launch.cli import main

    out = tmp_path / "run"
    out.mkdir()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])  # a live process: the holder
    try:
        (out / spine.LOCK_FILE).write_text(json.dumps({"pid": other.pid, "host": socket.gethostname(),
                                                       "since": "2026-01-01T00:00:00Z"}))
        if loop == "pretrain":
            argv = ["pretrain", "debug"] + [x for s in _pretrain_sets(cxr_shards, out, 2) for x in ("--set", s)]
        else:
            register_stage("probe", ProbeConfig, ProbeStage)
            recipe = tmp_path / "probe.yaml"
            recipe.write_text(f"kind: probe\nshards: {cxr_shards}\ninit: {init_weights}\nfinetune:\n  steps: 2\n"
                              f"  batch_size: 8\n  freeze: ['backbone.*']\n  progress: false\n  ckpt_every: 1\n"
                              f"  out_dir: {out}\n")
            argv = ["finetune", "probe", str(recipe)]
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"is in use by another run (pid {other.pid}" in err, err
        assert "Traceback" not in err and not spine.run_files(out)
    finally:
        other.kill()
        other.wait()
    try:
        assert main(argv) == 0  # its holder is gone: the lock is taken over
    finally:
        STAGES.pop("probe", None)
    assert not (out / spine.LOCK_FILE).exists() and _steps(out) == [1, 2]  # released at the end


def test_lock_unit():
    lock_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"spine-lock-{os.getpid()}"
    a, b = spine.RunLock(lock_dir), spine.RunLock(lock_dir)
    a.acquire()
    try:
        with pytest.raises(spine.RunDirError, match=f"in use by another run \\(pid {os.getpid()}"):
            b.acquire()
    finally:
        a.release()
    b.acquire()
    b.release()
    assert not (lock_dir / spine.LOCK_FILE).exists()
    # a holder that has exited but is not reaped yet (a zombie, e.g. a killed run its launcher has not waited for)
    import socket
    import time

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.time() + 30
    while time.time() < deadline and "Z" not in Path(f"/proc/{gone.pid}/stat").read_text().rsplit(")", 1)[1][:3]:
        time.sleep(0.05)
    (lock_dir / spine.LOCK_FILE).write_text(json.dumps({"pid": gone.pid, "host": socket.gethostname()}))
    assert spine.RunLock.holder(lock_dir) is None
    b.acquire()
    b.release()
    gone.wait()
    lock_dir.rmdir()


# ----------------------------------------------------------------------------------------------- guards
@pytest.mark.parametrize("loop", LOOPS)
def test_sigterm_checkpoints_and_the_cli_exits_0(loop, tmp_path, cxr_shards, init_weights, capsys, monkeypatch):
    """SIGTERM in step 3: the step finishes, a checkpoint of step 3 is written, the CLI reports it and exits 0."""
    from medvlp.finetune import STAGES, register_stage
    from medvlp.launch.cli import main

    def term_at_3(n, loss):
        if n == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return loss

    out = tmp_path / "run"
    if loop == "pretrain":
        from medvlp.pretrain import loss as loss_mod

        real, calls = loss_mod.ContrastiveLoss.forward, {"n": 0}

        def hooked(self, *a, **k):
            calls["n"] += 1
            return term_at_3(calls["n"], real(self, *a, **k))

        monkeypatch.setattr(loss_mod.ContrastiveLoss, "forward", hooked)
        argv = ["pretrain", "debug"] + [x for s in _pretrain_sets(cxr_shards, out, 50, ckpt_every=0)
                                        for x in ("--set", s)]
    else:
        register_stage("probe", ProbeConfig, lambda: _Probe(term_at_3))
        recipe = tmp_path / "probe.yaml"
        recipe.write_text(f"kind: probe\nshards: {cxr_shards}\ninit: {init_weights}\nfinetune:\n  steps: 50\n"
                          f"  batch_size: 8\n  freeze: ['backbone.*']\n  progress: false\n  final_eval: false\n"
                          f"  out_dir: {out}\n")
        argv = ["finetune", "probe", str(recipe)]
    try:
        capsys.readouterr()
        assert main(argv) == 0
    finally:
        STAGES.pop("probe", None)
    assert "stopped by signal (checkpoint written): 3 steps" in capsys.readouterr().out
    assert _steps(out) == [3] and not (out / "model.safetensors").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is gone with the run


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("policy", ["skip", "raise"])
def test_nonfinite_loss_policy(loop, policy, tmp_path, cxr_shards, init_weights, monkeypatch):
    """A NaN loss in the 2nd step: `skip` drops that step (the run still makes every step, all finite); `raise`
    stops the run there."""
    nan_at_2 = lambda n, loss: loss * float("nan") if n == 2 else loss  # noqa: E731
    kw = dict(hook=nan_at_2, monkeypatch=monkeypatch, nonfinite=policy, ckpt_every=0)
    if policy == "raise":
        with pytest.raises(spine.NonFiniteLossError, match="step 2: the loss is NaN/inf"):
            _run(loop, tmp_path / "run", cxr_shards, init_weights, steps=3, **kw)
        return
    res = _run(loop, tmp_path / "run", cxr_shards, init_weights, steps=3, **kw)
    assert res["steps"] == 3 and [s for s, _ in res["losses"]] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(v)) for _, v in res["losses"])


def test_epoch_batches_roll_over_count_and_rewind():
    opened = []

    def open_epoch(epoch, start):
        opened.append((epoch, start))
        return [f"e{epoch}b{i}" for i in range(start, 3)]

    b = spine.EpochBatches(open_epoch, epoch=0, step=1, lazy=True)
    assert opened == []  # lazy: nothing opened before the first batch
    assert [b.next() for _ in range(4)] == ["e0b1", "e0b2", "e1b0", "e1b1"]
    assert opened == [(0, 1), (1, 0)] and b.position() == {"epoch": 1, "step": 2}
    b.rewind({"epoch": 0, "step": 2})
    assert b.next() == "e0b2" and opened[-1] == (0, 2)  # reopened where the rewind put it
    with pytest.raises(RuntimeError, match="^the shards yielded no batch for a whole epoch"):
        spine.EpochBatches(lambda e, s: [], what="the shards").next()


def test_micro_batches_abandon_a_failed_step_without_a_trace():
    from medvlp.data_shards.guard import DataStreamError

    src = spine.EpochBatches(lambda e, s: range(s, 10))
    calls = {"n": 0, "abandoned": 0}

    def next_batch():
        calls["n"] += 1
        torch.rand(1)  # a draw the abandoned step must give back
        if calls["n"] == 5:
            raise DataStreamError("gone")
        return src.next()

    def abandon():
        calls["abandoned"] += 1

    assert [b for _, b in spine.micro_batches(next_batch, src, 3, abandon)] == [0, 1, 2]
    rng = torch.get_rng_state()
    with pytest.raises(DataStreamError):
        for _ in spine.micro_batches(next_batch, src, 3, abandon):
            pass
    assert calls["abandoned"] == 1 and src.position() == {"epoch": 0, "step": 3}  # back at the step's start
    assert torch.equal(torch.get_rng_state(), rng)  # the first micro batch's draw undone
    assert [b for _, b in spine.micro_batches(next_batch, src, 2, abandon)] == [3, 4]


@pytest.mark.parametrize("loop", LOOPS)
def test_both_loops_draw_their_batches_through_the_spine(loop, tmp_path, cxr_shards, init_weights, monkeypatch):
    """Each loop's training batches come from the spine's EpochBatches, grouped by its micro_batches."""
    seen = {"next": 0, "steps": 0}
    real_next, real_micro = spine.EpochBatches.next, spine.micro_batches

    def counting_next(self):
        seen["next"] += 1
        return real_next(self)

    def counting_micro(*a, **k):
        seen["steps"] += 1
        return real_micro(*a, **k)

    monkeypatch.setattr(spine.EpochBatches, "next", counting_next)
    monkeypatch.setattr(spine, "micro_batches", counting_micro)
    res = _run(loop, tmp_path / "run", cxr_shards, init_weights, steps=2, accum=2, ckpt_every=0)
    assert res["steps"] == 2 and seen == {"next": 4, "steps": 2}


def test_schedule_is_shared_and_unchanged():
    from medvlp.finetune.runner import lr_multiplier as ft
    from medvlp.pretrain.config import OptimConfig
    from medvlp.pretrain.engine import lr_lambda

    cfg = OptimConfig(warmup_steps=2, min_lr_ratio=0.1)
    got = [lr_lambda(s, cfg, 10) for s in range(11)]
    assert got == [ft(s, 2, 10, 0.1) for s in range(11)]
    assert [round(v, 6) for v in got[:3]] == [0.5, 1.0, 1.0] and got[-1] == pytest.approx(0.1)
    assert got[6] == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the cosine


# ----------------------------------------------------------------------------------------------- interruptions
def _fail_stream_at(loop, n, monkeypatch):  # both loops draw through the spine's EpochBatches
    """The data stream raises RemoteOutage (as `data.remote_outage_s` running out does) at its n-th batch."""
    from medvlp.data_shards.remote import RemoteOutage

    cls = spine.EpochBatches
    real, calls = cls.next, {"n": 0}

    def failing(self):
        calls["n"] += 1
        if calls["n"] == n:
            raise RemoteOutage("shard server unreachable for 300 s (9 tries; data.remote_outage_s=300); last: "
                               "http://shards.invalid/x.tar: curl exit 7: cannot connect")
        return real(self)

    monkeypatch.setattr(cls, "next", failing)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_remote_outage_checkpoints_the_last_step_and_the_resume_continues_exactly(loop, tmp_path, cxr_shards,
                                                                                   init_weights, monkeypatch):
    """Two micro batches per step; the stream fails at batch 6 (in step 3, after its first micro batch): the run
    stops with RemoteOutage naming the checkpoint of step 2 it wrote (the half step is dropped, its batch
    position rewound), the MLflow run ends KILLED tagged remote_outage, and the resume ends with the weights of
    the uninterrupted run."""
    from mlflow import MlflowClient

    from medvlp.data_shards.remote import RemoteOutage

    full = _run(loop, tmp_path / "full", cxr_shards, init_weights, steps=4, accum=2, ckpt_every=0)
    out = tmp_path / "part"
    _fail_stream_at(loop, 6, monkeypatch)
    with pytest.raises(RemoteOutage) as ei:
        _run(loop, out, cxr_shards, init_weights, steps=4, accum=2, ckpt_every=0, track=True)
    monkeypatch.undo()
    msg = str(ei.value)
    assert msg.startswith("shard server unreachable for 300 s") and len(msg.splitlines()) == 1
    assert f"; checkpoint of step 2 written to {out / 'checkpoints' / 'step_00000002'}: rerun with --resume" in msg
    assert _steps(out) == [2]
    client = MlflowClient(tracking_uri=f"sqlite:///{out}/mlruns.db")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "KILLED"
    assert run.data.tags["medvlp.interrupted"] == "remote_outage" and run.data.tags["medvlp.step_reached"] == "2"
    assert run.data.tags["medvlp.last_checkpoint"] == str((out / "checkpoints" / "step_00000002").resolve())
    rest = _run(loop, out, cxr_shards, init_weights, steps=4, accum=2, ckpt_every=0, resume=True, track=True)
    run = client.get_run(run.info.run_id)  # the resume continued the same MLflow run, no longer interrupted
    assert run.info.status == "FINISHED" and "medvlp.interrupted" not in run.data.tags
    assert run.data.tags["medvlp.resumed_after"] == "remote_outage at step 2"
    assert [s for s, _ in rest["losses"]][-2:] == [3, 4]
    assert [v for _, v in rest["losses"]][-2:] == [v for _, v in full["losses"]][-2:]
    a, b = load_file(str(full["weights"])), load_file(str(rest["weights"]))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("loop", LOOPS)
def test_an_interrupted_run_ends_with_its_curves_checkpoint_and_model_in_mlflow(loop, tmp_path, cxr_shards,
                                                                               init_weights, monkeypatch):
    """SIGTERM in step 3: the MLflow run ends KILLED with every step's loss up to 3, the tags naming why, the step
    reached and the checkpoint a resume continues from; pretraining (which logs a model when it ends) also logs
    the loss curve and the model of that checkpoint, as the run's model."""
    from mlflow import MlflowClient

    def term_at_3(n, loss):
        if n == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return loss

    out = tmp_path / "run"
    res = _run(loop, out, cxr_shards, init_weights, steps=50, ckpt_every=0, hook=term_at_3, monkeypatch=monkeypatch,
               track=True, log_model=True)
    assert res["signal"] and _steps(out) == [3]
    client = MlflowClient(tracking_uri=f"sqlite:///{out}/mlruns.db")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    tags = run.data.tags
    assert run.info.status == "KILLED"
    assert (tags["medvlp.interrupted"], tags["medvlp.step_reached"]) == ("signal_15", "3")
    assert tags["medvlp.last_checkpoint"] == str((out / "checkpoints" / "step_00000003").resolve())
    hist = client.get_metric_history(run.info.run_id, "train/loss")
    assert max(m.step for m in hist) == 3
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    if loop == "pretrain":
        assert [m.step for m in sorted(hist, key=lambda m: m.step)] == [1, 2, 3]
        assert {"loss_curve.png", "model"} <= arts
        assert tags["medvlp.model"] == f"runs:/{run.info.run_id}/model"
        model_files = {a.path for a in client.list_artifacts(run.info.run_id, "model")}
        assert "model/MLmodel" in model_files
