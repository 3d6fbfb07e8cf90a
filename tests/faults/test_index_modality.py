"""An index.json whose `modality` field is missing or not a known modality: every reader of the index (a stage's
shard check, the stream, `shards inspect`) refuses it in one line naming the file and the field, exit 2, before
anything is written. Without the field a stage's shard check used to pass and the stage failed in its build with a
traceback after writing into its output folder; with an unknown value pretraining trained on it silently."""
import json

import pytest

from medvlp.data_shards.config import DataConfig
from medvlp.data_shards.stream import make_loader
from medvlp.data_shards.writer import ShardIndexError
from tests.faults.conftest import cli_here as cli, one_line_error

pytestmark = pytest.mark.timeout(120)


def _set_modality(d, value):
    path = d / "index.json"
    doc = json.loads(path.read_text())
    if value is None:
        del doc["modality"]
    else:
        doc["modality"] = value
    path.write_text(json.dumps(doc))


@pytest.mark.parametrize("stage,recipe", [("report", "report-synth"), ("pcam", "pcam-synth")])
def test_stage_on_index_without_modality_is_one_line_and_writes_nothing(shards, tmp_path, stage, recipe):
    _set_modality(shards, None)
    out = tmp_path / "run"
    proc = cli("finetune", stage, recipe, "--set", f"data.train_shards={shards}", "--set", f"finetune.out_dir={out}",
               "--set", "tracking.enabled=false")
    assert proc.returncode == 2
    msg = one_line_error(proc)
    assert f"{shards / 'index.json'}: no 'modality' field" in msg
    assert not out.exists()


@pytest.mark.parametrize("value", ["xray", "", 3])
def test_stream_refuses_unknown_modality(shards, value):
    _set_modality(shards, value)
    cfg = DataConfig(train_shards=str(shards), batch_size=4, image_size=32, workers=0, shuffle_buffer=0)
    with pytest.raises(ShardIndexError, match=r"index\.json: modality .* is not one of cxr, patho, ct, slide"):
        make_loader(cfg)


def test_inspect_refuses_index_without_modality(shards):
    _set_modality(shards, None)
    proc = cli("shards", "inspect", shards, "--sheet", shards / "s.png")
    assert proc.returncode == 2
    assert "no 'modality' field" in one_line_error(proc)
    assert not (shards / "s.png").exists()


def test_inspect_strict_names_an_index_whose_modality_the_samples_do_not_fit(shards):
    """2D radiographs under an index that says 'ct': `shards inspect --strict` names the mismatch (it used to
    pass)."""
    assert cli("shards", "inspect", shards, "--strict", "--sheet", shards / "s.png").returncode == 0
    _set_modality(shards, "ct")
    plain = cli("shards", "inspect", shards, "--sheet", shards / "s.png")
    assert plain.returncode == 0
    assert "WARNING: index.json modality 'ct' needs a volume member; 40 of 40 samples have none" in plain.stdout
    bad = cli("shards", "inspect", shards, "--strict", "--sheet", shards / "s.png")
    assert bad.returncode == 1
    assert "modality: index.json modality 'ct' needs a volume member; 40 of 40 samples have none" in one_line_error(bad)


@pytest.mark.parametrize("value", ["ct", "slide"])
def test_stream_stops_early_when_the_index_names_another_modality(shards, value):
    """2D radiographs under an index that says 'ct' or 'slide': the stream stops after FOREIGN_IN_ROW such samples
    in a row (a single stray one is skipped as corrupt), naming the index's modality and what the samples hold,
    instead of skipping every sample as corrupt until the bad-run limit (data.max_bad_in_row, 1000)."""
    from medvlp.data_shards.members import MemberError

    _set_modality(shards, value)
    cfg = DataConfig(train_shards=str(shards), batch_size=4, image_size=32, workers=0, shuffle_buffer=0)
    loader = make_loader(cfg)
    with pytest.raises(MemberError, match=rf"index\.json says modality '{value}' .* holds image: the index names the "
                                          "wrong modality"):
        next(iter(loader))


def test_report_stage_on_radiographs_labelled_slide_is_one_line_and_writes_nothing(shards, tmp_path):
    _set_modality(shards, "slide")
    out = tmp_path / "run"
    proc = cli("finetune", "report", "report-synth", "--set", f"data.train_shards={shards}",
               "--set", f"finetune.out_dir={out}", "--set", "tracking.enabled=false")
    assert proc.returncode == 2
    assert "index.json says modality 'slide'" in one_line_error(proc)
    assert not (out / "tokenizer").exists()
