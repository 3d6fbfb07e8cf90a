"""PCAM pooling: weakly supervised localisation of findings from image-level labels (`medvlp finetune pcam`).

model.py    PcamHead: per-finding 1x1 conv heads, avg | max | lse | pcam pooling
loss.py     uncertain-label policies, multi-label BCE (batch-adaptive positive weight)
heatmap.py  heatmaps, thresholded connected-component boxes, PNG overlays
metrics.py  AUC per finding, pointing game, IoU and localisation accuracy at IoU thresholds
stage.py    the Stage on the fine-tune runner;  config.py  the `kind: pcam` root
localize.py `medvlp localize`;  compare.py  the pooling comparison table
"""
from medvlp.finetune import register_stage
from medvlp.finetune.pcam.config import PcamConfig
from medvlp.finetune.pcam.stage import PcamStage

register_stage("pcam", PcamConfig, PcamStage)

__all__ = ["PcamConfig", "PcamStage"]
