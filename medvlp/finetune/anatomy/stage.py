"""The anatomy stage on the fine-tune runner: build / loss / batches / evaluate (docs/anatomy.md).

    medvlp finetune anatomy anatomy-synth --set finetune.checkpoint=runs/ct3d      # from a pretrained 3D run
    medvlp finetune anatomy anatomy-synth                                          # from scratch (model.name)

Batches come from the shard stream (CT volume, organ label map, members organ_labels + organ_sentences). Per micro
batch the distinct organ sentences are tokenised once; the wrapped model's forward computes every loss.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn as nn

from medvlp.finetune.anatomy.evaluate import check_organ_names, evaluate_organs, organ_thresholds
from medvlp.finetune.anatomy.losses import sentence_key
from medvlp.finetune.anatomy.model import AnatomyModel
from medvlp.finetune.runner import StageContext

if TYPE_CHECKING:
    from medvlp.finetune.anatomy.config import AnatomyConfig


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


@dataclass
class CTTransform:
    """Sample -> {"volume" (1, D, H, W) in [-1, 1], "mask" (D, H, W)}: the stream's CT view with a chosen HU window
    (the stage default is the abdominal soft-tissue window, where organ lesions have contrast), resized to
    `volume_size` (trilinear volume, nearest mask), with the stream's random intensity jitter when training. A mask
    stored with source labels and an `organ_label_map` (a TotalSegmentator mask merged by the manifest's
    organ_merge) is relabelled to the sample's organ_names first. Picklable for loader workers."""

    window: tuple[float, float]
    volume_size: tuple[int, ...] | None = None
    train: bool = False

    def __call__(self, s, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        from medvlp.data_shards.transforms import RandIntensity3D, hu_window, resize_volume

        from medvlp.data_shards.require import missing_mask_reason

        why = missing_mask_reason(s, "anatomy")
        if why:  # the stream skips and counts this sample, logging the reason with its key
            raise ValueError(why)
        vol = hu_window(s.volume, self.window)
        m = s.mask
        if (s.extra or {}).get("organ_label_map"):  # source labels merged into the organs (readers.totalseg)
            from medvlp.data_shards.readers.totalseg import relabel

            m = relabel(m, s.extra["organ_label_map"])
        mask = torch.from_numpy(m.astype(np.int64))
        if mask.shape != vol.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} != volume shape {tuple(vol.shape)}")
        vol, mask = resize_volume(vol, mask, self.volume_size)
        if self.train:
            vol, mask = RandIntensity3D()((vol, mask), rng)
        return {"volume": vol.contiguous()[None], "mask": mask.contiguous()}


def ct_transform(cfg: AnatomyConfig, train: bool) -> CTTransform:
    size = tuple(cfg.data.volume_size) if cfg.data.volume_size else None
    return CTTransform((float(cfg.window[0]), float(cfg.window[1])), size, train and cfg.data.augment)


def data_config(cfg: AnatomyConfig, train: bool):
    bs = cfg.finetune.batch_size if train else cfg.eval.batch_size
    return dataclasses.replace(cfg.data, batch_size=bs)


def data_organ_names(cfg: AnatomyConfig) -> list[str]:
    """The organ names stored with the training samples (the first sample's organ_names)."""
    from medvlp.data_shards.stream import make_loader

    dc = dataclasses.replace(cfg.data, batch_size=1, workers=0, shuffle_buffer=0, resampled=False)
    for batch in make_loader(dc, train=False, split=cfg.data.split):
        return list(batch["organ_names"])
    raise ValueError(f"data.train_shards: no {cfg.data.split} samples in {cfg.data.train_shards}")


def text_inputs(tokenizer, sentences: list[list[str]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens (U, L) of the distinct sentences, index (B, O)); sentences equal up to case/spacing/period share one."""
    keys: dict[str, int] = {}
    first: list[str] = []
    index = []
    for row in sentences:
        ids = []
        for s in row:
            k = sentence_key(s)
            if k not in keys:
                keys[k] = len(first)
                first.append(s)
            ids.append(keys[k])
        index.append(ids)
    return tokenizer(first), torch.tensor(index, dtype=torch.long)


class AnatomyStage:
    """Stage protocol of `medvlp.finetune.runner` for ViSD-Boost anatomy normality modelling."""

    # An organ absent from every volume of a batch, or a batch without normal organs for the VQ-VAE, leaves those
    # parameters without a gradient in that step: DDP (several processes) must look for unused parameters.
    find_unused_parameters = True

    def build(self, pretrained: Any, cfg: AnatomyConfig) -> nn.Module:
        cfg.validate()
        if not cfg.data.train_shards:
            raise ValueError("data.train_shards: empty; point it at CT shards with organ masks")

        if pretrained is not None:
            clip = pretrained.model
        else:
            from medvlp.pretrain.model import build_model

            clip = build_model(cfg.model)
        if getattr(clip, "image_kind", "") != "3d":
            raise ValueError(f"anatomy: model {getattr(clip, 'name', '?')!r} has a 2D vision tower; the stage needs "
                             "a 3D tower (a pretrained CT run or model.name: debug-3d)")
        names = list(cfg.organs) or data_organ_names(cfg)
        cfg.organs = names  # resolved into the run's config.yaml
        return AnatomyModel(clip, names, cfg.head)

    def loss(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
        inner = _unwrap(model)
        check_organ_names(batch, inner.organ_names)
        tokens, index = text_inputs(inner.tokenizer, batch["organ_sentences"])
        dev = batch["volume"].device
        normal = batch["organ_labels"] == 0
        return model(batch["volume"], batch["mask"], normal, tokens.to(dev), index.to(dev))

    def batches(self, cfg: AnatomyConfig, split: str, ctx: StageContext, epoch: int = 0, start_step: int = 0):
        from medvlp.data_shards.stream import make_loader

        train = split == "train"
        return make_loader(data_config(cfg, train), rank=ctx.rank, world_size=ctx.world_size, epoch=epoch, start_step=start_step,
                           train=train, split=None if train else split, transform=ct_transform(cfg, train))

    def evaluate(self, model: nn.Module, cfg: AnatomyConfig, ctx: StageContext) -> dict:
        """Zero-shot metrics on eval.split; the operating points (accuracy / sensitivity / specificity) are picked
        on eval.threshold_split (validation) and applied unchanged. The per-item scores go to
        OUT/eval_scores.npz (labels, scores, present, keys) for paired comparisons across runs."""
        from medvlp.data_shards.stream import make_loader

        e = cfg.eval
        inner = _unwrap(model)
        kw = dict(max_samples=e.max_samples, prompts=e.prompts or None, normal_template=e.normal_template,
                  abnormal_template=e.abnormal_template)

        def loader(split):
            return make_loader(data_config(cfg, False), train=False, split=split, transform=ct_transform(cfg, False))

        thresholds = None
        if e.threshold_split and e.threshold_split != e.split:
            val: dict = {}
            evaluate_organs(inner, loader(e.threshold_split), scores_out=val, **kw)
            thresholds = organ_thresholds(val["labels"], val["scores"], val["present"], inner.organ_names)
        scores: dict = {}
        out = evaluate_organs(inner, loader(e.split), thresholds=thresholds, scores_out=scores, **kw)
        if thresholds is not None:
            out.update({f"threshold/{k}": v for k, v in thresholds.items()})
        od = Path(cfg.finetune.out_dir)
        od.mkdir(parents=True, exist_ok=True)
        np.savez(od / "eval_scores.npz", organs=np.asarray(inner.organ_names), **scores)
        return out
