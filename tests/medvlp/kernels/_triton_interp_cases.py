"""Run the Triton backend under TRITON_INTERPRET=1 against the reference; prints one JSON line of results.

A separate process: triton.jit picks the interpreter when the kernels are defined, so the variable must be set
before triton is imported, and the test process may already have imported it.
"""
import json
import os

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from medvlp.kernels import clip_loss  # noqa: E402
from medvlp.kernels import contrastive_triton as ct  # noqa: E402

# (n, D, dtype, distributed, two_pass). D = 300 fp32 / 600 bf16 split the backward's output columns into 3
# programs (BLOCK_DO 128 / 256); two_pass forces the forward's column fallback (row kernel on (k, q)).
CASES = [(1, 32, "float32", False, False), (7, 100, "float32", False, False), (129, 32, "float32", False, False),
         (129, 100, "bfloat16", False, False), (7, 32, "float32", True, False), (70, 100, "bfloat16", True, False),
         (9, 300, "float32", False, False), (9, 600, "bfloat16", False, False), (5, 300, "float32", True, False),
         (70, 40, "float32", False, True), (70, 100, "bfloat16", False, True)]


class _CountLaunches:
    """Wraps a kernel so `kernel[grid](...)` launches are counted (to see which forward path ran)."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


def _poisoned_empty(real_empty):
    """torch.empty that fills with NaN, so any output element a kernel fails to write shows up."""
    def empty(*args, **kwargs):
        return real_empty(*args, **kwargs).fill_(float("nan"))
    return empty


def run_case(n, d, dtype_name, distributed, two_pass):
    dtype = getattr(torch, dtype_name)
    budget, fwd_kernel = ct._COL_PARTIAL_BYTES, ct._clip_fwd_kernel
    counter = ct._clip_fwd_kernel = _CountLaunches(fwd_kernel)
    if two_pass:
        ct._COL_PARTIAL_BYTES = 0  # no room for column partials: the forward must take the two-pass path
    try:
        out = _run_case(n, d, dtype, distributed)
    finally:
        ct._COL_PARTIAL_BYTES, ct._clip_fwd_kernel = budget, fwd_kernel
    out["case"] = [n, d, dtype_name, distributed, two_pass]
    out["fwd_launches"] = counter.launches
    return out


def _run_case(n, d, dtype, distributed):
    g = torch.Generator().manual_seed(n * 7 + d)
    N = 2 * n + 3 if distributed else n
    img_k = F.normalize(torch.randn(N, d, generator=g), dim=-1).to(dtype)
    txt_k = F.normalize(img_k.float() + 0.5 * torch.randn(N, d, generator=g), dim=-1).to(dtype)
    off = n + 1 if distributed else 0
    scale = torch.tensor(25.0)
    errs = {}
    outs = {}
    for backend in ("reference", "triton"):
        feats = (img_k[off:off + n], txt_k[off:off + n], img_k, txt_k) if distributed else (img_k, txt_k)
        leaves = [t.detach().float().clone() if backend == "reference" else t.detach().clone() for t in feats]
        leaves = [t.requires_grad_() for t in leaves]
        s = scale.clone().requires_grad_()
        if distributed:
            loss = clip_loss(leaves[0], leaves[1], s, img_k=leaves[2], txt_k=leaves[3], q_offset=off, backend=backend)
        else:
            loss = clip_loss(leaves[0], leaves[1], s, backend=backend)
        outs[backend] = [loss] + list(torch.autograd.grad(loss, leaves + [s]))
    for i, (a, b) in enumerate(zip(outs["triton"], outs["reference"])):
        a, b = a.float(), b.float()
        errs[f"out{i}"] = {"max_abs": (a - b).abs().max().item(), "ref_max": b.abs().max().item(),
                           "finite": bool(torch.isfinite(a).all())}
    return {"errs": errs}


def run_candidates(n=9, d=500, dtype_name="bfloat16"):
    """Every backward autotuning candidate (forced as the launcher's config) against the reference: the fewer-pass
    one (BLOCK_DO 512: one output split at D = 500) must be as exact as the ahead-of-time config."""
    base = ct.pick_blocks
    out = []
    for cfg in ct.tune_candidates(d, getattr(torch, dtype_name))["bwd"]:
        ct.pick_blocks = lambda D, dt, cfg=cfg: {**base(D, dt), "bwd": dict(cfg)}
        try:
            res = _run_case(n, d, getattr(torch, dtype_name), False)
        finally:
            ct.pick_blocks = base
        out.append({"cfg": cfg, "case": [n, d, dtype_name], **res})
    return out


def run_poison():
    """Kernel outputs allocated with torch.empty are NaN-filled first; all must come back written."""
    ct_torch_empty = ct.torch.empty
    ct.torch.empty = _poisoned_empty(ct_torch_empty)
    try:
        q = F.normalize(torch.randn(37, 40, generator=torch.Generator().manual_seed(1)), dim=-1)
        k = F.normalize(torch.randn(45, 40, generator=torch.Generator().manual_seed(2)), dim=-1)
        s = torch.tensor([10.0])
        lse_M, lse_N = ct._fwd(q, k, s, True)
        dq, dk, ds = ct._bwd(q, k, s, lse_M, lse_N)
        z = 10.0 * q @ k.T
        return {"finite": all(bool(torch.isfinite(t).all()) for t in (lse_M, lse_N, dq, dk, ds)),
                "lse_row_err": (lse_M - z.logsumexp(1)).abs().max().item(),
                "lse_col_err": (lse_N - z.logsumexp(0)).abs().max().item()}
    finally:
        ct.torch.empty = ct_torch_empty


if __name__ == "__main__":
    print(json.dumps({"cases": [run_case(*c) for c in CASES], "candidates": run_candidates(),
                      "poison": run_poison()}))
