"""Recipes and the root-config registry; the builder itself lives in `medvlp.pretrain.configtree`.

    cfg = load_config("debug", overrides=["data.batch_size=64", "optim.lr=1e-3"])

* A recipe is a YAML file in ``medvlp/launch/recipes/`` (or any path, e.g. a run folder's ``config.yaml``). ``inherit:
  NAME`` merges it over another recipe. ``kind:`` selects the root config class from `ROOTS` (default ``pretrain``);
  fine-tune stages add theirs with `register_root`.
* Overrides are ``dotted.key=value``; the value is parsed as YAML (``1e-3``, ``true``, ``[1, 2]``, ``null``).
* An unknown key or a value of the wrong type fails with `ConfigError` naming the full key path.
* ``train.deepspeed_config`` may name a bundled template (``zero2``, ``zero3-offload.json``): it is resolved here to
  a file path, so the engine only ever sees paths.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from medvlp.pretrain.config import PretrainConfig
from medvlp.pretrain.configtree import (  # noqa: F401 - the builder's public names, re-exported for launch's users
    ConfigError, apply_overrides, build, deep_merge, dump_yaml, field_docs, flatten, format_docs, parse_override,
    replace, suggest, to_dict, unflatten)

RECIPE_DIR = Path(__file__).parent / "recipes"
DEEPSPEED_DIR = Path(__file__).parent / "deepspeed"

RootConfig = PretrainConfig  # the pretraining root (kept under its old name)

# recipe `kind:` -> root config dataclass; fine-tune stages register theirs (`register_root`)
ROOTS: dict[str, type] = {"pretrain": PretrainConfig}


def register_root(kind: str, cls: type) -> None:
    """Make recipes with ``kind: <kind>`` build `cls` (a dataclass with a ``kind`` field)."""
    if not dataclasses.is_dataclass(cls) or "kind" not in {f.name for f in dataclasses.fields(cls)}:
        raise TypeError(f"{cls!r}: a root config must be a dataclass with a `kind` field")
    ROOTS[kind] = cls


def root_for(kind: Any) -> type:
    """The root config class of recipe ``kind``; a fine-tune stage's is found through its registration
    (``kind: path_clip`` is the stage `medvlp finetune path-clip`)."""
    if kind not in ROOTS and isinstance(kind, str):
        from medvlp.finetune import get_stage

        try:
            cls, _ = get_stage(kind.replace("_", "-"))
        except ValueError:
            cls = None
        if cls is not None:
            register_root(kind, cls)
    if kind not in ROOTS:
        from medvlp.finetune import known_stages

        known = list(ROOTS) + [k.replace("-", "_") for k in known_stages() if k.replace("-", "_") not in ROOTS]
        near = suggest(str(kind), known)
        hint = f" (did you mean {near}?)" if near else ""
        raise ConfigError(f"kind: {kind!r} is not one of {', '.join(known)}{hint}")
    return ROOTS[kind]


def resolve_deepspeed_template(value: str) -> str:
    """A `train.deepspeed_config` value -> an existing file path ('' stays ''): a path as given, else a bundled
    template by name (``zero2`` or ``zero2.json``)."""
    if not value:
        return ""
    p = Path(value)
    if p.is_file():
        return str(p)
    for cand in (DEEPSPEED_DIR / p.name, DEEPSPEED_DIR / f"{p.name}.json"):
        if cand.is_file():
            return str(cand)
    names = sorted(q.stem for q in DEEPSPEED_DIR.glob("*.json"))
    near = suggest(p.stem, names)
    hint = f" (did you mean {near}?)" if near else ""
    raise ConfigError(f"train.deepspeed_config: {value} not found, and no bundled template of that name{hint}; "
                      f"bundled: {', '.join(names)}")


# ----------------------------------------------------------------------------------------------- recipes
def recipe_path(name: str) -> Path:
    p = Path(name)
    if p.suffix in (".yaml", ".yml") and p.exists():
        return p
    cand = RECIPE_DIR / f"{name}.yaml"
    if cand.exists():
        return cand
    raise ConfigError(f"recipe {name!r} not found (looked for {p} and {cand}); available: {', '.join(list_recipes())}")


def list_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def load_recipe_dict(name: str, _seen: tuple[str, ...] = ()) -> dict:
    path = recipe_path(name)
    if str(path) in _seen:
        raise ConfigError(f"recipe {name!r}: inherit cycle {' -> '.join(_seen)}")
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"recipe {path}: invalid YAML: {e}") from e
    if not isinstance(doc, dict):
        raise ConfigError(f"recipe {path}: top level must be a mapping")
    parent = doc.pop("inherit", None)
    if parent:
        doc = deep_merge(load_recipe_dict(parent, _seen + (str(path),)), doc)
    return doc


def load_config(recipe: str | None = "debug", overrides: list[str] | None = None, cls: type | None = None) -> Any:
    """Recipe (+ inherit chain) + dotted overrides -> typed, validated config tree. The root class is `cls` if given,
    else the one registered for the recipe's ``kind`` (default ``pretrain``)."""
    doc = load_recipe_dict(recipe) if recipe else {}
    doc = apply_overrides(doc, overrides or [])
    kind = doc.get("kind")
    if cls is None:
        cls = root_for(kind if kind is not None else "pretrain")
    elif kind is not None:
        want = next((k for k, c in ROOTS.items() if c is cls), None)
        if want is not None and kind != want:
            raise ConfigError(f"kind: recipe {recipe!r} is a {kind!r} recipe, not {want!r}")
    if kind is None:
        doc.pop("kind", None)
    cfg = build(cls, doc)
    train = getattr(cfg, "train", None)
    if train is not None and getattr(train, "deepspeed_config", ""):
        train.deepspeed_config = resolve_deepspeed_template(train.deepspeed_config)
    return cfg


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
