"""The anatomy model: a CLIP 3D tower turned into organ embeddings, contrasted with per-organ report sentences.

    model = AnatomyModel(clip, organ_names, AnatomyModelConfig(vse=True, vsd=True))
    emb_BOE, feats = model.encode_organs(volume_B1DHW, mask_BDHW, normal_BO=None)
    txt_BOE = model.encode_sentences(organ_sentences)          # list[list[str]] -> (B, O, E)

Vision path (`OrganEncoder`, also the momentum encoder of VSE):
  tower tokens (VisionTokens, 4 scales) -> per-scale Linear to the width C (ScaleProjection)
  organ masks max-pooled per scale (pool_organ_masks)
  [VSD] last-scale tokens of each organ ROI -> normal-anatomy VQ-VAE -> reconstruction; hybrid tokens
        proj([x ; x]) for the other scales and proj([x ; recon_o]) for the last one, proj = Linear 2C -> C -> C
  learnable organ queries, attention pooling over each organ's tokens (OrganQueryPool)      -> pooled (B, O, C)
Then self-attention across the organ tokens of a volume, Linear C -> E, L2 normalised (fVLM). VSE uses its own
head on the pooled tokens (Linear C -> C, L2 normalised), with the momentum copy of the vision path + head.
Text: the CLIP text tower (its projection included); the CLIP temperature is the contrastive scale.

Shape legend: B batch, O organs, C token width, E embedding width (the CLIP embed_dim), L tokens.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from medvlp.finetune.anatomy.losses import organ_contrastive_loss, vse_loss
from medvlp.finetune.anatomy.organs import (OrganQueryPool, OrganStatNorm, ScaleProjection, organ_fractions,
                                             organ_token_flags, pool_organ_masks, stat_pool)
from medvlp.finetune.anatomy.vsd import NormalityVSD, VSDOutput

MAX_LOGIT_SCALE = 4.6052  # log 100, as the pretrained CLIP


@dataclass
class AnatomyModelConfig:
    """The organ head on top of the 3D tower (VSE / VSD switches and their knobs)."""

    width: int = 64  # common token width C every scale is projected to (reference: 256)
    heads: int = 4  # attention heads of the organ-query pooling and the organ self-attention
    organ_layers: int = 1  # self-attention layers across a volume's organ tokens
    vse: bool = False  # vision semantic enhancement (momentum encoder + normal/abnormal contrast)
    vse_weight: float = 1.0  # weight of the VSE loss
    vse_tau: float = 0.1  # VSE temperature
    vse_momentum: float = 0.99  # EMA decay of the momentum encoder
    vse_noise: float = 0.02  # augmentation: Gaussian noise std on the windowed volume ([-1, 1] units)
    vse_intensity: float = 0.1  # augmentation: random scale 1 +- this and shift +- this / 2 of intensities
    vsd: bool = False  # vision semantic density boosting (normal-anatomy VQ-VAE on the last scale)
    vsd_mode: str = "conditioned"  # conditioned (one VQ-VAE + organ-id token) | per_anatomy (one per organ)
    vsd_weight: float = 1.0  # weight of the VQ-VAE loss (reconstruction + commitment)
    codebook_size: int = 64  # VQ codes K (reference: 400)
    code_dim: int = 64  # code width Z (reference: 768)
    codebook_decay: float = 0.99  # EMA decay of the codebook
    commitment: float = 0.25  # commitment loss weight beta
    vsd_layers: int = 2  # transformer layers of the VQ-VAE encoder and of its decoder
    soft_targets: bool = True  # fVLM soft targets (normal-normal / identical sentences are positives)
    token_select: str = "interior"  # organ tokens: interior (cells >= half inside the organ; all its cells when
    #                                 none is) | any (reference: a cell with any organ voxel)
    stat_pool: int = 2  # organ token += Linear of the masked max and sd of the n finest scales' tokens (0 = off)
    stem_stat: bool = False  # also the max and sd of the tower's stem map over the organ's voxels (a full-resolution
    #                          stem: the voxels themselves; statistic pooling only, the query does not attend to it)
    stem_norm: bool = False  # standardise the stem statistics per organ (OrganStatNorm) before the statistic MLP


@dataclass
class OrganFeatures:
    pooled: torch.Tensor  # (B, O, C) attention-pooled organ tokens
    present: torch.Tensor  # (B, O) bool: the organ has at least one token
    vsd: VSDOutput | None


class OrganEncoder(nn.Module):
    """3D tower -> multi-scale organ tokens -> [VSD hybrid] -> per-organ attention pooling (see module doc)."""

    def __init__(self, visual: nn.Module, n_organs: int, cfg: AnatomyModelConfig) -> None:
        super().__init__()
        self.visual, self.n_organs, self.cfg = visual, n_organs, cfg
        if not hasattr(visual, "scales") or not hasattr(visual, "widths"):
            raise ValueError("anatomy: the model's vision tower has no multi-scale 3D maps; use a resnet3d tower "
                             "(e.g. model debug-3d)")
        C = cfg.width
        self.tokens = ScaleProjection(visual.widths, C)
        self.vsd = None
        if cfg.vsd:
            self.vsd = NormalityVSD(n_organs, C, cfg.vsd_mode, cfg.code_dim, cfg.codebook_size, cfg.codebook_decay,
                                    cfg.commitment, cfg.heads, cfg.vsd_layers)
            self.hybrid = nn.Sequential(nn.Linear(2 * C, C), nn.GELU(), nn.Linear(C, C))
        self.pool = OrganQueryPool(n_organs, C, cfg.heads)
        self.stat_scales = min(int(cfg.stat_pool), len(visual.widths))
        self.stem_width = 0
        if cfg.stem_stat:
            if not hasattr(visual, "stem") or not hasattr(visual, "stages"):
                raise ValueError("head.stem_stat: the vision tower has no stem map (use a resnet3d tower)")
            self.stem_width = int(visual.widths[0])
        self.stem_norm = OrganStatNorm(n_organs, 2 * self.stem_width) if (cfg.stem_norm and self.stem_width) else None
        n_stat = 2 * self.stat_scales * C + 2 * self.stem_width
        if n_stat:
            self.stat = nn.Sequential(nn.Linear(n_stat, C), nn.GELU(), nn.Linear(C, C))
            self.stat_norm = nn.LayerNorm(C)

    def organ_flags(self, mask_BDHW: torch.Tensor, tok) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per scale (B, O, L_i): (bool flags of the tokens the organ query attends to, token weights of the
        statistic pooling)."""
        if self.cfg.token_select == "any":
            flags = pool_organ_masks(mask_BDHW, self.n_organs, tok.strides, tok.grids)
            return flags, [f.float() for f in flags]
        fracs = organ_fractions(mask_BDHW, self.n_organs, tok.strides, tok.grids)
        flags = [organ_token_flags(f) for f in fracs]
        return flags, [f.float() for f in flags]

    def _with_stats(self, pooled_BOC: torch.Tensor, xs: list[torch.Tensor], weights: list[torch.Tensor],
                    stem=None, present_BO: torch.Tensor | None = None):
        if not (self.stat_scales or self.stem_width):
            return pooled_BOC
        st = [stat_pool(x, w) for x, w in zip(xs[:self.stat_scales], weights[:self.stat_scales])]
        if stem is not None:
            s = stat_pool(*stem)
            st.append(s if self.stem_norm is None else self.stem_norm(s, present_BO))
        return self.stat_norm(pooled_BOC + self.stat(torch.cat(st, -1)))

    def tower(self, vol_B1DHW: torch.Tensor):
        """(VisionTokens of the tower, its stem map (B, w0, d, h, w) or None): the tower's own forward unless
        head.stem_stat needs the stem map too (then the same stem -> stages computation, run here)."""
        v = self.visual
        if not self.stem_width:
            return v(vol_B1DHW, return_tokens=True)[1], None
        from medvlp.pretrain.tokens import VisionTokens

        if vol_B1DHW.ndim != 5 or vol_B1DHW.shape[1] != v.in_channels:
            raise ValueError(f"3D vision tower expects (B, {v.in_channels}, D, H, W), got {tuple(vol_B1DHW.shape)}")
        stem = x = v.stem(vol_B1DHW)
        maps = []
        for stage in v.stages:
            x = stage(x)
            maps.append(x)
        return VisionTokens(maps, list(v.scales), [int(m.shape[1]) for m in maps], v.embed_dim, "resnet3d"), stem

    def stem_weights(self, mask_BDHW: torch.Tensor, stem_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(stem tokens (B, L0, w0), (B, O, L0) organ weights: the fraction of each stem cell in the organ, cells
        at least half inside)."""
        stride = tuple(int(round(m / s)) for m, s in zip(mask_BDHW.shape[1:], stem_B.shape[2:]))
        fr = organ_fractions(mask_BDHW, self.n_organs, [stride], [tuple(stem_B.shape[2:])])[0]
        return stem_B.flatten(2).transpose(1, 2), organ_token_flags(fr).float()

    def forward(self, vol_B1DHW: torch.Tensor, mask_BDHW: torch.Tensor,
                normal_BO: torch.Tensor | None = None) -> OrganFeatures:
        tok, stem = self.tower(vol_B1DHW)
        if stem is not None:
            stem = self.stem_weights(mask_BDHW, stem)
        flags, weights = self.organ_flags(mask_BDHW, tok)
        xs = self.tokens(tok.maps)
        present = torch.stack([f.any(-1) for f in flags]).any(0)
        if self.vsd is None:
            pooled = self.pool(torch.cat(xs, 1), torch.cat(flags, 2))
            return OrganFeatures(self._with_stats(pooled, xs, weights, stem, present), present, None)
        out = self.vsd(xs[-1], flags[-1], normal_BO)
        other = torch.cat(xs[:-1], 1)
        shared = self.hybrid(torch.cat([other, other], -1))
        last = xs[-1].unsqueeze(1).expand_as(out.recon)
        own = self.hybrid(torch.cat([last, out.recon.detach()], -1))  # (B, O, L, C)
        pooled = self.pool(shared, torch.cat(flags[:-1], 2), own, flags[-1])
        return OrganFeatures(self._with_stats(pooled, xs, weights, stem, present), present, out)


class AnatomyModel(nn.Module):
    """Organ embeddings (vision) and organ-sentence embeddings (text) in the CLIP space; see the module doc."""

    def __init__(self, clip: nn.Module, organ_names: Sequence[str], cfg: AnatomyModelConfig | None = None) -> None:
        super().__init__()
        cfg = cfg or AnatomyModelConfig()
        self.cfg, self.organ_names = cfg, list(organ_names)
        if not self.organ_names:
            raise ValueError("anatomy: no organ names")
        O, C, E = len(self.organ_names), cfg.width, int(clip.embed_dim)
        self.embed_dim = E
        self.encoder = OrganEncoder(clip.visual, O, cfg)
        layer = nn.TransformerEncoderLayer(C, cfg.heads, dim_feedforward=2 * C, dropout=0.0, batch_first=True,
                                           norm_first=True)
        self.organ_attn = nn.TransformerEncoder(layer, cfg.organ_layers, enable_nested_tensor=False)
        self.head = nn.Linear(C, E)
        self.text = clip.text
        self.logit_scale = clip.logit_scale
        self._tokenizer = clip.tokenizer
        self.vse_head = nn.Linear(C, C) if cfg.vse else None
        self.momentum = None
        if cfg.vse:
            self.momentum = nn.ModuleDict({"encoder": copy.deepcopy(self.encoder),
                                           "vse_head": copy.deepcopy(self.vse_head)})
            for p in self.momentum.parameters():
                p.requires_grad_(False)

    @property
    def tokenizer(self):
        return self._tokenizer

    def scale(self) -> torch.Tensor:
        return self.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp().reshape(())

    def project(self, pooled_BOC: torch.Tensor, present_BO: torch.Tensor) -> torch.Tensor:
        """Self-attention across the organs present in each volume, then Linear C -> E, L2 normalised."""
        pad = ~present_BO
        pad = pad & (~pad).any(1, keepdim=True)  # a volume with no organ at all attends to its padding
        h = self.organ_attn(pooled_BOC, src_key_padding_mask=pad)
        return F.normalize(self.head(h), dim=-1)

    def encode_organs(self, vol_B1DHW: torch.Tensor, mask_BDHW: torch.Tensor,
                      normal_BO: torch.Tensor | None = None) -> tuple[torch.Tensor, OrganFeatures]:
        feats = self.encoder(vol_B1DHW, mask_BDHW, normal_BO)
        return self.project(feats.pooled, feats.present), feats

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, E) L2-normalised embeddings of sentences (each distinct sentence encoded once)."""
        uniq = list(dict.fromkeys(texts))
        dev = self.logit_scale.device
        emb = F.normalize(self.text(self.tokenizer(uniq).to(dev)), dim=-1)
        where = {t: i for i, t in enumerate(uniq)}
        return emb[torch.tensor([where[t] for t in texts], device=dev)]

    def encode_sentences(self, sentences: Sequence[Sequence[str]]) -> torch.Tensor:
        """list of B lists of O sentences -> (B, O, E)."""
        B, O = len(sentences), len(self.organ_names)
        if any(len(s) != O for s in sentences):
            raise ValueError(f"anatomy: each sample needs {O} organ sentences ({', '.join(self.organ_names)})")
        return self.encode_texts([t for s in sentences for t in s]).view(B, O, -1)

    def forward(self, volume: torch.Tensor, mask: torch.Tensor, normal: torch.Tensor, text_tokens: torch.Tensor,
                text_index: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One training micro batch -> (loss, metrics). volume (B, 1, D, H, W), mask (B, D, H, W) organ labels,
        normal (B, O) bool, text_tokens (U, L) the distinct organ sentences, text_index (B, O) their index.
        Identical sentences share an index (soft targets treat them as positives)."""
        cfg = self.cfg
        if self.training and self.momentum is not None:
            self.update_momentum()  # EMA from the previous optimizer step
        view1 = volume
        if cfg.vse:
            view1 = augment_volume(volume, None, cfg.vse_intensity, cfg.vse_noise)
        emb, feats = self.encode_organs(view1, mask, normal if cfg.vsd else None)
        txt = F.normalize(self.text(text_tokens), dim=-1)[text_index]  # (B, O, E)
        scale = self.scale()
        loss_c = organ_contrastive_loss(emb, txt, scale, feats.present, normal.float(), text_index,
                                        cfg.soft_targets)
        loss = loss_c
        metrics = {"loss_organ": loss_c.detach(), "scale": scale.detach()}
        if cfg.vse:
            view2 = augment_volume(volume, None, cfg.vse_intensity, cfg.vse_noise)
            k = self.momentum_embed(view2, mask)
            loss_v = vse_loss(self.vse_embed(feats.pooled), k, normal, feats.present, cfg.vse_tau)
            loss = loss + cfg.vse_weight * loss_v
            metrics["loss_vse"] = loss_v.detach()
        if cfg.vsd:
            loss = loss + cfg.vsd_weight * feats.vsd.loss
            metrics["loss_vsd"] = feats.vsd.loss.detach()
            metrics.update({k: torch.tensor(v) for k, v in feats.vsd.stats.items()})
        return loss, metrics

    def vse_embed(self, pooled_BOC: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.vse_head(pooled_BOC), dim=-1)

    @torch.no_grad()
    def momentum_embed(self, vol_B1DHW: torch.Tensor, mask_BDHW: torch.Tensor) -> torch.Tensor:
        m = self.momentum
        feats = m["encoder"](vol_B1DHW, mask_BDHW, None)
        return F.normalize(m["vse_head"](feats.pooled), dim=-1)

    @torch.no_grad()
    def update_momentum(self) -> None:
        """EMA of the online vision path into the momentum encoder: m <- d m + (1 - d) online (buffers copied)."""
        if self.momentum is None:
            return
        d = self.cfg.vse_momentum
        pairs = [(self.encoder, self.momentum["encoder"]), (self.vse_head, self.momentum["vse_head"])]
        for online, mom in pairs:
            for p, q in zip(online.parameters(), mom.parameters()):
                q.mul_(d).add_(p.detach(), alpha=1 - d)
            for b, c in zip(online.buffers(), mom.buffers()):
                c.copy_(b)


def augment_volume(vol_B1DHW: torch.Tensor, gen: torch.Generator | None, intensity: float,
                   noise: float) -> torch.Tensor:
    """VSE view: per-volume intensity scale/shift and Gaussian noise, clamped to the window [-1, 1]."""
    B = vol_B1DHW.shape[0]
    shape = (B, 1, 1, 1, 1)
    a = 1 + intensity * (2 * torch.rand(shape, generator=gen) - 1)
    b = 0.5 * intensity * (2 * torch.rand(shape, generator=gen) - 1)
    n = noise * torch.randn(vol_B1DHW.shape, generator=gen)  # global RNG by default (saved with checkpoints)
    return (vol_B1DHW * a.to(vol_B1DHW) + b.to(vol_B1DHW) + n.to(vol_B1DHW)).clamp(-1.0, 1.0)
