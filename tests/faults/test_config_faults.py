"""Bad data-config values are refused by `medvlp` with the key path and the allowed range, before any work."""
import pytest

from tests.faults.conftest import cli_here, one_line_error

CASES = [
    ("data.batch_size=0", "data.batch_size: must be >= 1, got 0"),
    ("data.workers=-1", "data.workers: must be >= 0, got -1"),
    ("data.max_bad_in_row=0", "data.max_bad_in_row: must be >= 1, got 0"),
    ("data.on_mismatch=ignore", "data.on_mismatch: 'ignore' is not one of skip, fail"),
    ("data.split=holdout", "data.split: 'holdout' is not one of train, val, test"),
    ("data.context_length=0", "data.context_length: must be >= 1, got 0"),
    ("data.log_corrupt=-2", "data.log_corrupt: must be >= 0, got -2"),
    ("data.samples_per_epoch=-5", "data.samples_per_epoch: must be >= 0, got -5"),
    ("data.verify=maybe", "data.verify: expected true/false"),
    ("data.allow_pipe=2", "data.allow_pipe: expected true/false"),
]


@pytest.mark.parametrize("override,message", CASES, ids=[c[0] for c in CASES])
def test_bad_data_value_names_its_key(override, message):
    proc = cli_here("config", "show", "debug", "--set", override)
    assert proc.returncode == 2, proc.stdout
    assert message in one_line_error(proc)


def test_pipe_spec_refused_at_config_load_when_not_allowed(tmp_path):
    spec = "pipe:curl -s http://example.invalid/shard-{000000..000001}.tar"
    proc = cli_here("config", "show", "debug", "--set", f"data.train_shards={spec}", "--set", "data.allow_pipe=false")
    assert proc.returncode == 2
    assert "data.train_shards: 'pipe:curl -s http" in one_line_error(proc) and "allow_pipe is false" in proc.stderr
    assert cli_here("config", "show", "debug", "--set", f"data.train_shards={spec}").returncode == 0


# Learning rate and schedule: every loop's lr settings are refused with their key path, one line, exit 2.
LR_CASES = [
    (("pretrain", "debug"), "optim.lr=abc", "optim.lr: expected a number, got 'abc'"),
    (("pretrain", "debug"), "optim.lr=-0.001", "optim.lr: must be > 0, got -0.001"),
    (("pretrain", "debug"), "optim.lr=nan", "optim.lr: must be a finite number, got nan"),
    (("pretrain", "debug"), "optim.min_lr_ratio=nan", "optim.min_lr_ratio: must be in [0, 1], got nan"),
    (("finetune", "pcam"), "finetune.lr=-1", "finetune.lr: must be > 0, got -1.0"),
    (("finetune", "pcam"), "finetune.lr=.inf", "finetune.lr: must be a finite number, got inf"),
    (("finetune", "pcam"), "finetune.lr=0", "finetune.lr: must be > 0, got 0.0"),
    (("finetune", "pcam"), "finetune.grad_clip=nan", "finetune.grad_clip: must be a finite number >= 0, got nan"),
    (("finetune", "pcam"), "finetune.betas=[0.9, 1.5]", "finetune.betas: must be a pair of numbers in [0, 1)"),
    (("finetune", "report"), "model.lm_texts_lr=nan", "model.lm_texts_lr: must be a finite number, got nan"),
    (("finetune", "path-clip"), "protocol.full_lrs=[.nan]", "protocol.full_lrs: one or more finite values > 0"),
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("command,override,message", LR_CASES, ids=[c[1] for c in LR_CASES])
def test_bad_learning_rate_names_its_key(command, override, message):
    proc = cli_here(*command, "--set", override)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    err = one_line_error(proc)
    assert message in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.timeout(60)
def test_a_runner_config_made_in_code_names_the_finetune_key(tmp_path):
    """The runner's own check (a RunnerConfig built in code, not from a recipe) names the key as a recipe would."""
    from medvlp.finetune.runner import RunnerConfig, run_stage
    from medvlp.pretrain.configtree import ConfigError

    class Root:
        finetune = RunnerConfig(out_dir=str(tmp_path / "run"), lr=float("nan"))

    with pytest.raises(ConfigError, match=r"^finetune\.lr: must be a finite number, got nan$"):
        run_stage(object(), Root())
    assert not (tmp_path / "run").exists()


@pytest.mark.timeout(30)
def test_a_warmup_longer_than_the_run_is_said_in_one_line(caplog):
    from medvlp.pretrain.spine import warn_long_warmup

    with caplog.at_level("WARNING", logger="medvlp.spine"):
        assert not warn_long_warmup(10, 10, "optim.warmup_steps", "train.steps")
        assert warn_long_warmup(500, 150, "optim.warmup_steps", "train.steps")
    (rec,) = caplog.records
    assert rec.getMessage() == ("optim.warmup_steps=500 is more than train.steps=150: the lr rises for the whole run "
                                "and never reaches its peak (it ends at 30% of it)")
