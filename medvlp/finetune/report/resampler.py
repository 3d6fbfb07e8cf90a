"""Perceiver resampler: a patch-feature bag of any size -> a fixed set of M latents in the language model's width.

    res = PerceiverResampler(feat_dim=64, width=64, latents=16, depth=2, heads=4, out_dim=64)
    lat_BMO = res(feats_BND, mask_BN, coords_BN2)   # (B, M, out_dim) whatever N is; padded patches are ignored

Patch positions: with `pos_freqs` F > 0 each patch's coordinates are scaled to [0, 1] within its own bag (min / max
over the real patches, per axis, so pixel and grid coordinates alike give the position within the section) and
encoded as sin / cos(pi 2^k c), k < F, for both axes; a linear map of these 4F numbers is added to the projected
patch feature. Without coordinates (None) no position is added.

Each of the `depth` blocks: latents attend to keys/values = concat(patches, latents) (patch positions that are
padding are masked out), then a feed-forward; both pre-LayerNorm with residuals. After the blocks a final
LayerNorm and a linear projection to the LM width. Bags longer than a cap are subsampled (`cap_bag`: a random
subset while training, an even stride otherwise), so the cost is bounded by the cap, not by the slide.

Shape legend: B bags, N patches, D feature dim of a patch, M latents, W resampler width, O output (LM) width.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def cap_bag(feats_BND: torch.Tensor, mask_BN: torch.Tensor | None, cap: int, *, train: bool,
            generator: torch.Generator | None = None, coords_BN2: torch.Tensor | None = None):
    """Keep at most `cap` real patches per bag (random subset when `train`, else an even stride), in stored order.

    Returns (feats_BKD, mask_BK) with K = min(N, cap), and coords_BK2 as a third item when `coords_BN2` is given;
    bags with fewer real patches stay padded."""
    b, n, _ = feats_BND.shape
    mask_BN = torch.ones(b, n, dtype=torch.bool, device=feats_BND.device) if mask_BN is None else mask_BN.bool()
    if cap <= 0 or n <= cap:
        return (feats_BND, mask_BN) if coords_BN2 is None else (feats_BND, mask_BN, coords_BN2)
    rows_f, rows_m, rows_c = [], [], []
    for i in range(b):
        real = torch.nonzero(mask_BN[i], as_tuple=False).squeeze(1)
        if real.numel() > cap:
            if train:
                pick = torch.randperm(real.numel(), generator=generator, device="cpu")[:cap].sort().values
                real = real[pick.to(real.device)]
            else:
                real = real[torch.linspace(0, real.numel() - 1, cap).round().long().to(real.device)]
        f = feats_BND.new_zeros(cap, feats_BND.shape[2])
        m = torch.zeros(cap, dtype=torch.bool, device=feats_BND.device)
        f[: real.numel()] = feats_BND[i, real]
        m[: real.numel()] = True
        rows_f.append(f)
        rows_m.append(m)
        if coords_BN2 is not None:
            c = coords_BN2.new_zeros(cap, coords_BN2.shape[2])
            c[: real.numel()] = coords_BN2[i, real]
            rows_c.append(c)
    if coords_BN2 is None:
        return torch.stack(rows_f), torch.stack(rows_m)
    return torch.stack(rows_f), torch.stack(rows_m), torch.stack(rows_c)


def coord_features(coords_BN2: torch.Tensor, mask_BN: torch.Tensor, freqs: int) -> torch.Tensor:
    """(B, N, 4 * freqs) Fourier features of the patch positions scaled to [0, 1] within each bag (module doc)."""
    c = coords_BN2.float()
    m = mask_BN.bool()[..., None]
    big = torch.finfo(c.dtype).max
    lo = torch.where(m, c, big).amin(dim=1, keepdim=True)
    hi = torch.where(m, c, -big).amax(dim=1, keepdim=True)
    u = torch.where(m, (c - lo) / (hi - lo).clamp_min(1.0), torch.zeros_like(c))  # (B, N, 2) in [0, 1]
    ang = u[..., None] * (math.pi * 2.0 ** torch.arange(freqs, device=c.device, dtype=c.dtype))  # (B, N, 2, F)
    return torch.cat([ang.sin(), ang.cos()], dim=-1).flatten(2)


class _LatentAttention(nn.Module):
    """Latents (queries) attend to concat(patches, latents) (keys/values); padded patches masked out."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"resampler width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.norm_x = nn.LayerNorm(width)
        self.norm_l = nn.LayerNorm(width)
        self.q = nn.Linear(width, width, bias=False)
        self.kv = nn.Linear(width, 2 * width, bias=False)
        self.out = nn.Linear(width, width, bias=False)

    def forward(self, x_BNW: torch.Tensor, lat_BMW: torch.Tensor, mask_BN: torch.Tensor) -> torch.Tensor:
        b, m, w = lat_BMW.shape
        h = self.heads
        x, lat = self.norm_x(x_BNW), self.norm_l(lat_BMW)
        kv_in = torch.cat([x, lat], dim=1)  # (B, N + M, W)
        q = self.q(lat).view(b, m, h, w // h).transpose(1, 2)
        k, v = self.kv(kv_in).view(b, -1, 2, h, w // h).permute(2, 0, 3, 1, 4)
        keep_BK = torch.cat([mask_BN, torch.ones(b, m, dtype=torch.bool, device=mask_BN.device)], dim=1)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=keep_BK[:, None, None, :])
        return self.out(o.transpose(1, 2).reshape(b, m, w))


class _FeedForward(nn.Sequential):
    def __init__(self, width: int, mult: int) -> None:
        super().__init__(nn.LayerNorm(width), nn.Linear(width, width * mult, bias=False), nn.GELU(),
                         nn.Linear(width * mult, width, bias=False))


class PerceiverResampler(nn.Module):
    """(B, N, D) bag + (B, N) mask -> (B, M, out_dim) latents (see the module doc)."""

    def __init__(self, feat_dim: int, width: int = 64, latents: int = 16, depth: int = 2, heads: int = 4,
                 ff_mult: int = 4, out_dim: int | None = None, cap: int = 4096, pos_freqs: int = 0) -> None:
        super().__init__()
        if min(feat_dim, width, latents, depth, heads, ff_mult) < 1:
            raise ValueError("resampler: feat_dim, width, latents, depth, heads, ff_mult must all be >= 1")
        self.feat_dim, self.cap, self.pos_freqs = feat_dim, cap, pos_freqs
        self.proj_in = nn.Linear(feat_dim, width)
        self.pos = nn.Linear(4 * pos_freqs, width, bias=False) if pos_freqs > 0 else None
        self.latents = nn.Parameter(torch.randn(latents, width) * 0.02)
        self.blocks = nn.ModuleList(nn.ModuleList([_LatentAttention(width, heads), _FeedForward(width, ff_mult)])
                                    for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.proj_out = nn.Linear(width, out_dim or width)

    @property
    def out_dim(self) -> int:
        return self.proj_out.out_features

    def forward(self, feats_BND: torch.Tensor, mask_BN: torch.Tensor | None = None,
                coords_BN2: torch.Tensor | None = None) -> torch.Tensor:
        if feats_BND.dim() != 3 or feats_BND.shape[-1] != self.feat_dim:
            raise ValueError(f"resampler: expected a bag (B, N, {self.feat_dim}), got {tuple(feats_BND.shape)}")
        if coords_BN2 is not None and tuple(coords_BN2.shape) != (*feats_BND.shape[:2], 2):
            raise ValueError(f"resampler: coords {tuple(coords_BN2.shape)} do not fit the bag {tuple(feats_BND.shape)}")
        if coords_BN2 is None or self.pos is None:
            feats_BND, mask_BN = cap_bag(feats_BND, mask_BN, self.cap, train=self.training)
            coords_BN2 = None
        else:
            feats_BND, mask_BN, coords_BN2 = cap_bag(feats_BND, mask_BN, self.cap, train=self.training,
                                                     coords_BN2=coords_BN2)
        x_BNW = self.proj_in(feats_BND.to(self.proj_in.weight.dtype))
        if coords_BN2 is not None:
            x_BNW = x_BNW + self.pos(coord_features(coords_BN2, mask_BN, self.pos_freqs).to(x_BNW.dtype))
        lat_BMW = self.latents[None].expand(x_BNW.shape[0], -1, -1)
        for attn, ff in self.blocks:
            lat_BMW = lat_BMW + attn(x_BNW, lat_BMW, mask_BN)
            lat_BMW = lat_BMW + ff(lat_BMW)
        return self.proj_out(self.norm(lat_BMW))
