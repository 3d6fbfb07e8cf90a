"""Fused Triton kernels for the log-sum-exp part of the CLIP loss (see medvlp/kernels/contrastive.py for the maths).

For logits ``z = s·q·kᵀ`` (q: M×D queries, k: N×D keys) the kernels compute ``Σ_i LSE_j z_ij`` and, in the
single-device form, also ``Σ_j LSE_i z_ij`` (the text→image direction is the column direction of the same
logits), and their gradients w.r.t. q, k and s, never materialising the M×N logits:

* ``_clip_fwd_kernel``    one program per BLOCK_M query rows; walks the key tiles with an online max/sum (fp32)
  to get the row LSE; in the single-device form it also writes each tile's column partial LSE to a
  (cdiv(M, BLOCK_M), N) buffer that torch merges afterwards (``logsumexp`` over dim 0).
* ``_clip_bwd_dq_kernel`` grid (row blocks, D-splits): recomputes the logit tiles, w = row softmax (+ column
  softmax), accumulates dq = s·w·k for BLOCK_DO output columns, and a per-program partial of
  ds = Σ w⊙(q·kᵀ), reduced afterwards in torch.
* ``_clip_bwd_dk_kernel`` grid (key blocks, D-splits): the same tiles transposed, dk = s·wᵀ·q.

Passes of 2·M·N·D flops, with n_split = cdiv(D, BLOCK_DO):
  forward 1; backward dq: n_split recomputes + 1, dk: n_split recomputes + 1  →  3 + 2·n_split in all.
  bf16: BLOCK_DO = min(256, next_pow2(D)), so D ≤ 256 → 5 passes; D = 512 → 7; 768 → 9; 1024 → 11.
        The fewer-pass autotuning candidate (32×32 tiles, 8 warps, BLOCK_DO = 512, spill-free on sm_80/sm_90):
        D ≤ 512 → 5; 768 and 1024 → 7, at half the tile's L2 reuse (which of the two wins is the GPU's call).
  fp32: BLOCK_DO = min(128, next_pow2(D)), so D ≤ 128 → 5; 256 → 7; 512 → 11; 1024 → 19.
  (The materialised torch path needs 3 passes but O(N²) memory; the blockwise torch backend needs 4.)
  The split keeps the dq/dk accumulator (BLOCK_M×BLOCK_DO fp32) in registers; when the column-partial
  buffer would exceed _COL_PARTIAL_BYTES the forward runs the row kernel twice (on (q, k) and on (k, q)): +1.

Inputs fp32 or bf16 (fp16 too); tiles are multiplied in the input dtype with fp32 accumulation, fp32 with
IEEE precision so the values match the torch reference; softmax weights are cast to the input dtype for the
backward products (as in flash attention). Any M, N, D via masking; D is looped over in BLOCK_K chunks.

Ahead-of-time compile (tests/medvlp/kernels/test_contrastive_aot.py, triton 3.8, no GPU): resource use per kernel at
the launcher's block sizes is recorded in medvlp/kernels/README_SECTION.md.

Autotuning: on a GPU each kernel is wrapped in ``triton.autotune`` keyed on D and WITH_COLS (the autotuner adds
the tensors' dtypes to the key), over ``tune_candidates(D, dtype)``: the ahead-of-time config first, then
neighbours (bigger row/key tiles, more stages or warps, a narrower BLOCK_DO that frees registers, and for bf16
a wider BLOCK_DO on smaller tiles that saves recompute passes) that compile
for sm_80 and sm_90 without spills. The first call per (D, dtype, WITH_COLS) times them. Autotuning is opt-in
(MEDVLP_TRITON_AUTOTUNE=1) until its launch path has been run on a GPU; by default, and always under the CPU
interpreter, the ahead-of-time config is used. Roofline model: docs/performance.md.

Legend: M = query rows, N = key rows, D = embedding dim; q_MD, k_ND, lse_M (row LSE), lse_N (column LSE).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Above this the column partials (cdiv(M, BLOCK_M)·N fp32) cost more than one extra pass is worth.
_COL_PARTIAL_BYTES = 1 << 30


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a·b. UPCAST multiplies in fp32: the CPU interpreter (triton 3.8) returns garbage for bf16 tl.dot."""
    if UPCAST:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc, input_precision=PRECISION)
    return out


