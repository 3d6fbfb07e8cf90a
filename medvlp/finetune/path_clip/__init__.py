"""Path-CLIP: few-label adaptation of a pretrained medvlp model with frozen towers (docs/path_clip.md).

    medvlp finetune path-clip RECIPE --set finetune.checkpoint=RUN --set finetune.shots=4
    medvlp eval few-shot RECIPE --set finetune.checkpoint=RUN

Modules: model (RFR adapter, perturbation, self-adaptive residual ratio), loss (DVC NT-Xent, prompt loss),
sampling (label budgets), data (task, splits, views), stage (the runner's Stage), protocol (the table), metrics.
"""
from medvlp.finetune import register_stage
from medvlp.finetune.path_clip.config import PathCLIPConfig
from medvlp.finetune.path_clip.stage import PathCLIPStage

register_stage("path-clip", PathCLIPConfig, PathCLIPStage)
