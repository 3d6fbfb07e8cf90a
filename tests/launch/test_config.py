"""The typed config tree: every recipe loads, overrides apply, bad keys/values fail naming the key path."""
import subprocess
import sys

import pytest

from launch.config import ConfigError, RootConfig, build, dump_yaml, flatten, list_recipes, load_config, to_dict


@pytest.mark.parametrize("name", list_recipes())
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
    out = subprocess.run([sys.executable, "-m", "launch.cli", "config", "show", "debug", "--set", "data.batch_size=5"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "batch_size: 5" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "launch.cli", "config", "show", "debug", "--set", "data.nope=1"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "data.nope: unknown key" in bad.stderr


@pytest.mark.parametrize("name", list_recipes())
def test_every_recipe_names_a_registered_model_and_valid_deepspeed_config(name):
    from deepspeed.runtime.config import DeepSpeedConfig

    from pretrain.engine import deepspeed_config
    from pretrain.registry import get_model_config

    cfg = load_config(name)
    assert get_model_config(cfg.model.name)  # raises for an unknown architecture
    ds = DeepSpeedConfig(deepspeed_config(cfg.train, cfg.optim, cfg.data.batch_size, world_size=1))
    assert ds.zero_optimization_stage == cfg.train.zero_stage
    assert ds.train_batch_size == cfg.data.batch_size * cfg.train.grad_accum


def test_every_deepspeed_template_is_valid():
    import json
    from pathlib import Path

    from deepspeed.runtime.config import DeepSpeedConfig

    from pretrain.config import OptimConfig, TrainConfig
    from pretrain.engine import deepspeed_config

    templates = sorted((Path(__file__).resolve().parents[2] / "launch" / "deepspeed").glob("*.json"))
    assert len(templates) >= 5
    for t in templates:
        stage = json.loads(t.read_text())["zero_optimization"]["stage"]
        ds = DeepSpeedConfig(deepspeed_config(TrainConfig(deepspeed_config=str(t), zero_stage=stage), OptimConfig(),
                                              8, world_size=1))
        assert ds.zero_optimization_stage == stage and ds.train_batch_size == 8, t.name
    with pytest.raises(ValueError, match="train.zero_stage=1 but the DeepSpeed template"):
        deepspeed_config(TrainConfig(deepspeed_config=str(templates[0].parent / "zero3.json"), zero_stage=1),
                         OptimConfig(), 8, world_size=2)
