"""ViSD-Boost anatomy normality modelling for CT vision-language learning (docs/anatomy.md).

Registers the stage `anatomy` (root config `AnatomyConfig`, recipe `kind: anatomy`) with the fine-tune runner:
`medvlp finetune anatomy RECIPE`.
"""
from medvlp.finetune import register_stage
from medvlp.finetune.anatomy.config import AnatomyConfig
from medvlp.finetune.anatomy.stage import AnatomyStage

register_stage("anatomy", AnatomyConfig, AnatomyStage)

__all__ = ["AnatomyConfig", "AnatomyStage"]
