"""The stage registry: every fine-tune stage declares itself once, and the CLI and the config system find it here.

A stage package (`medvlp/finetune/<name>/__init__.py`) declares its stage when imported, naming its parts by import
path so that the declaration itself imports nothing heavy (the CLI reads every declaration at start-up):

    register_stage("pcam", "medvlp.finetune.pcam.config:PcamConfig", "medvlp.finetune.pcam.stage:PcamStage",
                   kind="pcam", commands="medvlp.finetune.pcam.commands:add_commands",
                   shards=ShardNeed(("cxr", "patho"), what="2D images"))

* ``name``: the CLI name (`medvlp finetune NAME`); ``kind``: the recipe ``kind:`` of its root config (recipes and
  `medvlp.pretrain.config.load_config` find the root class through `root_for_kind`, registered as a root finder
  of the config home); ``config``: the root config class (a dataclass with `kind` and `finetune` fields);
  ``stage``: the Stage factory the runner calls with no argument.
* ``commands``: ``add_commands(subparsers, help_cmd)`` adds the stage's own top-level commands (``help_cmd``: the
  command whose ``--help`` is being asked for, so an epilog that needs the config class is built only then);
  ``aliases``: argv prefixes the CLI rewrites before parsing (``{"eval few-shot": "eval-few-shot"}``).
  `add_stage_commands` adds every stage's commands to the `medvlp` parser.
* ``shards``: the shards the stage takes (`medvlp.data_shards.require.ShardNeed`: modalities, organ masks, the
  config keys naming them). The runner checks them before the stage builds (one line naming the config key, the
  shards' modality and the stage; exit 2 from the CLI); None: no check.

A class or callable may be given instead of an import path (tests register small stages that way).
"""
from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from medvlp.data_shards.require import ShardNeed
from medvlp.finetune.runner import register_stage_finder
from medvlp.pretrain.config import load_recipe_dict, register_root_finder
from medvlp.pretrain.configtree import ConfigError, apply_overrides, build, format_docs

AddCommands = Callable[[Any, "str | None"], None]


def _resolve(ref: Any) -> Any:
    """An object given as itself or as ``"package.module:attribute"``."""
    if not isinstance(ref, str):
        return ref
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


@dataclass(frozen=True)
class StageSpec:
    """One stage: its names, its parts (objects or import paths, resolved on first use) and its CLI commands."""

    name: str  # CLI name: `medvlp finetune NAME`
    kind: str  # recipe `kind:` of its root config
    config: Any  # root config class or "module:Class"
    stage: Any  # Stage factory (no arguments) or "module:Name"
    commands: Any = None  # add_commands(subparsers, help_cmd) or "module:function"; None: no commands of its own
    aliases: dict[str, str] = field(default_factory=dict)  # "eval few-shot" -> "eval-few-shot"
    shards: ShardNeed | None = None  # the shards it takes (checked by the runner before `build`); None: unchecked

    def root(self) -> type:
        return _resolve(self.config)

    def factory(self) -> Callable[[], Any]:
        return _resolve(self.stage)

    def add_commands(self, sub: Any, help_cmd: str | None = None) -> None:
        if self.commands is not None:
            _resolve(self.commands)(sub, help_cmd)


# CLI name -> its declaration
STAGES: dict[str, StageSpec] = {}


def _kind_of(config: Any, name: str) -> str:
    if isinstance(config, str):
        raise TypeError(f"register_stage({name!r}): give kind= when the config is an import path")
    if not dataclasses.is_dataclass(config):
        raise TypeError(f"register_stage({name!r}): {config!r} must be a dataclass with `kind` and `finetune` fields")
    kind = next((f.default for f in dataclasses.fields(config) if f.name == "kind"), None)
    if not isinstance(kind, str):
        raise TypeError(f"register_stage({name!r}): {config!r} has no `kind` field with a default")
    return kind


def register_stage(name: str, config: Any, stage: Any, *, kind: str | None = None, commands: Any = None,
                   aliases: dict[str, str] | None = None, shards: ShardNeed | None = None) -> StageSpec:
    """Declare stage `name` (see the module doc); a class config must be a dataclass with a `finetune` field."""
    if not isinstance(config, str) and (not dataclasses.is_dataclass(config) or "finetune" not in {
            f.name for f in dataclasses.fields(config)}):
        raise TypeError(f"register_stage({name!r}): {config!r} must be a dataclass with a `finetune` field")
    spec = StageSpec(name, kind or _kind_of(config, name), config, stage, commands, dict(aliases or {}), shards)
    STAGES[name] = spec
    return spec


