"""Report generation from whole-slide feature bags (HistoGPT-style): Perceiver resampler over the patch-feature bag,
a causal LM with gated cross-attention to the resampled latents, two training stages on the fine-tune runner.

    medvlp finetune report RECIPE --set finetune.stage=1      # MIL classification through the resampler
    medvlp finetune report RECIPE --set finetune.stage=2 --set finetune.init=RUN1   # report generation
    medvlp generate --checkpoint RUN2 --shards SLIDES --out reports.jsonl
    medvlp report eval --checkpoint RUN2 --shards SLIDES     # table vs the template and retrieval baselines
"""
from medvlp.finetune.report.config import ReportConfig
from medvlp.finetune.report.stage import ReportStage

__all__ = ["ReportConfig", "ReportStage"]

try:
    from medvlp.finetune import register_stage
except ImportError:  # pragma: no cover - a runner without the stage registry
    register_stage = None
if register_stage is not None:
    register_stage("report", ReportConfig, ReportStage)
