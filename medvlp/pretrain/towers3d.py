"""A small 3D ResNet vision tower for CT volumes: pooled embedding + multi-scale feature maps.

Layout (ResNet-18-3D style, as in the ViSD-Boost / fVLM reference, docs/methods.md §3, but sized by config):
  stem   Conv3d k=(3,7,7) stride (1,2,2) (`stem_stride`)      -> (B, w0, D,    H/2,  W/2)
  stage0 BasicBlock3d x blocks[0], first stride (2,2,2)       -> (B, w0, D/2,  H/4,  W/4)    scale (2,4,4)
  stage1 BasicBlock3d x blocks[1], first stride 2             -> (B, w1, D/4,  H/8,  W/8)    scale (4,8,8)
  stage2 ...                                                  -> (B, w2, D/8,  H/16, W/16)   scale (8,16,16)
  stage3 ...                                                  -> (B, w3, D/16, H/32, W/32)   scale (16,32,32)
  pooled = mean over the last map; embedding = LINEAR projection (w_last -> E), as the 2D towers.
`stem_kernel` (default (3, 7, 7)) sets the stem's kernel. `stem_stride` [1, 1, 1] keeps the stem at full resolution: every scale is then twice as fine in-plane
(strides (2,2,2) ... (16,16,16)), for small volumes where a lesion is a few voxels wide.
`self.scales[i]` is the total (D, H, W) down-sampling of map i: the organ-mask max-pooling kernel of that scale;
`forward(x, return_tokens=True)` returns the four maps as a `medvlp.pretrain.tokens.VisionTokens` with these strides.

GroupNorm, not BatchNorm: CT batches are small, and a batch-independent norm keeps the embedding cache and the
W-ranks-equals-one-rank equivalence exact (BatchNorm statistics depend on how the batch is split).

Shape legend: B batch, C channels, D/H/W volume depth/height/width, E embed dim.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from medvlp.pretrain.tokens import VisionTokens

_KEYS = {"type", "image_size", "in_channels", "widths", "blocks", "groups", "stem_stride", "stem_kernel"}


def _norm(ch: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(groups, ch), ch)


class BasicBlock3d(nn.Module):
    """Two 3x3x3 convs with a residual; a strided 1x1x1 conv on the shortcut when the shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: tuple[int, int, int], groups: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.n1 = _norm(c_out, groups)
        self.conv2 = nn.Conv3d(c_out, c_out, 3, padding=1, bias=False)
        self.n2 = _norm(c_out, groups)
        self.act = nn.ReLU(inplace=True)
        self.short = None
        if c_in != c_out or any(s != 1 for s in stride):
            self.short = nn.Sequential(nn.Conv3d(c_in, c_out, 1, stride=stride, bias=False), _norm(c_out, groups))

    def forward(self, x_BCDHW: torch.Tensor) -> torch.Tensor:
        y = self.act(self.n1(self.conv1(x_BCDHW)))
        y = self.n2(self.conv2(y))
        return self.act(y + (x_BCDHW if self.short is None else self.short(x_BCDHW)))


class ResNet3D(nn.Module):
    """3D CNN tower. Input (B, 1, D, H, W); `forward(x, return_tokens=True)` -> (emb_BE, VisionTokens)."""

    def __init__(self, embed_dim: int, cfg: dict, where: str = "vision") -> None:
        super().__init__()
        for k in cfg:
            if k not in _KEYS:
                raise ValueError(f"{where}: unknown key {k!r} (allowed: {', '.join(sorted(_KEYS))})")
        widths = list(cfg.get("widths", [32, 64, 128, 256]))
        blocks = list(cfg.get("blocks", [2, 2, 2, 2]))
        if len(widths) != len(blocks) or not widths:
            raise ValueError(f"{where}: widths {widths} and blocks {blocks} must be non-empty and of equal length")
        size = cfg.get("image_size", [32, 128, 128])
        self.image_size = tuple(int(s) for s in (size if isinstance(size, (list, tuple)) else [size] * 3))
        if len(self.image_size) != 3:
            raise ValueError(f"{where}.image_size: expected (D, H, W), got {size}")
        groups = int(cfg.get("groups", 8))
        self.in_channels = int(cfg.get("in_channels", 1))
        self.width = widths[-1]
        stem_stride = tuple(int(s) for s in cfg.get("stem_stride", (1, 2, 2)))
        if len(stem_stride) != 3 or any(s not in (1, 2) for s in stem_stride):
            raise ValueError(f"{where}.stem_stride: expected three strides of 1 or 2, got {cfg.get('stem_stride')}")
        stem_kernel = tuple(int(k) for k in cfg.get("stem_kernel", (3, 7, 7)))
        if len(stem_kernel) != 3 or any(k < 1 or k % 2 == 0 for k in stem_kernel):
            raise ValueError(f"{where}.stem_kernel: expected three odd sizes, got {cfg.get('stem_kernel')}")
        self.stem = nn.Sequential(
            nn.Conv3d(self.in_channels, widths[0], stem_kernel, stride=stem_stride,
                      padding=tuple(k // 2 for k in stem_kernel), bias=False),
            _norm(widths[0], groups), nn.ReLU(inplace=True))
        self.stages = nn.ModuleList()
        self.scales: list[tuple[int, int, int]] = []
        c_in, scale = widths[0], stem_stride
        for c_out, n in zip(widths, blocks):
            layers = [BasicBlock3d(c_in, c_out, (2, 2, 2), groups)]
            layers += [BasicBlock3d(c_out, c_out, (1, 1, 1), groups) for _ in range(n - 1)]
            self.stages.append(nn.Sequential(*layers))
            scale = tuple(2 * s for s in scale)
            self.scales.append(scale)
            c_in = c_out
        self.widths = widths
        self.embed_dim = int(embed_dim)
        self.proj = nn.Linear(widths[-1], embed_dim, bias=False)
        nn.init.normal_(self.proj.weight, std=widths[-1] ** -0.5)
        self.grad_checkpointing = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def forward(self, vol_BCDHW: torch.Tensor, return_tokens: bool = False):
        if vol_BCDHW.ndim != 5 or vol_BCDHW.shape[1] != self.in_channels:
            raise ValueError(f"3D vision tower expects (B, {self.in_channels}, D, H, W), "
                             f"got shape {tuple(vol_BCDHW.shape)}")
        x = self.stem(vol_BCDHW)
        maps = []
        for stage in self.stages:
            x = checkpoint(stage, x, use_reentrant=False) if self.grad_checkpointing and self.training else stage(x)
            maps.append(x)
        emb_BE = self.proj(x.mean(dim=(2, 3, 4)))
        if not return_tokens:
            return emb_BE
        return emb_BE, VisionTokens(maps, list(self.scales), [int(m.shape[1]) for m in maps], self.embed_dim,
                                    "resnet3d")
