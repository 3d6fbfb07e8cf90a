"""PCAM pooling and the per-finding classification head over a spatial feature map (docs/methods.md §4).

Per finding k a 1x1 convolution `fc_k` (C -> 1) turns the feature map X (B, C, h, w) into a logit map s_k
(B, h, w): this map is the heatmap. A pooling turns X into one feature vector x_k (B, C) per finding, optionally
batch-normalised (one BatchNorm per finding) and dropped out, and the SAME `fc_k` maps x_k to the finding's logit:

  avg   x = mean_hw X                      (then logit = mean_hw s_k when there is no BatchNorm/dropout)
  max   x = max_hw X                       (channel-wise)
  lse   x = m + (1/r) log mean_hw exp(r (X - m)),  m = max_hw X  (log-sum-exp; r -> 0 avg, r -> inf max)
  pcam  p = sigmoid(s_k), w = p / sum_hw p, x_k = sum_hw w X      (a per-finding attention from its own CAM)

The K convolutions are held as one Conv2d with K outputs (`fc.weight` (K, C, 1, 1), `fc.bias` (K,)); per-finding
BatchNorm over K x C features is one BatchNorm1d(K*C), which normalises each finding's C channels separately.

Shape legend: B batch, C channels, h/w feature-map rows/columns, K findings.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

POOLINGS = ("avg", "max", "lse", "pcam")


def pcam_pool(feat_BChw: torch.Tensor, logit_BKhw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (x_BKC, w_BKhw): each finding's probability-weighted feature and its weights (sum_hw w = 1)."""
    p_BKhw = torch.sigmoid(logit_BKhw.float())
    # sigmoid > 0, so the sum is positive; the clamp only guards an underflow of every p to 0 in float32.
    w_BKhw = p_BKhw / p_BKhw.sum(dim=(-2, -1), keepdim=True).clamp_min(torch.finfo(p_BKhw.dtype).tiny)
    x_BKC = torch.einsum("bkhw,bchw->bkc", w_BKhw, feat_BChw.float())
    return x_BKC, w_BKhw


def lse_pool(feat_BChw: torch.Tensor, r: float) -> torch.Tensor:
    """Channel-wise log-sum-exp pooling with sharpness r: m + (1/r) log mean exp(r (X - m)) -> x_BC."""
    flat_BCn = feat_BChw.float().flatten(2)
    m_BC1 = flat_BCn.amax(dim=2, keepdim=True)
    n = flat_BCn.shape[2]
    lse_BC = torch.logsumexp(r * (flat_BCn - m_BC1), dim=2) - torch.log(torch.tensor(float(n)))
    return m_BC1.squeeze(2) + lse_BC / r


@dataclass
class HeadOutput:
    logits: torch.Tensor  # (B, K) finding logits
    maps: torch.Tensor  # (B, K, h, w) logit maps s_k (the heatmaps before normalisation)
    weights: torch.Tensor | None = None  # (B, K, h, w) PCAM pooling weights (pcam only)


class PcamHead(nn.Module):
    """K findings' 1x1-conv classifiers over a feature map with a chosen global pooling."""

    def __init__(self, in_channels: int, n_findings: int, pooling: str = "pcam", lse_r: float = 10.0,
                 batchnorm: bool = False, dropout: float = 0.0) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling: {pooling!r} is not one of {', '.join(POOLINGS)}")
        if in_channels < 1 or n_findings < 1:
            raise ValueError(f"PcamHead needs in_channels >= 1 and n_findings >= 1, got {in_channels}, {n_findings}")
        if pooling == "lse" and not lse_r > 0:
            raise ValueError(f"lse_r: must be > 0, got {lse_r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout: must be in [0, 1), got {dropout}")
        self.pooling, self.lse_r, self.dropout = pooling, float(lse_r), float(dropout)
        self.in_channels, self.n_findings = int(in_channels), int(n_findings)
        self.fc = nn.Conv2d(in_channels, n_findings, kernel_size=1, bias=True)
        nn.init.normal_(self.fc.weight, std=0.01)  # the reference initialises the 1x1 heads this way
        nn.init.zeros_(self.fc.bias)
        self.bn = nn.BatchNorm1d(n_findings * in_channels) if batchnorm else None

    def _pooled(self, feat_BChw: torch.Tensor, maps_BKhw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, C = feat_BChw.shape[:2]
        K = self.n_findings
        if self.pooling == "pcam":
            return pcam_pool(feat_BChw, maps_BKhw)
        if self.pooling == "avg":
            x_BC = feat_BChw.float().mean(dim=(-2, -1))
        elif self.pooling == "max":
            x_BC = feat_BChw.float().amax(dim=(-2, -1))
        else:
            x_BC = lse_pool(feat_BChw, self.lse_r)
        return x_BC[:, None, :].expand(B, K, C), None

    def forward(self, feat_BChw: torch.Tensor) -> HeadOutput:
        if feat_BChw.ndim != 4 or feat_BChw.shape[1] != self.in_channels:
            raise ValueError(f"PcamHead expects a (B, {self.in_channels}, h, w) feature map, "
                             f"got {tuple(feat_BChw.shape)}")
        feat_BChw = feat_BChw.float()
        maps_BKhw = self.fc(feat_BChw)
        x_BKC, w_BKhw = self._pooled(feat_BChw, maps_BKhw)
        B, K, C = x_BKC.shape
        if self.bn is not None:
            x_BKC = self.bn(x_BKC.reshape(B, K * C)).reshape(B, K, C)
        if self.dropout > 0:
            x_BKC = F.dropout(x_BKC, self.dropout, self.training)
        # The same fc_k on the pooled feature: logit_k = <W_k, x_k> + b_k.
        logits_BK = torch.einsum("bkc,kc->bk", x_BKC, self.fc.weight.view(K, C)) + self.fc.bias
        return HeadOutput(logits_BK, maps_BKhw, w_BKhw)
