"""Path-CLIP: few-label adaptation of a pretrained medvlp model with frozen towers (docs/path_clip.md).

    medvlp finetune path-clip RECIPE --set finetune.checkpoint=RUN --set finetune.shots=4
    medvlp eval few-shot RECIPE --set finetune.checkpoint=RUN

Modules: model (RFR adapter, perturbation, self-adaptive residual ratio), loss (DVC NT-Xent, prompt loss),
sampling (label budgets), data (task, splits, views), stage (the runner's Stage), protocol (the table), metrics.
"""
from medvlp.finetune.registry import register_stage

register_stage("path-clip", "medvlp.finetune.path_clip.config:PathCLIPConfig",
               "medvlp.finetune.path_clip.stage:PathCLIPStage", kind="path_clip",
               commands="medvlp.finetune.path_clip.commands:add_commands", aliases={"eval few-shot": "eval-few-shot"})

_LAZY = {"PathCLIPConfig": "medvlp.finetune.path_clip.config", "PathCLIPStage": "medvlp.finetune.path_clip.stage"}
__all__ = ["PathCLIPConfig", "PathCLIPStage"]


def __getattr__(name: str):  # the stage's classes, imported on first use (declaring the stage imports nothing heavy)
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
