"""Multi-label binary cross-entropy with per-finding uncertain-label policies (docs/methods.md §4).

Labels are 1 (positive), 0 (negative) or -1 (uncertain). Each finding has a policy for its uncertain labels:
  ignore  the sample does not count for that finding (masked out of its loss)
  zeros   uncertain -> negative
  ones    uncertain -> positive
(The reference CheXpert setup maps uncertain Edema/Atelectasis to ones and the other findings to zeros.)

Loss = sum over findings of the finding's BCE, each averaged over the samples it counts (as the reference sums
its per-finding losses). With `batch_weight` the positives of finding k get the batch-adaptive weight
n_neg_k / n_pos_k (counted over the batch's counted samples), so positives and negatives weigh the same; a batch
without a counted positive of finding k contributes 0 for k (the reference does the same). Without it, a fixed
`pos_weight` per finding (or none) is used.

Shape legend: B batch, K findings.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

UNCERTAIN_POLICIES = ("ignore", "zeros", "ones")


def check_policies(policies: Sequence[str], names: Sequence[str], where: str = "uncertain") -> list[str]:
    """Validate one policy per finding; a single policy is broadcast to every finding."""
    pol = list(policies)
    if len(pol) == 1 and len(names) != 1:
        pol = pol * len(names)
    if len(pol) != len(names):
        raise ValueError(f"{where}: {len(pol)} policies for {len(names)} findings ({', '.join(names)})")
    for name, p in zip(names, pol):
        if p not in UNCERTAIN_POLICIES:
            raise ValueError(f"{where}.{name}: {p!r} is not one of {', '.join(UNCERTAIN_POLICIES)}")
    return pol


def apply_uncertain(labels_BK: torch.Tensor, policies: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """labels in {1, 0, -1} -> (target_BK in {0, 1}, counted_BK bool) under the per-finding policies."""
    if labels_BK.ndim != 2 or labels_BK.shape[1] != len(policies):
        raise ValueError(f"labels of shape {tuple(labels_BK.shape)} do not fit {len(policies)} findings")
    bad = ~((labels_BK == 1) | (labels_BK == 0) | (labels_BK == -1))
    if bad.any():
        raise ValueError(f"labels must be 1, 0 or -1; found {labels_BK[bad][0].item()!r}")
    unc_BK = labels_BK == -1
    target_BK = (labels_BK == 1).float()
    counted_BK = torch.ones_like(unc_BK)
    for k, p in enumerate(policies):
        if p == "ones":
            target_BK[:, k] = torch.where(unc_BK[:, k], 1.0, target_BK[:, k])
        elif p == "ignore":
            counted_BK[:, k] = ~unc_BK[:, k]
    return target_BK, counted_BK


def multilabel_bce(logits_BK: torch.Tensor, target_BK: torch.Tensor, counted_BK: torch.Tensor, *,
                   batch_weight: bool = False, pos_weight_K: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (loss (sum over findings), per-finding losses (K,)). See the module doc for the weighting."""
    if logits_BK.shape != target_BK.shape or counted_BK.shape != target_BK.shape:
        raise ValueError(f"logits {tuple(logits_BK.shape)}, targets {tuple(target_BK.shape)} and mask "
                         f"{tuple(counted_BK.shape)} must have one shape")
    logits_BK = logits_BK.float()
    m_BK = counted_BK.float()
    n_K = m_BK.sum(0)
    if batch_weight:
        n_pos_K = (target_BK * m_BK).sum(0)
        pw_K = torch.where(n_pos_K > 0, (n_K - n_pos_K) / n_pos_K.clamp_min(1), torch.zeros_like(n_pos_K))
    else:
        pw_K = pos_weight_K.to(logits_BK) if pos_weight_K is not None else None
    elem_BK = F.binary_cross_entropy_with_logits(logits_BK, target_BK, pos_weight=pw_K, reduction="none")
    per_K = (elem_BK * m_BK).sum(0) / n_K.clamp_min(1)
    if batch_weight:  # no counted positive in the batch: the finding contributes nothing (as in the reference)
        per_K = torch.where(n_pos_K > 0, per_K, torch.zeros_like(per_K))
    return per_K.sum(), per_K.detach()
