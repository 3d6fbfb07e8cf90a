"""Recipes for the CLI: the config home is `medvlp.pretrain.config` (`load_config`, the root registry, recipes);
its names are re-exported here, and this module adds the fine-tune stages' recipe kinds (a root finder over the
stage registry) and `load_stage_config`.

    cfg = load_config("debug", overrides=["data.batch_size=64", "optim.lr=1e-3"])
"""
from __future__ import annotations

from medvlp.pretrain.config import (  # noqa: F401 - the config home's public names, re-exported for launch's users
    DEEPSPEED_DIR, RECIPE_DIR, ROOTS, PretrainConfig, list_recipes, load_config, load_recipe_dict, recipe_path,
    register_root, register_root_finder, resolve_deepspeed_template, root_for)
from medvlp.pretrain.configtree import (  # noqa: F401 - the builder's public names, re-exported for launch's users
    ConfigError, apply_overrides, build, deep_merge, dump_yaml, field_docs, flatten, format_docs, parse_override,
    replace, suggest, to_dict, unflatten)

RootConfig = PretrainConfig  # the pretraining root (kept under its old name)


def _stage_root(kind: str) -> type | None:
    """The root config of fine-tune stage `kind` (``kind: path_clip`` is the stage `medvlp finetune path-clip`)."""
    from medvlp.finetune import get_stage

    try:
        cls, _ = get_stage(kind.replace("_", "-"))
    except ValueError:
        return None
    return cls


def _stage_kinds() -> list[str]:
    from medvlp.finetune import known_stages

    return [k.replace("-", "_") for k in known_stages()]


register_root_finder(_stage_root, _stage_kinds)


def load_stage_config(stage: str, recipe: str | None, overrides: list[str]):
    """(root config, Stage factory) of fine-tune `stage` from a recipe (its `kind` must be the stage's) + overrides."""
    import dataclasses

    from medvlp.finetune import get_stage

    try:
        root_cls, factory = get_stage(stage)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    doc = load_recipe_dict(recipe) if recipe else {}
    want = next((f.default for f in dataclasses.fields(root_cls) if f.name == "kind"), None)
    have = doc.get("kind")
    if have is not None and want is not None and have != want:
        raise ConfigError(f"kind: the recipe is for {have!r}, but `medvlp finetune {stage}` needs kind: {want}")
    return build(root_cls, apply_overrides(doc, overrides)), factory
