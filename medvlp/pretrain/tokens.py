"""`VisionTokens`: the spatial output of every vision tower in one type.

    emb_BE, tok = model.encode_image(x, return_tokens=True)     # emb_BE == model.encode_image(x)
    tok.maps[i]      (B, C_i, *grid_i)   2D: (B, C, h, w); 3D: (B, C, d, h, w); finest first, coarsest last
    tok.strides[i]   input pixels (voxels) per token along each grid axis, so strides[i][a] * grid_i[a] == input size
    tok.channels[i]  C_i;  tok.embed_dim  the projected width E;  tok.kind  "resnet" | "vit" | "resnet3d"
    tok.last         the coarsest map (the one the tower pools into the embedding)

Per tower:
  resnet    open_clip ModifiedResNet: the four stage outputs (strides 4, 8, 16, 32). The embedding is the tower's
            attention pool of `last` (`model.visual.net.attnpool(tok.last)` reproduces the unnormalised embedding).
  vit       open_clip VisionTransformer: one map, the patch tokens after the final LayerNorm, unprojected (width W,
            not E), the class token removed, reshaped from (B, L, W) to (B, W, h, w); stride = the patch size.
  resnet3d  the four stage outputs of the 3D ResNet (strides (2,4,4) ... (16,32,32) in (D, H, W)); the embedding
            is the linear projection of the mean of `last`.

Shape legend: B batch, C channels, h/w (d) token-grid height/width (depth), L tokens, W width, E embed dim.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

TOKEN_KINDS = ("resnet", "vit", "resnet3d")


@dataclass
class VisionTokens:
    """Multi-scale token maps of one image batch (see the module doc for the per-tower content)."""

    maps: list[torch.Tensor]  # each (B, C_i, *grid_i), finest first, coarsest last
    strides: list[tuple[int, ...]]  # input pixels (voxels) per token along each grid axis, one tuple per map
    channels: list[int]  # C_i of each map
    embed_dim: int  # projected width E of the pooled embedding
    kind: str  # "resnet" | "vit" | "resnet3d"

    def __post_init__(self) -> None:
        if self.kind not in TOKEN_KINDS:
            raise ValueError(f"VisionTokens.kind: {self.kind!r} is not one of {', '.join(TOKEN_KINDS)}")
        if not self.maps or not len(self.maps) == len(self.strides) == len(self.channels):
            raise ValueError(f"VisionTokens: {len(self.maps)} maps, {len(self.strides)} strides and "
                             f"{len(self.channels)} channels must be equal in number and non-zero")
        for i, (m, s, c) in enumerate(zip(self.maps, self.strides, self.channels)):
            if m.ndim != 2 + len(s) or m.shape[1] != c:
                raise ValueError(f"VisionTokens.maps[{i}]: shape {tuple(m.shape)} does not fit {c} channels and "
                                 f"stride {s}")

    @property
    def last(self) -> torch.Tensor:
        """The coarsest map (B, C, *grid)."""
        return self.maps[-1]

    @property
    def grids(self) -> list[tuple[int, ...]]:
        """The token grid of each map, e.g. (h, w) or (d, h, w)."""
        return [tuple(int(n) for n in m.shape[2:]) for m in self.maps]

    def __len__(self) -> int:
        return len(self.maps)
