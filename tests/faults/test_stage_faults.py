"""Fine-tuning stages given shards of the wrong kind: one line naming the key and the modality, exit 2."""
import pytest

from medvlp.data_shards.synth import synth_to_shards
from tests.faults.conftest import cli_here as cli, one_line_error

pytestmark = pytest.mark.timeout(300)


def test_pcam_on_ct_shards_is_one_line(tmp_path):
    synth_to_shards(tmp_path / "ct", modality="ct", n=8, seed=0, shard_size=8, size=16)
    proc = cli("finetune", "pcam", "pcam-synth", "--set", f"data.train_shards={tmp_path / 'ct'}",
               "--set", f"finetune.out_dir={tmp_path / 'run'}", "--set", "tracking.enabled=false")
    assert proc.returncode == 2
    msg = one_line_error(proc)
    assert "data.train_shards" in msg and "'ct'" in msg and "2D images" in msg
