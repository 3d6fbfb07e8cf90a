"""Fine-tuning of pretrained medvlp models: the shared `accelerate` runner and the stage registry.

A stage package (`medvlp/finetune/<name>/`) registers itself when imported:

    from medvlp.finetune import register_stage
    register_stage("path-clip", PathClipConfig, PathClipStage)   # CLI name, root config class, Stage factory

`medvlp finetune <name> RECIPE --set ...` imports `finetune.<name with - as _>` on demand, builds the root config
from the recipe and runs `run_stage(factory(), cfg)`.
"""
from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path
from typing import Any, Callable

from medvlp.finetune.runner import (FinetuneResult, RunnerConfig, Stage, count_parameters, freeze_by_pattern,
                             run_stage)

__all__ = ["STAGES", "FinetuneResult", "RunnerConfig", "Stage", "count_parameters", "freeze_by_pattern",
           "get_stage", "known_stages", "register_stage", "run_stage"]

# CLI name -> (root config class, Stage factory taking no arguments)
STAGES: dict[str, tuple[type, Callable[[], Any]]] = {}


def register_stage(name: str, root_cls: type, factory: Callable[[], Any]) -> None:
    """Make `medvlp finetune NAME` run `factory()` with a `root_cls` config (a dataclass with a `finetune` field)."""
    import dataclasses

    if not dataclasses.is_dataclass(root_cls) or "finetune" not in {f.name for f in dataclasses.fields(root_cls)}:
        raise TypeError(f"register_stage({name!r}): {root_cls!r} must be a dataclass with a `finetune` field")
    STAGES[name] = (root_cls, factory)


def _module_name(name: str) -> str:
    return name.replace("-", "_")


def known_stages() -> list[str]:
    """Registered stage names plus the stage packages present under medvlp/finetune/ (not imported)."""
    here = Path(__file__).parent
    found = {m.name.replace("_", "-") for m in pkgutil.iter_modules([str(here)]) if m.ispkg and m.name != "common"}
    return sorted(found | set(STAGES))


def get_stage(name: str) -> tuple[type, Callable[[], Any]]:
    """(root config class, factory) of stage `name`, importing `finetune.<name>` when it is not registered yet."""
    if name not in STAGES:
        mod = _module_name(name)
        if (Path(__file__).parent / mod).is_dir():
            importlib.import_module(f"medvlp.finetune.{mod}")
    if name not in STAGES:
        known = known_stages()
        import difflib

        near = difflib.get_close_matches(name, known, n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise ValueError(f"finetune stage {name!r} is not known{hint}; known: {', '.join(known) or '(none)'}")
    return STAGES[name]
