"""The fine-tune runner on a minimal stage (linear head on the frozen debug model over the synthetic radiographs)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

from medvlp.finetune.runner import (RunnerConfig, complete_checkpoints, count_parameters, freeze_by_pattern, lr_multiplier,
                             run_stage)
from ft_probe_stage import ProbeStage, probe_config

HERE = Path(__file__).parent
ROOT = HERE.parents[2]


@pytest.fixture(scope="module")
def init_weights(tmp_path_factory):
    """A debug model saved once as model.safetensors with its architecture (the 'pretrained' backbone of every run;
    `init=` loads it into a freshly built model, `finetune.checkpoint=` through `pretrain.load_pretrained`)."""
    from medvlp.pretrain.checkpoint import model_metadata, save_state_dict
    from medvlp.pretrain.config import ModelConfig
    from medvlp.pretrain.model import build_model

    torch.manual_seed(123)
    model = build_model(ModelConfig(name="debug"))
    return save_state_dict(model.state_dict(), tmp_path_factory.mktemp("init") / "model.safetensors",
                           model_metadata(model))


# ----------------------------------------------------------------------------------------------- units
def test_freeze_by_pattern_counts_and_errors():
    model = nn.Sequential()
    model.add_module("enc", nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3)))
    model.add_module("head", nn.Linear(3, 2))
    names = freeze_by_pattern(model, ["*"], ["head.*", "enc.1.*"])
    assert names == ["enc.1.weight", "enc.1.bias", "head.weight", "head.bias"]
    assert count_parameters(model) == (3 + 3 + 6 + 2, 12 + 3 + 3 + 3 + 6 + 2 + 2 - 2)
    assert not model.enc[0].weight.requires_grad
    with pytest.raises(ValueError, match=r"finetune.freeze: pattern 'encoder.\*' matches no parameter"):
        freeze_by_pattern(model, ["encoder.*"])
    with pytest.raises(ValueError, match="finetune.unfreeze: pattern 'hed'"):
        freeze_by_pattern(model, [], ["hed"])


def test_lr_schedule_and_config_errors():
    assert [round(lr_multiplier(s, 2, 10), 4) for s in (0, 1, 2, 6, 10)] == [0.5, 1.0, 1.0, 0.5, 0.0]
    assert lr_multiplier(10, 0, 10, min_lr_ratio=0.1) == pytest.approx(0.1)
    for bad, msg in [(dict(mixed_precision="fp8"), "mixed_precision: 'fp8'"), (dict(grad_accum=0), "grad_accum"),
                     (dict(deepspeed="zero9"), "deepspeed: 'zero9'"), (dict(steps=0), "steps: must be >= 1")]:
        with pytest.raises(ValueError, match=msg):
            RunnerConfig(**bad).validate()


def test_stage_without_methods_and_all_frozen_are_clear_errors(tmp_path, cxr_shards, init_weights):
    with pytest.raises(TypeError, match="needs a `loss` method"):
        run_stage(type("Half", (), {"build": lambda *a: None, "batches": lambda *a: []})(), probe_config(tmp_path, ""))
    with pytest.raises(FileNotFoundError, match="finetune.checkpoint: /no/such/run does not exist"):
        run_stage(ProbeStage(), probe_config(tmp_path, cxr_shards, checkpoint="/no/such/run"))
    with pytest.raises(ValueError, match="every parameter is frozen"):
        run_stage(ProbeStage(), probe_config(tmp_path, cxr_shards, init_weights, freeze=["*"]))


# ----------------------------------------------------------------------------------------------- training
def test_probe_trains_frozen_backbone_untouched_and_logged(tmp_path, cxr_shards, init_weights):
    cfg = probe_config(tmp_path / "run", cxr_shards, checkpoint=str(init_weights), steps=24, batch_size=26, lr=0.3, eval_every=12,
                       ckpt_every=12, keep_ckpts=1, progress=True)
    cfg.tracking.enabled = True
    cfg.tracking.uri = f"sqlite:///{tmp_path}/mlruns.db"
    cfg.tracking.experiment = "ft-probe"
    res = run_stage(ProbeStage(), cfg)

    losses = [v for _, v in res.losses]
    assert len(losses) == 24 and sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.05, losses
    assert res.evals[0][0] == 12 and res.evals[-1][0] == 24 and res.metrics == res.evals[-1][1]
    assert res.evals[-1][1]["bce"] < res.evals[0][1]["bce"] < 0.69  # held-out loss falls too
    assert res.n_trainable == 65 * 5 and res.trainable == ["head.weight", "head.bias"]

    final = load_file(res.weights)
    init = load_file(init_weights)  # loaded by finetune.checkpoint -> pretrain.load_pretrained
    for k, v in init.items():  # the frozen backbone is bit-identical after 24 optimizer steps
        assert torch.equal(final[f"backbone.{k}"], v), k
    assert final["head.weight"].abs().sum() > 0
    # one complete checkpoint kept (keep_ckpts=1), the last one, written by accelerate's save_state
    ckpts = complete_checkpoints(res.out_dir)
    assert [c.name for c in ckpts] == ["step_00000024"] and res.checkpoint == str(ckpts[0])
    assert {"model.safetensors", "optimizer.bin", "random_states_0.pkl"} <= {p.name for p in ckpts[0].iterdir()}
    assert json.loads((tmp_path / "run" / "result.json").read_text())["steps_done"] == 24
    assert "finetune:" in (tmp_path / "run" / "config.yaml").read_text()

    from medvlp.pretrain.tracking import read_runs

    (run,) = read_runs("ft-probe", cfg.tracking.uri)
    assert run["run_id"] == res.run_id and run["status"] == "FINISHED"
    assert run["params"]["finetune.lr"] == "0.3" and run["params"]["kind"] == "probe"
    assert [s for s, _ in run["history"]["train/loss"]] == list(range(1, 25))
    assert run["history"]["train/loss"][0][1] == pytest.approx(losses[0])
    assert [s for s, _ in run["history"]["eval/bce"]] == [12, 24]
    assert run["metrics"]["eval/acc"] == pytest.approx(res.metrics["acc"])


def test_grad_accum_equals_the_larger_batch(tmp_path, cxr_shards, init_weights):
    big = run_stage(ProbeStage(), probe_config(tmp_path / "a", cxr_shards, init_weights, steps=5, batch_size=16,
                                               final_eval=False))
    acc = run_stage(ProbeStage(), probe_config(tmp_path / "b", cxr_shards, init_weights, steps=5, batch_size=8,
                                               grad_accum=2, final_eval=False))
    assert [s for s, _ in acc.losses] == [1, 2, 3, 4, 5]
    torch.testing.assert_close(torch.tensor(acc.losses), torch.tensor(big.losses), rtol=1e-5, atol=1e-6)
    wa, wb = load_file(big.weights), load_file(acc.weights)
    torch.testing.assert_close(wb["head.weight"], wa["head.weight"], rtol=1e-5, atol=1e-6)


def test_resume_continues_exactly(tmp_path, cxr_shards, init_weights):
    kw = dict(steps=8, batch_size=8, grad_accum=2, ckpt_every=4, warmup_steps=3, weight_decay=0.01,
              final_eval=False)
    full = run_stage(ProbeStage(), probe_config(tmp_path / "full", cxr_shards, init_weights, **kw))
    first = run_stage(ProbeStage(), probe_config(tmp_path / "part", cxr_shards, init_weights, stop_after=3, **kw))
    assert first.stopped and first.steps_done == 3 and first.checkpoint.endswith("step_00000003")
    rest = run_stage(ProbeStage(), probe_config(tmp_path / "part", cxr_shards, init_weights, resume=True, **kw))
    assert rest.resumed_from == 3 and rest.steps_done == 8
    assert first.losses + rest.losses == full.losses  # bit-exact: weights, Adam moments, schedule, data position
    wf, wr = load_file(full.weights), load_file(rest.weights)
    assert all(torch.equal(wf[k], wr[k]) for k in wf)


@pytest.mark.timeout(60)
def test_every_stage_call_gets_the_run_context(tmp_path, cxr_shards, init_weights):
    """The runner hands `batches` and `evaluate` one StageContext: this process, the run folder, the step evaluated
    and (main process) the tracker; `batches` is asked to start at the epoch and micro batch the run reached."""
    class Recording(ProbeStage):
        def __init__(self):
            self.seen = []

        def batches(self, cfg, split, ctx, *, epoch=0, start_step=0):
            self.seen.append(("batches", ctx, epoch, start_step))
            return super().batches(cfg, split, ctx, epoch=epoch, start_step=start_step)

        def evaluate(self, model, cfg, ctx):
            self.seen.append(("evaluate", ctx))
            return super().evaluate(model, cfg, ctx)

    class Tracker:
        def __init__(self):
            self.metrics = {}

        def log_metrics(self, metrics, step):
            self.metrics.setdefault(step, {}).update(metrics)

    stage, tracker = Recording(), Tracker()
    from ft_probe_stage import split_tensors

    per_epoch = len(split_tensors(str(cxr_shards), "train")[0]) // 32
    assert 1 < per_epoch < 4  # so the 4 steps run into a second epoch
    kw = dict(steps=4, batch_size=32, eval_every=2)
    res = run_stage(stage, probe_config(tmp_path / "run", cxr_shards, init_weights, **kw), tracker=tracker)
    assert res.steps_done == 4
    calls = [c for c in stage.seen if c[0] == "batches"]
    assert [(e, s) for _, _, e, s in calls] == [(0, 0), (1, 0)]
    ctx = calls[0][1]
    assert (ctx.rank, ctx.world_size, ctx.is_main, ctx.out_dir) == (0, 1, True, str(tmp_path / "run"))
    assert ctx.tracker is tracker and ctx.step is None
    evals = [c[1] for c in stage.seen if c[0] == "evaluate"]
    assert [e.step for e in evals] == [2, 4] and all(e.tracker is tracker for e in evals)
    assert "eval/acc" in tracker.metrics[2] and "eval/acc" in tracker.metrics[4]


def test_bf16_mixed_precision_runs(tmp_path, cxr_shards, init_weights):
    """mixed_precision=bf16 really computes the forward pass in bf16 (autocast: the inner layers' outputs), and
    fp32 does not (accelerate hands the model's final output back in fp32 either way)."""
    class Recording(ProbeStage):
        def __init__(self):
            self.dtypes, self.hooked = [], False

        def loss(self, model, batch):
            if not self.hooked:
                for m in model.modules():
                    if isinstance(m, (nn.Linear, nn.Conv2d)):
                        m.register_forward_hook(lambda _m, _i, out: self.dtypes.append(out.dtype))
                self.hooked = True
            return super().loss(model, batch)

    bf16, fp32 = Recording(), Recording()
    res = run_stage(bf16, probe_config(tmp_path / "bf16", cxr_shards, init_weights, steps=2, mixed_precision="bf16"))
    run_stage(fp32, probe_config(tmp_path / "fp32", cxr_shards, init_weights, steps=2, mixed_precision="no"))
    assert bf16.dtypes and set(bf16.dtypes) == {torch.bfloat16}
    assert fp32.dtypes and set(fp32.dtypes) == {torch.float32}
    assert all(torch.isfinite(torch.tensor(v)) for _, v in res.losses) and "acc" in res.metrics


# ----------------------------------------------------------------------------------------------- 2 processes
@pytest.mark.dist
@pytest.mark.parametrize("deepspeed", ["", pytest.param("zero2", marks=pytest.mark.slow)])
def test_two_processes_match_one_process_with_the_doubled_batch(tmp_path, cxr_shards, init_weights, deepspeed):
    """accelerate launch --multi_gpu --num_processes 2 on CPU (gloo), B=4 per rank == one process with B=8 (the
    stage hands each rank half of the same global rows; DDP, or DeepSpeed ZeRO-2 through accelerate's plugin,
    averages the two halves' gradients)."""
    out = tmp_path / "dist"
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{HERE}", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()),
           str(HERE / "ft_probe_stage.py"), str(out), str(cxr_shards), str(init_weights), "4", "4", deepspeed]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [(d["rank"], d["world"], d["backend"]) for d in ranks] == [(0, 2, "gloo"), (1, 2, "gloo")]
    assert ranks[0]["losses"] == ranks[1]["losses"]  # averaged over both ranks
    (ckpt,) = complete_checkpoints(out)
    files = {p.name for p in ckpt.iterdir()}
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= files
    assert ("pytorch_model" if deepspeed else "model.safetensors") in files

    one = run_stage(ProbeStage(), probe_config(tmp_path / "one", cxr_shards, init_weights, steps=4, batch_size=8,
                                               ckpt_every=4))
    torch.testing.assert_close(torch.tensor(ranks[0]["losses"]), torch.tensor(one.losses), rtol=1e-5, atol=1e-6)
    w2, w1 = load_file(out / "model.safetensors"), load_file(one.weights)
    torch.testing.assert_close(w2["head.weight"], w1["head.weight"], rtol=1e-5, atol=1e-6)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------------------------- CLI
def test_cli_finetune_runs_a_registered_stage_and_rejects_bad_input(tmp_path, cxr_shards, init_weights, capsys):
    from medvlp.finetune import STAGES, register_stage
    from ft_probe_stage import ProbeConfig
    from medvlp.launch.cli import main

    register_stage("probe", ProbeConfig, ProbeStage)
    try:
        recipe = tmp_path / "probe.yaml"
        recipe.write_text(f"kind: probe\nshards: {cxr_shards}\ninit: {init_weights}\n"
                          "finetune:\n  steps: 3\n  batch_size: 8\n  freeze: ['backbone.*']\n  progress: false\n")
        out = tmp_path / "run"
        assert main(["finetune", "probe", str(recipe), "--set", f"finetune.out_dir={out}",
                     "--set", "finetune.lr=0.01"]) == 0
        assert json.loads((out / "result.json").read_text())["steps_done"] == 3
        assert "finetune probe done: 3 steps, 325 trainable parameters" in capsys.readouterr().out
        # resume of a finished run: nothing left to do, same step count
        assert main(["finetune", "probe", str(recipe), "--set", f"finetune.out_dir={out}", "--resume"]) == 0
        assert "resumed from" in capsys.readouterr().out

        assert main(["finetune", "probe", str(recipe), "--set", "finetune.freeze=[bakcbone.*]"]) == 2
        assert "finetune.freeze: pattern 'bakcbone.*' matches no parameter" in capsys.readouterr().err
        assert main(["finetune", "probe", str(recipe), "--set", f"finetune.checkpoint={recipe}"]) == 2
        assert str(recipe) in capsys.readouterr().err  # not a model: pretrain.load_pretrained says why
        assert main(["finetune", "probe", str(recipe), "--set", "finetune.stepz=3"]) == 2
        assert "finetune.stepz: unknown key" in capsys.readouterr().err
        recipe.write_text("kind: pcam\n")
        assert main(["finetune", "probe", str(recipe)]) == 2
        assert "kind: the recipe is for 'pcam'" in capsys.readouterr().err
        assert main(["finetune", "prob", str(recipe)]) == 2
        assert "finetune stage 'prob' is not known (did you mean 'probe'?)" in capsys.readouterr().err
    finally:
        STAGES.pop("probe", None)


def test_deepspeed_zero1_plugin_trains_like_ddp_and_resumes(tmp_path, cxr_shards, init_weights):
    """finetune.deepspeed=zero1 goes through accelerate's DeepSpeed plugin (a DeepSpeed engine and checkpoint)."""
    kw = dict(steps=4, batch_size=8, ckpt_every=2, final_eval=False)
    plain = run_stage(ProbeStage(), probe_config(tmp_path / "plain", cxr_shards, init_weights, **kw))
    first = run_stage(ProbeStage(), probe_config(tmp_path / "ds", cxr_shards, init_weights, deepspeed="zero1",
                                                 stop_after=2, **kw))
    ckpt = Path(first.checkpoint)
    assert (ckpt / "pytorch_model").is_dir() and (ckpt / "zero_to_fp32.py").is_file()  # DeepSpeed's own layout
    rest = run_stage(ProbeStage(), probe_config(tmp_path / "ds", cxr_shards, init_weights, deepspeed="zero1",
                                                resume=True, **kw))
    assert rest.resumed_from == 2
    torch.testing.assert_close(torch.tensor(first.losses + rest.losses), torch.tensor(plain.losses),
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(load_file(rest.weights)["head.weight"], load_file(plain.weights)["head.weight"],
                               rtol=1e-5, atol=1e-6)


def test_resume_with_more_steps_follows_the_new_schedule(tmp_path, cxr_shards, init_weights):
    """A finished 3-step run extended to 5 steps trains on (its lr was 0 at the end of the old cosine)."""
    short = run_stage(ProbeStage(), probe_config(tmp_path, cxr_shards, init_weights, steps=3, final_eval=False))
    head3 = load_file(short.weights)["head.weight"]
    step4 = run_stage(ProbeStage(), probe_config(tmp_path, cxr_shards, init_weights, steps=5, resume=True,
                                                 stop_after=1, final_eval=False))
    assert step4.resumed_from == 3 and [s for s, _ in step4.losses] == [4] and step4.stopped
    head4 = load_file(Path(step4.checkpoint) / "model.safetensors")["head.weight"]
    assert (head4 - head3).abs().max() > 1e-4  # step 4 ran at the new schedule's lr, not the old one's 0


class _Payload:
    def __reduce__(self):
        return (print, ("payload ran",))


def test_resume_refuses_a_checkpoint_pickle_that_holds_code(tmp_path, cxr_shards, init_weights):
    first = run_stage(ProbeStage(), probe_config(tmp_path, cxr_shards, init_weights, steps=4, stop_after=2,
                                                 final_eval=False))
    bad = Path(first.checkpoint) / "custom_checkpoint_1.pkl"
    torch.save({"step": _Payload()}, bad)
    from medvlp.pretrain import LoadError

    with pytest.raises(LoadError, match="custom_checkpoint_1.pkl: refused"):
        run_stage(ProbeStage(), probe_config(tmp_path, cxr_shards, init_weights, steps=4, resume=True))
