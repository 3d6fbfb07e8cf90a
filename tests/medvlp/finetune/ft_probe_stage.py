"""A minimal fine-tune stage for the runner's tests: a linear head on the frozen image embedding of the debug model,
multi-label BCE on the synthetic radiographs' findings. Also the entry point of the 2-process run:

    accelerate launch --multi_gpu --num_processes 2 tests/medvlp/finetune/ft_probe_stage.py OUT SHARDS INIT BATCH STEPS [zero2]
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from medvlp.finetune.runner import RunnerConfig, StageContext, run_stage
from medvlp.pretrain.config import ModelConfig, TrackingConfig

_CACHE: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


@dataclass
class ProbeConfig:
    """Root config of the probe stage."""

    kind: str = "probe"  # recipe kind
    shards: str = ""  # synthetic cxr shard dir
    model: str = "debug"  # registry model name
    init: str = ""  # state-dict file of the backbone ("" = random init from the seed)
    finetune: RunnerConfig = field(default_factory=RunnerConfig)  # the runner
    tracking: TrackingConfig = field(default_factory=lambda: TrackingConfig(enabled=False))  # MLflow


class ProbeModel(nn.Module):
    def __init__(self, backbone: nn.Module, n_labels: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.embed_dim, n_labels)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone.encode_image(image))


def split_tensors(shards: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """All images (N, 3, 64, 64) and binary labels (N, K) of a split, in index order (decoded once)."""
    key = (str(shards), split)
    if key not in _CACHE:
        from medvlp.data_shards.config import DataConfig
        from medvlp.data_shards.stream import make_loader

        dc = DataConfig(train_shards=str(shards), image_size=64, batch_size=64, resampled=False, augment=False,
                        shuffle_buffer=0, split=split)
        xs, ys = [], []
        for b in make_loader(dc, train=False):
            xs.append(b["image"])
            ys.append((b["labels"] > 0).float())
        _CACHE[key] = (torch.cat(xs), torch.cat(ys))
    return _CACHE[key]


class ProbeStage:
    """Stage protocol: build / loss / batches / evaluate."""

    def build(self, pretrained, cfg: ProbeConfig) -> nn.Module:
        if pretrained is not None:
            backbone = pretrained.model
        else:
            from medvlp.pretrain.model import build_model, load_checkpoint

            backbone = build_model(ModelConfig(name=cfg.model))
            if cfg.init:
                load_checkpoint(backbone, cfg.init)
        _, y = split_tensors(cfg.shards, "train")
        return ProbeModel(backbone, y.shape[1])

    def loss(self, model, batch):
        logits = model(batch["image"])
        loss = F.binary_cross_entropy_with_logits(logits, batch["labels"])
        acc = ((logits > 0).float() == batch["labels"]).float().mean()
        return loss, {"acc": acc.detach(), "rows": float(batch["image"].shape[0])}

    def batches(self, cfg: ProbeConfig, split: str, ctx: StageContext, *, epoch: int = 0, start_step: int = 0):
        """Global batch G = batch_size x world drawn from a per-epoch permutation; rank r gets rows [rB, (r+1)B)."""
        x, y = split_tensors(cfg.shards, split)
        b, rank = cfg.finetune.batch_size, ctx.rank
        g = b * ctx.world_size
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(1000 * cfg.finetune.seed + epoch))
        for i in range(start_step, len(x) // g):
            idx = perm[i * g:(i + 1) * g][rank * b:(rank + 1) * b]
            yield {"image": x[idx], "labels": y[idx]}

    def evaluate(self, model, cfg: ProbeConfig, ctx: StageContext) -> dict:
        x, y = split_tensors(cfg.shards, "test")
        logits = model(x)
        return {"bce": F.binary_cross_entropy_with_logits(logits, y).item(),
                "acc": ((logits > 0).float() == y).float().mean().item()}


def probe_config(out_dir, shards, init="", **runner) -> ProbeConfig:
    kw = dict(out_dir=str(out_dir), steps=8, batch_size=8, lr=0.05, warmup_steps=2, freeze=["backbone.*"],
              log_every=1, progress=False, seed=0)
    kw.update(runner)
    return ProbeConfig(shards=str(shards), init=str(init), finetune=RunnerConfig(**kw))


if __name__ == "__main__":  # the distributed entry point (see the module doc)
    out, shards, init, batch, steps, deepspeed = (sys.argv[1:7] + [""])[:6]
    res = run_stage(ProbeStage(), probe_config(out, shards, init, batch_size=int(batch), steps=int(steps),
                                               ckpt_every=int(steps), deepspeed=deepspeed))
    from accelerate import PartialState

    st = PartialState()
    Path(out, f"rank{st.process_index}.json").write_text(json.dumps(
        {"rank": st.process_index, "world": st.num_processes, "losses": res.losses,
         "backend": str(torch.distributed.get_backend()) if torch.distributed.is_initialized() else ""}))
