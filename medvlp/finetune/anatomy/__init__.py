"""ViSD-Boost anatomy normality modelling for CT vision-language learning (docs/anatomy.md).

Registers the stage `anatomy` (root config `AnatomyConfig`, recipe `kind: anatomy`) with the fine-tune runner:
`medvlp finetune anatomy RECIPE`.
"""
from medvlp.data_shards.require import ShardNeed
from medvlp.finetune.registry import lazy_exports, register_stage

register_stage("anatomy", "medvlp.finetune.anatomy.config:AnatomyConfig", "medvlp.finetune.anatomy.stage:AnatomyStage",
               kind="anatomy", commands="medvlp.finetune.anatomy.commands:add_commands",
               shards=ShardNeed(("ct",), masks=True, what="CT volumes with organ masks"))

_LAZY = {"AnatomyConfig": "medvlp.finetune.anatomy.config", "AnatomyStage": "medvlp.finetune.anatomy.stage"}
__getattr__ = lazy_exports(__name__, _LAZY)  # the classes load on first use
__all__ = ["AnatomyConfig", "AnatomyStage"]
