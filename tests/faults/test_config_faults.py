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
