"""`--resume` into a folder that holds a run of the other loop (a pretraining run resumed by a fine-tune stage, or
the reverse) or of another recipe kind (a path_clip run resumed by pcam): refused before anything is loaded or
written, in one line naming the folder and what it holds. Before, the fine-tune runner tried to load the pretraining
run's DeepSpeed checkpoint as its own and failed on a missing `pytorch_model.bin`, and pretraining listed every key
of the other config as changed."""
from __future__ import annotations

import json

import pytest

from ft_probe_stage import ProbeStage, probe_config
from medvlp.finetune.runner import run_stage
from medvlp.pretrain.spine import RunDirError, foreign_run
from tests.conftest import tiny_overrides
from tests.faults.conftest import cli_here, one_line_error

pytestmark = pytest.mark.timeout(120)


def _fake_run(out, loop, kind):
    """A finished run's identity files and one complete-looking checkpoint folder."""
    (out / "checkpoints" / "step_00000004").mkdir(parents=True)
    (out / "checkpoints" / "step_00000004" / "weights.bin").write_bytes(b"x" * 16)
    (out / "run.json").write_text(json.dumps({"uid": "a" * 32, "loop": loop, "created": "2026-12-07T00:00:00Z"}))
    (out / "config.yaml").write_text(f"kind: {kind}\n")
    return {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}


def _unchanged(out, before):
    return {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_foreign_run_names_what_the_folder_holds(tmp_path):
    assert foreign_run(tmp_path / "none", "finetune", "pcam", "finetune.out_dir") == ""
    _fake_run(tmp_path, "pretrain", "pretrain")
    assert foreign_run(tmp_path, "pretrain", "pretrain", "train.out_dir") == ""
    msg = foreign_run(tmp_path, "finetune", "pcam", "finetune.out_dir")
    assert msg == (f"finetune.out_dir {tmp_path}: --resume: it holds a pretrain run (run.json loop), not a "
                   "finetune run; resume that run with its own command, or choose another finetune.out_dir")
    (tmp_path / "run.json").write_text(json.dumps({"uid": "b" * 32, "loop": "finetune"}))
    (tmp_path / "config.yaml").write_text("kind: path_clip\n")
    assert "it holds a path_clip run (config.yaml kind), not a pcam run" in foreign_run(
        tmp_path, "finetune", "pcam", "finetune.out_dir")


def test_finetune_resume_into_a_pretraining_run_is_refused(tmp_path, cxr_shards):
    out = tmp_path / "run"
    before = _fake_run(out, "pretrain", "pretrain")
    with pytest.raises(RunDirError, match=r"it holds a pretrain run \(run.json loop\), not a finetune run"):
        run_stage(ProbeStage(), probe_config(out, cxr_shards, resume=True, steps=2, final_eval=False))
    assert _unchanged(out, before)


def test_pretrain_resume_into_a_finetune_run_is_one_line(tmp_path, cxr_shards):
    out = tmp_path / "run"
    before = _fake_run(out, "finetune", "path_clip")
    sets = tiny_overrides(cxr_shards, out, steps=2, **{"tracking.enabled": "false", "train.final_eval": "false"})
    proc = cli_here("pretrain", "debug", "--resume", *[x for s in sets for x in ("--set", s)])
    assert proc.returncode == 2
    msg = one_line_error(proc)
    assert f"train.out_dir {out}: --resume: it holds a finetune run (run.json loop), not a pretrain run" in msg
    assert _unchanged(out, before)