@triton.jit
def _logits_tile(q_ptr, k_ptr, rows, cols, row_ok, col_ok, D, stride_q, stride_k,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
                 UPCAST: tl.constexpr):
    """raw[BLOCK_M, BLOCK_N] = q[rows]·k[cols]ᵀ accumulated in fp32 over D in BLOCK_K chunks."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    offs_k = tl.arange(0, BLOCK_K)
    for k0 in range(0, D, BLOCK_K):
        dk = k0 + offs_k
        dk_ok = dk < D
        q = tl.load(q_ptr + rows[:, None] * stride_q + dk[None, :], mask=row_ok[:, None] & dk_ok[None, :], other=0.0)
        k = tl.load(k_ptr + cols[:, None] * stride_k + dk[None, :], mask=col_ok[:, None] & dk_ok[None, :], other=0.0)
        acc = _dot(q, tl.trans(k), acc, PRECISION, UPCAST)
    return acc


@triton.jit
def _clip_fwd_kernel(q_ptr, k_ptr, lse_row_ptr, col_part_ptr, scale_ptr, M, N, D, stride_q, stride_k,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     WITH_COLS: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """Row LSE of s·q·kᵀ for BLOCK_M rows (online max/sum); column partial LSE per tile when WITH_COLS."""
    pid_m = tl.program_id(0)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    s = tl.load(scale_ptr).to(tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        z = _logits_tile(q_ptr, k_ptr, rows, cols, row_ok, col_ok, D, stride_q, stride_k,
                         BLOCK_M, BLOCK_N, BLOCK_K, PRECISION, UPCAST) * s
        z_row = tl.where(col_ok[None, :], z, float("-inf"))
        # Every tile holds at least one valid column, so m_new is finite and no -inf - -inf NaN appears.
        m_new = tl.maximum(m_i, tl.max(z_row, axis=1))
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(z_row - m_new[:, None]), axis=1)
        m_i = m_new
        if WITH_COLS:
            z_col = tl.where(row_ok[:, None], z, float("-inf"))
            c_max = tl.max(z_col, axis=0)
            c_sum = tl.sum(tl.exp(z_col - c_max[None, :]), axis=0)
            tl.store(col_part_ptr + pid_m * N + cols, c_max + tl.log(c_sum), mask=col_ok)
    tl.store(lse_row_ptr + rows, m_i + tl.log(l_i), mask=row_ok)


@triton.jit
def _softmax_weights(z, lse_r, lse_c, row_ok, col_ok, WITH_COLS: tl.constexpr):
    """w = exp(z − lse_row) (+ exp(z − lse_col)), zero outside the valid rows/columns."""
    w = tl.exp(z - lse_r[:, None])
    if WITH_COLS:
        w += tl.exp(z - lse_c[None, :])
    return tl.where(row_ok[:, None] & col_ok[None, :], w, 0.0)


@triton.jit
def _clip_bwd_dq_kernel(q_ptr, k_ptr, lse_row_ptr, lse_col_ptr, dq_ptr, ds_part_ptr, scale_ptr, M, N, D,
                        stride_q, stride_k, stride_dq,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        BLOCK_DO: tl.constexpr, WITH_COLS: tl.constexpr, PRECISION: tl.constexpr,
                        UPCAST: tl.constexpr):
    """dq[rows, d-split] = s·Σ_j w_ij k_j and the program's partial Σ w⊙(q·kᵀ) for ds."""
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    d_out = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
    d_ok = d_out < D
    s = tl.load(scale_ptr).to(tl.float32)
    lse_r = tl.load(lse_row_ptr + rows, mask=row_ok, other=0.0)
    acc = tl.zeros((BLOCK_M, BLOCK_DO), dtype=tl.float32)
    ds_acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        raw = _logits_tile(q_ptr, k_ptr, rows, cols, row_ok, col_ok, D, stride_q, stride_k,
                           BLOCK_M, BLOCK_N, BLOCK_K, PRECISION, UPCAST)
        lse_c = tl.zeros((BLOCK_N,), dtype=tl.float32)
        if WITH_COLS:
            lse_c = tl.load(lse_col_ptr + cols, mask=col_ok, other=0.0)
        w = _softmax_weights(raw * s, lse_r, lse_c, row_ok, col_ok, WITH_COLS)
        ds_acc += tl.sum(w * raw, axis=1)
        kd = tl.load(k_ptr + cols[:, None] * stride_k + d_out[None, :], mask=col_ok[:, None] & d_ok[None, :],
                     other=0.0)
        acc = _dot(w.to(kd.dtype), kd, acc, PRECISION, UPCAST)
    tl.store(dq_ptr + rows[:, None] * stride_dq + d_out[None, :], acc * s, mask=row_ok[:, None] & d_ok[None, :])
    tl.store(ds_part_ptr + pid_m * tl.num_programs(1) + pid_d, tl.sum(ds_acc, axis=0))


