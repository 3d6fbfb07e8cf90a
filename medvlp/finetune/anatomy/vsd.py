"""Vision semantic density boosting (VSD): a VQ-VAE of NORMAL organs' lowest-resolution tokens (docs/anatomy.md).

    vsd = NormalityVSD(n_organs, width, mode="conditioned", codebook_size=64)
    out = vsd(last_BLC, flags_BOL, normal_BO)   # out.recon (B, O, L, C), out.loss, out.codes, out.stats

Per ROI (one organ of one volume: its flagged last-scale tokens):
  1. min-max scale the ROI's tokens to [-0.5, 0.5] (one min and one max per ROI, over its tokens and channels);
  2. encoder: Linear C -> 2C -> Z, [organ-id token ;] tokens, a small transformer, the id token removed again;
  3. quantise each token to its nearest code (EMA codebook, straight-through gradient, commitment loss);
  4. decoder (mirror: transformer, Linear Z -> 2C -> C), then the inverse scaling
     recon = (x_rec + 0.5) * (max - min) + min.
Modes: "per_anatomy" = one VQ-VAE (and codebook) per organ, no id token; "conditioned" = one shared VQ-VAE with a
learnable organ-id token prepended before the encoder and dropped after it.
Training: only normal ROIs (`normal_BO`) enter the reconstruction loss and the codebook update, so the model learns
the normal distribution; an abnormal ROI is reconstructed "as if normal" and the difference carries the lesion.
The VQ-VAE sees detached tokens (it models the backbone's features; it does not train the backbone).

EMA codebook (van den Oord et al. 2017, appendix; started from K training vectors at the first update): with
assignments n_k and sums s_k of the batch's vectors,
  N_k <- d N_k + (1 - d) n_k ;  m_k <- d m_k + (1 - d) s_k ;  N'_k = (N_k + eps) / (sum N + K eps) * sum N ;
  e_k = m_k / N'_k.

Shape legend: B batch, O organs, L last-scale tokens, C token width, Z code width, K codebook size, R ROIs.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

VSD_MODES = ("per_anatomy", "conditioned")


def minmax_scale(x_RLC: torch.Tensor, keep_RL: torch.Tensor, eps: float = 1e-6):
    """Per-ROI min-max scaling of the kept tokens to [-0.5, 0.5] -> (scaled, lo_R11, hi_R11).

    lo/hi are over the ROI's kept tokens and all channels; padded tokens are zeroed after scaling."""
    big = torch.finfo(x_RLC.dtype).max
    k = keep_RL.unsqueeze(-1)
    lo = x_RLC.masked_fill(~k, big).amin(dim=(1, 2), keepdim=True)
    hi = x_RLC.masked_fill(~k, -big).amax(dim=(1, 2), keepdim=True)
    empty = ~keep_RL.any(dim=1).view(-1, 1, 1)
    lo, hi = torch.where(empty, torch.zeros_like(lo), lo), torch.where(empty, torch.ones_like(hi), hi)
    scaled = (x_RLC - lo) / (hi - lo).clamp_min(eps) - 0.5
    return scaled.masked_fill(~k, 0.0), lo, hi


