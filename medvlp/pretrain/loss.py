"""Contrastive losses over the global batch: feature gathering, CLIP (symmetric InfoNCE) and SigLIP.

CLIP (docs/methods.md §1): L = ½·(CE(s·I·Tᵀ, diag) + CE(s·T·Iᵀ, diag)), I and T L2-normalised, s = exp(t) learned.
The numbers come from `medvlp.kernels.contrastive` (the one pure-torch reference lives there, `clip_loss_reference`;
backend "torch" is that reference, "chunked" the blockwise torch version, "triton" the fused kernels).

Distribution (W ranks, n rows each, N = W·n):
  * `gather_features` all-gathers the local features. With grad (`AllGatherRows`) the backward sums every rank's
    gradient w.r.t. this rank's rows back to it; without grad the remote rows are constants and only the local rows
    (put back into the gathered tensor) carry gradient.
  * `local_loss=True`: this rank's n query rows against all N keys (positives at key rows rank·n + i). The mean over
    ranks of these losses IS the single-device loss on the N rows, and with gather-with-grad each rank's parameter
    gradient is W × its rows' share, so DDP's average over ranks gives exactly the single-device gradient.
  * `local_loss=False`: every rank computes the whole N×N loss (W times the work; for comparison). Its gradient
    w.r.t. the local rows, summed over the W identical copies by the gather backward, is again W × the share.
  * `gather_with_grad=False`: cheaper, but the gradient misses the other ranks' use of this rank's rows as keys;
    it is not the single-device gradient (a known approximation, kept as a knob).

SigLIP (Zhai et al., 2023): L = −(1/n)·Σ_i Σ_j log σ(z_ij·(s·x_i·y_j + b)), z = +1 on the positive pair, −1
elsewhere, with a learned bias b (init −10) and scale (init t = log 10). The sum over all pairs is split by query
rows exactly as the CLIP loss (rows of this rank vs all keys), so the same equivalences hold.

Shape legend: n local rows, N global rows (all ranks), D embedding dim.
"""
from __future__ import annotations


import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from medvlp.pretrain.config import LossConfig


class AllGatherRows(torch.autograd.Function):
    """All-gather of (n, ...) rows along dim 0 with a summing backward: rank r's input gradient is the sum over
    ranks of their gradient w.r.t. rows [r·n, (r+1)·n).

    Written here rather than taken from `torch.distributed.nn.functional.all_gather`: that module binds
    `group=group.WORLD` as a default argument when it is first imported, so importing it after
    `init_process_group` pins the default process group for the life of the process. `destroy_process_group` then
    cannot free it, its gloo threads are still running when the interpreter exits, and the process can die with
    SIGABRT ("terminate called without an active exception"). This function resolves the group at call time and
    keeps no reference to it once the graph is freed.
    """

    @staticmethod
    def forward(ctx, x_nX: torch.Tensor) -> torch.Tensor:  # noqa: D102
        world, rank = dist.get_world_size(), dist.get_rank()
        x_nX = x_nX.contiguous()
        parts = [torch.empty_like(x_nX) for _ in range(world)]
        dist.all_gather(parts, x_nX)
        ctx.rows = (rank * x_nX.shape[0], (rank + 1) * x_nX.shape[0])
        return torch.cat(parts, 0)

    @staticmethod
    def backward(ctx, g_NX: torch.Tensor) -> torch.Tensor:  # noqa: D102
        lo, hi = ctx.rows
        g_NX = g_NX.contiguous()
        if dist.get_backend() == "nccl":  # one reduce-scatter moves (W-1)/W of what an all-reduce moves
            out = torch.empty_like(g_NX[lo:hi])
            dist.reduce_scatter_tensor(out, g_NX)
            return out
        g_NX = g_NX.clone()  # gloo has no reduce-scatter: sum everywhere, keep our rows
        dist.all_reduce(g_NX)
        return g_NX[lo:hi]


def gather_features(img_nD: torch.Tensor, txt_nD: torch.Tensor, rank: int, world_size: int,
                    with_grad: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """All-gather the local features of every rank -> (img_ND, txt_ND), rank r's rows at [r·n, (r+1)·n).

    Every rank must hold the same n (all_gather needs equal shapes).
    """
    if world_size == 1:
        return img_nD, txt_nD
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"gather_features: world_size={world_size} but torch.distributed is not initialised")
    if with_grad:
        return AllGatherRows.apply(img_nD), AllGatherRows.apply(txt_nD)
    out = []
    for x in (img_nD, txt_nD):
        parts = [torch.empty_like(x) for _ in range(world_size)]
        dist.all_gather(parts, x.detach().contiguous())
        parts[rank] = x  # the local rows keep their graph
        out.append(torch.cat(parts, 0))
    return out[0], out[1]


