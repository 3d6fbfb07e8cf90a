"""Recipes for the CLI: the config home is `medvlp.pretrain.config` (`load_config`, the root registry, recipes);
its names are re-exported here, with the stage registry's `load_stage_config` (importing the registry makes the
fine-tune stages' recipe kinds known to `load_config`).

    cfg = load_config("debug", overrides=["data.batch_size=64", "optim.lr=1e-3"])
"""
from __future__ import annotations

from medvlp.pretrain.config import (  # noqa: F401 - the config home's public names, re-exported for launch's users
    DEEPSPEED_DIR, RECIPE_DIR, ROOTS, PretrainConfig, list_recipes, load_config, load_recipe_dict, recipe_path,
    register_root, register_root_finder, resolve_deepspeed_template, root_for)
from medvlp.finetune.registry import load_stage_config  # noqa: F401 - registers the stages' recipe kinds
from medvlp.pretrain.configtree import (  # noqa: F401 - the builder's public names, re-exported for launch's users
    ConfigError, apply_overrides, build, deep_merge, dump_yaml, field_docs, flatten, format_docs, parse_override,
    replace, suggest, to_dict, unflatten)

RootConfig = PretrainConfig  # the pretraining root (kept under its old name)