def minmax_unscale(x_RLC: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Inverse of `minmax_scale`: (x + 0.5) * (hi - lo) + lo."""
    return (x_RLC + 0.5) * (hi - lo).clamp_min(eps) + lo


class EMACodebook(nn.Module):
    """K codes of width Z updated by exponential moving averages (no codebook gradient)."""

    def __init__(self, size: int, dim: int, decay: float = 0.99, eps: float = 1e-5) -> None:
        super().__init__()
        if size < 1 or dim < 1:
            raise ValueError(f"EMACodebook: size {size} and dim {dim} must be >= 1")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMACodebook: decay must be in [0, 1), got {decay}")
        self.size, self.dim, self.decay, self.eps = size, dim, decay, eps
        embed = torch.randn(size, dim) * 0.1
        self.register_buffer("embed", embed)
        self.register_buffer("cluster_size", torch.ones(size))
        self.register_buffer("embed_sum", embed.clone())
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def init_from(self, z_NZ: torch.Tensor) -> None:
        """Data-dependent start: the codes become K of the first training vectors (repeated when fewer), so no code
        starts out of reach of the data (fewer dead codes than a random start)."""
        pick = torch.randperm(z_NZ.shape[0], device=z_NZ.device)
        pick = pick.repeat(-(-self.size // pick.numel()))[: self.size]
        self.embed.copy_(z_NZ[pick])
        self.embed_sum.copy_(self.embed)
        self.cluster_size.fill_(1.0)
        self.initialised.fill_(True)

    def assign(self, z_NZ: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code (squared Euclidean) of each row."""
        d = (z_NZ.pow(2).sum(1, keepdim=True) - 2 * z_NZ @ self.embed.t() + self.embed.pow(2).sum(1)[None])
        return d.argmin(dim=1)

    @torch.no_grad()
    def ema_update(self, z_NZ: torch.Tensor, idx_N: torch.Tensor) -> None:
        """One EMA step from the vectors `z_NZ` assigned to codes `idx_N` (see the module doc)."""
        onehot = F.one_hot(idx_N, self.size).to(z_NZ.dtype)  # (N, K)
        n_K = onehot.sum(0)
        s_KZ = onehot.t() @ z_NZ
        self.cluster_size.mul_(self.decay).add_(n_K, alpha=1 - self.decay)
        self.embed_sum.mul_(self.decay).add_(s_KZ, alpha=1 - self.decay)
        total = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (total + self.size * self.eps) * total
        self.embed.copy_(self.embed_sum / smoothed.unsqueeze(1))

    def forward(self, z_NZ: torch.Tensor, update_rows: torch.Tensor | None = None):
        """-> (straight-through quantised z, commitment MSE, indices). `update_rows` (N,) bool: rows that update the
        codebook (training only); None = no update."""
        train = self.training and update_rows is not None and bool(update_rows.any())
        if train and not bool(self.initialised):
            self.init_from(z_NZ.detach()[update_rows])
        idx = self.assign(z_NZ.detach())
        q = self.embed[idx]
        if train:
            self.ema_update(z_NZ.detach()[update_rows], idx[update_rows])
        return z_NZ + (q - z_NZ).detach(), q, idx


def _block(dim: int, heads: int, layers: int) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=2 * dim, dropout=0.0, batch_first=True,
                                       norm_first=True)
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)


class VQVAE(nn.Module):
    """Token-set VQ-VAE: encoder Linear C->2C->Z + transformer, EMA codebook, mirrored decoder."""

    def __init__(self, width: int, code_dim: int, codebook_size: int, decay: float, heads: int = 4,
                 layers: int = 2) -> None:
        super().__init__()
        self.enc_in = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, code_dim))
        self.enc = _block(code_dim, heads, layers)
        self.codebook = EMACodebook(codebook_size, code_dim, decay)
        self.dec = _block(code_dim, heads, layers)
        self.dec_out = nn.Sequential(nn.Linear(code_dim, 2 * width), nn.GELU(), nn.Linear(2 * width, width))

    def forward(self, x_RLC: torch.Tensor, keep_RL: torch.Tensor, cond_RC: torch.Tensor | None = None,
                update_R: torch.Tensor | None = None):
        """x scaled tokens (R, L, C), keep (R, L); cond (R, C) an id token in the input width (prepended before the
        encoder, removed after it). -> (x_rec (R, L, C), commitment (R, L), idx (R, L))."""
        h = self.enc_in(x_RLC)
        pad = ~keep_RL
        if cond_RC is not None:
            h = torch.cat([self.enc_in(cond_RC).unsqueeze(1), h], dim=1)
            pad = torch.cat([torch.zeros_like(pad[:, :1]), pad], dim=1)
        # a ROI without tokens would make every key padded (NaN attention): let it attend to its padding instead
        safe_pad = pad & pad.logical_not().any(1, keepdim=True)
        z = self.enc(h, src_key_padding_mask=safe_pad)
        if cond_RC is not None:
            z = z[:, 1:]
        R, L, Z = z.shape
        upd = None if update_R is None else (update_R[:, None] & keep_RL).reshape(-1)
        zq, q, idx = self.codebook(z.reshape(R * L, Z), upd)
        commit = (z.reshape(R * L, Z) - q.detach()).pow(2).mean(1).view(R, L)
        x_rec = self.dec_out(self.dec(zq.view(R, L, Z), src_key_padding_mask=safe_pad[:, -L:]))
        return x_rec, commit, idx.view(R, L)


@dataclass
class VSDOutput:
    recon: torch.Tensor  # (B, O, L, C) reconstruction of each organ's last-scale tokens (zeros outside the ROI)
    loss: torch.Tensor  # reconstruction MSE + beta * commitment over normal ROIs' tokens (0-d)
    codes: torch.Tensor  # (B, O, L) code index of each token (-1 outside the ROI)
    stats: dict[str, float] = field(default_factory=dict)  # recon_mse, commitment


