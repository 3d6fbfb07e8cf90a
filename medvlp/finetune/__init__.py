"""Fine-tuning of pretrained medvlp models: the shared `accelerate` runner and the stage registry.

A stage package (`medvlp/finetune/<name>/`) declares itself when imported (`medvlp.finetune.registry`):

    from medvlp.finetune import register_stage
    register_stage("path-clip", "medvlp.finetune.path_clip.config:PathCLIPConfig",
                   "medvlp.finetune.path_clip.stage:PathCLIPStage", kind="path_clip",
                   commands="medvlp.finetune.path_clip.commands:add_commands")

`medvlp finetune <name> RECIPE --set ...` finds the declaration, builds the root config from the recipe and runs
`run_stage(factory(), cfg)`; the stage's own commands (`medvlp eval few-shot`, `medvlp pcam-table`, ...) are added
to the CLI from the same declaration.
"""
from __future__ import annotations

from medvlp.finetune.registry import (STAGES, StageSpec, get_stage, known_stages, load_stage_config, register_stage,
                                      stage_spec)
from medvlp.finetune.runner import (FinetuneResult, RunnerConfig, Stage, StageContext, count_parameters,
                                    freeze_by_pattern, run_stage)

__all__ = ["STAGES", "FinetuneResult", "RunnerConfig", "Stage", "StageContext", "StageSpec", "count_parameters",
           "freeze_by_pattern", "get_stage", "known_stages", "load_stage_config", "register_stage", "run_stage",
           "stage_spec"]
