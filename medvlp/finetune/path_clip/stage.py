"""The Path-CLIP stage on the fine-tune runner: frozen towers, a trained head on cached view embeddings.

    medvlp finetune path-clip RECIPE --set finetune.checkpoint=RUN --set finetune.shots=4

`build` loads the task (`TaskContext`: class prompts embedded by the frozen text tower, eval-split embeddings),
draws the label budget (`finetune.shots` per class or `finetune.label_fraction` of the training split, seeded by
`finetune.budget_seed`) and embeds `finetune.views` weak and strong augmented views of each labelled image once
with the frozen image tower. The towers are never part of the trained module (they cannot receive gradients); the
module is the head (RFR adapter + alpha's theta; the class embeddings and scale are buffers). Each training batch
draws, per labelled image, two different weak views and one strong view from that cache.
`finetune.views: 0` augments every step instead (slower, the towers run each step, still without gradients).

`adapter.method`:
  path_clip              RFR + perturbation + adaptive alpha + DVC, prompt loss on both views (the method)
  path_clip_fixed_alpha  the same with alpha fixed at `adapter.alpha` (the ablation of the adaptive ratio)
  residual_adapter       CLIPath / CLIP-Adapter: fixed alpha, no noise, no DVC; the prompt loss on the same weak and
                         strong views as the method (1/2 [CE(weak) + CE(strong)])
  full_finetune          the whole image tower trained with the prompt loss on online-augmented images
Shape legend: V views, n labelled images, B batch, E embedding width, C classes.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from medvlp.finetune.path_clip import data as D
from medvlp.finetune.path_clip.config import PathCLIPConfig
from medvlp.finetune.path_clip.loss import path_clip_loss
from medvlp.finetune.path_clip.metrics import classification_metrics
from medvlp.finetune.path_clip.model import PathCLIPHead
from medvlp.finetune.path_clip.sampling import label_budget
from medvlp.finetune.runner import StageContext

log = logging.getLogger("medvlp.path_clip")


class TaskContext:
    """Everything about the task that does not depend on the label budget, computed once per pretrained model."""

    def __init__(self, pretrained: Any, cfg: PathCLIPConfig) -> None:
        from medvlp.data_shards.writer import read_index
        from pathlib import Path

        d = cfg.data
        if not d.shards:
            raise ValueError("data.shards: set the shard dir of the labelled task")
        if not Path(d.shards).is_dir():
            raise FileNotFoundError(f"data.shards: {d.shards} is not a shard dir")
        self.model = pretrained.model.eval()
        if self.model.image_kind != "2d":
            raise ValueError("finetune.checkpoint: Path-CLIP adapts 2D image models; this one has a 3D image tower")
        index = read_index(d.shards)
        self.modality = d.modality or index.get("modality", "") or getattr(pretrained, "modality", "patho")
        self.image_size = d.image_size or int(self.model.image_size)
        t = cfg.task
        self.task = D.TaskSpec.build(list(index.get("label_names", [])), label=t.label,
                                     class_names=t.class_names or None, prompts=t.prompts, classes=t.classes)
        self.text_CE = D.encode_prompts(self.model, self.task.prompts)
        self.scale = float(self.model.scale().detach())
        self.train = D.read_split(d.shards, d.train_split, self.task)
        self.eval_split = D.read_split(d.shards, d.eval_split, self.task, limit=d.max_eval)
        self.eval_images = self.eval_split.images()
        self.f_eval = self.embed(self.eval_images, "eval")
        self._val: tuple[D.SplitData, torch.Tensor] | None = None
        self.shards = d.shards
        self.val_split_name = d.val_split
        self.max_eval = d.max_eval
        self.source: D.SplitData | None = None  # the source domain's split (forgetting), if the protocol names one
        self.f_source: torch.Tensor | None = None
        self.source_images: list[np.ndarray] = []
        log.info("task %s: %d classes %s, %d training / %d eval samples", d.shards, self.task.num_classes,
                 self.task.class_names, len(self.train), len(self.eval_split))

    def embed(self, images: list[np.ndarray], kind: str, seed: int = 0, view: int = 0) -> torch.Tensor:
        return D.encode(self.model, D.make_views(images, kind, self.modality, self.image_size, seed, view))

    def val(self) -> tuple[np.ndarray, torch.Tensor]:
        """(y, embeddings) of the validation split (read on first use)."""
        if self._val is None:
            split = D.read_split(self.shards, self.val_split_name, self.task, limit=self.max_eval)
            self._val_images = split.images()
            self._val = (split, self.embed(self._val_images, "eval"))
        return self._val[0].y_N, self._val[1]

    def val_images(self) -> list[np.ndarray]:
        self.val()
        return self._val_images

    def load_source(self, shards: str, split: str) -> None:
        """Read and embed the source domain's split (the same task on the pretraining's domain)."""
        from pathlib import Path

        if not Path(shards).is_dir():
            raise FileNotFoundError(f"protocol.source_shards: {shards} is not a shard dir")
        self.source = D.read_split(shards, split, self.task, limit=self.max_eval)
        self.source_images = self.source.images()
        self.f_source = self.embed(self.source_images, "eval")


@dataclasses.dataclass
class Budget:
    """A labelled subset and its cached view embeddings."""

    idx: np.ndarray  # positions in the training split
    y: torch.Tensor  # (n,) class ids
    images: list[np.ndarray]  # decoded labelled images
    f_eval: torch.Tensor  # (n, E) eval-view embeddings (linear probe, Tip-Adapter cache)
    f_weak: torch.Tensor | None = None  # (V, n, E)
    f_strong: torch.Tensor | None = None  # (V, n, E)


def draw_budget(ctx: TaskContext, shots: int, label_fraction: float, seed: int, views: int) -> Budget:
    """The labelled subset of (shots | label_fraction, seed) and its weak/strong view embeddings."""
    idx = label_budget(ctx.train.y_N, shots=shots, label_fraction=label_fraction, seed=seed,
                       num_classes=ctx.task.num_classes)
    images = ctx.train.images(idx)
    b = Budget(idx=idx, y=torch.from_numpy(ctx.train.y_N[idx]), images=images, f_eval=ctx.embed(images, "eval"))
    if views > 0:
        # view seeds depend on the budget seed, not on the method: every method sees the same augmentations
        b.f_weak = torch.stack([ctx.embed(images, "weak", seed, v) for v in range(max(views, 2))])
        b.f_strong = torch.stack([ctx.embed(images, "strong", seed, v) for v in range(views)])
    return b


class PathCLIPModule(nn.Module):
    """The trained module: the Path-CLIP head; forward computes the training loss (so DDP sees it)."""

    def __init__(self, head: PathCLIPHead, method: str, dvc_weight: float, temperature: float) -> None:
        super().__init__()
        self.head, self.method = head, method
        self.dvc_weight, self.temperature = dvc_weight, temperature

    def forward(self, f_w1, f_w2, f_s, y):
        if self.method == "residual_adapter":  # the same weak and strong views, no DVC (and no noise: head_for)
            return path_clip_loss(self.head, f_w1, f_w2, f_s, y, dvc_weight=0.0)
        return path_clip_loss(self.head, f_w1, f_w2, f_s, y, dvc_weight=self.dvc_weight,
                              temperature=self.temperature)

    @torch.no_grad()
    def logits(self, f_NE: torch.Tensor) -> torch.Tensor:
        return self.head(f_NE)


class FullFinetuneModule(nn.Module):
    """The image tower, trained whole, against the frozen class-prompt embeddings."""

    def __init__(self, visual: nn.Module, text_CE: torch.Tensor, scale: float) -> None:
        super().__init__()
        self.visual = visual
        self.register_buffer("text_CE", F.normalize(text_CE.float(), dim=-1))
        self.register_buffer("scale", torch.tensor(scale))

    def class_logits(self, image: torch.Tensor) -> torch.Tensor:
        return self.scale * F.normalize(self.visual(image).float(), dim=-1) @ self.text_CE.t()

    def forward(self, image, y):
        loss = F.cross_entropy(self.class_logits(image), y)
        return loss, {"loss": loss.item()}


def head_for(ctx: TaskContext, cfg: PathCLIPConfig) -> PathCLIPHead:
    a = cfg.adapter
    m = a.method
    fixed = m in ("residual_adapter", "path_clip_fixed_alpha") or a.alpha_mode == "fixed"
    return PathCLIPHead(ctx.text_CE, ctx.scale, alpha_mode="fixed" if fixed else "adaptive", alpha=a.alpha,
                        alpha_lo=a.alpha_lo, alpha_hi=a.alpha_hi,
                        noise_std=0.0 if m == "residual_adapter" else a.noise_std, tau_momentum=a.tau_momentum,
                        tau_source=a.tau_source)


class PathCLIPStage:
    """Stage protocol of the fine-tune runner. `context` / `budget` may be handed in (the protocol shares them
    between methods); otherwise `build` makes them from the config and the pretrained model."""

    def __init__(self, context: TaskContext | None = None, budget: Budget | None = None,
                 with_val: bool = False) -> None:
        self.ctx, self.budget, self.with_val = context, budget, with_val
        self.preds: dict[str, np.ndarray] = {}  # class predictions of the last evaluation: eval (and val, source)

    # -- runner protocol
    def build(self, pretrained: Any, cfg: PathCLIPConfig) -> nn.Module:
        f = cfg.finetune
        if self.ctx is None:
            if pretrained is None:
                raise ValueError("finetune.checkpoint: Path-CLIP adapts a pretrained model; set it to a run folder, "
                                 "a model.safetensors or an exported folder")
            self.ctx = TaskContext(pretrained, cfg)
        if self.budget is None:
            self.budget = draw_budget(self.ctx, f.shots, f.label_fraction, f.budget_seed,
                                      f.views if cfg.adapter.method != "full_finetune" else 0)
        n = len(self.budget.idx)
        if cfg.adapter.method == "full_finetune":
            visual = copy.deepcopy(self.ctx.model.visual)
            return FullFinetuneModule(visual, self.ctx.text_CE, self.ctx.scale)
        needs_pairs = cfg.adapter.method != "residual_adapter" and cfg.adapter.dvc_weight > 0
        if needs_pairs and n < 2:
            raise ValueError(f"finetune: the DVC loss needs >= 2 labelled images, the budget has {n}")
        return PathCLIPModule(head_for(self.ctx, cfg), cfg.adapter.method, cfg.adapter.dvc_weight,
                              cfg.adapter.temperature)

    def loss(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
        return model(**batch)

    def batches(self, cfg: PathCLIPConfig, split: str, run: StageContext, *, epoch: int = 0,
                start_step: int = 0):
        """One epoch = one pass over the labelled subset in batches of at most `finetune.batch_size` images per
        process (an image appears at most once per batch: the rest of the batch are its DVC negatives)."""
        if split != "train":
            raise ValueError(f"Path-CLIP trains on the labelled subset only (split {split!r})")
        b, rank, world = self.budget, run.rank, run.world_size
        n = len(b.idx)
        per_rank = max(1, min(cfg.finetune.batch_size, n // world))
        g = per_rank * world
        gen = torch.Generator().manual_seed(int(cfg.finetune.seed) * 1_000_003 + int(epoch))
        perm = torch.randperm(n, generator=gen)
        steps = max(1, n // g)
        for i in range(steps):
            rows = perm[i * g:(i + 1) * g][rank * per_rank:(rank + 1) * per_rank]
            vg = torch.Generator().manual_seed(int(cfg.finetune.seed) * 7919 + 104729 * int(epoch) + i)
            if i < start_step:
                continue
            yield self._batch(cfg, rows, vg)

    def _batch(self, cfg: PathCLIPConfig, rows: torch.Tensor, gen: torch.Generator) -> dict:
        b, y = self.budget, self.budget.y[rows]
        if cfg.adapter.method == "full_finetune":
            seeds = torch.randint(0, 2**31 - 1, (len(rows),), generator=gen).tolist()
            t = D.view_transform("train", self.ctx.modality, self.ctx.image_size)
            imgs = [t(D.to_float_image(b.images[int(r)]), np.random.Generator(np.random.PCG64(s)))
                    for r, s in zip(rows, seeds)]
            return {"image": torch.stack(imgs), "y": y}
        if b.f_weak is None:  # views: 0 -> augment now
            s = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
            imgs = [b.images[int(r)] for r in rows]
            f_w1, f_w2, f_s = (self.ctx.embed(imgs, k, s, v) for k, v in (("weak", 0), ("weak", 1), ("strong", 0)))
            return {"f_w1": f_w1, "f_w2": f_w2, "f_s": f_s, "y": y}
        V, nrow = b.f_weak.shape[0], len(rows)
        v1 = torch.randint(0, V, (nrow,), generator=gen)
        v2 = (v1 + torch.randint(1, V, (nrow,), generator=gen)) % V  # a different weak view
        vs = torch.randint(0, b.f_strong.shape[0], (nrow,), generator=gen)
        return {"f_w1": b.f_weak[v1, rows], "f_w2": b.f_weak[v2, rows], "f_s": b.f_strong[vs, rows], "y": y}

    def evaluate(self, model: nn.Module, cfg: PathCLIPConfig, run: StageContext) -> dict:
        logits = self.logits(model, self.ctx.f_eval).numpy()
        out = classification_metrics(self.ctx.eval_split.y_N, logits)
        self.preds = {"eval": logits.argmax(1), "eval_prob": _prob1(logits)}
        if self.with_val:  # the val split, for choosing a setting (e.g. the residual adapter's alpha)
            y_val, f_val = self.ctx.val()
            val = classification_metrics(y_val, self.logits(model, f_val, split="val").numpy())
            out.update({f"val_{k}": v for k, v in val.items()})
        if self.ctx.f_source is not None:  # forgetting: the adapted model on the source domain
            src = self.logits(model, self.ctx.f_source, split="source").numpy()
            out.update({f"source_{k}": v for k, v in classification_metrics(self.ctx.source.y_N, src).items()})
            self.preds["source"] = src.argmax(1)
        out["n_labelled"] = float(len(self.budget.idx))
        head = getattr(model, "head", None)
        if head is not None and head.ratio is not None:
            out["alpha"] = float(head.alpha().detach())
            out["tau"] = float(head.ratio.tau)
        return out

    # -- helpers
    @torch.no_grad()
    def logits(self, model: nn.Module, f_NE: torch.Tensor, split: str = "eval") -> torch.Tensor:
        """Class logits of the eval (or val) split: from cached embeddings, or images for the full fine-tune."""
        if isinstance(model, FullFinetuneModule):
            imgs = {"eval": self.ctx.eval_images, "source": self.ctx.source_images}.get(split) or self.ctx.val_images()
            x = D.make_views(imgs, "eval", self.ctx.modality, self.ctx.image_size, 0)
            p = next(model.parameters())
            return torch.cat([model.class_logits(x[i:i + 128].to(p.device)).float().cpu()
                              for i in range(0, len(x), 128)])
        p = next(model.parameters())
        return model.head(f_NE.to(p.device)).float().cpu()


def _prob1(logits_NC: np.ndarray) -> np.ndarray:
    """Softmax probabilities (N, C) of class logits."""
    z = logits_NC - logits_NC.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)
