"""The config system shared by pretraining and fine-tuning: typed dataclass trees built from plain mappings.

    cfg = build(PretrainConfig, {"optim": {"lr": 1e-3}})              # every key and type checked
    doc = apply_overrides(to_dict(cfg), ["train.steps=5", "optim.betas=[0.8, 0.9]"])
    cfg = build(PretrainConfig, doc)
    print(dump_yaml(cfg))                                               # itself a valid recipe

* `build` is strict: an unknown key fails with `ConfigError` naming its full path (and the nearest known key by
  edit distance); a value of the wrong type fails the same way. After a dataclass is built its `validate()` hook (if
  any) runs; a `ValueError("field: message")` it raises becomes `ConfigError("section.field: message")`.
* Overrides are ``dotted.key=value`` with the value parsed as YAML (``1e-3``, ``true``, ``[1, 2]``, ``null``).
* `field_docs(cls)` gives every dotted key's one-line doc: the ``# comment`` after the field in the source, or
  ``field(metadata={"doc": ...})``.
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import types
import typing
from dataclasses import fields, is_dataclass
from typing import Any, Literal, Union, get_args, get_origin

import yaml

__all__ = ["ConfigError", "build", "to_dict", "flatten", "unflatten", "parse_override", "apply_overrides",
           "field_docs", "dump_yaml", "replace", "suggest", "deep_merge", "format_docs"]


class ConfigError(ValueError):
    """Bad config: the message starts with the offending key path."""


# ----------------------------------------------------------------------------------------------- hints
def _distance(a: str, b: str) -> int:
    """Levenshtein distance (insert, delete, substitute), plus adjacent transpositions."""
    prev2: list[int] | None = None
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i] + [0] * len(b)
        for j, cb in enumerate(b, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb))
            if prev2 is not None and i > 1 and j > 1 and ca == b[j - 2] and a[i - 2] == cb:
                cur[j] = min(cur[j], prev2[j - 2] + 1)
        prev2, prev = prev, cur
    return prev[-1]


def suggest(name: str, candidates: typing.Iterable[str]) -> str | None:
    """The candidate closest to `name` by edit distance, if close enough to be a likely typo (else None)."""
    name = str(name)
    best, best_d = None, None
    for c in candidates:
        d = _distance(name.lower(), str(c).lower())
        if best_d is None or d < best_d:
            best, best_d = c, d
    if best is None:
        return None
    limit = max(1, min(3, len(name) // 3))
    if best_d <= limit or (len(name) >= 4 and (str(best).startswith(name) or name.startswith(str(best)))):
        return best
    return None


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


# ----------------------------------------------------------------------------------------------- building
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
    if not isinstance(data, dict):
        raise ConfigError(f"{path or cls.__name__}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in fields(cls) if f.init]
    for k in data:
        if k not in known:
            near = suggest(str(k), known)
            hint = f" (did you mean {_join(path, near)}?)" if near else ""
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
            raise ConfigError(f"{path}.{e}" if path else str(e)) from e
    return obj


def to_dict(obj: Any) -> Any:
    """A dataclass tree as plain dicts/lists (tuples become lists), ready for YAML/JSON."""
    if is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def replace(cfg: Any, **changes: Any) -> Any:
    """A copy of dataclass `cfg` with `changes`, rebuilt and validated like a loaded config."""
    return build(type(cfg), to_dict(dataclasses.replace(cfg, **changes)))


# ----------------------------------------------------------------------------------------------- flat / dotted
def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; empty dicts stay as leaves."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v:
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def unflatten(flat: dict) -> dict:
    """{'a.b': 1} -> {'a': {'b': 1}} (keys without dots stay top-level); a key that is both a value and a section
    fails with ConfigError."""
    out: dict = {}
    for key, v in flat.items():
        *head, last = str(key).split(".")
        node = out
        for i, h in enumerate(head):
            nxt = node.setdefault(h, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"{key}: {'.'.join(head[:i + 1])!r} is a value, not a section")
            node = nxt
        if isinstance(node.get(last), dict) and not isinstance(v, dict):
            raise ConfigError(f"{key}: is a section, not a value")
        node[last] = v
    return out


def deep_merge(base: dict, over: dict) -> dict:
    """`over` merged into a copy of `base`, section by section."""
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """'a.b=1e-3' -> (['a', 'b'], 0.001): the value parsed as YAML (unparsable text stays a string)."""
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


def apply_overrides(doc: dict, overrides: list[str] | None) -> dict:
    """A copy of nested `doc` with each ``dotted.key=value`` set (sections created as needed)."""
    doc = deep_merge({}, doc)
    for ov in overrides or []:
        parts, value = parse_override(ov)
        node = doc
        for p in parts[:-1]:
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            elif not isinstance(nxt, dict):
                raise ConfigError(f"{'.'.join(parts)}: {p!r} is a value, not a section")
            else:
                nxt = node[p] = dict(nxt)
            node = nxt
        node[parts[-1]] = value
    return doc


# ----------------------------------------------------------------------------------------------- docs
def _comment_docs(cls: type) -> dict[str, str]:
    """field name -> the `# comment` on its line in the class source ({} when the source is unavailable)."""
    try:
        src = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    lines = src.splitlines()
    out: dict[str, str] = {}
    try:
        tree = ast.parse(src)
    except SyntaxError:
        return {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    for node in body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            line = lines[(node.end_lineno or node.lineno) - 1]
            tail = line[node.end_col_offset:] if node.end_col_offset is not None else line
            if "#" in tail:
                out[node.target.id] = tail.split("#", 1)[1].strip()
    return out


def field_docs(cls: type, prefix: str = "") -> dict[str, str]:
    """Every dotted key of dataclass `cls` (nested sections included) -> its one-line doc ("" when undocumented)."""
    hints = typing.get_type_hints(cls)
    comments: dict[str, str] = {}
    for klass in reversed(cls.__mro__):  # subclasses' comments win
        if is_dataclass(klass):
            comments.update(_comment_docs(klass))
    out: dict[str, str] = {}
    for f in fields(cls):
        key = _join(prefix, f.name)
        tp = hints.get(f.name)
        doc = f.metadata.get("doc") or comments.get(f.name, "")
        if isinstance(tp, type) and is_dataclass(tp):
            out.update(field_docs(tp, key))
        else:
            out[key] = doc
    return out


def format_docs(cfg_or_cls: Any) -> str:
    """One line per key: ``key = value  # doc`` for a config object, ``key  # doc`` for a class."""
    cls = cfg_or_cls if isinstance(cfg_or_cls, type) else type(cfg_or_cls)
    docs = field_docs(cls)
    if isinstance(cfg_or_cls, type):
        width = max(len(k) for k in docs)
        return "\n".join(f"{k:<{width}}  {d}" for k, d in docs.items()) + "\n"
    values = flatten(to_dict(cfg_or_cls))
    rows = [(f"{k} = {yaml.safe_dump(values.get(k), default_flow_style=True).strip().removesuffix('...').strip()}", d)
            for k, d in docs.items()]
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{left:<{width}}  # {d}" if d else left for left, d in rows) + "\n"


def dump_yaml(cfg: Any) -> str:
    """The config tree as YAML (field order kept); loading it back with `build` gives an equal config."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
