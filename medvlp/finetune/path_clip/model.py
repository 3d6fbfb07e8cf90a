"""Path-CLIP head: residual feature refinement (RFR) with hidden representation perturbation and a self-adaptive
residual ratio, on top of a frozen CLIP image embedding and frozen class-prompt text embeddings.

    f     = norm(encode_image(x))                             frozen image tower, (B, E)
    f~    = f + eps,   eps ~ N(0, (sigma * |f| / sqrt(E))^2)  training only (hidden representation perturbation)
    z     = norm(RFR(f~))                                     the only trained weights (+ theta of alpha)
    f'    = alpha * z + (1 - alpha) * f                       residual mix (CLIPath / CLIP-Adapter form)
    logit = s * norm(f') . norm(T)^T                          T (C, E): class-prompt embeddings, s the model's scale

RFR is a bias-free Linear+ReLU stack whose bottleneck scales with the width: E -> E/2 -> E/4 -> E/2 -> E (for the
1024-d ResNet-50 CLIP feature that is the paper's 1024 -> 512 -> 256 -> 512 -> 1024).

Self-adaptive residual ratio (the paper leaves the formula open; this is ours):

    alpha = lo + (hi - lo) * sigmoid(g * theta) * tau

theta is a learned scalar (g = `theta_gain`, default 10: Adam moves a parameter by about the learning rate per
step whatever its gradient's size, so the gain lets alpha move on the adapter's time scale rather than stay
put); tau in [0, 1] is the dual-view agreement: the mean cosine similarity of the RFR outputs of the weak and
the strong view of the same images, mapped to [0, 1] as (1 + cos) / 2 and averaged over training batches with an
exponential moving average (momentum `tau_momentum`, a buffer saved with the weights, used as is at evaluation).
tau is detached: the adapter must not collapse the two views just to raise its own weight. Because the DVC loss
trains the refined views to agree, tau measured on them sits near 1 whatever the data; `tau_source="frozen"` (the
default) measures it on the frozen embeddings of the two views instead, which the training cannot move: tau then
says how stable the pretrained feature itself is under the strong augmentation on this task. When strong and weak
views agree (the refinement is stable under augmentation) alpha grows and the refined feature counts more; when
they disagree (the adapter fits view-specific detail: over-fitting) alpha shrinks toward `lo` and the frozen
feature dominates. alpha stays within [lo, hi] by construction. The fixed mode (`alpha_mode="fixed"`) uses
alpha = `alpha` exactly (the CLIPath / CLIP-Adapter residual adapter, and the ablation of the adaptive ratio).

Shape legend: B batch, E embedding width, C classes, H hidden width.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def rfr_widths(embed_dim: int) -> list[int]:
    """[E, E/2, E/4, E/2, E] (1024 -> 512 -> 256 -> 512 -> 1024); every width at least 1."""
    if embed_dim < 1:
        raise ValueError(f"embed_dim must be >= 1, got {embed_dim}")
    h1, h2 = max(1, embed_dim // 2), max(1, embed_dim // 4)
    return [embed_dim, h1, h2, h1, embed_dim]


class RFRAdapter(nn.Module):
    """Residual feature refinement MLP: bias-free Linear + ReLU per layer, widths `rfr_widths(E)`."""

    def __init__(self, embed_dim: int) -> None:
        super().__init__()
        self.widths = rfr_widths(embed_dim)
        layers: list[nn.Module] = []
        for a, b in zip(self.widths[:-1], self.widths[1:]):
            layers += [nn.Linear(a, b, bias=False), nn.ReLU(inplace=False)]
        self.net = nn.Sequential(*layers)

    def forward(self, f_BE: torch.Tensor) -> torch.Tensor:
        return self.net(f_BE)


def perturb(f_BE: torch.Tensor, std: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """f + eps with eps ~ N(0, (std * |f| / sqrt(E))^2) per row: std is relative to the per-coordinate RMS."""
    if std <= 0:
        return f_BE
    rms_B1 = f_BE.norm(dim=-1, keepdim=True) / math.sqrt(f_BE.shape[-1])
    noise = torch.randn(f_BE.shape, generator=generator, device=f_BE.device, dtype=f_BE.dtype)
    return f_BE + std * rms_B1 * noise


def view_agreement(z_weak_BE: torch.Tensor, z_strong_BE: torch.Tensor) -> torch.Tensor:
    """tau in [0, 1]: (1 + mean_i cos(z_weak_i, z_strong_i)) / 2, detached (0-d tensor)."""
    if z_weak_BE.shape != z_strong_BE.shape:
        raise ValueError(f"weak {tuple(z_weak_BE.shape)} and strong {tuple(z_strong_BE.shape)} views differ")
    cos_B = F.cosine_similarity(z_weak_BE.detach().float(), z_strong_BE.detach().float(), dim=-1)
    return ((1.0 + cos_B.mean()) / 2.0).clamp(0.0, 1.0)


class ResidualRatio(nn.Module):
    """alpha = lo + (hi - lo) * sigmoid(g * theta) * tau (adaptive) or the constant `alpha` (fixed); see module doc."""

    def __init__(self, mode: str = "adaptive", alpha: float = 0.5, lo: float = 0.0, hi: float = 1.0,
                 tau_momentum: float = 0.9, theta_gain: float = 10.0) -> None:
        super().__init__()
        if mode not in ("adaptive", "fixed"):
            raise ValueError(f"alpha_mode: {mode!r} is not one of adaptive, fixed")
        if not 0.0 <= lo < hi <= 1.0:
            raise ValueError(f"alpha bounds: need 0 <= lo < hi <= 1, got lo={lo}, hi={hi}")
        if not lo <= alpha <= hi:
            raise ValueError(f"alpha: {alpha} is outside [{lo}, {hi}]")
        if not 0.0 <= tau_momentum < 1.0:
            raise ValueError(f"tau_momentum: must be in [0, 1), got {tau_momentum}")
        if theta_gain <= 0:
            raise ValueError(f"theta_gain: must be > 0, got {theta_gain}")
        self.mode, self.lo, self.hi, self.momentum = mode, float(lo), float(hi), float(tau_momentum)
        self.gain = float(theta_gain)
        self.fixed = float(alpha)
        # theta starts where alpha = `alpha` at full agreement (tau = 1); clamped away from sigmoid's asymptotes.
        u = min(max((alpha - lo) / (hi - lo), 1e-3), 1 - 1e-3)
        self.theta = nn.Parameter(torch.full((1,), math.log(u / (1 - u)) / self.gain),
                                  requires_grad=mode == "adaptive")
        self.register_buffer("tau", torch.ones(1))  # running dual-view agreement
        self.register_buffer("tau_seen", torch.zeros(1))  # 0 until the first update

    @torch.no_grad()
    def update_tau(self, tau_batch: torch.Tensor) -> None:
        """Fold one batch's agreement into the running tau (averaged over processes when several train)."""
        t = tau_batch.detach().float().reshape(1).to(self.tau.device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(t)
            t /= torch.distributed.get_world_size()
        if float(self.tau_seen) == 0.0:
            self.tau.copy_(t)
            self.tau_seen.fill_(1.0)
        else:
            self.tau.mul_(self.momentum).add_((1 - self.momentum) * t)

    def forward(self, tau: torch.Tensor | None = None) -> torch.Tensor:
        """alpha as a 0-d tensor; `tau` overrides the running agreement (adaptive mode)."""
        if self.mode == "fixed":
            return self.theta.new_tensor(self.fixed).reshape(())
        t = (self.tau if tau is None else tau.detach()).reshape(())
        return self.lo + (self.hi - self.lo) * torch.sigmoid(self.gain * self.theta.reshape(())) * t


class PathCLIPHead(nn.Module):
    """RFR + perturbation + residual ratio + frozen class-prompt embeddings and scale -> class logits.

    `text_CE` are the L2-normalised class-prompt embeddings (a buffer, never trained); `scale` the frozen CLIP
    logit scale s. `adapter=False` gives the frozen zero-shot classifier (alpha = 0)."""

    def __init__(self, text_CE: torch.Tensor, scale: float, *, adapter: bool = True, alpha_mode: str = "adaptive",
                 alpha: float = 0.5, alpha_lo: float = 0.0, alpha_hi: float = 1.0, noise_std: float = 0.0,
                 tau_momentum: float = 0.9, tau_source: str = "frozen") -> None:
        super().__init__()
        if tau_source not in ("frozen", "refined"):
            raise ValueError(f"tau_source: {tau_source!r} is not one of frozen, refined")
        self.tau_source = tau_source
        if text_CE.ndim != 2:
            raise ValueError(f"class embeddings must be (C, E), got {tuple(text_CE.shape)}")
        self.embed_dim = int(text_CE.shape[1])
        self.register_buffer("text_CE", F.normalize(text_CE.detach().float(), dim=-1))
        self.register_buffer("scale", torch.tensor(float(scale)))
        self.noise_std = float(noise_std)
        if self.noise_std < 0:
            raise ValueError(f"noise_std: must be >= 0, got {noise_std}")
        self.rfr = RFRAdapter(self.embed_dim) if adapter else None
        self.ratio = ResidualRatio(alpha_mode, alpha, alpha_lo, alpha_hi, tau_momentum) if adapter else None

    def refine(self, f_BE: torch.Tensor, noise: bool | None = None) -> torch.Tensor:
        """z = norm(RFR(f + eps)); noise only in training mode (or when `noise` is True)."""
        if self.rfr is None:
            raise RuntimeError("this head has no adapter")
        noisy = self.training if noise is None else noise
        x = perturb(f_BE, self.noise_std) if noisy else f_BE
        return F.normalize(self.rfr(x), dim=-1)

    def alpha(self, tau: torch.Tensor | None = None) -> torch.Tensor:
        return f_zero() if self.ratio is None else self.ratio(tau)

    def mix(self, f_BE: torch.Tensor, z_BE: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        return alpha * z_BE + (1 - alpha) * F.normalize(f_BE, dim=-1)

    def logits(self, feat_BE: torch.Tensor) -> torch.Tensor:
        return self.scale * F.normalize(feat_BE, dim=-1) @ self.text_CE.t()

    def forward(self, f_BE: torch.Tensor) -> torch.Tensor:
        """Class logits (B, C) of frozen image embeddings (eval: no noise, running tau)."""
        f_BE = f_BE.float()
        if self.rfr is None:
            return self.logits(f_BE)
        return self.logits(self.mix(f_BE, self.refine(f_BE), self.alpha()))


def f_zero() -> torch.Tensor:
    return torch.zeros(())
