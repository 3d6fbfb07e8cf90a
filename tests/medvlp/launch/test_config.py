"""The typed config tree: every recipe loads, overrides apply, bad keys/values fail naming the key path."""
import subprocess
import sys

import pytest

from medvlp.launch.config import (ConfigError, RootConfig, build, dump_yaml, flatten, list_recipes, load_config,
                           load_recipe_dict, to_dict)

# fine-tune stages keep their recipes here too (kind: report, ...); these tests are about pretraining recipes
PRETRAIN_RECIPES = [n for n in list_recipes() if load_recipe_dict(n).get("kind", "pretrain") == "pretrain"]


@pytest.mark.parametrize("name", PRETRAIN_RECIPES)
def test_every_recipe_loads_and_round_trips(name):
    cfg = load_config(name)
    assert isinstance(cfg, RootConfig)
    again = build(RootConfig, to_dict(cfg))  # the resolved tree is itself a valid config
    assert to_dict(again) == to_dict(cfg)


def test_overrides_are_typed():
    cfg = load_config("debug", ["data.batch_size=64", "optim.lr=3e-4", "loss.backend=chunked",
                                "optim.betas=[0.8, 0.9]", "train.resume=true"])
    assert cfg.data.batch_size == 64 and cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.loss.backend == "chunked" and cfg.optim.betas == [0.8, 0.9] and cfg.train.resume is True


@pytest.mark.parametrize("override, path", [
    ("data.batchsize=3", "data.batchsize: unknown key"),
    ("data.batch_size=abc", "data.batch_size: expected an integer"),
    ("train.zero_stage=7", "train.zero_stage: 7 is not one of"),
    ("loss.backend=cuda", "loss.backend: 'cuda' is not one of"),
    ("nosection.x=1", "nosection: unknown key"),
    ("train.resume=maybe", "train.resume: expected true/false"),
    ("optim.betas=0.9", "optim.betas: expected a list"),
    ("data.batch_size.x=1", "data.batch_size.x: 'batch_size' is a value"),
])
def test_bad_keys_and_values_name_the_path(override, path):
    with pytest.raises(ConfigError) as ei:
        load_config("debug", [override])
    assert path in str(ei.value)


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="expected dotted.key=value"):
        load_config("debug", ["data.batch_size"])


