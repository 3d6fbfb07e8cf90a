"""Symmetric CLIP contrastive loss: a materialised reference and a blockwise (chunked) torch backend.

Maths (docs/methods.md §1): ``L = ½·(CE(s·I·Tᵀ, diag) + CE(s·T·Iᵀ, diag))`` with I, T already L2-normalised and
s the (already exponentiated) logit scale. Per query row i with positive key p(i) = q_offset + i:

    CE_i = LSE_j(s·q_i·k_j) − s·q_i·k_p(i)

Only the log-sum-exp (LSE) part needs the N×N logits; the backends compute it without ever materialising
them (the O(n·D) positive term is folded into the same autograd.Function, so each input gets one gradient):

* ``reference`` — logits materialised, ``F.cross_entropy`` (the ground truth for tests and benchmarks);
  single device: one N×N matrix and its transpose, 3 passes of 2·N²·D flops (forward 1, backward 2).
* ``chunked``   — row blocks × key tiles of the logits (B = 2048 rows × T = 512 keys by default: one tile stays in
  cache while it is exponentiated and summed, and the tile products run near the matmul peak); the forward keeps
  only the LSE vectors (O(N)), the backward recomputes each tile. Memory O(N·D + B·T + B·D).
  Passes of 2·N²·D flops: forward 1 (the row LSE of a block merges its tiles' row LSEs; the single-device form
  also merges per-tile column partials of the same tiles into the column LSE), backward 3 (recompute, dQ, dK):
  4 in all. Elementwise passes over each B×T tile: forward 5 (max, shift, exp, row sum, column mat-vec); backward
  3 (one exp of the logits shifted by their row LSE inside the matmul's accumulator, then the column softmax as a
  rank-1 rescale of the row softmax: w = w_row + (w_row·a_i)·b_j), exact two-exp fallback for LSE spreads > 45.
* ``triton``    — fused kernels in ``medvlp.kernels.contrastive_triton`` (GPU, or CPU under TRITON_INTERPRET=1).

Distributed form: ``img_q, txt_q`` are this rank's n rows, ``img_k, txt_k`` the N gathered rows of all ranks
(gathered with autograd), positives at key rows ``q_offset + i``. The mean over ranks of the per-rank losses is
the single-device loss on the concatenated batch; each rank's local-feature gradient (direct path plus the
all-gather backward's sum) is W times the single-device gradient of those rows, which DDP's averaging undoes.

Legend: n = query rows, N = key rows, D = embedding dim, B = row block, T = key tile; ``q_nD``, ``k_ND``, ``s_BN`` (a block of
logits), ``lse_n`` (row log-sum-exp), ``lse_N`` (column log-sum-exp).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

BACKENDS = ("reference", "chunked", "triton")
_ALIASES = {"torch": "reference", "naive": "reference"}
# Tiles of B rows × T keys: the logits of one tile stay in cache while their exp, sums and weights are taken, and
# the products (B×D by D×T, T×B by B×D, B×T by T×D) are large enough to run near the matmul peak. B = 2048 rows,
# T = 1M / B = 512 keys: two 4 MiB tile buffers whatever N is. Measured on the 2-core EPYC, N = 16,384, D = 256,
# fwd+bwd, 2 threads: B×T = 2048×512 2.82 s, 1024×1024 3.12, 256×4096 3.11-3.29, 8192×256 3.06 s; the earlier
# untiled 256×16,384 blocks took 3.65 s (1 thread: 5.77 s against 6.20 s).
_ROW_BLOCK = 2048
_TILE_ELEMS = 1 << 20
_MIN_TILE = 64


def triton_available() -> tuple[bool, str]:
    """(True, "") when the Triton backend can run here, else (False, why not)."""
    try:
        import triton  # noqa: F401
    except Exception as exc:  # pragma: no cover - triton is a declared dependency
        return False, f"triton cannot be imported: {exc}"
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return True, ""
    if not torch.cuda.is_available():
        return False, "no CUDA device and TRITON_INTERPRET is not set to 1"
    return True, ""


def pick_block(n_rows: int, n_keys: int, block: int | None = None) -> int:
    """Row block B of the chunked backend: the given one, else _ROW_BLOCK; never more than the rows."""
    if block is not None:
        if int(block) < 1:
            raise ValueError(f"block: must be >= 1, got {block}")
        return min(int(block), max(n_rows, 1))
    return min(_ROW_BLOCK, max(n_rows, 1))


def pick_tile(block: int, n_keys: int, tile: int | None = None) -> int:
    """Key tile T of the chunked backend: the given one, else ~_TILE_ELEMS logits per B×T tile; never more than
    the keys."""
    if tile is not None:
        if int(tile) < 1:
            raise ValueError(f"tile: must be >= 1, got {tile}")
        return min(int(tile), max(n_keys, 1))
    return min(max(_MIN_TILE, _TILE_ELEMS // max(block, 1)), max(n_keys, 1))


# --------------------------------------------------------------------------------------------------------------
# reference
# --------------------------------------------------------------------------------------------------------------
def clip_loss_reference(img_q, txt_q, logit_scale, img_k=None, txt_k=None, q_offset: int = 0) -> torch.Tensor:
    """Materialised logits + F.cross_entropy: mean over query rows of ½(CE image→text + CE text→image)."""
    single = img_k is None
    img_k, txt_k = _check_inputs(img_q, txt_q, logit_scale, img_k, txt_k, q_offset)
    n = img_q.shape[0]
    labels_n = torch.arange(q_offset, q_offset + n, device=img_q.device)
    logits_it_nN = logit_scale * img_q @ txt_k.T
    # Single device: text→image logits are the transpose of the same matrix (3 passes, one N×N matrix).
    logits_ti_nN = logits_it_nN.T if single else logit_scale * txt_q @ img_k.T
    return 0.5 * (F.cross_entropy(logits_it_nN, labels_n) + F.cross_entropy(logits_ti_nN, labels_n))


# --------------------------------------------------------------------------------------------------------------
# chunked (blockwise torch)
# --------------------------------------------------------------------------------------------------------------
# Column partials below this lost their leading digits to fp32 underflow: recompute those columns exactly.
_UNDERFLOW = 1e-30
# The backward's rank-1 column weights need the block's largest row LSE within _SPREAD of the smallest column LSE
# (a column weight whose row weight underflowed is then below e^(−87+45) ≈ 6e-19); otherwise it takes both exps.
_SPREAD = 45.0


def _block_lse_both(qs_BD, k_ND, z_BN, with_cols: bool = True):
    """Row LSE (B) [and column partial LSE (N)] of one logits block ``qs·kᵀ`` with a single exp pass.

    Rows are shifted by their own max (exact; the largest term is exactly 1, which keeps the sum's rounding at
    the reference's level). Columns reuse the same exponentials, reweighted by exp(row max − block max) in one
    mat-vec; a column whose entries all sit far below the block max (logit spreads > ~70, possible at s = 100)
    underflows there and is recomputed exactly from its logits.
    """
    torch.mm(qs_BD, k_ND.T, out=z_BN)
    m_B = z_BN.amax(dim=1)
    e_BN = z_BN.sub_(m_B[:, None]).exp_()  # in place: the logits are not needed again for most columns
    lse_B = m_B + e_BN.sum(dim=1).log()
    if not with_cols:
        return lse_B, None
    top = m_B.max()
    col_N = torch.mv(e_BN.T, torch.exp(m_B - top))
    part_N = top + col_N.log()
    bad = (col_N < _UNDERFLOW).nonzero().flatten()
    if bad.numel():
        part_N[bad] = torch.logsumexp(torch.mm(qs_BD, k_ND[bad].T), dim=0)
    return lse_B, part_N


def _row_factors(lse_B):
    """(largest row LSE, exp(lse_B − it) in fp32 via fp64): the row side of the rank-1 column rescale, the same
    for every key tile of a row block."""
    hi = lse_B.max()
    return hi, torch.exp(lse_B.double() - hi.double()).float()


def _block_weights(qs_BD, k_ND, lse_B, lse_N, z_BN, w_BN, row_factors=None):
    """∂(Σ LSE)/∂logits of one block: row softmax (+ column softmax when lse_N is given), in w_BN.

    Row part: one exp of the logits shifted by their row LSE inside the matmul's accumulator. Column part:
    exp(z − lse_N_j) = w_row·exp(lse_n_i − C)·exp(C − lse_N_j), a rank-1 rescale of the row weights (factors in
    fp64), which saves a second N² exp pass. Valid while max_i lse_n_i − min_j lse_N_j ≤ _SPREAD (a column weight
    whose row weight underflowed is then below e^-42); otherwise both exps are taken exactly.
    """
    if lse_N is None:
        return torch.addmm(lse_B[:, None].neg(), qs_BD, k_ND.T, out=w_BN).exp_()
    if row_factors is None:
        row_factors = _row_factors(lse_B)
    hi, a_B = row_factors
    if float(hi - lse_N.min()) <= _SPREAD:
        w_row = torch.addmm(lse_B[:, None].neg(), qs_BD, k_ND.T, out=z_BN).exp_()
        b_N = torch.exp(hi.double() - lse_N.double()).float()
        torch.mul(w_row, a_B[:, None], out=w_BN)
        return torch.addcmul(w_row, w_BN, b_N[None, :], out=w_BN)
    s_BN = torch.mm(qs_BD, k_ND.T, out=z_BN)  # exact: both softmaxes from the logits (2 exp passes)
    torch.sub(s_BN, lse_B[:, None], out=w_BN).exp_()
    return w_BN.add_(s_BN.sub_(lse_N[None, :]).exp_())


class _ChunkedCE(torch.autograd.Function):
    """Σ_i CE_i of s·q·kᵀ rows (+ the columns' CE when with_cols) without materialising the n×N logits.

    Returns Σ_i LSE_j(z_ij) [+ Σ_j LSE_i(z_ij)] − c·s·Σ_i q_i·k_{off+i}, c = 2 with columns (the diagonal is
    the positive of both directions) else 1. The positive term lives inside the Function so each input gets a
    single gradient tensor (autograd would otherwise allocate and add a second n×D one). Computed in fp32
    whatever the input dtype: a bf16 logit of size ~100 would carry an error of ~0.4.
    """

    @staticmethod
    def forward(ctx, q_nD, k_ND, scale, with_cols: bool, q_offset: int, block: int, tile: int):
        qf_nD, kf_ND, s = q_nD.float(), k_ND.float(), scale.float()
        n, N = qf_nD.shape[0], kf_ND.shape[0]
        lse_n = torch.empty(n, dtype=torch.float32, device=q_nD.device)
        lse_N = torch.full((N,), float("-inf"), dtype=torch.float32, device=q_nD.device) if with_cols else None
        pos = torch.zeros((), dtype=torch.float32, device=q_nD.device)
        # One tile buffer reused (out=): repeated allocations fragment the CPU heap and grow the RSS. Flat, so the
        # last, narrower tile of a row block is still a contiguous view.
        z_buf = torch.empty(min(block, n) * min(tile, N), dtype=torch.float32, device=q_nD.device)
        for b0 in range(0, n, block):
            qb_BD = qf_nD[b0:b0 + block]
            rows = qb_BD.shape[0]
            pos += (qb_BD * kf_ND[q_offset + b0:q_offset + b0 + rows]).sum()
            qs_BD = qb_BD * s
            lse_B = None
            for t0 in range(0, N, tile):
                kt_TD = kf_ND[t0:t0 + tile]
                cols = kt_TD.shape[0]
                lse_t, part_T = _block_lse_both(qs_BD, kt_TD, z_buf[:rows * cols].view(rows, cols), with_cols)
                lse_B = lse_t if lse_B is None else torch.logaddexp(lse_B, lse_t)
                if with_cols:
                    torch.logaddexp(lse_N[t0:t0 + cols], part_T, out=lse_N[t0:t0 + cols])
            lse_n[b0:b0 + rows] = lse_B
        del z_buf
        ctx.save_for_backward(q_nD, k_ND, scale, lse_n, lse_N if with_cols else lse_n.new_empty(0))
        ctx.with_cols, ctx.q_offset, ctx.block, ctx.tile = with_cols, q_offset, block, tile
        total = lse_n.sum() - (2 if with_cols else 1) * s * pos
        return total + lse_N.sum() if with_cols else total

    @staticmethod
    def backward(ctx, grad_out):
        q_nD, k_ND, scale, lse_n, lse_N = ctx.saved_tensors
        block, tile, with_cols, off = ctx.block, ctx.tile, ctx.with_cols, ctx.q_offset
        c = 2.0 if with_cols else 1.0
        qf_nD, kf_ND, s = q_nD.float(), k_ND.float(), scale.float()
        n, N = qf_nD.shape[0], kf_ND.shape[0]
        g = grad_out.float()
        dq_nD = torch.empty_like(qf_nD)
        dk_ND = torch.zeros_like(kf_ND)
        ds = torch.zeros((), dtype=torch.float32, device=q_nD.device)
        z_buf = torch.empty(min(block, n) * min(tile, N), dtype=torch.float32, device=q_nD.device)
        w_buf = torch.empty_like(z_buf)
        for b0 in range(0, n, block):
            qb_BD = qf_nD[b0:b0 + block]
            rows = qb_BD.shape[0]
            qs_BD, lse_B = qb_BD * s, lse_n[b0:b0 + block]
            dqraw_BD = torch.zeros_like(qb_BD)
            factors = _row_factors(lse_B) if with_cols else None
            for t0 in range(0, N, tile):
                kt_TD = kf_ND[t0:t0 + tile]
                cols = kt_TD.shape[0]
                w_BT = _block_weights(qs_BD, kt_TD, lse_B, lse_N[t0:t0 + cols] if with_cols else None,
                                      z_buf[:rows * cols].view(rows, cols), w_buf[:rows * cols].view(rows, cols),
                                      factors)
                dk_ND[t0:t0 + cols].addmm_(w_BT.T, qb_BD)
                dqraw_BD.addmm_(w_BT, kt_TD)
            dk_ND[off + b0:off + b0 + rows].sub_(qb_BD, alpha=c)  # the positives' key gradient
            dqraw_BD.sub_(kf_ND[off + b0:off + b0 + rows], alpha=c)
            # ∂/∂s of Σ (w − c·δ)⊙(q·kᵀ) = Σ_i q_i·dqraw_i: reuses dq instead of another B×N product.
            ds += (dqraw_BD * qb_BD).sum()
            dq_nD[b0:b0 + block] = dqraw_BD.mul_(s * g)
        del z_buf, w_buf
        dk_ND.mul_(s * g)
        return dq_nD.to(q_nD.dtype), dk_ND.to(k_ND.dtype), (ds * g).to(scale.dtype), None, None, None, None


def _ce_sum(q_nD, k_ND, logit_scale, with_cols: bool, q_offset: int, backend: str, block: int | None,
            tile: int | None = None):
    """Σ of row (and column) cross-entropies of s·q·kᵀ, positives at key rows q_offset + i."""
    if backend == "chunked":
        block = pick_block(q_nD.shape[0], k_ND.shape[0], block)
        return _ChunkedCE.apply(q_nD, k_ND, logit_scale, with_cols, q_offset, block,
                                pick_tile(block, k_ND.shape[0], tile))
    from medvlp.kernels.contrastive_triton import triton_ce_sum

    return triton_ce_sum(q_nD, k_ND, logit_scale, with_cols, q_offset)


def resolve_backend(backend: str, on_cuda: bool, n_keys: int | None = None, chunked_min: int = 0) -> str:
    """The one rule naming the kernel a CLIP-loss call runs: "reference" | "chunked" | "triton".

    "torch" is an alias of "reference". "auto" = triton on a CUDA device when Triton works, else chunked when the key
    count `n_keys` is at least `chunked_min` (or unknown), else reference. Unknown names raise ValueError."""
    backend = _ALIASES.get(backend, backend)
    if backend == "auto":
        if on_cuda and triton_available()[0]:
            return "triton"
        return "chunked" if n_keys is None or n_keys >= chunked_min else "reference"
    if backend not in BACKENDS:
        raise ValueError(f"backend: {backend!r} is not one of {', '.join(BACKENDS)} (or torch, auto)")
    return backend


# --------------------------------------------------------------------------------------------------------------
# public entry point
# --------------------------------------------------------------------------------------------------------------
def clip_loss(img_q, txt_q, logit_scale, img_k=None, txt_k=None, q_offset: int = 0, backend: str = "chunked",
              block: int | None = None, tile: int | None = None) -> torch.Tensor:
    """Symmetric CLIP loss (mean over the query rows); see the module doc for the single/distributed forms.

    backend: "reference" | "chunked" | "triton" ("torch" is an alias of "reference", "auto" picks triton on a
    CUDA device when available, else chunked). block, tile: row block and key tile of the chunked backend
    (None = automatic).
    """
    backend = resolve_backend(backend, img_q.is_cuda)
    if backend == "reference":
        return clip_loss_reference(img_q, txt_q, logit_scale, img_k, txt_k, q_offset)
    if backend == "triton":
        ok, why = triton_available()
        if not ok:
            raise RuntimeError(f"backend 'triton' is unavailable: {why}")
    single = img_k is None
    img_k, txt_k = _check_inputs(img_q, txt_q, logit_scale, img_k, txt_k, q_offset)
    n = img_q.shape[0]
    if single:
        # Column LSE of s·I·Tᵀ is the row LSE of s·T·Iᵀ: one pass over the blocks gives both directions.
        total = _ce_sum(img_q, txt_q, logit_scale, True, 0, backend, block, tile)
    else:
        total = (_ce_sum(img_q, txt_k, logit_scale, False, q_offset, backend, block, tile)
                 + _ce_sum(txt_q, img_k, logit_scale, False, q_offset, backend, block, tile))
    # fp32 whatever the input dtype (accumulated in fp32).
    return total / (2 * n)


def _check_inputs(img_q, txt_q, logit_scale, img_k, txt_k, q_offset):
    """Validate shapes and return (img_k, txt_k), defaulting the keys to the queries."""
    for name, t in (("img_q", img_q), ("txt_q", txt_q)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise ValueError(f"{name}: expected a 2-D (n, D) tensor, got {_desc(t)}")
    if img_q.shape != txt_q.shape:
        raise ValueError(f"img_q {tuple(img_q.shape)} and txt_q {tuple(txt_q.shape)}: shapes differ")
    if img_q.shape[0] == 0:
        raise ValueError("img_q: empty batch (n = 0)")
    if not isinstance(logit_scale, torch.Tensor) or logit_scale.dim() != 0:
        raise ValueError(f"logit_scale: expected a 0-dim tensor, got {_desc(logit_scale)}")
    if (img_k is None) != (txt_k is None):
        raise ValueError("img_k and txt_k: give both (distributed form) or neither (single device)")
    if img_k is None:
        if q_offset != 0:
            raise ValueError(f"q_offset: must be 0 when keys are the queries, got {q_offset}")
        return img_q, txt_q
    for name, t in (("img_k", img_k), ("txt_k", txt_k)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.shape[1] != img_q.shape[1]:
            raise ValueError(f"{name}: expected a 2-D (N, {img_q.shape[1]}) tensor, got {_desc(t)}")
    if img_k.shape != txt_k.shape:
        raise ValueError(f"img_k {tuple(img_k.shape)} and txt_k {tuple(txt_k.shape)}: shapes differ")
    if not 0 <= q_offset <= img_k.shape[0] - img_q.shape[0]:
        raise ValueError(f"q_offset: {q_offset} + n={img_q.shape[0]} does not fit in N={img_k.shape[0]} keys")
    return img_k, txt_k


def _desc(t) -> str:
    return f"tensor of shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
