"""The report recipe and config: loads through the stage registry, bad values name their key."""
import pytest

from medvlp.launch.cli import load_stage_config
from medvlp.launch.config import ConfigError


def test_kind_report_selects_the_report_root(tmp_path):
    from medvlp.finetune.report import ReportConfig
    from medvlp.launch.config import ROOTS, dump_yaml, load_config, to_dict

    cfg = load_config("report-synth", ["finetune.stage=2"])
    assert isinstance(cfg, ReportConfig) and ROOTS["report"] is ReportConfig
    # the resolved tree, as a run folder saves it, is itself a recipe of the same kind
    saved = tmp_path / "config.yaml"
    saved.write_text(dump_yaml(cfg))
    again = load_config(str(saved))
    assert isinstance(again, ReportConfig) and to_dict(again) == to_dict(cfg)


def test_report_recipe_loads_for_both_stages():
    from medvlp.finetune.report import ReportConfig, ReportStage

    cfg, factory = load_stage_config("report", "report-synth", [])
    assert isinstance(cfg, ReportConfig) and cfg.kind == "report" and cfg.finetune.stage == 1
    assert factory is ReportStage
    cfg, _ = load_stage_config("report", "report-synth", ["finetune.stage=2", "finetune.init=runs/report/stage1",
                                                          "gen.strategy=nucleus", "finetune.deepspeed=zero2"])
    assert cfg.finetune.stage == 2 and cfg.gen.strategy == "nucleus" and cfg.finetune.deepspeed == "zero2"


@pytest.mark.parametrize("override, message", [
    ("finetune.stage=3", "finetune.stage: 3 is not one of 1, 2"),
    ("gen.strategy=topk", "gen.strategy: 'topk' is not one of greedy, beam, nucleus"),
    ("model.width=30", "model.width: 30 is not divisible by heads 4"),
    ("data.modality=cxr", "data.modality: report generation reads slide bags"),
    ("model.latent=3", "model.latent: unknown key"),
])
def test_bad_values_name_their_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_stage_config("report", "report-synth", [override])


def test_a_recipe_of_another_kind_is_refused(tmp_path):
    other = tmp_path / "other.yaml"
    other.write_text("kind: pcam\n")
    with pytest.raises(ConfigError, match="kind: the recipe is for 'pcam'"):
        load_stage_config("report", str(other), [])
