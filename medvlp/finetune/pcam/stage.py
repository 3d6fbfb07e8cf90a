"""The PCAM stage on the fine-tune runner: model = image tower + `PcamHead`, per-finding BCE, localisation eval.

    cfg = load_config("pcam-synth")                 # kind: pcam
    result = run_stage(PcamStage(), cfg)            # medvlp finetune pcam RECIPE

The image tower comes from `finetune.checkpoint` (`pretrain.load_pretrained`) or, without one, is the registry
model `head.model` with random weights. Its `VisionTokens` map `head.feature_level` feeds the head; tower
parameters that do not reach that map (the text tower is dropped; a ResNet's later stages and attention pool
when an earlier map is used; a ViT's class-token projection) are frozen, so DDP sees only parameters that get
gradients. `head.backbone: frozen` freezes the whole tower.

The run folder gets `pcam_model.json` (the tower's architecture, the findings, the map level, the image size and
modality) beside the runner's `model.safetensors`, which is everything `medvlp localize` needs.

Shape legend: B batch, K findings, h/w feature-map grid, S view side (the model's input size).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from medvlp.finetune.pcam.config import PcamConfig, policies_for
from medvlp.finetune.pcam.heatmap import components, heatmaps, overlay_png
from medvlp.finetune.pcam.loss import apply_uncertain, multilabel_bce
from medvlp.finetune.pcam.metrics import LocalisationMeter, ground_truth_from_batch
from medvlp.finetune.pcam.model import PcamHead
from medvlp.finetune.runner import StageContext

log = logging.getLogger("medvlp.finetune.pcam")
MODEL_META = "pcam_model.json"
ITEMS_FILE = "eval_items.npz"  # the final evaluation's rows and localisation cases (`LocalisationMeter.cases`)


class PcamModel(nn.Module):
    """Image tower -> its `VisionTokens` map at `feature_level` (B, C, h, w) -> `PcamHead` (logits, logit maps)."""

    def __init__(self, visual: nn.Module, head: PcamHead, feature_level: int = -1) -> None:
        super().__init__()
        self.visual, self.head, self.feature_level = visual, head, int(feature_level)

    def features(self, image_BCHW: torch.Tensor) -> torch.Tensor:
        _, tokens = self.visual(image_BCHW, return_tokens=True)
        if tokens.kind == "resnet3d":
            raise ValueError("PCAM pooling needs a 2D image tower; this model's tower is 3D")
        return tokens.maps[self.feature_level]

    def forward(self, image_BCHW: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.head(self.features(image_BCHW))
        return {"logits": out.logits, "maps": out.maps}


# ------------------------------------------------------------------------------------------------ building
def _level_check(n_maps: int, level: int) -> None:
    if not -n_maps <= level < n_maps:
        raise ValueError(f"head.feature_level: {level} is out of range for a tower with {n_maps} token maps "
                         f"(use -{n_maps}..{n_maps - 1})")


def probe_visual(visual: nn.Module, image_size: int, level: int) -> tuple[int, list[str]]:
    """(channels of the chosen map, names of tower parameters that do not reach it) from one dummy pass."""
    was = visual.training
    visual.eval()
    x = torch.zeros(1, 3, image_size, image_size, device=next(visual.parameters()).device)
    with torch.enable_grad():
        _, tokens = visual(x, return_tokens=True)
        if tokens.kind == "resnet3d":
            raise ValueError("PCAM pooling needs a 2D image tower; this model's tower is 3D")
        _level_check(len(tokens.maps), level)
        feat = tokens.maps[level]
        saved = {n: p.requires_grad for n, p in visual.named_parameters()}
        for p in visual.parameters():
            p.requires_grad_(True)
            p.grad = None
        feat.float().sum().backward()
    unused = [n for n, p in visual.named_parameters() if p.grad is None]
    for n, p in visual.named_parameters():
        p.grad = None
        p.requires_grad_(saved[n])
    visual.train(was)
    return int(feat.shape[1]), unused


def build_pcam_model(visual: nn.Module, image_size: int, n_findings: int, head_cfg) -> tuple[PcamModel, list[str]]:
    """PcamModel over `visual`; -> (model, names of tower parameters frozen because they do not reach the map)."""
    channels, unused = probe_visual(visual, image_size, head_cfg.feature_level)
    head = PcamHead(channels, n_findings, pooling=head_cfg.pooling, lse_r=head_cfg.lse_r,
                    batchnorm=head_cfg.batchnorm, dropout=head_cfg.dropout)
    return PcamModel(visual, head, head_cfg.feature_level), unused


def _write_meta(out_dir: str, meta: dict) -> None:
    path = Path(out_dir) / MODEL_META
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, path)


def _is_main() -> bool:
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) \
        or torch.distributed.get_rank() == 0


# ------------------------------------------------------------------------------------------------ the stage
class PcamStage:
    """`medvlp.finetune.runner.Stage` for PCAM pooling (see the module doc)."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.policies: list[str] = []
        self.pos_weight_K: torch.Tensor | None = None
        self.batch_weight = True

    # -- data
    def _data(self, cfg: PcamConfig, members: list[str]):
        return dataclasses.replace(cfg.data, batch_size=cfg.finetune.batch_size, members=members)

    def batches(self, cfg: PcamConfig, split: str, ctx: StageContext, epoch: int = 0, start_step: int = 0):
        from medvlp.data_shards.stream import make_loader

        train = split == "train"
        members = ["boxes"] if not train and cfg.eval.boxes else []  # ground truth only where it is scored
        return make_loader(self._data(cfg, members), rank=ctx.rank, world_size=ctx.world_size, epoch=epoch,
                           start_step=start_step, train=train, split=None if train else split)

    def _label_names(self, cfg: PcamConfig) -> list[str]:
        from medvlp.data_shards.stream import resolve_shards

        return list(resolve_shards(cfg.data.train_shards, cfg.data.split, cfg.data.index).label_names)

    # -- model
    def build(self, pretrained: Any, cfg: PcamConfig) -> nn.Module:
        from medvlp.pretrain.model import MedCLIP
        from medvlp.pretrain.registry import get_model_config

        if not cfg.data.train_shards:
            raise ValueError("data.train_shards: empty; point it at the training shards")
        available = self._label_names(cfg)
        names = list(cfg.head.findings) or available
        missing = [n for n in names if n not in available]
        if missing:
            raise ValueError(f"head.findings: {missing} are not labels of {cfg.data.train_shards} "
                             f"(labels: {', '.join(available)})")
        cfg.head.findings = names  # the resolved list goes into the run's config.yaml
        self.names, self.policies = names, policies_for(cfg.loss, names)
        self.batch_weight = cfg.loss.batch_weight
        if cfg.loss.pos_weight:
            bad = [k for k in cfg.loss.pos_weight if k not in names]
            if bad:
                raise ValueError(f"loss.pos_weight: {bad} are not findings of this run ({', '.join(names)})")
            self.pos_weight_K = torch.tensor([cfg.loss.pos_weight.get(n, 1.0) for n in names])
        if pretrained is not None:
            clip, modality = pretrained.model, pretrained.modality
        else:
            clip, modality = MedCLIP(get_model_config(cfg.head.model)), cfg.data.modality
        if clip.image_kind != "2d":
            raise ValueError("finetune.checkpoint: PCAM pooling needs a 2D image tower; this model's tower is 3D")
        if int(clip.image_size) != cfg.data.image_size:
            raise ValueError(f"data.image_size: {cfg.data.image_size}, but the model {clip.name!r} takes "
                             f"{clip.image_size}x{clip.image_size} images")
        model, unused = build_pcam_model(clip.visual, int(clip.image_size), len(names), cfg.head)
        for n, p in model.visual.named_parameters():
            if cfg.head.backbone == "frozen" or n in unused:
                p.requires_grad_(False)
        if unused:
            log.info("%d tower tensors do not reach the feature map and are frozen (%s, ...)", len(unused),
                     ", ".join(unused[:3]))
        if _is_main():
            _write_meta(cfg.finetune.out_dir, {
                "spec": {k: clip.spec[k] for k in ("embed_dim", "vision") if k in clip.spec},
                "model": clip.name, "findings": names, "feature_level": cfg.head.feature_level,
                "image_size": int(clip.image_size), "modality": modality,
                "head": dataclasses.asdict(cfg.head), "threshold": cfg.eval.threshold})
        return model

    # -- loss
    def columns(self, batch: dict) -> torch.Tensor:
        """The batch's labels (B, K_all) reordered to this run's findings (B, K)."""
        have = list(batch["label_names"])
        try:
            idx = [have.index(n) for n in self.names]
        except ValueError:
            raise ValueError(f"batch labels {have} lack a finding of this run {self.names}") from None
        return batch["labels"][:, idx]

    def loss(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
        out = model(batch["image"])
        target, counted = apply_uncertain(self.columns(batch), self.policies)
        loss, per_K = multilabel_bce(out["logits"], target, counted, batch_weight=self.batch_weight,
                                     pos_weight_K=self.pos_weight_K)
        return loss, {f"bce/{n}": float(v) for n, v in zip(self.names, per_K.tolist())}

    # -- evaluation
    def _has_split(self, cfg: PcamConfig, split: str) -> bool:
        from medvlp.data_shards.stream import resolve_shards

        if not split:
            return False
        try:
            resolve_shards(cfg.data.val_shards or cfg.data.train_shards, split, cfg.data.index)
        except (ValueError, FileNotFoundError):
            return False
        return True

    def _score(self, model: nn.Module, cfg: PcamConfig, split: str, thresholds, threshold: float,
               overlays: int = 0) -> tuple[LocalisationMeter, list]:
        """Heatmaps, boxes and logits of `split` into a meter (boxes at every threshold); the first `overlays`
        (image, present finding) pairs for drawing."""
        from medvlp.data_shards.members import boxes_to_view

        meter = LocalisationMeter(self.names, threshold, thresholds=thresholds)
        device = next(model.parameters()).device
        shown: list[tuple[torch.Tensor, torch.Tensor, list, str]] = []
        for i, batch in enumerate(self.batches(cfg, split, StageContext())):
            if cfg.eval.max_batches and i >= cfg.eval.max_batches:
                break
            img = batch["image"].to(device)
            out = model(img)
            S = int(img.shape[-1])
            heat_BKHW = heatmaps(out["maps"].float(), (S, S)).cpu()
            if cfg.eval.boxes:
                boxes = boxes_to_view(batch["boxes"], batch["boxes_image_hw"], S)
                gt = ground_truth_from_batch(boxes, batch["boxes_count"], self._remap(batch))
            else:
                gt = [[] for _ in batch["key"]]
            labels = self.columns(batch)
            meter.update(out["logits"].float().cpu(), labels, heat_BKHW, gt, keys=batch["key"])
            for b, items in enumerate(gt):
                for k in sorted({k for k, _ in items}):
                    if len(shown) < overlays and float(labels[b, k]) == 1:
                        shown.append((img[b].cpu(), heat_BKHW[b, k], [bx for kk, bx in items if kk == k],
                                      f"{batch['key'][b]}_{self.names[k]}"))
        return meter, shown

    def evaluate(self, model: nn.Module, cfg: PcamConfig, ctx: StageContext) -> dict:
        """Periodic evaluations (step < finetune.steps) measure on `eval.val_split`; the final one picks the box
        threshold on `eval.val_split` (best mean IoU among `eval.thresholds`), then reads `eval.split` once and
        reports it at that threshold (metric `threshold`; `threshold_from_val` 1 or 0), writing every case to
        OUT/eval_items.npz for paired comparisons."""
        step, tracker = ctx.step, ctx.tracker
        final = step is None or step >= cfg.finetune.steps
        has_val = self._has_split(cfg, cfg.eval.val_split)
        if not final:
            split = cfg.eval.val_split if has_val else cfg.eval.split
            meter, _ = self._score(model, cfg, split, [], cfg.eval.threshold)
            return meter.summary()
        threshold, from_val = cfg.eval.threshold, 0.0
        if cfg.eval.boxes and cfg.eval.thresholds and has_val:
            val, _ = self._score(model, cfg, cfg.eval.val_split, cfg.eval.thresholds, cfg.eval.threshold)
            threshold, from_val = val.best_threshold("iou_mean"), 1.0
        elif cfg.eval.boxes and cfg.eval.thresholds:
            log.warning("eval.val_split %r has no samples: boxes use the fixed eval.threshold %.2f",
                        cfg.eval.val_split, cfg.eval.threshold)
        meter, shown = self._score(model, cfg, cfg.eval.split, cfg.eval.thresholds, threshold, cfg.eval.overlays)
        if shown and ctx.is_main:
            self._overlays(cfg, [(img, heat, gt, components(heat, threshold)[:1], name)
                                 for img, heat, gt, name in shown], step, tracker)
        if ctx.is_main:
            self._write_items(cfg, meter, threshold, from_val)
        return {**meter.summary(threshold), "threshold": float(threshold), "threshold_from_val": from_val}

    def _write_items(self, cfg: PcamConfig, meter: LocalisationMeter, threshold: float, from_val: float) -> None:
        path = Path(cfg.finetune.out_dir) / ITEMS_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
        np.savez_compressed(tmp, **meter.cases(), threshold=np.float64(threshold),
                            threshold_from_val=np.float64(from_val), split=np.asarray(cfg.eval.split))
        os.replace(tmp, path)
        meta_path = Path(cfg.finetune.out_dir) / MODEL_META
        if meta_path.is_file():  # `medvlp localize` defaults to the threshold chosen on validation
            meta = json.loads(meta_path.read_text())
            meta.update(threshold=float(threshold), threshold_from_val=bool(from_val))
            _write_meta(cfg.finetune.out_dir, meta)

    def _remap(self, batch: dict) -> torch.Tensor:
        """boxes_label (index into the data set's label names) -> index into this run's findings (-1 = other)."""
        have = list(batch["label_names"])
        lut = torch.tensor([self.names.index(n) if n in self.names else -1 for n in have] + [-1])
        lab = batch["boxes_label"]
        return lut[torch.where(lab >= 0, lab, torch.full_like(lab, len(have)))]

    def _overlays(self, cfg: PcamConfig, shown, step: int | None, tracker: Any) -> None:
        folder = Path(cfg.finetune.out_dir) / "overlays" / (f"step_{step:06d}" if step is not None else "final")
        for j, (img, heat, gt, comp, name) in enumerate(shown):
            safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
            overlay_png(img, heat, folder / f"{j:02d}_{safe}.png", boxes=[c["box"] for c in comp], gt_boxes=gt)
        if tracker is not None:
            tracker.log_artifact(folder, f"overlays/{folder.name}")
