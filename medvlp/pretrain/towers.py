"""The 2D vision towers and the text towers of MedCLIP, built from open_clip's and transformers' own modules.

Each tower ends in a LINEAR projection to the shared embedding width E (CLIP, docs/methods.md §1):
  * ResNet (open_clip `ModifiedResNet`): the attention pool's output projection `attnpool.c_proj` (C -> E);
  * ViT (open_clip `VisionTransformer`): the bias-free `proj` (W -> E) on the class token;
  * open_clip text transformer: `text_projection` (W -> E) on the [EOS] state;
  * BERT (`transformers.BertModel`, built from a local `BertConfig`, never from the hub): `proj` (H -> E).
Building through open_clip's own classes keeps `RN50` / `ViT-B-16` identical to open_clip's models of that name,
so a benchmark against open_clip compares the same network.

Text embedding (the "final [EOS] state"):
  * open_clip text: the state at the argmax token id (the BPE end-of-text id is the largest id in the vocab);
  * BERT: `pool="cls"` (default) takes the [CLS] state (BERT's sentence summary; the encoder is bidirectional so
    [CLS] sees every token), `pool="eos"` the last non-pad token ([SEP]), which assumes right padding.

Shape legend:
  B batch, C channels, H/W image height/width, h/w feature-map height/width, L tokens, W width, E embed dim.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from medvlp.pretrain.tokens import VisionTokens

VISION_KINDS = ("resnet", "vit")
TEXT_KINDS = ("openclip", "bert")


def _cfg_error(where: str, key: str, allowed: Any) -> ValueError:
    return ValueError(f"{where}: unknown key {key!r} (allowed: {', '.join(sorted(allowed))})")


def _checked(cls: type, cfg: dict, where: str) -> Any:
    """Build open_clip's config dataclass `cls` from `cfg`, naming the bad key instead of a TypeError."""
    allowed = set(cls.__dataclass_fields__)
    for k in cfg:
        if k not in allowed:
            raise _cfg_error(where, k, allowed)
    return cls(**cfg)


