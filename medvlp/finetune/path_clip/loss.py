"""Path-CLIP losses: dual-view vision contrastive (DVC, NT-Xent after SimCLR) and the image-class-prompt loss.

    L = 1/2 [CE(logits(f'_weak), y) + CE(logits(f'_strong), y)] + lambda * L_dvc

DVC. Every image i of the batch has two weak views (w1_i, w2_i) and one strong view (s_i). On the refined,
L2-normalised embeddings z = norm(RFR(f + eps)):

    L_dvc = 1/2 [NT-Xent(z_w1, z_w2) + NT-Xent(z_w1, z_s)]                  (weak-weak and weak-strong pairs)

    NT-Xent(a, b): the 2B rows u = [a; b]; sim_jk = u_j . u_k / T; for each row j its positive p(j) is the other
    view of the same image, every other row (the rest of the batch, both views) is a negative:
        l_j = -log( exp(sim_j,p(j)) / sum_{k != j} exp(sim_jk) ),   NT-Xent = mean_j l_j

so the weak-weak and weak-strong views of an image are pulled together and pushed away from other images.

Shape legend: B batch, E embedding width, C classes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from medvlp.finetune.path_clip.model import PathCLIPHead, view_agreement


def nt_xent(a_BE: torch.Tensor, b_BE: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """SimCLR NT-Xent over the 2B rows [a; b] (rows L2-normalised here); positives a_i <-> b_i."""
    if a_BE.shape != b_BE.shape or a_BE.ndim != 2:
        raise ValueError(f"nt_xent: views must both be (B, E), got {tuple(a_BE.shape)} and {tuple(b_BE.shape)}")
    if a_BE.shape[0] < 2:
        raise ValueError("nt_xent: needs a batch of >= 2 images (the other images are the negatives)")
    if temperature <= 0:
        raise ValueError(f"nt_xent: temperature must be > 0, got {temperature}")
    b = a_BE.shape[0]
    u_NE = torch.cat([a_BE, b_BE])
    u_NE = F.normalize(u_NE if u_NE.dtype == torch.float64 else u_NE.float(), dim=-1)
    sim_NN = u_NE @ u_NE.t() / temperature
    sim_NN = sim_NN.masked_fill(torch.eye(2 * b, dtype=torch.bool, device=sim_NN.device), float("-inf"))
    pos_N = torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)]).to(sim_NN.device)
    return F.cross_entropy(sim_NN, pos_N)


def dvc_loss(z_w1: torch.Tensor, z_w2: torch.Tensor, z_s: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """1/2 [NT-Xent(weak1, weak2) + NT-Xent(weak1, strong)]."""
    return 0.5 * (nt_xent(z_w1, z_w2, temperature) + nt_xent(z_w1, z_s, temperature))


def path_clip_loss(head: PathCLIPHead, f_w1: torch.Tensor, f_w2: torch.Tensor, f_s: torch.Tensor,
                   y_B: torch.Tensor, *, dvc_weight: float = 1.0, temperature: float = 0.1,
                   update_tau: bool = True) -> tuple[torch.Tensor, dict[str, float]]:
    """Training loss of the head on frozen embeddings of two weak views and one strong view (each (B, E)).

    The batch's dual-view agreement tau (of the frozen or the refined views, `head.tau_source`) updates the running
    tau first (adaptive alpha), then alpha is computed
    from it. With `dvc_weight == 0` the second weak view is not used."""
    z_w1, z_s = head.refine(f_w1), head.refine(f_s)
    tau = view_agreement(z_w1, z_s) if head.tau_source == "refined" else view_agreement(f_w1, f_s)
    if update_tau and head.ratio is not None and head.training:
        head.ratio.update_tau(tau)
    alpha = head.alpha()
    ce_w = F.cross_entropy(head.logits(head.mix(f_w1, z_w1, alpha)), y_B)
    ce_s = F.cross_entropy(head.logits(head.mix(f_s, z_s, alpha)), y_B)
    loss = 0.5 * (ce_w + ce_s)
    metrics = {"ce_weak": ce_w.item(), "ce_strong": ce_s.item(), "tau_batch": tau.item(), "alpha": alpha.item()}
    if dvc_weight > 0:
        dvc = dvc_loss(z_w1, head.refine(f_w2), z_s, temperature)
        loss = loss + dvc_weight * dvc
        metrics["dvc"] = dvc.item()
    metrics["loss"] = loss.item()
    return loss, metrics


def prompt_ce_loss(head: PathCLIPHead, f_B_E: torch.Tensor, y_B: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Plain image-class-prompt cross-entropy through the head (residual adapter baseline, one view)."""
    loss = F.cross_entropy(head(f_B_E), y_B)
    return loss, {"loss": loss.item()}