@triton.jit
def _clip_bwd_dk_kernel(q_ptr, k_ptr, lse_row_ptr, lse_col_ptr, dk_ptr, scale_ptr, M, N, D,
                        stride_q, stride_k, stride_dk,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        BLOCK_DO: tl.constexpr, WITH_COLS: tl.constexpr, PRECISION: tl.constexpr,
                        UPCAST: tl.constexpr):
    """dk[cols, d-split] = s·Σ_i w_ij q_i, the logit tiles walked down the query rows."""
    pid_n = tl.program_id(0)
    pid_d = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    d_out = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
    d_ok = d_out < D
    s = tl.load(scale_ptr).to(tl.float32)
    lse_c = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if WITH_COLS:
        lse_c = tl.load(lse_col_ptr + cols, mask=col_ok, other=0.0)
    acc = tl.zeros((BLOCK_N, BLOCK_DO), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        raw = _logits_tile(q_ptr, k_ptr, rows, cols, row_ok, col_ok, D, stride_q, stride_k,
                           BLOCK_M, BLOCK_N, BLOCK_K, PRECISION, UPCAST)
        lse_r = tl.load(lse_row_ptr + rows, mask=row_ok, other=0.0)
        w = _softmax_weights(raw * s, lse_r, lse_c, row_ok, col_ok, WITH_COLS)
        qd = tl.load(q_ptr + rows[:, None] * stride_q + d_out[None, :], mask=row_ok[:, None] & d_ok[None, :],
                     other=0.0)
        acc = _dot(tl.trans(w.to(qd.dtype)), qd, acc, PRECISION, UPCAST)
    tl.store(dk_ptr + cols[:, None] * stride_dk + d_out[None, :], acc * s, mask=col_ok[:, None] & d_ok[None, :])


# --------------------------------------------------------------------------------------------------------------
# launcher
# --------------------------------------------------------------------------------------------------------------
def pick_blocks(D: int, dtype: torch.dtype) -> dict:
    """Tile sizes (powers of two ≥ 16, as tl.dot needs) and warps for embedding dim D and input dtype.

    Chosen by ahead-of-time compiles for sm_80 and sm_90 (medvlp/kernels/contrastive_aot.py): the largest tiles that
    compile without register spills (stack 0). fp32 runs IEEE FMA products, whose operand layouts need
    more registers than the bf16 tensor-core path, hence the smaller backward tiles.
    """
    if D < 1:
        raise ValueError(f"D: embedding dim must be >= 1, got {D}")
    d_pow2 = max(16, triton.next_power_of_2(D))
    if dtype == torch.float32:
        fwd = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=min(32, d_pow2), num_warps=8, num_stages=1)
        bwd = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=min(32, d_pow2), BLOCK_DO=min(128, d_pow2), num_warps=4,
                   num_stages=1)
    else:
        fwd = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=min(64, d_pow2), num_warps=8, num_stages=2)
        bwd = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=min(64, d_pow2), BLOCK_DO=min(256, d_pow2), num_warps=8,
                   num_stages=1)
    return {"fwd": fwd, "bwd": bwd}


