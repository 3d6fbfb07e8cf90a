"""Ahead-of-time compile of every contrastive kernel for sm_90 and sm_80 (no GPU needed)."""
import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    pytest.skip("TRITON_INTERPRET=1 turns the kernels into interpreted functions; AOT needs the compiler",
                allow_module_level=True)

from medvlp.kernels import contrastive_aot as aot  # noqa: E402
from medvlp.kernels import contrastive_triton as ct  # noqa: E402

DIMS = (256, 512, 768, 1024)


@pytest.fixture(scope="module")
def compiled():
    results = aot.compile_all(dims=DIMS, dtypes=(torch.float32, torch.bfloat16), archs=(90, 80))
    print("\n" + aot.markdown_table(results))
    return results


def test_every_kernel_compiles_to_cubin(compiled):
    seen = {(r.kernel, r.arch, r.dtype, r.with_cols) for r in compiled}
    for _, fn in aot.KERNELS:
        for arch in (90, 80):
            for dtype in ("float32", "bfloat16"):
                for cols in (True, False):  # WITH_COLS=False: the two-pass forward and the distributed losses
                    assert (fn.__name__, arch, dtype, cols) in seen
    for r in compiled:
        assert r.cubin_bytes > 1000, f"{r.kernel} sm_{r.arch} {r.dtype}: no cubin"
        assert r.ptx.startswith("//") and f".target sm_{r.arch}" in r.ptx


def test_launcher_configs_cover_all_dims(compiled):
    covered = {int(d) for r in compiled for d in r.dims.split(",")}
    assert covered == set(DIMS)


def test_bf16_uses_tensor_cores(compiled):
    for r in compiled:
        if r.dtype == "bfloat16":
            want = "wgmma" if r.arch == 90 else "mma"
            assert r.mma == want, f"{r.kernel} sm_{r.arch}: expected {want} in the PTX, saw {r.mma}"
        else:
            assert r.mma == "none", f"{r.kernel} sm_{r.arch} fp32: IEEE products must not use tensor cores"


def test_resources_within_limits(compiled):
    for r in compiled:
        assert 0 < r.shared <= 227 * 1024, f"{r.kernel} sm_{r.arch}: shared {r.shared} B"
        if r.regs >= 0:
            assert r.regs <= 255
            # A few spilled words are tolerated; hundreds of bytes mean the tiles are too large.
            assert r.stack <= 64, f"{r.kernel} sm_{r.arch} {r.dtype}: {r.stack} B of stack (spills)"


def test_pass_count_formula():
    assert ct.pass_count(256, torch.bfloat16) == 5
    assert ct.pass_count(1024, torch.bfloat16) == 11
    assert ct.pass_count(256, torch.float32) == 7
    with pytest.raises(ValueError, match="D: embedding dim"):
        ct.pick_blocks(0, torch.float32)


@pytest.fixture(scope="module")
def candidates():
    results = aot.compile_candidates(dims=DIMS, dtypes=(torch.float32, torch.bfloat16), archs=(90, 80))
    print("\n" + aot.markdown_table(results))
    return results


def test_every_autotune_candidate_compiles_without_spills(candidates):
    for dtype in (torch.float32, torch.bfloat16):
        for D in DIMS:
            cands = ct.tune_candidates(D, dtype)
            assert cands["fwd"][0] == ct.pick_blocks(D, dtype)["fwd"]  # today's choice is always a candidate
            assert cands["bwd"][0] == ct.pick_blocks(D, dtype)["bwd"]
            assert len(cands["fwd"]) >= 2 and len(cands["bwd"]) >= 2
    seen = {(r.kernel, r.arch, r.dtype) for r in candidates}
    assert len(seen) == 3 * 2 * 2
    for r in candidates:
        assert r.cubin_bytes > 1000 and 0 < r.shared <= 227 * 1024
        if r.regs < 0:
            continue
        dtype = getattr(torch, r.dtype)
        which = "fwd" if r.kernel == "_clip_fwd_kernel" else "bwd"
        aot_choice = ct.pick_blocks(int(r.dims.split(",")[0]), dtype)[which]
        tiles = " ".join(f"{k.split('_')[1]}{v}" for k, v in aot_choice.items() if k.startswith("BLOCK_"))
        is_base = r.blocks == f"{tiles} st{aot_choice['num_stages']}" and r.num_warps == aot_choice["num_warps"]
        # Today's ahead-of-time choice keeps its tolerance (a few words on sm_80 bf16); the neighbours add none.
        limit = 64 if is_base else 0
        assert r.stack <= limit, f"{r.kernel} sm_{r.arch} {r.dtype} {r.blocks} w{r.num_warps}: {r.stack} B spilled"


def test_autotune_is_off_under_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not ct.autotune_enabled()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.delenv("MEDVLP_TRITON_AUTOTUNE", raising=False)
    assert not ct.autotune_enabled()  # opt-in until the tuned launch path has run on a GPU
    monkeypatch.setenv("MEDVLP_TRITON_AUTOTUNE", "1")
    assert ct.autotune_enabled()
    assert ct.pass_count(512, torch.bfloat16, block_do=128) == 11  # a tuned BLOCK_DO changes the passes
    from triton.runtime.autotuner import Autotuner

    kernel, cands = ct._tuned(ct._clip_bwd_dq_kernel, "bwd", 512, torch.bfloat16)
    assert isinstance(kernel, Autotuner) and kernel.keys == ["D", "WITH_COLS"]
    assert [c.kwargs["BLOCK_DO"] for c in kernel.configs] == [c["BLOCK_DO"] for c in cands] == [256, 128, 512]
    assert ct._tuned(ct._clip_bwd_dq_kernel, "bwd", 500, torch.bfloat16)[0] is kernel  # one tuner per D bucket
    assert ct._chosen(kernel, cands) == cands[0]  # before any launch: the ahead-of-time config
