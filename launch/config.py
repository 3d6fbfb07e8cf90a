"""One typed config tree, assembled from the components' own dataclasses; YAML recipes; dotted overrides.

    cfg = load_config("debug", overrides=["data.batch_size=64", "optim.lr=1e-3"])

* A recipe is a YAML file in ``launch/recipes/`` (or any path). ``inherit: NAME`` merges it over another recipe.
* Overrides are ``dotted.key=value``; the value is parsed as YAML (``1e-3``, ``true``, ``[1, 2]``, ``null``).
* An unknown key or a value of the wrong type fails with `ConfigError` naming the full key path.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from data_shards.config import DataConfig
from pretrain.tracking import flatten  # noqa: F401 - re-exported: {'a': {'b': 1}} -> {'a.b': 1}
from pretrain.config import EvalConfig, LossConfig, ModelConfig, OptimConfig, TrackingConfig, TrainConfig

RECIPE_DIR = Path(__file__).parent / "recipes"


class ConfigError(ValueError):
    """Bad config: the message starts with the offending key path."""


@dataclass
class RootConfig:
    """The whole resolved tree for a pretraining run."""

    data: DataConfig = field(default_factory=DataConfig)  # shards and streaming
    model: ModelConfig = field(default_factory=ModelConfig)  # towers and projections
    loss: LossConfig = field(default_factory=LossConfig)  # contrastive loss and its backend
    optim: OptimConfig = field(default_factory=OptimConfig)  # optimizer, schedule, clipping
    train: TrainConfig = field(default_factory=TrainConfig)  # steps, checkpoints, DeepSpeed
    eval: EvalConfig = field(default_factory=EvalConfig)  # zero-shot / retrieval / probes
    tracking: TrackingConfig = field(default_factory=TrackingConfig)  # MLflow


# ----------------------------------------------------------------------------------------------- typing
def _coerce(tp: Any, value: Any, path: str) -> Any:
    """Check/convert `value` against annotation `tp`; raise ConfigError naming `path`."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping for {tp.__name__}, got {value!r}")
        return build(tp, value, path)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{path}: may not be null")
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{path}: {value!r} matches none of {args}")
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{path}: {value!r} is not one of {list(get_args(tp))}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        (item_tp, *_) = get_args(tp) or (Any,)
        out = [_coerce(item_tp, v, f"{path}[{i}]") for i, v in enumerate(value)]
        return out if origin is list else tuple(out)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        _, v_tp = get_args(tp) or (Any, Any)
        return {k: _coerce(v_tp, v, f"{path}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{path}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{path}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{path}: expected a string, got {value!r}")
    return value


def build(cls: type, data: dict, path: str = "") -> Any:
    """Build dataclass `cls` from a mapping, checking every key and type; runs `validate()` if defined."""
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls) if f.init}
    for k in data:
        if k not in known:
            near = [n for n in known if n.startswith(str(k)[:3])]
            hint = f" (did you mean {', '.join(near)}?)" if near else ""
            raise ConfigError(f"{_join(path, k)}: unknown key{hint}; known keys: {', '.join(known)}")
    kwargs = {k: _coerce(hints[k], v, _join(path, k)) for k, v in data.items()}
    obj = cls(**kwargs)
    check = getattr(obj, "validate", None)
    if callable(check):
        try:
            check()
        except ConfigError:
            raise
        except ValueError as e:  # components raise ValueError("field: message")
            raise ConfigError(f"{_join(path, '')}{e}") from e
    return obj


def _join(path: str, key: str) -> str:
    if not key:
        return f"{path}." if path else ""
    return f"{path}.{key}" if path else str(key)


def to_dict(obj: Any) -> Any:
    if is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


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


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


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
        doc = _deep_merge(load_recipe_dict(parent, _seen + (str(path),)), doc)
    return doc


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected dotted.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: bad key {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(doc: dict, overrides: list[str]) -> dict:
    doc = _deep_merge({}, doc)
    for ov in overrides or []:
        parts, value = parse_override(ov)
        node = doc
        for p in parts[:-1]:
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            elif not isinstance(nxt, dict):
                raise ConfigError(f"{'.'.join(parts)}: {p!r} is a value, not a section")
            node = nxt
        node[parts[-1]] = value
    return doc


def load_config(recipe: str | None = "debug", overrides: list[str] | None = None, cls: type = RootConfig) -> Any:
    """Recipe (+ inherit chain) + dotted overrides -> typed, validated config tree."""
    doc = load_recipe_dict(recipe) if recipe else {}
    doc.pop("kind", None)
    return build(cls, apply_overrides(doc, overrides or []))


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def replace(cfg: Any, **changes: Any) -> Any:
    return dataclasses.replace(cfg, **changes)