def pass_count(D: int, dtype: torch.dtype, with_cols: bool = True, block_do: int | None = None) -> int:
    """Passes of 2·M·N·D flops one forward + backward makes (the module doc's formula); block_do: the backward's
    BLOCK_DO if not the ahead-of-time choice (an autotuned config)."""
    n_split = triton.cdiv(D, block_do or pick_blocks(D, dtype)["bwd"]["BLOCK_DO"])
    return 1 + 2 * (n_split + 1)


# Autotuning candidates around the ahead-of-time choice, per (dtype, kernel kind): each entry changes pick_blocks'
# config by these keys (BLOCK_K and BLOCK_DO are then capped by D as there). Every candidate compiles for sm_80 and
# sm_90 without spills (stack 0; tests/medvlp/kernels/test_contrastive_aot.py), measured with WITH_COLS, the heavier form.
_TUNE_DELTAS = {
    (torch.float32, "fwd"): ({}, {"BLOCK_M": 128}, {"BLOCK_N": 128}, {"num_warps": 4}),
    (torch.float32, "bwd"): ({}, {"num_warps": 8}),  # larger tiles or 2 stages spill (fp32 IEEE operand layouts)
    (torch.bfloat16, "fwd"): ({}, {"num_stages": 3}, {"BLOCK_M": 128}, {"BLOCK_N": 128}),
    # bf16 backward: BLOCK_M=128 with BLOCK_DO=128 spills 72-152 B; BLOCK_DO=128 frees registers for 2 stages.
    # The fewer-pass candidate: 32x32 tiles and 8 warps leave room for a 32x512 fp32 accumulator, so D <= 512 needs
    # one output split (5 passes instead of 7; D = 768/1024: 7 instead of 9/11) at half the tile's L2 reuse.
    # 64x64 or 4 warps with BLOCK_DO=512 spill 400-9000 B.
    (torch.bfloat16, "bwd"): ({}, {"BLOCK_DO": 128, "num_stages": 2},
                              {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_DO": 512, "num_warps": 8}),
}


def tune_candidates(D: int, dtype: torch.dtype) -> dict:
    """{"fwd": [cfg, ...], "bwd": [cfg, ...]}: the ahead-of-time config first, then its tuning neighbours."""
    base = pick_blocks(D, dtype)
    d_pow2 = max(16, triton.next_power_of_2(D))
    key_dtype = torch.float32 if dtype == torch.float32 else torch.bfloat16  # fp16 tunes like bf16
    out = {}
    for which in ("fwd", "bwd"):
        seen, cands = set(), []
        for delta in _TUNE_DELTAS[(key_dtype, which)]:
            cfg = dict(base[which], **delta)
            if "BLOCK_DO" in cfg:
                cfg["BLOCK_DO"] = min(cfg["BLOCK_DO"], d_pow2)
            key = tuple(sorted(cfg.items()))
            if key not in seen:
                seen.add(key)
                cands.append(cfg)
        out[which] = cands
    return out


def autotune_enabled() -> bool:
    """Autotune on a GPU when MEDVLP_TRITON_AUTOTUNE=1 (opt-in: not yet run on a GPU); never under the interpreter
    (it would time Python)."""
    return os.environ.get("TRITON_INTERPRET", "0") != "1" and os.environ.get("MEDVLP_TRITON_AUTOTUNE", "0") == "1"


_TUNERS: dict = {}


def _tuned(fn, which: str, D: int, dtype: torch.dtype):
    """(kernel to launch, candidate configs): a triton.autotune wrapper keyed on D and WITH_COLS (the autotuner
    adds the tensors' dtypes to the key itself), or the plain kernel with the ahead-of-time config."""
    cands = tune_candidates(D, dtype)[which] if autotune_enabled() else [pick_blocks(D, dtype)[which]]
    if len(cands) == 1:
        return fn, cands
    key = (fn.__name__, D if D < 16 else triton.next_power_of_2(D), str(dtype))
    if key not in _TUNERS:
        configs = [triton.Config({k: v for k, v in c.items() if k.startswith("BLOCK_")}, num_warps=c["num_warps"],
                                 num_stages=c["num_stages"]) for c in cands]
        _TUNERS[key] = triton.autotune(configs=configs, key=["D", "WITH_COLS"])(fn)
    return _TUNERS[key], cands


def _chosen(kernel, cands: list[dict]) -> dict:
    """The config the last launch of `kernel` ran with."""
    best = getattr(kernel, "best_config", None)
    if best is None:
        return cands[0]
    return dict(best.kwargs, num_warps=best.num_warps, num_stages=best.num_stages)


def _dot_args(dtype: torch.dtype) -> dict:
    """IEEE fp32 products for fp32 inputs (parity with the torch reference); fp32 upcast when interpreting."""
    interpreting = os.environ.get("TRITON_INTERPRET", "0") == "1"
    return dict(PRECISION="ieee" if dtype == torch.float32 else "tf32",
                UPCAST=interpreting and dtype != torch.float32)


def _fwd(q_MD, k_ND, scale, with_cols: bool):
    M, D = q_MD.shape
    N = k_ND.shape[0]
    kernel, cands = _tuned(_clip_fwd_kernel, "fwd", D, q_MD.dtype)
    run = _dot_args(q_MD.dtype)
    if len(cands) == 1:  # fixed config: tiles and launch options passed here
        run.update({k: v for k, v in cands[0].items() if k.startswith("BLOCK_")},
                   num_warps=cands[0]["num_warps"], num_stages=cands[0]["num_stages"])
    lse_M = torch.empty(M, dtype=torch.float32, device=q_MD.device)
    # Sized for the candidate with the most row blocks; the chosen config's rows are sliced out afterwards.
    n_mblocks = max(triton.cdiv(M, c["BLOCK_M"]) for c in cands)
    one_pass = with_cols and n_mblocks * N * 4 <= _COL_PARTIAL_BYTES
    col_part = torch.empty((n_mblocks, N) if one_pass else (1,), dtype=torch.float32, device=q_MD.device)
    kernel[lambda meta: (triton.cdiv(M, meta["BLOCK_M"]),)](q_MD, k_ND, lse_M, col_part, scale, M, N, D,
                                                           q_MD.stride(0), k_ND.stride(0), WITH_COLS=one_pass, **run)
    if not with_cols:
        return lse_M, None
    if one_pass:
        used = triton.cdiv(M, _chosen(kernel, cands)["BLOCK_M"])
        return lse_M, torch.logsumexp(col_part[:used], dim=0)
    lse_N = torch.empty(N, dtype=torch.float32, device=q_MD.device)
    kernel[lambda meta: (triton.cdiv(N, meta["BLOCK_M"]),)](k_ND, q_MD, lse_N, col_part, scale, N, M, D,
                                                           k_ND.stride(0), q_MD.stride(0), WITH_COLS=False, **run)
    return lse_M, lse_N


def _bwd(q_MD, k_ND, scale, lse_M, lse_N):
    M, D = q_MD.shape
    N = k_ND.shape[0]
    dq_kernel, cands = _tuned(_clip_bwd_dq_kernel, "bwd", D, q_MD.dtype)
    dk_kernel, _ = _tuned(_clip_bwd_dk_kernel, "bwd", D, q_MD.dtype)
    run = _dot_args(q_MD.dtype)
    if len(cands) == 1:
        run.update({k: v for k, v in cands[0].items() if k.startswith("BLOCK_")},
                   num_warps=cands[0]["num_warps"], num_stages=cands[0]["num_stages"])
    with_cols = lse_N is not None
    lse_c = lse_N if with_cols else lse_M
    dq_MD = torch.empty((M, D), dtype=torch.float32, device=q_MD.device)
    dk_ND = torch.empty((N, D), dtype=torch.float32, device=q_MD.device)
    ds_part = torch.empty(max(triton.cdiv(M, c["BLOCK_M"]) * triton.cdiv(D, c["BLOCK_DO"]) for c in cands),
                          dtype=torch.float32, device=q_MD.device)
    dq_kernel[lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(D, meta["BLOCK_DO"]))](
        q_MD, k_ND, lse_M, lse_c, dq_MD, ds_part, scale, M, N, D, q_MD.stride(0), k_ND.stride(0), dq_MD.stride(0),
        WITH_COLS=with_cols, **run)
    dk_kernel[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), triton.cdiv(D, meta["BLOCK_DO"]))](
        q_MD, k_ND, lse_M, lse_c, dk_ND, scale, M, N, D, q_MD.stride(0), k_ND.stride(0), dk_ND.stride(0),
        WITH_COLS=with_cols, **run)
    # Every d-split program of a row block computed the same ds partial; column 0 holds one copy each.
    cfg = _chosen(dq_kernel, cands)
    grid_m, n_split = triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(D, cfg["BLOCK_DO"])
    return dq_MD, dk_ND, ds_part[:grid_m * n_split].view(grid_m, n_split)[:, 0].sum()


