"""Arms of the few-label protocol that train the image tower itself (the towers of every other arm stay frozen).

  full_finetune  a copy of the image tower trained on the labelled images with the prompt cross-entropy on the same
                 weak and strong views the adapters see: 1/2 [CE(weak) + CE(strong)] against the frozen class-prompt
                 embeddings (logit = s * norm(visual(x)) . norm(T)^T).
  fixmatch       FixMatch (Sohn et al., 2020) on the same head: the labelled loss on a weak view, plus, on
                 `protocol.fixmatch_unlabelled` images per step from the rest of the training split (labels never
                 read), the cross-entropy of the strong view against the weak view's prediction where that
                 prediction's confidence is >= `protocol.fixmatch_threshold` (weight `protocol.fixmatch_weight`).
                 Labelled and unlabelled views go through one forward pass (one BatchNorm batch), as in FixMatch.

Both use AdamW (weight decay `finetune.weight_decay`), batches of at most `finetune.batch_size` labelled images and
fresh augmentations every step. The learning rate and the step count are picked on the val split: one run per lr in
`protocol.full_lrs`, scored on val after each step count in `protocol.full_eval_steps`; the best (val accuracy,
fewest steps on ties) is scored on the eval split and on the source split. FixMatch takes the lr the full fine-tune
picked for the same cell and picks its step count on val (to keep the CPU cost bounded).
Shape legend: n labelled, B batch, S image side, E embedding width, C classes.
"""
from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from medvlp.finetune.path_clip import data as D
from medvlp.finetune.path_clip.metrics import classification_metrics


def _logits(visual: torch.nn.Module, text_CE: torch.Tensor, scale: float, x_BCSS: torch.Tensor) -> torch.Tensor:
    return scale * F.normalize(visual(x_BCSS).float(), dim=-1) @ text_CE.t()


@torch.no_grad()
def predict(visual: torch.nn.Module, text_CE: torch.Tensor, scale: float, x_NCSS: torch.Tensor) -> np.ndarray:
    """Class logits (N, C) in eval mode (BatchNorm running statistics), batches of 128."""
    was = visual.training
    visual.eval()
    out = torch.cat([_logits(visual, text_CE, scale, x_NCSS[i:i + 128]) for i in range(0, len(x_NCSS), 128)])
    visual.train(was)
    return out.numpy()


class TowerArms:
    """Eval-view tensors of val / eval / source, built once per task and shared by every tower cell."""

    def __init__(self, ctx: Any) -> None:
        self.ctx = ctx
        mk = lambda imgs: D.make_views(imgs, "eval", ctx.modality, ctx.image_size, 0)  # noqa: E731
        self.x_val = mk(ctx.val_images())
        self.y_val = ctx.val()[0]
        self.x_eval = mk(ctx.eval_images)
        self.x_source = mk(ctx.source_images) if ctx.source_images else None
        self.text_CE = F.normalize(ctx.text_CE.float(), dim=-1)
        self._unlabelled: tuple[np.ndarray, list[np.ndarray]] | None = None

    def unlabelled(self) -> tuple[np.ndarray, list[np.ndarray]]:
        """(positions, images) of the whole training split (each cell drops its labelled images from it)."""
        if self._unlabelled is None:
            pos = np.arange(len(self.ctx.train))
            self._unlabelled = (pos, self.ctx.train.images(pos))
        return self._unlabelled

    def _views(self, images: list[np.ndarray], kind: str, seed: int) -> torch.Tensor:
        return D.make_views(images, kind, self.ctx.modality, self.ctx.image_size, seed)

    def _train(self, b: Any, cfg: Any, seed: int, lr: float, method: str) -> list[tuple[int, dict, float]]:
        """Train a copy of the tower; (step, state_dict, val accuracy) at every step count of full_eval_steps."""
        p, f = cfg.protocol, cfg.finetune
        torch.manual_seed(seed)
        visual = copy.deepcopy(self.ctx.model.visual).float().train()
        for q in visual.parameters():
            q.requires_grad_(True)
        opt = torch.optim.AdamW(visual.parameters(), lr=lr, weight_decay=f.weight_decay)
        n = len(b.idx)
        rng = np.random.default_rng([seed, 7, int(lr * 1e6)])
        if method == "fixmatch":
            pos, pool = self.unlabelled()
            free = np.setdiff1d(pos, b.idx)
        out, stops = [], sorted(set(p.full_eval_steps))
        for step in range(1, stops[-1] + 1):
            rows = rng.permutation(n)[:min(n, f.batch_size)]
            imgs = [b.images[int(r)] for r in rows]
            y = b.y[rows]
            vseed = int(rng.integers(0, 2**31 - 1))
            if method == "full_finetune":
                x = torch.cat([self._views(imgs, "weak", vseed), self._views(imgs, "strong", vseed)])
                lg = _logits(visual, self.text_CE, self.ctx.scale, x)
                loss = 0.5 * (F.cross_entropy(lg[:len(rows)], y) + F.cross_entropy(lg[len(rows):], y))
            else:
                u = rng.choice(free, size=min(p.fixmatch_unlabelled, len(free)), replace=False)
                uimgs = [pool[int(i)] for i in u]
                x = torch.cat([self._views(imgs, "weak", vseed), self._views(uimgs, "weak", vseed + 1),
                               self._views(uimgs, "strong", vseed + 2)])
                lg = _logits(visual, self.text_CE, self.ctx.scale, x)
                k = len(rows)
                lg_uw, lg_us = lg[k:k + len(u)], lg[k + len(u):]
                conf, pseudo = torch.softmax(lg_uw.detach(), dim=-1).max(dim=-1)
                mask = (conf >= p.fixmatch_threshold).float()
                loss_u = (F.cross_entropy(lg_us, pseudo, reduction="none") * mask).mean()
                loss = F.cross_entropy(lg[:k], y) + p.fixmatch_weight * loss_u
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step in stops:
                val = classification_metrics(self.y_val, predict(visual, self.text_CE, self.ctx.scale, self.x_val))
                out.append((step, copy.deepcopy(visual.state_dict()), val["acc"]))
        return out

    def cell(self, method: str, b: Any, cfg: Any, seed: int, lrs: list[float] | None = None) -> tuple[dict, dict]:
        """(metrics, predictions) of one tower cell; lr and steps picked on val (first best on ties)."""
        if method not in ("full_finetune", "fixmatch"):
            raise ValueError(f"tower arm {method!r} is not one of full_finetune, fixmatch")
        best = None
        for lr in (lrs or cfg.protocol.full_lrs):
            for step, state, val_acc in self._train(b, cfg, seed, lr, method):
                if best is None or val_acc > best[0]:
                    best = (val_acc, lr, step, state)
        val_acc, lr, step, state = best
        visual = copy.deepcopy(self.ctx.model.visual).float()
        visual.load_state_dict(state)
        logits = predict(visual, self.text_CE, self.ctx.scale, self.x_eval)
        m = {**classification_metrics(self.ctx.eval_split.y_N, logits), "val_acc": val_acc, "lr": lr,
             "steps": float(step)}
        preds = {"eval": logits.argmax(1)}
        if self.x_source is not None:
            src = predict(visual, self.text_CE, self.ctx.scale, self.x_source)
            m.update({f"source_{k}": v for k, v in classification_metrics(self.ctx.source.y_N, src).items()})
            preds["source"] = src.argmax(1)
        return m, preds
