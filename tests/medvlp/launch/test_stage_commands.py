"""The CLI finds every stage and its commands in the stage registry: the same commands and options as before."""
from __future__ import annotations

import dataclasses
import re
import subprocess
import sys

import pytest

from medvlp.launch.cli import main

pytestmark = pytest.mark.timeout(180)

COMMANDS = {"config", "shards", "tokenizer", "pretrain", "finetune", "eval-few-shot", "anatomy-ablation", "eval",
            "export", "features", "generate", "report", "runs", "localize", "pcam-table", "pcam-corpus", "launch",
            "plan"}
# the stages' own commands and the options each had when the CLI defined them itself
STAGE_OPTIONS = {
    ("eval-few-shot",): {"--set"},
    ("eval", "few-shot"): {"--set"},
    ("anatomy-ablation",): {"--seeds", "--variants", "--out", "--merge", "--set"},
    ("localize",): {"--checkpoint", "--out", "--threshold", "--findings"},
    ("pcam-table",): {"--out", "--poolings", "--seeds", "--reference", "--resume", "--set"},
    ("pcam-corpus",): {"--out", "--n", "--seed", "--nodule-radius", "--size"},
    ("features", "extract"): {"--checkpoint", "--shards", "--out", "--batch-size", "--slide-key", "--slides-per-shard"},
    ("generate",): {"--checkpoint", "--shards", "--out", "--split", "--max-samples", "--strategy", "--set"},
    ("report", "eval"): {"--checkpoint", "--shards", "--split", "--out", "--set"},
}
OTHER = [("config", "show"), ("config", "list"), ("shards", "synth"), ("shards", "build"), ("shards", "inspect"),
         ("shards", "import"), ("shards", "merge-index"), ("tokenizer", "train"), ("pretrain",), ("finetune",),
         ("finetune", "pcam"), ("finetune", "path-clip"), ("finetune", "anatomy"), ("finetune", "report"), ("eval",),
         ("export",), ("runs", "compare"), ("runs", "ui"), ("launch",), ("plan",)]


def _help(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as e:
        main([*argv, "--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


def test_top_level_lists_the_same_commands(capsys):
    text = _help(capsys)
    listed = set(re.search(r"\{([^}]*)\}", text).group(1).split(","))
    assert listed == COMMANDS


@pytest.mark.parametrize("argv", list(STAGE_OPTIONS), ids=" ".join)
def test_stage_commands_keep_their_options(capsys, argv):
    text = _help(capsys, *argv)
    assert STAGE_OPTIONS[argv] <= set(re.findall(r"(--[a-z][a-z-]*)", text)), text


def test_every_other_command_still_answers_help(capsys):
    for argv in OTHER:
        text = _help(capsys, *argv)
        if argv[0] == "finetune" and len(argv) == 2:  # a stage's help: the finetune usage and the stage's keys
            assert text.startswith("usage: medvlp finetune") and f"config keys of stage {argv[1]}" in text
        else:
            assert text.startswith("usage: medvlp " + " ".join(argv))


def test_registry_declares_each_stage_once_with_its_kind():
    from medvlp.finetune.path_clip.config import PathCLIPConfig
    from medvlp.finetune.registry import known_stages, load_stage_config, stage_spec
    from medvlp.pretrain.config import ConfigError, root_for

    assert known_stages() == ["anatomy", "path-clip", "pcam", "report"]
    assert stage_spec("path-clip").kind == "path_clip" and root_for("path_clip") is PathCLIPConfig
    with pytest.raises(ConfigError, match=r"stage 'pcma' is not known \(did you mean 'pcam'\?\)"):
        load_stage_config("pcma", None, [])


def test_a_stage_brings_its_own_command_and_alias(capsys):
    from medvlp.finetune import STAGES, register_stage
    from medvlp.finetune.runner import RunnerConfig

    @dataclasses.dataclass
    class HelloConfig:
        kind: str = "hello"
        finetune: RunnerConfig = dataclasses.field(default_factory=RunnerConfig)

    def add_commands(sub, help_cmd):
        s = sub.add_parser("hello-table", help="a stage's own command")
        s.add_argument("--n", type=int, default=1)
        s.set_defaults(fn=lambda a: print(f"hello {a.n}") or 0)

    register_stage("hello", HelloConfig, object, commands=add_commands, aliases={"hello table": "hello-table"})
    try:
        assert main(["hello-table", "--n", "3"]) == 0 and capsys.readouterr().out == "hello 3\n"
        assert main(["hello", "table"]) == 0 and capsys.readouterr().out == "hello 1\n"
        assert "hello-table" in _help(capsys)
    finally:
        STAGES.pop("hello", None)


def test_declaring_the_stages_imports_none_of_their_modules():
    code = ("import sys, medvlp.finetune.registry as r; r.discover(); "
            "print(sorted(m for m in sys.modules if m.startswith('medvlp.finetune.') and m.count('.') > 2))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=170, check=True).stdout
    assert out.strip() == "[]", out  # stage, model, config modules load only when a stage is used
