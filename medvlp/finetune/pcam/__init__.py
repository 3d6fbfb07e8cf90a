"""PCAM pooling: weakly supervised localisation of findings from image-level labels (`medvlp finetune pcam`).

model.py    PcamHead: per-finding 1x1 conv heads, avg | max | lse | pcam pooling
loss.py     uncertain-label policies, multi-label BCE (batch-adaptive positive weight)
heatmap.py  heatmaps, thresholded connected-component boxes, PNG overlays
metrics.py  AUC per finding, pointing game, IoU and localisation accuracy at IoU thresholds
stage.py    the Stage on the fine-tune runner;  config.py  the `kind: pcam` root
localize.py `medvlp localize`;  compare.py  the pooling comparison table
commands.py the stage's CLI commands: localize, pcam-table, pcam-corpus
"""
from medvlp.data_shards.require import ShardNeed
from medvlp.finetune.registry import lazy_exports, register_stage

register_stage("pcam", "medvlp.finetune.pcam.config:PcamConfig", "medvlp.finetune.pcam.stage:PcamStage", kind="pcam",
               commands="medvlp.finetune.pcam.commands:add_commands",
               shards=ShardNeed(("cxr", "patho"), what="2D images: PCAM localises findings in them"))

_LAZY = {"PcamConfig": "medvlp.finetune.pcam.config", "PcamStage": "medvlp.finetune.pcam.stage"}
__getattr__ = lazy_exports(__name__, _LAZY)  # the classes load on first use
__all__ = ["PcamConfig", "PcamStage"]
