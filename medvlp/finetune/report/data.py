"""Slide bags for the report stage, from slide-bag shards (`feats.npy` + `coords.npy` + report + json) through the
project's stream: training batches are streamed (resampled, shuffled, split by rank, resumable at a step);
evaluation splits are read once, in index order, and kept in memory (`SlideSplit`).

A batch: feats (B, N, D) zero padded, feats_mask (B, N), coords (B, N, 2), class_index (B,), composition (B, T) with
composition_names, text (B reports), key.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from medvlp.data_shards.config import DataConfig
from medvlp.data_shards.stream import make_loader, resolve_shards
from medvlp.data_shards.transforms import collate_bags

MEMBERS = ["class_index", "composition"]


def data_config(dc: DataConfig, batch_size: int, seed: int | None = None) -> DataConfig:
    """The stage's stream config: slide modality, the ground-truth members it scores against."""
    members = list(dict.fromkeys(list(dc.members) + MEMBERS))
    kw = dict(modality="slide", batch_size=batch_size, members=members)
    if seed is not None:
        kw["seed"] = seed
    return dataclasses.replace(dc, **kw)


def class_names(dc: DataConfig, split: str = "train") -> list[str]:
    names = resolve_shards(dc.train_shards, split, dc.index).label_names
    if not names:
        raise ValueError(f"data.train_shards: {dc.train_shards} lists no label_names (the slide classes) in index.json")
    return names


def train_batches(dc: DataConfig, batch_size: int, seed: int, rank: int, world: int, epoch: int, start_step: int):
    """This rank's streamed training batches of one epoch (from `start_step`)."""
    cfg = data_config(dc, batch_size, seed)
    yield from make_loader(cfg, rank=rank, world_size=world, epoch=epoch, start_step=start_step, train=True,
                           split="train")


@dataclass
class SlideSplit:
    """One split held in memory: per-slide bags (capped like the eval stream), reports and ground truth."""

    keys: list[str]
    feats: list[torch.Tensor]  # (N_i, D) each
    coords: list[torch.Tensor]  # (N_i, 2) each
    texts: list[str]
    class_index: np.ndarray  # (S,)
    composition: np.ndarray  # (S, T) fractions
    tissues: list[str]  # composition names (T)
    classes: list[str]  # class names

    def __len__(self) -> int:
        return len(self.keys)

    def batches(self, batch_size: int):
        """(feats_BND, mask_BN, coords_BN2) of consecutive slides."""
        for i in range(0, len(self), batch_size):
            yield collate_bags(self.feats[i:i + batch_size], self.coords[i:i + batch_size])


_SPLITS: dict[tuple, SlideSplit] = {}


def load_split(dc: DataConfig, split: str, max_samples: int = 0, shards: str | None = None,
               ground_truth: bool = True) -> SlideSplit:
    """All slides of `split` (at most `max_samples`, 0 = all) in index order, cached per process. Without
    `ground_truth` the class index and composition are not read (zeros): slides that store neither still load."""
    spec = shards or dc.train_shards
    key = (str(spec), split, max_samples, dc.max_patches, dc.index, ground_truth)
    if key in _SPLITS:
        return _SPLITS[key]
    cfg = dataclasses.replace(data_config(dc, 32), train_shards=str(spec), val_shards="", workers=0, augment=False,
                              resampled=False, shuffle_buffer=0)
    if not ground_truth:
        cfg.members = [m for m in cfg.members if m not in MEMBERS]
    keys, feats, coords, texts, cls, comp = [], [], [], [], [], []
    tissues: list[str] = []
    classes: list[str] = []
    for b in make_loader(cfg, train=False, split=split):
        classes = b["label_names"]
        tissues = list(b.get("composition_names", []))
        for i in range(len(b["key"])):
            n = int(b["feats_mask"][i].sum())
            keys.append(b["key"][i])
            feats.append(b["feats"][i, :n].clone())
            coords.append(b["coords"][i, :n].clone())
            texts.append(b["text"][i])
            cls.append(int(b["class_index"][i]) if "class_index" in b else -1)
            comp.append(b["composition"][i].numpy() if "composition" in b else np.zeros(0, np.float32))
        if max_samples and len(keys) >= max_samples:
            break
    if max_samples:
        keys, feats, coords, texts, cls, comp = keys[:max_samples], feats[:max_samples], coords[:max_samples], \
            texts[:max_samples], cls[:max_samples], comp[:max_samples]
    out = SlideSplit(keys, feats, coords, texts, np.array(cls, dtype=np.int64),
                     np.stack(comp) if comp else np.zeros((0, len(tissues))), tissues, list(classes))
    _SPLITS[key] = out
    return out
