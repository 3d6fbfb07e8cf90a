"""Every stage declares in the stage registry the shards it takes; the runner refuses shards of another modality
before the stage builds anything: one line naming the config key, the shards' modality and the stage (exit 2 from
the CLI)."""
from __future__ import annotations

import pytest

from medvlp.data_shards.require import ShardRequirementError
from medvlp.finetune.registry import discover, load_stage_config
from medvlp.finetune.runner import run_stage
from tests.faults.conftest import cli_here as cli
from tests.faults.conftest import one_line_error

pytestmark = pytest.mark.timeout(120)

# stage -> (recipe, the config key naming its shards, a modality it does not take)
WRONG = {"anatomy": ("anatomy-synth", "data.train_shards", "cxr"),
         "pcam": ("pcam-synth", "data.train_shards", "ct"),
         "path-clip": ("path-clip-patho", "data.shards", "ct"),
         "report": ("report-synth", "data.train_shards", "cxr")}


@pytest.fixture
def wrong_shards(modality_shards):
    return modality_shards


def test_every_stage_declares_its_shards():
    need = {s.name: s.shards for s in discover() if s.name in WRONG}
    assert {n: (s.modalities, s.masks, s.keys) for n, s in need.items()} == {
        "anatomy": (("ct",), True, ("train_shards", "val_shards")),
        "pcam": (("cxr", "patho"), False, ("train_shards", "val_shards")),
        "path-clip": (("patho", "cxr"), False, ("shards",)),
        "report": (("slide",), False, ("train_shards", "val_shards"))}


@pytest.mark.parametrize("stage", sorted(WRONG))
def test_runner_refuses_shards_of_another_modality_before_build(stage, wrong_shards, tmp_path):
    recipe, key, modality = WRONG[stage]
    out = tmp_path / "run"
    cfg, factory = load_stage_config(stage, recipe, [f"{key}={wrong_shards / modality}", f"finetune.out_dir={out}",
                                                     "tracking.enabled=false"])
    built = []
    instance = factory()
    instance.build = lambda *a: built.append(a)  # must not be reached
    with pytest.raises(ShardRequirementError) as e:
        run_stage(instance, cfg)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{key}: {wrong_shards / modality} holds {modality!r} samples")
    assert f"the {stage} stage needs" in msg
    assert not built and not out.exists()  # refused before the stage builds or the run folder is made


@pytest.mark.parametrize("stage", ["path-clip", "report"])
def test_cli_refusal_is_one_line_and_exit_2(stage, wrong_shards, tmp_path):
    recipe, key, modality = WRONG[stage]
    proc = cli("finetune", stage, recipe, "--set", f"{key}={wrong_shards / modality}",
               "--set", f"finetune.out_dir={tmp_path / 'run'}", "--set", "tracking.enabled=false")
    assert proc.returncode == 2
    msg = one_line_error(proc)
    assert f"holds {modality!r} samples (index.json modality); the {stage} stage needs" in msg