def siglip_loss(img_q: torch.Tensor, txt_k: torch.Tensor, logit_scale: torch.Tensor, logit_bias: torch.Tensor,
                q_offset: int = 0) -> torch.Tensor:
    """Pairwise sigmoid loss of query rows `img_q` (n, D) vs keys `txt_k` (N, D), positives at q_offset + i;
    summed over keys, averaged over the n rows."""
    n = img_q.shape[0]
    if q_offset < 0 or q_offset + n > txt_k.shape[0]:
        raise ValueError(f"q_offset: {q_offset} + n={n} does not fit in N={txt_k.shape[0]} keys")
    logits_nN = logit_scale * img_q @ txt_k.T + logit_bias
    z_nN = -torch.ones_like(logits_nN)
    z_nN[torch.arange(n, device=z_nN.device), torch.arange(q_offset, q_offset + n, device=z_nN.device)] = 1.0
    return -F.logsigmoid(z_nN * logits_nN).sum() / n


def _triton_status() -> tuple[bool, str]:
    from medvlp.kernels.contrastive import triton_available

    st = triton_available()
    return (st, "" if st else "not available") if isinstance(st, bool) else (bool(st[0]), str(st[1]))


class ContrastiveLoss(nn.Module):
    """CLIP or SigLIP loss over the global batch. `forward(img, txt, logit_scale, logit_bias=None, rank, world_size)`.

    Inputs are the model outputs: L2-normalised (n, D) features and the exponentiated scale s (0-d); for SigLIP
    also the learned bias b (0-d). Returns the scalar loss of this rank (mean over its rows; see module doc).
    """

    def __init__(self, cfg: LossConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or LossConfig()
        cfg.validate()
        if cfg.backend == "triton":
            ok, why = _triton_status()
            if not ok:
                raise RuntimeError(f"triton backend unavailable: {why}; use loss.backend=chunked")

    def backend_for(self, q: torch.Tensor, n_keys: int) -> str:
        """The backend this call runs: `auto` = triton on CUDA when available, else chunked if N >= knob, else torch."""
        b = self.cfg.backend
        if self.cfg.kind == "siglip":
            return "torch"
        if b == "triton":
            ok, why = _triton_status()
            if not ok:
                raise RuntimeError(f"triton backend unavailable: {why}; use loss.backend=chunked")
        if b != "auto":
            return b
        from medvlp.kernels.contrastive import resolve_backend

        picked = resolve_backend("auto", q.is_cuda, n_keys, self.cfg.auto_chunked_min)
        return "torch" if picked == "reference" else picked

    def forward(self, img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor,
                logit_bias: torch.Tensor | None = None, rank: int = 0, world_size: int = 1) -> torch.Tensor:
        if img.ndim != 2 or img.shape != txt.shape:
            raise ValueError(f"img {tuple(img.shape)} and txt {tuple(txt.shape)}: expected two (n, D) tensors")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        logit_scale = logit_scale.reshape(())
        n = img.shape[0]
        img_k, txt_k = gather_features(img, txt, rank, world_size, self.cfg.gather_with_grad)
        if world_size > 1 and not self.cfg.local_loss:  # the full N×N loss on every rank
            img, txt, offset = img_k, txt_k, 0
        else:
            offset = rank * n
        if self.cfg.kind == "siglip":
            if logit_bias is None:
                raise ValueError("loss.kind=siglip needs the model's logit_bias (build_model(model_cfg, loss_cfg))")
            return siglip_loss(img, txt_k, logit_scale, logit_bias.reshape(()), offset)
        from medvlp.kernels.contrastive import clip_loss

        backend = self.backend_for(img, img_k.shape[0])
        single = img_k is img  # keys are the queries: the kernels' single-device form
        keys = (None, None) if single else (img_k, txt_k)
        return clip_loss(img, txt, logit_scale, keys[0], keys[1], q_offset=0 if single else offset,
                         backend="reference" if backend == "torch" else backend,
                         block=(self.cfg.chunk_size or None) if backend == "chunked" else None)
