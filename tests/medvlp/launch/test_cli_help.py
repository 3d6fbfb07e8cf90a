"""`--help` of every training command lists its config keys with their docs."""
import pytest

from medvlp.launch.cli import main

pytestmark = pytest.mark.timeout(120)


def _help(capsys, *argv):
    with pytest.raises(SystemExit) as e:
        main([*argv, "--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


def _keys(text):
    return {ln.split()[0] for ln in text.splitlines() if ln and not ln.startswith(" ") and "." in ln.split()[0]}


def test_finetune_help_lists_runner_keys_and_a_stage_lists_all_of_its_own(capsys):
    from medvlp.finetune import get_stage
    from medvlp.launch.config import field_docs

    plain = _help(capsys, "finetune")
    assert "finetune.lr" in _keys(plain) and "finetune.steps" in _keys(plain)
    assert "`medvlp finetune STAGE --help`" in plain
    for stage in ("pcam", "path-clip"):
        text = _help(capsys, "finetune", stage)
        root, _ = get_stage(stage)
        want = {k for k in field_docs(root) if "." in k}  # plus the root "kind"
        assert want <= _keys(text), sorted(want - _keys(text))[:5]
        line = next(ln for ln in text.splitlines() if ln.startswith("finetune.lr "))
        assert len(line.split(None, 1)) == 2  # the key's doc is on its line


def test_pretrain_and_few_shot_help_list_their_keys(capsys):
    assert {"optim.lr", "train.steps", "tracking.run_name"} <= _keys(_help(capsys, "pretrain"))
    assert any(k.startswith("protocol.") for k in _keys(_help(capsys, "eval-few-shot")))
    assert "medvlp finetune anatomy --help" in _help(capsys, "anatomy-ablation")
