"""The anatomy stage given shards it cannot use: CT without any organ mask, or 2D shards. One line, exit 2, before
any training (the pcam case is in test_stage_faults.py)."""
import numpy as np
import pytest

from medvlp.data_shards.synth import synth_to_shards
from tests.conftest import write_csv
from tests.faults.conftest import cli_here as cli, one_line_error

pytestmark = pytest.mark.timeout(300)


def _anatomy(tmp_path, shards):
    return cli("finetune", "anatomy", "anatomy-synth", "--set", f"data.train_shards={shards}",
               "--set", f"finetune.out_dir={tmp_path / 'run'}", "--set", "tracking.enabled=false")


def test_anatomy_on_ct_without_masks_is_one_line(tmp_path):
    rows = []
    for i in range(3):
        np.save(tmp_path / f"v{i}.npy", np.full((4, 8, 8), -100, np.int16))
        rows.append({"volume": f"v{i}.npy", "report": "Liver normal.", "patient_id": f"p{i}", "split": "train"})
    built = cli("shards", "build", "--manifest", write_csv(tmp_path / "ct.csv", rows), "--out", tmp_path / "ct",
                "--workers", 1)
    assert built.returncode == 0 and "3 volumes have no organ mask (meta has_mask: false" in built.stdout
    proc = _anatomy(tmp_path, tmp_path / "ct")
    assert proc.returncode == 2
    msg = one_line_error(proc)
    assert "data.train_shards" in msg and "none of its 3 volume samples has an organ mask" in msg
    assert "build the shards with a mask column" in msg


def test_anatomy_on_2d_shards_is_one_line(tmp_path):
    synth_to_shards(tmp_path / "cxr", modality="cxr", n=4, seed=0, shard_size=4, size=32)
    proc = _anatomy(tmp_path, tmp_path / "cxr")
    assert proc.returncode == 2
    msg = one_line_error(proc)
    assert "holds 'cxr' samples (index.json modality); the anatomy stage needs 'ct' shards" in msg


def test_pcam_with_ct_validation_shards_is_one_line(tmp_path):
    synth_to_shards(tmp_path / "cxr", modality="cxr", n=4, seed=0, shard_size=4, size=32)
    synth_to_shards(tmp_path / "ct", modality="ct", n=4, seed=0, shard_size=4, size=16)
    proc = cli("finetune", "pcam", "pcam-synth", "--set", f"data.train_shards={tmp_path / 'cxr'}",
               "--set", f"data.val_shards={tmp_path / 'ct'}", "--set", f"finetune.out_dir={tmp_path / 'run'}",
               "--set", "tracking.enabled=false")
    assert proc.returncode == 2
    msg = one_line_error(proc)
    assert msg.strip().endswith(f"data.val_shards: {tmp_path / 'ct'} holds 'ct' samples (index.json modality); the pcam stage "
                        "needs 'cxr' or 'patho' shards (2D images: PCAM localises findings in them)")