class NormalityVSD(nn.Module):
    """Normal-anatomy VQ-VAE over the last-scale tokens of every organ ROI (see the module doc)."""

    def __init__(self, n_organs: int, width: int, mode: str = "conditioned", code_dim: int = 64,
                 codebook_size: int = 64, decay: float = 0.99, commitment: float = 0.25, heads: int = 4,
                 layers: int = 2) -> None:
        super().__init__()
        if mode not in VSD_MODES:
            raise ValueError(f"vsd mode: {mode!r} is not one of {', '.join(VSD_MODES)}")
        self.mode, self.n_organs, self.width, self.commitment = mode, n_organs, width, commitment
        n_vae = n_organs if mode == "per_anatomy" else 1
        self.vaes = nn.ModuleList(VQVAE(width, code_dim, codebook_size, decay, heads, layers) for _ in range(n_vae))
        self.organ_id = nn.Embedding(n_organs, width) if mode == "conditioned" else None

    @property
    def codebooks(self) -> list[EMACodebook]:
        return [v.codebook for v in self.vaes]

    def forward(self, last_BLC: torch.Tensor, flags_BOL: torch.Tensor, normal_BO: torch.Tensor | None = None,
                organ_ids: torch.Tensor | None = None) -> VSDOutput:
        """normal_BO: bool, ROIs that train the VQ-VAE (None = none: inference). organ_ids (O,) long: the id of each
        organ slot (default 0..O-1; tests swap it to show the conditioning matters)."""
        B, L, C = last_BLC.shape
        O = self.n_organs
        x = last_BLC.detach().unsqueeze(1).expand(B, O, L, C)
        keep = flags_BOL
        train_R = None if normal_BO is None else (normal_BO.bool() & keep.any(-1))
        xs, lo, hi = minmax_scale(x.reshape(B * O, L, C), keep.reshape(B * O, L))
        xs = xs.view(B, O, L, C)
        rec = torch.zeros_like(xs)
        commit = torch.zeros(B, O, L, device=x.device, dtype=x.dtype)
        codes = torch.full((B, O, L), -1, dtype=torch.long, device=x.device)
        if self.mode == "conditioned":
            ids = torch.arange(O, device=x.device) if organ_ids is None else organ_ids.to(x.device)
            cond = self.organ_id(ids).unsqueeze(0).expand(B, O, C).reshape(B * O, C)
            upd = None if train_R is None else train_R.reshape(B * O)
            r, c, idx = self.vaes[0](xs.reshape(B * O, L, C), keep.reshape(B * O, L), cond, upd)
            rec, commit, codes = r.view(B, O, L, C), c.view(B, O, L), idx.view(B, O, L)
        else:
            parts = [self.vaes[o](xs[:, o], keep[:, o], None, None if train_R is None else train_R[:, o])
                     for o in range(O)]
            rec = torch.stack([p[0] for p in parts], 1)
            commit = torch.stack([p[1] for p in parts], 1)
            codes = torch.stack([p[2] for p in parts], 1)
        codes = codes.masked_fill(~keep, -1)
        tok_w = keep.float() if train_R is None else (keep & train_R.unsqueeze(-1)).float()
        n = tok_w.sum().clamp_min(1.0)
        mse = ((rec - xs).pow(2).mean(-1) * tok_w).sum() / n
        com = (commit * tok_w).sum() / n
        loss = mse + self.commitment * com if train_R is not None else mse.new_zeros(())
        recon = minmax_unscale(rec.reshape(B * O, L, C), lo, hi).view(B, O, L, C)
        recon = recon * keep.unsqueeze(-1)
        return VSDOutput(recon, loss, codes, {"vsd_recon_mse": float(mse.detach()),
                                              "vsd_commitment": float(com.detach())})


def codebook_usage(counts_K: torch.Tensor) -> dict[str, float]:
    """Perplexity exp(-sum p log p) of code assignment counts and the number of codes never used."""
    counts = counts_K.double()
    total = counts.sum()
    if total <= 0:
        return {"perplexity": float("nan"), "dead_codes": float(counts.numel())}
    p = counts / total
    ent = -(p[p > 0] * p[p > 0].log()).sum()
    return {"perplexity": float(ent.exp()), "dead_codes": float((counts == 0).sum())}
