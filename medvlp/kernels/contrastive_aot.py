"""Ahead-of-time compilation of the contrastive kernels for CUDA targets, without a GPU.

``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` runs the whole pipeline down to a cubin
on any machine; the bundled ``cuobjdump -res-usage`` then reports registers, stack (spills) and shared memory
per kernel. This checks that every kernel compiles at the block sizes the launcher picks (the CPU interpreter
accepts tiles and dtype mixes the compiler rejects) and records its resource use.

Run ``python -m medvlp.kernels.contrastive_aot`` for the markdown table (medvlp/kernels/README_SECTION.md holds a copy).
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from medvlp.kernels import contrastive_triton as ct

KERNELS = (("fwd", ct._clip_fwd_kernel), ("bwd", ct._clip_bwd_dq_kernel), ("bwd", ct._clip_bwd_dk_kernel))
_PTR_TYPE = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16"}
_FEATURE_PTRS = ("q_ptr", "k_ptr")


@dataclass
class AotResult:
    """One compiled kernel: what it was compiled for and the resources it uses."""

    kernel: str  # kernel function name
    arch: int  # CUDA compute capability, e.g. 90
    dtype: str  # feature dtype (float32 | bfloat16)
    dims: str  # the embedding dims whose launcher config this is, e.g. "256,512"
    blocks: str  # constexpr tile sizes, e.g. "M64 N64 K64 DO256"
    num_warps: int  # warps per program
    shared: int  # shared memory bytes (compiled.metadata.shared)
    regs: int  # registers per thread (cuobjdump; -1 if unavailable)
    stack: int  # stack bytes per thread, > 0 means register spills (cuobjdump; -1 if unavailable)
    cubin_bytes: int  # size of the produced cubin
    mma: str  # tensor-core instruction family seen in the PTX: wgmma | mma | none
    ptx: str = ""  # PTX text, for callers that want to inspect it (not shown in tables)
    with_cols: bool = True  # WITH_COLS variant (False: the two-pass forward and the one-way distributed losses)


def _signature(fn, dtype: torch.dtype, constexprs: dict) -> dict:
    """Argument name → Triton type string: feature pointers take the input dtype, the rest fp32 / i32."""
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = _PTR_TYPE[dtype] if name in _FEATURE_PTRS else "*fp32"
        else:
            sig[name] = "i32"
    return sig


def _res_usage(cubin: bytes, kernel: str) -> tuple[int, int]:
    """(registers, stack bytes) from the bundled cuobjdump; (-1, -1) when it is missing or says nothing."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return -1, -1
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(rf"Function {kernel}:\s*REG:(\d+) STACK:(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else (-1, -1)


def compile_kernel(fn, cfg: dict, dtype: torch.dtype, arch: int, with_cols: bool = True):
    """triton.compile one kernel for sm_<arch> at launcher config ``cfg``; returns the CompiledKernel."""
    cfg = dict(cfg)
    options = {"num_warps": cfg.pop("num_warps"), "num_stages": cfg.pop("num_stages")}
    consts = dict(cfg, WITH_COLS=with_cols, PRECISION="ieee" if dtype == torch.float32 else "tf32", UPCAST=False)
    consts = {k: v for k, v in consts.items() if k in fn.arg_names}
    src = ASTSource(fn=fn, signature=_signature(fn, dtype, consts), constexprs=consts)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def compile_all(dims=(256, 512, 768, 1024), dtypes=(torch.float32, torch.bfloat16), archs=(90, 80),
                with_cols=(True, False)):
    """Compile every kernel at each distinct launcher config for ``dims`` × ``dtypes`` × ``archs`` × the
    ``WITH_COLS`` variants (the launcher runs both: one-pass symmetric loss, and the two-pass / one-way paths)."""
    results = []
    for dtype in dtypes:
        configs: dict[tuple, list[int]] = {}  # distinct launcher configs → the dims that pick them
        for D in dims:
            blocks = ct.pick_blocks(D, dtype)
            configs.setdefault(tuple(sorted((k, tuple(sorted(v.items()))) for k, v in blocks.items())), []).append(D)
        for key, dlist in configs.items():
            blocks = {k: dict(v) for k, v in key}
            for arch, cols, (which, fn) in ((a, c, k) for a in archs for c in with_cols for k in KERNELS):
                cfg = blocks[which]
                compiled = compile_kernel(fn, cfg, dtype, arch, with_cols=cols)
                cubin = compiled.asm["cubin"]
                ptx = compiled.asm["ptx"]
                regs, stack = _res_usage(cubin, fn.__name__)
                tiles = " ".join(f"{k.split('_')[1]}{v}" for k, v in cfg.items() if k.startswith("BLOCK_"))
                results.append(AotResult(
                    kernel=fn.__name__, arch=arch, dtype=str(dtype).replace("torch.", ""),
                    dims=",".join(map(str, dlist)), blocks=tiles, num_warps=cfg["num_warps"],
                    shared=int(compiled.metadata.shared), regs=regs, stack=stack, cubin_bytes=len(cubin),
                    mma="wgmma" if "wgmma" in ptx else ("mma" if re.search(r"\bmma\.sync", ptx) else "none"),
                    ptx=ptx, with_cols=cols))
    return results


def compile_candidates(dims=(256, 512, 768, 1024), dtypes=(torch.float32, torch.bfloat16), archs=(90, 80)):
    """Compile every autotuning candidate (``ct.tune_candidates``) of every kernel, WITH_COLS=True (the heavier
    form: it adds the column exp and partials), once per distinct config; ``dims`` lists the dims that pick it."""
    results = []
    for dtype in dtypes:
        configs: dict[tuple, tuple[str, dict, list[int]]] = {}  # (which, config) -> (which, config, dims)
        for D in dims:
            for which, cands in ct.tune_candidates(D, dtype).items():
                for cfg in cands:
                    configs.setdefault((which, tuple(sorted(cfg.items()))), (which, cfg, []))[2].append(D)
        for which, cfg, dlist in configs.values():
            for arch, (kind, fn) in ((a, k) for a in archs for k in KERNELS):
                if kind != which:
                    continue
                compiled = compile_kernel(fn, cfg, dtype, arch, with_cols=True)
                cubin, ptx = compiled.asm["cubin"], compiled.asm["ptx"]
                regs, stack = _res_usage(cubin, fn.__name__)
                tiles = " ".join(f"{k.split('_')[1]}{v}" for k, v in cfg.items() if k.startswith("BLOCK_"))
                results.append(AotResult(
                    kernel=fn.__name__, arch=arch, dtype=str(dtype).replace("torch.", ""),
                    dims=",".join(map(str, dlist)), blocks=tiles + f" st{cfg['num_stages']}",
                    num_warps=cfg["num_warps"], shared=int(compiled.metadata.shared), regs=regs, stack=stack,
                    cubin_bytes=len(cubin),
                    mma="wgmma" if "wgmma" in ptx else ("mma" if re.search(r"\bmma\.sync", ptx) else "none"),
                    ptx=ptx, with_cols=True))
    return results


def markdown_table(results) -> str:
    head = "| kernel | WITH_COLS | sm | dtype | D | tiles | warps | shared (B) | regs | stack (B) | tensor cores |\n"
    head += "|---|---|---|---|---|---|---|---|---|---|---|\n"
    return head + "".join(
        f"| {r.kernel} | {r.with_cols} | {r.arch} | {r.dtype} | {r.dims} | {r.blocks} | {r.num_warps} | {r.shared} "
        f"| {r.regs} | {r.stack} | {r.mma} |\n" for r in results)


if __name__ == "__main__":
    import sys

    print(markdown_table(compile_candidates() if "--candidates" in sys.argv else compile_all()))
