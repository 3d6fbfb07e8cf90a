"""Pretraining on shards without the split the final evaluation reads (`eval.split`, default test; e.g. an import
with `--opt split=train`): refused before the first step, in one line naming the key, the shards and the splits
they have, exit 2, nothing written. It used to train the whole run and then exit 2 from the final evaluation."""
import numpy as np
import pytest
from PIL import Image

from tests.conftest import tiny_overrides
from tests.faults.conftest import build_rows, cli_here, one_line_error

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def train_only(tmp_path_factory):
    d = tmp_path_factory.mktemp("train_only")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(16):
        Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8)).save(d / f"i{i}.png")
        rows.append({"image": f"i{i}.png", "report": f"Finding {i % 3}.", "patient_id": f"p{i}", "split": "train"})
    built = build_rows(d, rows)
    assert built.returncode == 0, built.stderr[-2000:]
    return d / "out"


def _pretrain(shards, out, **extra):
    sets = tiny_overrides(shards, out, steps=1, **{"tracking.enabled": "false", "data.image_size": 64, **extra})
    return cli_here("pretrain", "debug", *[x for s in sets for x in ("--set", s)])


def test_final_eval_on_a_missing_split_is_refused_before_training(train_only, tmp_path):
    out = tmp_path / "run"
    proc = _pretrain(train_only, out)
    assert proc.returncode == 2
    msg = one_line_error(proc)
    assert f"eval.split: {train_only} has no 'test' samples (index.json splits: train 16)" in msg
    assert "train.final_eval=false" in msg
    assert not out.exists()


def test_without_final_eval_the_same_shards_train(train_only, tmp_path):
    out = tmp_path / "run"
    proc = _pretrain(train_only, out, **{"train.final_eval": "false"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "model.safetensors").is_file()


def test_a_train_split_smaller_than_one_batch_is_refused_before_the_folder_is_claimed(train_only, tmp_path):
    """16 training samples, batch 32: one line naming the numbers, exit 2, and no run folder left behind that a
    corrected rerun would have to --overwrite."""
    out = tmp_path / "run"
    proc = _pretrain(train_only, out, **{"train.final_eval": "false", "data.batch_size": 32})
    assert proc.returncode == 2
    msg = one_line_error(proc)
    assert "samples_per_epoch: 16 global samples give no batch of batch_size 32 x world_size 1" in msg
    assert not out.exists()
    assert _pretrain(train_only, out, **{"train.final_eval": "false"}).returncode == 0