class _TritonCE(torch.autograd.Function):
    """Σ row CE (+ Σ column CE) of s·q·kᵀ: kernels for the LSE part, torch for the O(M·D) positive term."""

    @staticmethod
    def forward(ctx, q_MD, k_ND, scale, with_cols: bool, q_offset: int):
        q_MD, k_ND = q_MD.contiguous(), k_ND.contiguous()
        scale32 = scale.detach().float().reshape(1)
        lse_M, lse_N = _fwd(q_MD, k_ND, scale32, with_cols)
        M = q_MD.shape[0]
        pos = (q_MD.float() * k_ND[q_offset:q_offset + M].float()).sum()
        ctx.save_for_backward(q_MD, k_ND, scale32, lse_M, lse_N if with_cols else lse_M.new_empty(0))
        ctx.with_cols, ctx.q_offset, ctx.scale_dtype = with_cols, q_offset, scale.dtype
        c = 2.0 if with_cols else 1.0  # the diagonal is the positive of both directions
        total = lse_M.sum() - c * scale32[0] * pos
        return total + lse_N.sum() if with_cols else total

    @staticmethod
    def backward(ctx, grad_out):
        q_MD, k_ND, scale32, lse_M, lse_N = ctx.saved_tensors
        off, M = ctx.q_offset, q_MD.shape[0]
        c = 2.0 if ctx.with_cols else 1.0
        dq_MD, dk_ND, ds = _bwd(q_MD, k_ND, scale32, lse_M, lse_N if ctx.with_cols else None)
        k_pos = k_ND[off:off + M].float()
        ds = ds - c * (q_MD.float() * k_pos).sum()
        dq_MD.sub_(c * scale32 * k_pos)  # tensor scale: no host sync for .item()
        dk_ND[off:off + M].sub_(c * scale32 * q_MD.float())
        g = grad_out.float()
        ds = (ds * g).reshape(()).to(ctx.scale_dtype)
        return dq_MD.mul_(g).to(q_MD.dtype), dk_ND.mul_(g).to(k_ND.dtype), ds, None, None


def triton_ce_sum(q_MD, k_ND, logit_scale, with_cols: bool, q_offset: int = 0) -> torch.Tensor:
    """Σ_i CE_i of s·q·kᵀ rows [+ columns], positives at key rows q_offset + i, via the kernels (fp32 scalar)."""
    if q_MD.dtype != k_ND.dtype:
        raise ValueError(f"q and k: dtypes differ ({q_MD.dtype} vs {k_ND.dtype}); tl.dot needs them equal")
    if q_MD.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"q: dtype {q_MD.dtype} is not one of float32, bfloat16, float16")
    return _TritonCE.apply(q_MD, k_ND, logit_scale, with_cols, q_offset)
