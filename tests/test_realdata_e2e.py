"""What a user does with real data, end to end, when $MEDVLP_REALDATA names a folder holding the public sets in
their own layouts (covid_cxr_notes/: covid-chestxray-dataset metadata.csv + images/; kather_tiles/: Kather-2016
Images/Samples/<NN_CLASS>/); skipped otherwise. Tiny runs (a few steps of the debug model, 64 px): the commands
work together, not the numbers. Radiographs: import (split by patient) -> inspect -> pretrain with its final
evaluation -> eval -> export; a fine-tune stage given them refuses in one line. Tiles: import -> pretrain ->
Path-CLIP."""
import json

import pytest

from tests.conftest import realdata, tiny_overrides
from tests.faults.conftest import cli_here, one_line_error

pytestmark = pytest.mark.timeout(600)
COVID, KATHER = realdata("covid_cxr_notes"), realdata("kather_tiles")


def _ok(*args):
    proc = cli_here(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _sets(pairs):
    return [x for s in pairs for x in ("--set", s)]


@pytest.mark.skipif(COVID is None, reason="set MEDVLP_REALDATA to a folder holding covid_cxr_notes/")
def test_real_radiographs_import_pretrain_eval_export(tmp_path):
    shards = tmp_path / "shards"
    _ok("shards", "import", "covid_chestxray", COVID, "--out", shards, "--opt", "image_size=64", "--opt",
        "test_frac=0.2", "--opt", "limit=24", "--opt", "workers=1")
    doc = json.loads((shards / "index.json").read_text())
    assert doc["modality"] == "cxr" and doc["build"]["splits_by"]["group_disjoint"] is True
    assert _ok("shards", "inspect", shards, "--sheet", tmp_path / "s.png").stdout.startswith(f"shards: {shards}")
    run = tmp_path / "run"
    sets = tiny_overrides(shards, run, steps=2, **{"eval.kshot": "[]", "eval.bootstrap": 10, "tracking.enabled":
                                                   "false", "data.image_size": 64, "data.batch_size": 8})
    _ok("pretrain", "debug", *_sets(sets))
    metrics = json.loads((run / "eval" / "eval_metrics.json").read_text())
    assert "retrieval/i2t_r1_ci_lo" in metrics and "zeroshot_group/view/balanced_acc" in metrics
    _ok("eval", "--model-dir", run, "--shards", shards, "--out", tmp_path / "ev", "--set", "eval.kshot=[]",
        "--set", "eval.bootstrap=10")
    assert json.loads((tmp_path / "ev" / "eval_metrics.json").read_text())["eval/n_samples"] == metrics[
        "eval/n_samples"]
    _ok("export", "--model-dir", run, "--to", "open_clip", "--out", tmp_path / "exp")
    assert (tmp_path / "exp" / "open_clip_model.safetensors").is_file()
    out = tmp_path / "report"
    proc = cli_here("finetune", "report", "report-synth", "--set", f"data.train_shards={shards}",
                    "--set", f"finetune.checkpoint={run}", "--set", f"finetune.out_dir={out}")
    assert proc.returncode == 2 and not out.exists()
    assert "holds 'cxr' samples (index.json modality); the report stage needs 'slide' shards" in one_line_error(proc)


@pytest.mark.skipif(KATHER is None, reason="set MEDVLP_REALDATA to a folder holding kather_tiles/")
def test_real_tiles_import_pretrain_path_clip(tmp_path):
    shards = tmp_path / "shards"
    _ok("shards", "import", "class_folders", KATHER, "--out", shards, "--opt", "val_frac=0.25", "--opt",
        "test_frac=0.25", "--opt", "image_size=64")
    assert json.loads((shards / "index.json").read_text())["modality"] == "patho"
    run = tmp_path / "run"
    _ok("pretrain", "debug", *_sets(tiny_overrides(shards, run, steps=2, **{
        "train.final_eval": "false", "tracking.enabled": "false", "data.image_size": 64, "data.batch_size": 8})))
    out = tmp_path / "pclip"
    _ok("finetune", "path-clip", "path-clip-patho", *_sets([
        f"finetune.checkpoint={run}", "finetune.shots=1", f"data.shards={shards}", "task.label=",
        "task.class_names=[]", "task.prompts={}", "finetune.steps=2", "finetune.batch_size=8",
        "protocol.source_shards=", f"finetune.out_dir={out}", "tracking.enabled=false"]))
    result = json.loads((out / "result.json").read_text())
    assert (out / "model.safetensors").is_file() and result