def _stage_packages() -> list[str]:
    here = Path(__file__).parent
    return sorted(m.name for m in pkgutil.iter_modules([str(here)]) if m.ispkg)


def discover() -> list[StageSpec]:
    """Every declared stage: the stage packages under medvlp/finetune/ are imported (their declarations only)."""
    for mod in _stage_packages():
        importlib.import_module(f"medvlp.finetune.{mod}")
    return [STAGES[n] for n in sorted(STAGES)]


def known_stages() -> list[str]:
    """The names of every declared stage."""
    return [s.name for s in discover()]


def stage_spec(name: str) -> StageSpec:
    """The declaration of stage `name`; ValueError naming the known stages (and the nearest) otherwise."""
    if name not in STAGES:
        discover()
    if name not in STAGES:
        import difflib

        known = sorted(STAGES)
        near = difflib.get_close_matches(name, known, n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise ValueError(f"finetune stage {name!r} is not known{hint}; known: {', '.join(known) or '(none)'}")
    return STAGES[name]


def get_stage(name: str) -> tuple[type, Callable[[], Any]]:
    """(root config class, Stage factory) of stage `name`."""
    spec = stage_spec(name)
    return spec.root(), spec.factory()


def spec_for_kind(kind: str) -> StageSpec | None:
    """The declaration of the stage whose recipes say ``kind: <kind>`` (None: no such stage)."""
    return next((s for s in STAGES.values() if s.kind == kind), None) or next(
        (s for s in discover() if s.kind == kind), None)


def root_for_kind(kind: str) -> type | None:
    """The root config class of the stage whose recipes say ``kind: <kind>`` (None: no such stage)."""
    spec = spec_for_kind(kind)
    return spec.root() if spec is not None else None


def stage_kinds() -> list[str]:
    return [s.kind for s in discover()]


register_root_finder(root_for_kind, stage_kinds)
register_stage_finder(spec_for_kind)  # the runner checks a stage's shards against its declaration


def load_stage_config(stage: str, recipe: str | None, overrides: list[str]):
    """(root config, Stage factory) of fine-tune `stage` from a recipe (its `kind` must be the stage's) + overrides."""
    try:
        spec = stage_spec(stage)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    doc = load_recipe_dict(recipe) if recipe else {}
    have = doc.get("kind")
    if have is not None and have != spec.kind:
        raise ConfigError(f"kind: the recipe is for {have!r}, but `medvlp finetune {stage}` needs kind: {spec.kind}")
    return build(spec.root(), apply_overrides(doc, overrides)), spec.factory()


# ----------------------------------------------------------------------------------------------- the CLI
def keys_epilog(cls: type, what: str = "") -> str:
    """`--help` epilog of a command configured by `cls`: every config key with its doc."""
    return (f"config keys{what} (set with --set KEY=VALUE; the recipe supplies the values):\n" + format_docs(cls))


def stage_keys_epilog(stage: str | None) -> str:
    """`medvlp finetune STAGE --help`: the stage's config keys; without a stage, the runner keys every stage has."""
    if stage:
        try:
            root_cls, _ = get_stage(stage)
        except ValueError as e:
            return f"{e}\n"
        return keys_epilog(root_cls, f" of stage {stage}")
    from medvlp.finetune.runner import RunnerConfig

    keys = "".join(f"finetune.{line}\n" for line in format_docs(RunnerConfig).splitlines())
    return ("config keys of the shared runner, in every stage (set with --set KEY=VALUE); each stage adds its own "
            "(model, data, loss, eval, tracking): `medvlp finetune STAGE --help` lists them all:\n" + keys)


def add_stage_commands(sub: Any, help_cmd: str | None = None) -> None:
    """Add every stage's own commands to the `medvlp` subparsers."""
    for spec in discover():
        spec.add_commands(sub, help_cmd)


def expand_aliases(argv: list[str]) -> list[str]:
    """argv with a stage's alias prefix (``eval few-shot``) rewritten to its command (``eval-few-shot``)."""
    for spec in discover():
        for alias, target in spec.aliases.items():
            words = alias.split()
            if argv[:len(words)] == words:
                return [target] + argv[len(words):]
    return argv


def command_line() -> str:
    """The command as typed (``medvlp ...``), for the tables and indexes a command writes."""
    import shlex
    import sys

    return "medvlp " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def lazy_exports(module: str, table: dict[str, str]):
    """A module `__getattr__` that imports each name of `table` (name -> module path) on first use, so that a
    stage's package can declare the stage without importing its model code."""
    def __getattr__(name: str):
        if name in table:
            import importlib

            return getattr(importlib.import_module(table[name]), name)
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    return __getattr__
