"""Losses of the anatomy stage: fVLM's organ-sentence contrastive loss (hard or soft targets) and VSE.

Organ contrastive (per organ o, over the volumes of the batch that contain o):
  logits_ij = s * <img_i^o, txt_j^o>;  loss_o = (CE(logits, T) + CE(logits^T, T^T)) / 2
  hard targets T = I; soft targets T_ij = 1 if i == j, or both sentences say normal, or the sentences are identical,
  each row normalised to sum 1 (fVLM: a batch of normal livers are not negatives of each other).
  The batch loss is the mean over organs that have at least one volume.

VSE (vision semantic enhancement), vision only, per organ o: anchors q_i (online encoder, view 1) against keys k_j
(momentum encoder, view 2), logits q_i . k_j / tau. Positives of i: j == i (its own other view) and, if i is normal,
every normal j. So normal-normal pairs are pulled together and any pair with an abnormal member is pushed apart
(abnormal samples stay distinct from the normal cluster and from each other). Supervised-contrastive form:
  loss_i = -mean_{p in P(i)} log softmax_j(q_i . k_j / tau)[p].

Shape legend: B batch, O organs, E embedding width.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def sentence_key(s: str) -> str:
    """Sentences that differ only in case, spacing or a final period are identical."""
    return " ".join(s.lower().split()).rstrip(".")


def soft_targets(normal_B: torch.Tensor, sentences: Sequence[str] | torch.Tensor | None = None) -> torch.Tensor:
    """(B, B) row-normalised targets: 1 on the diagonal, between two normal samples, between identical sentences.

    sentences: the B strings, or (B,) ids where equal ids mean identical sentences."""
    normal = normal_B.bool()
    B = normal.shape[0]
    pos = torch.eye(B, dtype=torch.bool, device=normal.device) | (normal[:, None] & normal[None, :])
    if sentences is not None:
        if len(sentences) != B:
            raise ValueError(f"soft_targets: {len(sentences)} sentences for {B} samples")
        if torch.is_tensor(sentences):
            ids = sentences.to(normal.device)
        else:
            keys = [sentence_key(s) for s in sentences]
            ids = torch.tensor([keys.index(k) for k in keys], device=normal.device)
        pos = pos | (ids[:, None] == ids[None, :])
    t = pos.float()
    return t / t.sum(dim=1, keepdim=True)


def _soft_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return -(targets * F.log_softmax(logits, dim=1)).sum(1).mean()


def organ_contrastive_loss(img_BOE: torch.Tensor, txt_BOE: torch.Tensor, scale: torch.Tensor,
                           present_BO: torch.Tensor, normal_BO: torch.Tensor | None = None,
                           sentences: Sequence[Sequence[str]] | torch.Tensor | None = None,
                           soft: bool = True) -> torch.Tensor:
    """Mean over organs of the symmetric organ-sentence InfoNCE (module doc); embeddings L2-normalised.
    sentences: B lists of O strings, or (B, O) sentence ids (equal id = identical sentence)."""
    B, O, _ = img_BOE.shape
    if soft and normal_BO is None:
        raise ValueError("organ_contrastive_loss: soft targets need the organs' normal flags (organ_labels)")
    losses = []
    for o in range(O):
        rows = present_BO[:, o].nonzero().flatten()
        if rows.numel() == 0:
            continue
        i, t = img_BOE[rows, o], txt_BOE[rows, o]
        logits = scale * i @ t.t()
        if soft:
            if sentences is None:
                sents = None
            elif torch.is_tensor(sentences):
                sents = sentences[rows, o]
            else:
                sents = [sentences[int(r)][o] for r in rows]
            T = soft_targets(normal_BO[rows, o], sents)
        else:
            T = torch.eye(rows.numel(), device=img_BOE.device)
        losses.append(0.5 * (_soft_ce(logits, T) + _soft_ce(logits.t(), T.t())))
    if not losses:
        return img_BOE.sum() * 0.0
    return torch.stack(losses).mean()


def vse_targets(normal_B: torch.Tensor) -> torch.Tensor:
    """(B, B) bool positives of VSE: the diagonal, plus normal-normal pairs."""
    n = normal_B.bool()
    return torch.eye(n.shape[0], dtype=torch.bool, device=n.device) | (n[:, None] & n[None, :])


def vse_loss(q_BOE: torch.Tensor, k_BOE: torch.Tensor, normal_BO: torch.Tensor, present_BO: torch.Tensor,
             tau: float = 0.1) -> torch.Tensor:
    """Vision semantic enhancement (module doc): q online (grad), k momentum (no grad), both L2-normalised."""
    B, O, _ = q_BOE.shape
    losses = []
    for o in range(O):
        rows = present_BO[:, o].nonzero().flatten()
        if rows.numel() < 2:
            continue
        q, k = q_BOE[rows, o], k_BOE[rows, o].detach()
        logp = F.log_softmax(q @ k.t() / tau, dim=1)
        P = vse_targets(normal_BO[rows, o]).float()
        losses.append((-(P * logp).sum(1) / P.sum(1)).mean())
    if not losses:
        return q_BOE.sum() * 0.0
    return torch.stack(losses).mean()