def test_recipe_inherit_and_unknown_recipe(tmp_path):
    child = tmp_path / "child.yaml"
    child.write_text("inherit: debug\ndata:\n  batch_size: 7\n")
    cfg = load_config(str(child))
    assert cfg.data.batch_size == 7 and cfg.model.name == load_config("debug").model.name
    with pytest.raises(ConfigError, match="not found"):
        load_config("no-such-recipe")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [1, 2\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(str(bad))


def test_flatten_and_dump():
    cfg = load_config("debug")
    flat = flatten(to_dict(cfg))
    assert flat["data.batch_size"] == cfg.data.batch_size and "optim.lr" in flat
    assert "batch_size:" in dump_yaml(cfg)


def test_cli_config_show_and_error():
    out = subprocess.run([sys.executable, "-m", "medvlp.launch.cli", "config", "show", "debug", "--set", "data.batch_size=5"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "batch_size: 5" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "medvlp.launch.cli", "config", "show", "debug", "--set", "data.nope=1"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "data.nope: unknown key" in bad.stderr


@pytest.mark.parametrize("name", PRETRAIN_RECIPES)
def test_every_recipe_names_a_registered_model_and_valid_deepspeed_config(name):
    from deepspeed.runtime.config import DeepSpeedConfig

    from medvlp.pretrain.engine import deepspeed_config
    from medvlp.pretrain.registry import get_model_config

    cfg = load_config(name)
    assert get_model_config(cfg.model.name)  # raises for an unknown architecture
    ds = DeepSpeedConfig(deepspeed_config(cfg.train, cfg.optim, cfg.data.batch_size, world_size=1))
    assert ds.zero_optimization_stage == cfg.train.zero_stage
    assert ds.train_batch_size == cfg.data.batch_size * cfg.train.grad_accum


def test_every_deepspeed_template_is_valid():
    import json
    from pathlib import Path

    from deepspeed.runtime.config import DeepSpeedConfig

    from medvlp.pretrain.config import OptimConfig, TrainConfig
    from medvlp.pretrain.engine import deepspeed_config

    templates = sorted((Path(__file__).resolve().parents[3] / "medvlp" / "launch" / "deepspeed").glob("*.json"))
    assert len(templates) >= 5
    for t in templates:
        stage = json.loads(t.read_text())["zero_optimization"]["stage"]
        ds = DeepSpeedConfig(deepspeed_config(TrainConfig(deepspeed_config=str(t), zero_stage=stage), OptimConfig(),
                                              8, world_size=1))
        assert ds.zero_optimization_stage == stage and ds.train_batch_size == 8, t.name
    with pytest.raises(ValueError, match="train.zero_stage=1 but the DeepSpeed template"):
        deepspeed_config(TrainConfig(deepspeed_config=str(templates[0].parent / "zero3.json"), zero_stage=1),
                         OptimConfig(), 8, world_size=2)


# ------------------------------------------------------------------------------------------------ the shared builder
def test_configtree_is_the_builder_and_root_alias():
    from medvlp.launch import config as L
    from medvlp.pretrain import configtree as T
    from medvlp.pretrain.config import PretrainConfig

    assert L.RootConfig is PretrainConfig and L.ROOTS["pretrain"] is PretrainConfig
    assert L.build is T.build and L.ConfigError is T.ConfigError
    cfg = load_config("debug")
    assert cfg.kind == "pretrain"
    assert T.to_dict(T.replace(cfg.optim, lr=2e-3))["lr"] == 2e-3
    with pytest.raises(ConfigError, match="lr: must be > 0"):
        T.replace(cfg.optim, lr=-1.0)


def test_flatten_unflatten_overrides_round_trip():
    from medvlp.pretrain.configtree import apply_overrides, parse_override, unflatten

    doc = to_dict(load_config("debug"))
    assert unflatten(flatten(doc)) == doc
    assert parse_override("a.b=[1, 2]") == (["a", "b"], [1, 2])
    assert parse_override("a=null") == (["a"], None)
    out = apply_overrides({"a": {"b": 1}}, ["a.c=x", "d.e=0.5"])
    assert out == {"a": {"b": 1, "c": "x"}, "d": {"e": 0.5}}
    with pytest.raises(ConfigError, match="a.b: 'a' is a value"):
        unflatten({"a": 1, "a.b": 2})
    with pytest.raises(ConfigError, match="expected dotted.key=value"):
        parse_override("novalue")


@pytest.mark.parametrize("name, cands, want", [
    ("stpes", ["steps", "seed", "stop_after"], "steps"),
    ("batchsize", ["batch_size", "workers"], "batch_size"),
    ("lr", ["lr", "eps"], "lr"),
    ("zzzzzz", ["steps", "seed"], None),
])
def test_suggest_by_edit_distance(name, cands, want):
    from medvlp.pretrain.configtree import suggest

    assert suggest(name, cands) == want


def test_misspelt_keys_get_a_hint():
    with pytest.raises(ConfigError, match=r"train.stpes: unknown key \(did you mean train.steps\?\)"):
        load_config("debug", ["train.stpes=3"])
    with pytest.raises(ConfigError, match=r"optimm: unknown key \(did you mean optim\?\)"):
        load_config("debug", ["optimm.lr=3"])


def test_every_key_has_a_one_line_doc():
    from medvlp.pretrain.configtree import field_docs
    from medvlp.pretrain.config import PretrainConfig

    docs = field_docs(PretrainConfig)
    assert set(docs) == set(flatten(to_dict(PretrainConfig())))
    assert not [k for k, d in docs.items() if not d], "undocumented keys"
    assert docs["optim.lr"] == "peak learning rate" and docs["kind"].startswith("recipe kind")


@pytest.mark.parametrize("override, message", [
    ("optim.lr=nan", "optim.lr: must be a finite number"),
    ("optim.lr=-1e-3", "optim.lr: must be > 0"),
    ("optim.lr=.inf", "optim.lr: must be a finite number"),
    ("optim.betas=[0.9]", "optim.betas: must be a pair of numbers in [0, 1)"),
    ("optim.betas=[0.9, 1.0]", "optim.betas: must be a pair"),
    ("optim.eps=0", "optim.eps: must be > 0"),
    ("optim.min_lr_ratio=2", "optim.min_lr_ratio: must be in [0, 1]"),
    ("train.grad_accum=0", "train.grad_accum: must be >= 1"),
    ("train.steps=0", "train.steps: must be >= 1"),
    ("train.steps=-5", "train.steps: must be >= 1"),
    ("data.batch_size=0", "data.batch_size: must be >= 1"),
    ("train.max_bad_steps=0", "train.max_bad_steps: must be >= 1"),
    ("train.out_dir=''", "train.out_dir: must not be empty"),
    ("eval.kshot=[0, 2]", "eval.kshot: every size must be >= 1"),
    ("loss.cache_chunk=-1", "loss.cache_chunk: must be >= 0"),
    ("tracking.http_timeout_s=0", "tracking.http_timeout_s: must be >= 1"),
    ("kind=segmentation", "kind: 'segmentation' is not one of pretrain"),
])
def test_range_checks_name_the_key(override, message):
    with pytest.raises(ConfigError) as ei:
        load_config("debug", [override])
    assert str(ei.value).startswith(message.split(":")[0]) and message in str(ei.value)


def test_kind_selects_the_root_and_the_registry_extends(tmp_path):
    from dataclasses import dataclass, field

    from medvlp.launch.config import ROOTS, register_root

    @dataclass
    class Head:
        lr: float = 0.1  # head learning rate

    @dataclass
    class ToyStage:
        kind: str = "toy"  # recipe kind
        head: Head = field(default_factory=Head)  # the head

    (tmp_path / "toy.yaml").write_text("kind: toy\nhead:\n  lr: 0.5\n")
    with pytest.raises(ConfigError, match="kind: 'toy' is not one of"):
        load_config(str(tmp_path / "toy.yaml"))
    register_root("toy", ToyStage)
    try:
        cfg = load_config(str(tmp_path / "toy.yaml"), ["head.lr=0.25"])
        assert isinstance(cfg, ToyStage) and cfg.head.lr == 0.25
        with pytest.raises(ConfigError, match="is a 'toy' recipe, not 'pretrain'"):
            load_config(str(tmp_path / "toy.yaml"), cls=RootConfig)
    finally:
        ROOTS.pop("toy", None)


def test_saved_yaml_is_a_valid_recipe(tmp_path):
    cfg = load_config("rn50-cxr", ["optim.lr=3e-4", "data.batch_size=7"])
    (tmp_path / "config.yaml").write_text(dump_yaml(cfg))
    again = load_config(str(tmp_path / "config.yaml"))
    assert to_dict(again) == to_dict(cfg) and again.kind == "pretrain"


def test_deepspeed_template_names_are_resolved_by_launch_not_the_engine():
    from pathlib import Path

    from medvlp.pretrain.config import OptimConfig, TrainConfig
    from medvlp.pretrain.engine import deepspeed_config

    cfg = load_config("rn50-cxr")
    p = Path(cfg.train.deepspeed_config)
    assert p.is_file() and p.parent.name == "deepspeed" and p.parent.parent.name == "launch"
    assert load_config("debug", ["train.deepspeed_config=zero3", "train.zero_stage=3"]).train.deepspeed_config.endswith(
        "zero3.json")
    with pytest.raises(ConfigError, match=r"train.deepspeed_config: zero9 not found.*did you mean zero1"):
        load_config("debug", ["train.deepspeed_config=zero9"])
    with pytest.raises(FileNotFoundError, match="train.deepspeed_config: zero2.json not found"):
        deepspeed_config(TrainConfig(deepspeed_config="zero2.json", zero_stage=2), OptimConfig(), 8, world_size=1)


def test_cli_docs_list_every_key():
    from medvlp.pretrain.config import PretrainConfig
    from medvlp.pretrain.configtree import field_docs

    keys = list(field_docs(PretrainConfig))
    helptext = subprocess.run([sys.executable, "-m", "medvlp.launch.cli", "pretrain", "--help"], capture_output=True,
                              text=True)
    assert helptext.returncode == 0 and "--overwrite" in helptext.stdout
    assert all(k in helptext.stdout for k in keys)
    shown = subprocess.run([sys.executable, "-m", "medvlp.launch.cli", "config", "show", "debug", "--doc"],
                           capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert len(lines) == len(keys)
    assert any(l.startswith("optim.lr = 0.001") and l.endswith("# peak learning rate") for l in lines)
