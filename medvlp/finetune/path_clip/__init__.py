"""Path-CLIP: few-label adaptation of a pretrained medvlp model with frozen towers (docs/path_clip.md).

    medvlp finetune path-clip RECIPE --set finetune.checkpoint=RUN --set finetune.shots=4
    medvlp eval few-shot RECIPE --set finetune.checkpoint=RUN

Modules: model (RFR adapter, perturbation, self-adaptive residual ratio), loss (DVC NT-Xent, prompt loss),
sampling (label budgets), data (task, splits, views), stage (the runner's Stage), protocol (the table), metrics.
"""
from medvlp.data_shards.require import ShardNeed
from medvlp.finetune.registry import lazy_exports, register_stage

register_stage("path-clip", "medvlp.finetune.path_clip.config:PathCLIPConfig",
               "medvlp.finetune.path_clip.stage:PathCLIPStage", kind="path_clip",
               commands="medvlp.finetune.path_clip.commands:add_commands", aliases={"eval few-shot": "eval-few-shot"},
               shards=ShardNeed(("patho", "cxr"), what="2D images of the labelled task", keys=("shards",)))

_LAZY = {"PathCLIPConfig": "medvlp.finetune.path_clip.config", "PathCLIPStage": "medvlp.finetune.path_clip.stage"}
__getattr__ = lazy_exports(__name__, _LAZY)  # the classes load on first use
__all__ = ["PathCLIPConfig", "PathCLIPStage"]
