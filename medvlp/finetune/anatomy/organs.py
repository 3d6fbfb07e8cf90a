"""Organ-level tokens from a 3D tower's multi-scale maps (fVLM / ViSD-Boost, docs/anatomy.md).

    flags = pool_organ_masks(mask_BDHW, n_organs, tok.strides, tok.grids)   # list of (B, O, L_i) bool per scale
    x = ScaleProjection(tok.channels, width)(tok.maps)                      # list of (B, L_i, C) tokens
    pooled_BOC = OrganQueryPool(n_organs, width)(keys, flags)               # per-organ attention pooling

Mask pooling: the organ label map (0 = background, organ o has id o + 1) becomes one binary map per organ, max-pooled
to each scale with kernel = stride = that scale's down-sampling, so a token belongs to an organ if ANY voxel of its
cell does (a token may belong to several organs). `ceil_mode` makes a partial cell at the border count, matching
the tower's padded strided convolutions (grid = ceil(input / stride)).

Attention pooling: one learnable query per organ attends, multi-head, over the tokens flagged for that organ only
(all scales together); an organ without any token (absent from the volume) pools to zeros and is reported by
`present` so losses can skip it.

Shape legend: B batch, O organs, D/H/W volume, L_i tokens of scale i (flattened grid), C common width, h heads.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def organ_onehot(mask_BDHW: torch.Tensor, n_organs: int) -> torch.Tensor:
    """(B, D, H, W) integer label map (0 background, organ o = o + 1) -> (B, O, D, H, W) float {0, 1}."""
    if mask_BDHW.ndim != 4:
        raise ValueError(f"organ mask: expected (B, D, H, W) labels, got shape {tuple(mask_BDHW.shape)}")
    m = mask_BDHW.long()
    if m.numel() and (int(m.min()) < 0 or int(m.max()) > n_organs):
        raise ValueError(f"organ mask: labels {int(m.min())}..{int(m.max())} outside 0..{n_organs} "
                         f"({n_organs} organs, 0 = background)")
    ids = torch.arange(1, n_organs + 1, device=m.device).view(1, n_organs, 1, 1, 1)
    return (m.unsqueeze(1) == ids).float()


def pool_organ_masks(mask_BDHW: torch.Tensor, n_organs: int, strides: Sequence[Sequence[int]],
                     grids: Sequence[Sequence[int]] | None = None) -> list[torch.Tensor]:
    """Per scale, (B, O, L_i) bool: token l of scale i belongs to organ o if any voxel of its cell does.

    strides: the (D, H, W) down-sampling of each scale (`VisionTokens.strides`); grids: the maps' (d, h, w), checked
    against the pooled mask so a mask at another resolution than the volume fails clearly."""
    onehot = organ_onehot(mask_BDHW, n_organs)
    out = []
    for i, s in enumerate(strides):
        s = tuple(int(v) for v in s)
        pooled = F.max_pool3d(onehot, kernel_size=s, stride=s, ceil_mode=True)  # (B, O, d, h, w)
        if grids is not None and tuple(pooled.shape[2:]) != tuple(grids[i]):
            raise ValueError(f"organ mask: shape {tuple(mask_BDHW.shape[1:])} pooled by stride {s} gives grid "
                             f"{tuple(pooled.shape[2:])}, but token map {i} has grid {tuple(grids[i])}; the mask "
                             "must have the volume's (D, H, W)")
        out.append(pooled.flatten(2) > 0)
    return out


def organ_fractions(mask_BDHW: torch.Tensor, n_organs: int, strides: Sequence[Sequence[int]],
                    grids: Sequence[Sequence[int]] | None = None) -> list[torch.Tensor]:
    """Per scale, (B, O, L_i) float in [0, 1]: the fraction of token l's cell (kernel = stride = the scale's
    down-sampling, partial border cells by their in-volume part) that lies in organ o. `pool_organ_masks` is
    `fraction > 0`."""
    onehot = organ_onehot(mask_BDHW, n_organs)
    out = []
    for i, s in enumerate(strides):
        s = tuple(int(v) for v in s)
        pooled = F.avg_pool3d(onehot, kernel_size=s, stride=s, ceil_mode=True)
        if grids is not None and tuple(pooled.shape[2:]) != tuple(grids[i]):
            raise ValueError(f"organ mask: shape {tuple(mask_BDHW.shape[1:])} pooled by stride {s} gives grid "
                             f"{tuple(pooled.shape[2:])}, but token map {i} has grid {tuple(grids[i])}; the mask "
                             "must have the volume's (D, H, W)")
        out.append(pooled.flatten(2))
    return out


def organ_token_flags(frac_BOL: torch.Tensor, min_frac: float = 0.5) -> torch.Tensor:
    """(B, O, L) bool: the organ's interior tokens (cells at least `min_frac` inside the organ); an organ with no
    such cell keeps every cell it touches, so no organ present in the volume loses all its tokens."""
    inner = frac_BOL >= min_frac
    return torch.where(inner.any(-1, keepdim=True), inner, frac_BOL > 0)


def stat_pool(x_BLC: torch.Tensor, w_BOL: torch.Tensor) -> torch.Tensor:
    """Per organ, the max and the sd of its tokens (weights w, 0 = not the organ's): (B, O, 2C); zeros for an organ
    without tokens. A lesion changes a few tokens of a large organ: the max and the spread keep it where the mean
    dilutes it by the organ's token count."""
    keep = w_BOL > 0
    s = w_BOL.sum(-1, keepdim=True).clamp_min(1e-6)
    mean = torch.einsum("bol,blc->boc", w_BOL, x_BLC) / s
    var = torch.einsum("bol,blc->boc", w_BOL, x_BLC.pow(2)) / s - mean.pow(2)
    sd = (var.clamp_min(0) + 1e-6).sqrt() - 1e-3
    big = torch.finfo(x_BLC.dtype).max
    mx = x_BLC.unsqueeze(1).masked_fill(~keep.unsqueeze(-1), -big).amax(2)  # (B, O, C)
    has = keep.any(-1, keepdim=True)
    mx = torch.where(has, mx - mean, torch.zeros_like(mx))
    return torch.cat([mx, torch.where(has, sd, torch.zeros_like(sd))], -1)


class OrganStatNorm(nn.Module):
    """Per organ and feature, standardise organ statistics over the volumes that contain the organ (batch statistics
    in training, their running averages in evaluation, as batch norm), then a per-organ affine: (B, O, F) -> (B, O, F),
    zeros where the organ is absent. The same voxel sd means a lesion in one organ and nothing in another (a lesion
    fills 2-3 % of a liver but 20-40 % of a kidney at 16x32x32); standardised per organ, each organ's abnormal volumes
    stand out by their own spread, as they do for a linear probe with per-organ feature scaling."""

    def __init__(self, n_organs: int, n_features: int, momentum: float = 0.1, eps: float = 1e-5) -> None:
        super().__init__()
        self.momentum, self.eps = float(momentum), float(eps)
        self.weight = nn.Parameter(torch.ones(n_organs, n_features))
        self.bias = nn.Parameter(torch.zeros(n_organs, n_features))
        self.register_buffer("running_mean", torch.zeros(n_organs, n_features))
        self.register_buffer("running_var", torch.ones(n_organs, n_features))

    def forward(self, x_BOF: torch.Tensor, present_BO: torch.Tensor) -> torch.Tensor:
        w = present_BO.to(x_BOF.dtype).unsqueeze(-1)  # (B, O, 1)
        if self.training:
            n = w.sum(0)  # (O, 1)
            mean = (w * x_BOF).sum(0) / n.clamp_min(1)
            var = (w * (x_BOF - mean).pow(2)).sum(0) / n.clamp_min(1)
            has = n > 1  # an organ in fewer than two volumes of the batch keeps the running statistics
            with torch.no_grad():
                unbiased = var * n / (n - 1).clamp_min(1)
                m = self.momentum
                self.running_mean.copy_(torch.where(has, (1 - m) * self.running_mean + m * mean, self.running_mean))
                self.running_var.copy_(torch.where(has, (1 - m) * self.running_var + m * unbiased, self.running_var))
            mean = torch.where(has, mean, self.running_mean)
            var = torch.where(has, var, self.running_var)
        else:
            mean, var = self.running_mean, self.running_var
        y = (x_BOF - mean) * torch.rsqrt(var + self.eps) * self.weight + self.bias
        return y * w


class ScaleProjection(nn.Module):
    """Each scale's map (B, C_i, d, h, w) -> tokens (B, L_i, C): a per-scale linear (1x1x1 conv) to the common width,
    plus a learnable per-scale embedding so pooled tokens know their resolution."""

    def __init__(self, channels: Sequence[int], width: int) -> None:
        super().__init__()
        self.proj = nn.ModuleList(nn.Linear(int(c), width) for c in channels)
        self.scale_emb = nn.Parameter(torch.zeros(len(channels), width))
        nn.init.normal_(self.scale_emb, std=0.02)

    def forward(self, maps: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if len(maps) != len(self.proj):
            raise ValueError(f"ScaleProjection: built for {len(self.proj)} scales, got {len(maps)} maps")
        return [p(m.flatten(2).transpose(1, 2)) + self.scale_emb[i] for i, (p, m) in enumerate(zip(self.proj, maps))]


def masked_softmax(scores: torch.Tensor, keep: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Softmax over `dim` restricted to `keep`; rows with nothing kept are all zeros (not NaN)."""
    scores = scores.masked_fill(~keep, float("-inf"))
    any_kept = keep.any(dim=dim, keepdim=True)
    w = torch.softmax(scores.masked_fill(~any_kept, 0.0), dim=dim)
    return torch.where(any_kept, w, torch.zeros_like(w))


class OrganQueryPool(nn.Module):
    """Learnable per-organ queries, multi-head attention pooling over each organ's own tokens.

    forward(shared, shared_flags, own=None, own_flags=None) -> (B, O, C)
      shared (B, Ls, C) tokens common to all organs with shared_flags (B, O, Ls) bool;
      own (B, O, Lo, C) organ-specific tokens (e.g. the VSD hybrid of the last scale) with own_flags (B, O, Lo).
    """

    def __init__(self, n_organs: int, width: int, heads: int = 4) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"OrganQueryPool: width {width} is not divisible by heads {heads}")
        self.n_organs, self.width, self.heads = n_organs, width, heads
        self.queries = nn.Parameter(torch.randn(n_organs, width) * 0.02)
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.out = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)

    def _split(self, x: torch.Tensor) -> torch.Tensor:  # (..., C) -> (..., h, C/h)
        return x.reshape(*x.shape[:-1], self.heads, self.width // self.heads)

    def forward(self, shared: torch.Tensor, shared_flags: torch.Tensor, own: torch.Tensor | None = None,
                own_flags: torch.Tensor | None = None) -> torch.Tensor:
        B = shared.shape[0]
        if shared_flags.shape != (B, self.n_organs, shared.shape[1]):
            raise ValueError(f"OrganQueryPool: flags {tuple(shared_flags.shape)} do not fit tokens "
                             f"{tuple(shared.shape)} and {self.n_organs} organs")
        q_Ohd = self._split(self.q(self.queries))
        k_s, v_s = (self._split(t) for t in self.kv(shared).chunk(2, dim=-1))  # (B, Ls, h, d)
        scale = 1.0 / math.sqrt(self.width // self.heads)
        scores = torch.einsum("ohd,blhd->bohl", q_Ohd, k_s) * scale  # (B, O, h, Ls)
        keep = shared_flags.unsqueeze(2).expand_as(scores)
        if own is not None:
            k_o, v_o = (self._split(t) for t in self.kv(own).chunk(2, dim=-1))  # (B, O, Lo, h, d)
            s_own = torch.einsum("ohd,bolhd->bohl", q_Ohd, k_o) * scale
            scores = torch.cat([scores, s_own], dim=-1)
            keep = torch.cat([keep, own_flags.unsqueeze(2).expand_as(s_own)], dim=-1)
        w = masked_softmax(scores, keep)  # (B, O, h, L)
        ls = shared.shape[1]
        pooled = torch.einsum("bohl,blhd->bohd", w[..., :ls], v_s)
        if own is not None:
            pooled = pooled + torch.einsum("bohl,bolhd->bohd", w[..., ls:], v_o)
        return self.norm(self.out(pooled.reshape(B, self.n_organs, self.width)))


def organ_size_report(mask_BDHW: torch.Tensor, organ_names: Sequence[str],
                      strides: Sequence[Sequence[int]]) -> list[list[dict]]:
    """Per volume, per organ: its voxels on the stage grid, the tokens it touches at the finest and at the last
    (coarsest) scale, its size in last-scale tokens (voxels / cell volume) and `smaller_than_token` (under one
    last-scale cell: it still gets the cells it touches, but a lesion in it shares them with its neighbours).
    An organ absent from the volume has voxels 0 and `present` False: reported, not dropped."""
    O = len(organ_names)
    onehot = organ_onehot(mask_BDHW, O)
    vox = onehot.flatten(2).sum(-1)  # (B, O)
    first, last = (tuple(int(v) for v in s) for s in (strides[0], strides[-1]))
    fl = pool_organ_masks(mask_BDHW, O, [first, last])
    cell = float(np.prod(last))
    out = []
    for b in range(mask_BDHW.shape[0]):
        rows = []
        for o, name in enumerate(organ_names):
            v = int(vox[b, o])
            rows.append({"organ": name, "present": v > 0, "voxels": v, "tokens_first": int(fl[0][b, o].sum()),
                         "tokens_last": int(fl[1][b, o].sum()), "size_in_last_tokens": round(v / cell, 3),
                         "smaller_than_token": 0 < v < cell})
        out.append(rows)
    return out