# ------------------------------------------------------------------------------------------------ vision (2D)
class OpenClipVision(nn.Module):
    """open_clip's ModifiedResNet (`type: resnet`) or VisionTransformer (`type: vit`), with spatial tokens on request.

    Input (B, C, H, W) with C = 3; grey input (C = 1) is repeated to 3 channels so the stem (and RN50's weights)
    stay exactly open_clip's. Tokens (`medvlp.pretrain.tokens.VisionTokens`): ResNet the four stage maps (strides 4, 8, 16,
    32; the attention pool of the last gives the embedding), ViT the unprojected patch grid (stride = patch size).
    """

    RESNET_STRIDES = (4, 8, 16, 32)  # stem (conv s2 + avgpool 2) = 4, then layer2..4 each halve

    def __init__(self, embed_dim: int, cfg: dict, where: str = "vision") -> None:
        super().__init__()
        from open_clip.model import CLIPVisionCfg, _build_vision_tower

        cfg = dict(cfg)
        self.kind = cfg.pop("type")
        if self.kind not in VISION_KINDS:
            raise ValueError(f"{where}.type: {self.kind!r} is not one of {', '.join(VISION_KINDS)}")
        if self.kind == "vit":
            cfg["output_tokens"] = True  # the pooled embedding and the patch tokens come from one pass
            if isinstance(cfg.get("layers"), list):
                raise ValueError(f"{where}.layers: a ViT takes an int layer count, got {cfg['layers']}")
        elif not isinstance(cfg.get("layers"), list) or len(cfg["layers"]) != 4:
            raise ValueError(f"{where}.layers: a ResNet takes 4 stage depths, got {cfg.get('layers')}")
        vcfg = _checked(CLIPVisionCfg, cfg, where)
        self.image_size = int(vcfg.image_size)
        self.width = int(vcfg.width)
        self.embed_dim = int(embed_dim)
        self.net = _build_vision_tower(embed_dim, vcfg)
        self.grad_checkpointing = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        if self.kind == "vit":
            self.net.set_grad_checkpointing(enable)
        # open_clip's ModifiedResNet ignores the flag, so the stages are checkpointed in `_resnet` below.

    def _resnet(self, img_BCHW: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        net = self.net
        x = net.stem(img_BCHW.to(dtype=net.conv1.weight.dtype))
        maps = []
        for stage in (net.layer1, net.layer2, net.layer3, net.layer4):
            # BatchNorm running stats are updated again by the recomputation: harmless, and documented.
            x = checkpoint(stage, x, use_reentrant=False) if self.grad_checkpointing and self.training else stage(x)
            maps.append(x)
        return net.attnpool(x), maps

    def _vit_grid(self, tok_BLW: torch.Tensor) -> torch.Tensor:
        """(B, L, W) patch tokens -> (B, W, h, w) on the patch grid."""
        h, w = (int(n) for n in self.net.grid_size)
        b, n, width = tok_BLW.shape
        if n != h * w:  # e.g. a pool_type that keeps the class token
            raise ValueError(f"ViT returned {n} tokens; its {h}x{w} patch grid needs {h * w}")
        return tok_BLW.transpose(1, 2).reshape(b, width, h, w)

    def forward(self, img_BCHW: torch.Tensor, return_tokens: bool = False):
        """-> emb_BE, or (emb_BE, VisionTokens)."""
        if img_BCHW.ndim != 4:
            raise ValueError(f"2D vision tower expects (B, C, H, W), got shape {tuple(img_BCHW.shape)}")
        if img_BCHW.shape[1] == 1:
            img_BCHW = img_BCHW.expand(-1, 3, -1, -1)
        if self.kind == "vit":  # open_clip's ViT does not cast its input (its ResNet does): bf16 weights need it
            emb_BE, tok_BLW = self.net(img_BCHW.to(dtype=self.net.conv1.weight.dtype))
            if not return_tokens:
                return emb_BE
            grid_BWhw = self._vit_grid(tok_BLW)
            stride = tuple(int(p) for p in self.net.patch_size)
            return emb_BE, VisionTokens([grid_BWhw], [stride], [int(grid_BWhw.shape[1])], self.embed_dim, "vit")
        emb_BE, maps = self._resnet(img_BCHW)
        if not return_tokens:
            return emb_BE
        return emb_BE, VisionTokens(maps, [(s, s) for s in self.RESNET_STRIDES], [int(m.shape[1]) for m in maps],
                                    self.embed_dim, "resnet")


# ------------------------------------------------------------------------------------------------ text
class OpenClipText(nn.Module):
    """open_clip's causal text transformer (BPE ids); embedding = projected state at the [EOS] (argmax) token."""

    def __init__(self, embed_dim: int, cfg: dict, where: str = "text") -> None:
        super().__init__()
        from open_clip.model import CLIPTextCfg, _build_text_tower

        cfg = dict(cfg)
        cfg.pop("type")
        tcfg = _checked(CLIPTextCfg, cfg, where)
        if tcfg.hf_model_name:
            raise ValueError(f"{where}.hf_model_name: hub text models are not used; use type: bert")
        self.context_length = int(tcfg.context_length)
        self.vocab_size = int(tcfg.vocab_size)
        self.width = int(tcfg.width)
        self.layers = int(tcfg.layers)
        self.net = _build_text_tower(embed_dim, tcfg)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.net.set_grad_checkpointing(enable)

    def forward(self, tok_BL: torch.Tensor) -> torch.Tensor:
        if tok_BL.ndim != 2 or tok_BL.shape[1] != self.context_length:
            raise ValueError(f"text tower expects (B, {self.context_length}) token ids, got {tuple(tok_BL.shape)}")
        return self.net(tok_BL)


class BertText(nn.Module):
    """A BERT encoder (`transformers.BertModel` from a local `BertConfig`) + a bias-free linear projection."""

    POOLS = ("cls", "eos")

    def __init__(self, embed_dim: int, cfg: dict, where: str = "text") -> None:
        super().__init__()
        from transformers import BertConfig, BertModel

        cfg = dict(cfg)
        cfg.pop("type")
        self.pool = cfg.pop("pool", "cls")
        if self.pool not in self.POOLS:
            raise ValueError(f"{where}.pool: {self.pool!r} is not one of {', '.join(self.POOLS)}")
        self.context_length = int(cfg.pop("context_length", 77))
        allowed = set(BertConfig().to_dict())
        for k in cfg:
            if k not in allowed:
                raise _cfg_error(where, k, allowed)
        if cfg.get("max_position_embeddings", 512) < self.context_length:
            raise ValueError(f"{where}.max_position_embeddings < context_length {self.context_length}")
        self.config = BertConfig(**cfg)
        self.pad_id = int(self.config.pad_token_id or 0)
        self.vocab_size = int(self.config.vocab_size)
        self.width = int(self.config.hidden_size)
        self.layers = int(self.config.num_hidden_layers)
        self.net = BertModel(self.config, add_pooling_layer=False)
        self.proj = nn.Linear(self.width, embed_dim, bias=False)
        nn.init.normal_(self.proj.weight, std=self.width ** -0.5)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        # transformers 5 renamed gradient_* to activation_checkpointing_*; 4.x has only the old names.
        if hasattr(self.net, "activation_checkpointing_enable"):
            if enable:
                self.net.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                self.net.activation_checkpointing_disable()
        elif enable:
            self.net.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            self.net.gradient_checkpointing_disable()

    def forward(self, tok_BL: torch.Tensor) -> torch.Tensor:
        if tok_BL.ndim != 2:
            raise ValueError(f"text tower expects (B, L) token ids, got {tuple(tok_BL.shape)}")
        mask_BL = (tok_BL != self.pad_id).long()
        hid_BLW = self.net(input_ids=tok_BL, attention_mask=mask_BL).last_hidden_state
        if self.pool == "cls":
            pooled_BW = hid_BLW[:, 0]
        else:  # last non-pad token ([SEP]) under right padding
            last_B = (mask_BL.sum(1) - 1).clamp(min=0)
            pooled_BW = hid_BLW[torch.arange(hid_BLW.shape[0], device=hid_BLW.device), last_B]
        return self.proj(pooled_BW)


def build_vision(embed_dim: int, cfg: dict, where: str = "vision") -> nn.Module:
    kind = cfg.get("type")
    if kind == "resnet3d":
        from medvlp.pretrain.towers3d import ResNet3D

        return ResNet3D(embed_dim, cfg, where)
    if kind not in VISION_KINDS:
        raise ValueError(f"{where}.type: {kind!r} is not one of {', '.join(VISION_KINDS + ('resnet3d',))}")
    return OpenClipVision(embed_dim, cfg, where)


def build_text(embed_dim: int, cfg: dict, where: str = "text") -> nn.Module:
    kind = cfg.get("type")
    if kind == "openclip":
        return OpenClipText(embed_dim, cfg, where)
    if kind == "bert":
        return BertText(embed_dim, cfg, where)
    raise ValueError(f"{where}.type: {kind!r} is not one of {', '.join(TEXT_KINDS)}")
