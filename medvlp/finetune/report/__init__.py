"""Report generation from whole-slide feature bags (HistoGPT-style): Perceiver resampler over the patch-feature bag,
a causal LM with gated cross-attention to the resampled latents, two training stages on the fine-tune runner.

    medvlp finetune report RECIPE --set finetune.stage=1      # MIL classification through the resampler
    medvlp finetune report RECIPE --set finetune.stage=2 --set finetune.init=RUN1   # report generation
    medvlp generate --checkpoint RUN2 --shards SLIDES --out reports.jsonl
    medvlp report eval --checkpoint RUN2 --shards SLIDES     # table vs the template and retrieval baselines
"""
from medvlp.data_shards.require import ShardNeed
from medvlp.finetune.registry import lazy_exports, register_stage

register_stage("report", "medvlp.finetune.report.config:ReportConfig", "medvlp.finetune.report.stage:ReportStage",
               kind="report", commands="medvlp.finetune.report.commands:add_commands",
               shards=ShardNeed(("slide",), what="whole-slide feature bags: `medvlp features extract` writes them"))

_LAZY = {"ReportConfig": "medvlp.finetune.report.config", "ReportStage": "medvlp.finetune.report.stage"}
__getattr__ = lazy_exports(__name__, _LAZY)  # the classes load on first use
__all__ = ["ReportConfig", "ReportStage"]
