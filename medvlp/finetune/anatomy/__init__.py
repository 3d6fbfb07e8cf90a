"""ViSD-Boost anatomy normality modelling for CT vision-language learning (docs/anatomy.md).

Registers the stage `anatomy` (root config `AnatomyConfig`, recipe `kind: anatomy`) with the fine-tune runner:
`medvlp finetune anatomy RECIPE`.
"""
from medvlp.finetune.registry import register_stage

register_stage("anatomy", "medvlp.finetune.anatomy.config:AnatomyConfig", "medvlp.finetune.anatomy.stage:AnatomyStage",
               kind="anatomy", commands="medvlp.finetune.anatomy.commands:add_commands")

_LAZY = {"AnatomyConfig": "medvlp.finetune.anatomy.config", "AnatomyStage": "medvlp.finetune.anatomy.stage"}
__all__ = ["AnatomyConfig", "AnatomyStage"]


def __getattr__(name: str):  # the stage's classes, imported on first use (declaring the stage imports nothing heavy)
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
