"""Chunked (blockwise torch) backend vs the materialised reference: values and gradients, odd shapes."""
import pytest
import torch
import torch.nn.functional as F

from medvlp.kernels import clip_loss, clip_loss_reference, pick_block, triton_available


def _feats(n, d, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    img_nD = F.normalize(torch.randn(n, d, generator=g), dim=-1).to(dtype)
    # Texts correlated with their images, like a trained model, so the diagonal matters.
    txt_nD = F.normalize(img_nD.float() + 0.7 * torch.randn(n, d, generator=g), dim=-1).to(dtype)
    return img_nD, txt_nD


def _loss_and_grads(fn, tensors, scale):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    s = scale.detach().clone().requires_grad_()
    loss = fn(*leaves, s)
    grads = torch.autograd.grad(loss, leaves + [s])
    return loss.detach(), grads


def _assert_close(got, want, rtol, atol, what):
    torch.testing.assert_close(got.float(), want.float(), rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


# Odd N × D; (1000, 512) is left out: it adds nothing over (1000, 100) and (129, 512) but seconds.
@pytest.mark.parametrize("n,d", [(n, d) for n in (1, 7, 129, 1000) for d in (32, 100, 512) if (n, d) != (1000, 512)])
def test_chunked_matches_reference_fp32(n, d):
    img, txt = _feats(n, d, seed=n * 1000 + d)
    scale = torch.tensor(1 / 0.07)
    want, want_g = _loss_and_grads(lambda i, t, s: clip_loss_reference(i, t, s), (img, txt), scale)
    # A block and a key tile that do not divide n exercise the ragged last block and tile.
    got, got_g = _loss_and_grads(lambda i, t, s: clip_loss(i, t, s, backend="chunked", block=50, tile=37),
                                 (img, txt), scale)
    _assert_close(got, want, 1e-5, 1e-6, "loss")
    for name, g, w in zip(("d_img", "d_txt", "d_scale"), got_g, want_g):
        _assert_close(g, w, 1e-5, 1e-7, name)


@pytest.mark.parametrize("n,d", [(7, 32), (129, 100), (300, 512)])
def test_chunked_bf16_matches_fp32_reference(n, d):
    img, txt = _feats(n, d, dtype=torch.bfloat16, seed=n + d)
    scale = torch.tensor(30.0)
    # Reference in fp32 from the very same bf16 values: only the backend's own rounding differs.
    want, want_g = _loss_and_grads(lambda i, t, s: clip_loss_reference(i.float(), t.float(), s), (img, txt), scale)
    got, got_g = _loss_and_grads(lambda i, t, s: clip_loss(i, t, s, backend="chunked", block=64, tile=48),
                                 (img, txt), scale)
    assert got.dtype == torch.float32
    assert got_g[0].dtype == torch.bfloat16 and got_g[1].dtype == torch.bfloat16
    _assert_close(got, want, 1e-5, 1e-5, "loss")
    # bf16 leaves: autograd adds the LSE and positive-term gradients in bf16, so each element carries
    # about one bf16 ulp of the largest term (2^-8 relative).
    for name, g, w in zip(("d_img", "d_txt", "d_scale"), got_g, want_g):
        _assert_close(g, w, 1e-2, 8e-3 * w.abs().max().item(), name)


@pytest.mark.parametrize("backend", ["reference", "chunked"])
def test_distributed_form_sums_to_single_device(backend):
    """Per-rank losses with gathered keys average to the single-device loss; the key path carries gradient."""
    n, world, d = 37, 3, 48
    img, txt = _feats(n * world, d, seed=5)
    scale = torch.tensor(20.0)
    want = clip_loss_reference(img, txt, scale)
    per_rank = [clip_loss(img[r * n:(r + 1) * n], txt[r * n:(r + 1) * n], scale, img_k=img, txt_k=txt,
                          q_offset=r * n, backend=backend, block=16, tile=25) for r in range(world)]
    _assert_close(torch.stack(per_rank).mean(), want, 1e-6, 1e-6, "mean per-rank loss")


def test_distributed_form_gradients_match_reference():
    n, N, d = 23, 80, 40
    img_k, txt_k = _feats(N, d, seed=9)
    img_q, txt_q = _feats(n, d, seed=10)
    scale = torch.tensor(12.0)
    tensors = (img_q, txt_q, img_k, txt_k)

    def run(backend):
        return _loss_and_grads(lambda iq, tq, ik, tk, s: clip_loss(iq, tq, s, img_k=ik, txt_k=tk, q_offset=31,
                                                                   backend=backend, block=8, tile=30), tensors,
                                 scale)

    (want, want_g), (got, got_g) = run("reference"), run("chunked")
    _assert_close(got, want, 1e-5, 1e-6, "loss")
    for name, g, w in zip(("d_img_q", "d_txt_q", "d_img_k", "d_txt_k", "d_scale"), got_g, want_g):
        _assert_close(g, w, 1e-5, 1e-7, name)


def test_known_value_two_pairs():
    # Orthogonal pairs: logits are s on the diagonal and 0 off it, so CE = log(1 + e^-s) both ways.
    img = torch.eye(2)
    s = torch.tensor(3.0)
    want = torch.log1p(torch.exp(-s))
    for backend in ("reference", "chunked"):
        _assert_close(clip_loss(img, img.clone(), s, backend=backend), want, 1e-6, 1e-7, backend)


def test_large_scale_is_stable():
    """s = 100 with sign-flipped rows spans logits ±100: a single shared shift would underflow exp."""
    img, txt = _feats(64, 16, seed=3)
    txt = torch.cat([txt[:32], -txt[32:]])
    scale = torch.tensor(100.0)
    want, want_g = _loss_and_grads(lambda i, t, s: clip_loss_reference(i, t, s), (img, txt), scale)
    # Tiles of 5 keys: some tiles hold only the opposite keys, so their column partials and weights take the
    # underflow and wide-spread paths.
    got, got_g = _loss_and_grads(lambda i, t, s: clip_loss(i, t, s, backend="chunked", block=7, tile=5),
                                 (img, txt), scale)
    assert torch.isfinite(got)
    _assert_close(got, want, 1e-5, 1e-5, "loss")
    for name, g, w in zip(("d_img", "d_txt", "d_scale"), got_g, want_g):
        _assert_close(g, w, 1e-4, 1e-5, name)


def test_pick_block_and_tile_bounds():
    from medvlp.kernels.contrastive import pick_tile

    assert pick_block(10, 10) == 10  # never more than the rows
    assert pick_block(100_000, 16_384) == 2048 == pick_block(100_000, 1 << 30)  # rows per block: not N-dependent
    assert pick_tile(2048, 16_384) == 512  # ~1M logits per tile (4 MiB), whatever N is
    assert pick_tile(2048, 100) == 100 and pick_tile(1 << 20, 1 << 30) == 64  # at most the keys; a floor
    assert pick_block(100, 100, block=7) == 7 and pick_tile(7, 100, tile=9) == 9
    with pytest.raises(ValueError, match="block"):
        pick_block(10, 10, block=0)
    with pytest.raises(ValueError, match="tile"):
        pick_tile(10, 10, tile=0)


def test_tiles_change_nothing_but_rounding():
    """The same loss and gradients from one full-width tile per block and from many narrow ragged ones."""
    img, txt = _feats(200, 64, seed=11)
    scale = torch.tensor(1 / 0.07)
    wide, wide_g = _loss_and_grads(lambda i, t, s: clip_loss(i, t, s, backend="chunked", block=64, tile=200),
                                   (img, txt), scale)
    narrow, narrow_g = _loss_and_grads(lambda i, t, s: clip_loss(i, t, s, backend="chunked", block=64, tile=23),
                                       (img, txt), scale)
    _assert_close(narrow, wide, 1e-6, 1e-6, "loss")
    for name, a, b in zip(("d_img", "d_txt", "d_scale"), narrow_g, wide_g):
        _assert_close(a, b, 1e-5, 1e-7, name)


@pytest.mark.parametrize("kwargs,match", [
    (dict(backend="cuda"), "backend: 'cuda'"),
    (dict(img_k=torch.zeros(4, 8)), "img_k and txt_k"),
    (dict(img_k=torch.zeros(4, 8), txt_k=torch.zeros(4, 8), q_offset=2), "q_offset: 2"),
    (dict(img_k=torch.zeros(4, 5), txt_k=torch.zeros(4, 5)), "img_k: expected a 2-D"),
    (dict(q_offset=1), "q_offset: must be 0"),
])
def test_bad_input_errors_name_the_item(kwargs, match):
    img = torch.zeros(3, 8)
    with pytest.raises(ValueError, match=match):
        clip_loss(img, img, torch.tensor(1.0), **kwargs)


def test_bad_shapes_and_scale():
    with pytest.raises(ValueError, match="txt_q"):
        clip_loss(torch.zeros(3, 8), torch.zeros(4, 8), torch.tensor(1.0))
    with pytest.raises(ValueError, match="logit_scale"):
        clip_loss(torch.zeros(3, 8), torch.zeros(3, 8), torch.ones(1))
    with pytest.raises(ValueError, match="img_q"):
        clip_loss(torch.zeros(8), torch.zeros(8), torch.tensor(1.0))


def test_triton_available_reports_reason(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    ok, why = triton_available()
    if not torch.cuda.is_available():
        assert not ok and "TRITON_INTERPRET" in why
        with pytest.raises(RuntimeError, match="unavailable"):
            clip_loss(torch.eye(2), torch.eye(2), torch.tensor(1.0), backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert triton_available() == (True, "")


def test_block_column_partials_survive_underflow():
    """A column 200 below the block max underflows the shared-exp shortcut; it must fall back exactly."""
    from medvlp.kernels.contrastive import _block_lse_both

    k = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]])
    q = 100.0 * torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])  # column 1 peaks at -60, block max is 100
    z = q @ k.T
    lse_B, part_N = _block_lse_both(q, k, torch.empty(3, 3))
    torch.testing.assert_close(lse_B, torch.logsumexp(z, 1), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(part_N, torch.logsumexp(z, 0), rtol=1e-6, atol=1e-5)
    assert torch.isfinite(part_N).all()


def test_resolve_backend_is_the_one_auto_rule():
    from medvlp.kernels import resolve_backend
    from medvlp.kernels.contrastive import triton_available
    from medvlp.pretrain.config import LossConfig
    from medvlp.pretrain.loss import ContrastiveLoss

    assert resolve_backend("torch", False) == "reference" and resolve_backend("chunked", True) == "chunked"
    assert resolve_backend("auto", False) == "chunked"  # key count unknown: bounded memory
    assert resolve_backend("auto", False, n_keys=100, chunked_min=512) == "reference"
    assert resolve_backend("auto", False, n_keys=512, chunked_min=512) == "chunked"
    assert resolve_backend("auto", True) == ("triton" if triton_available()[0] else "chunked")
    with pytest.raises(ValueError, match="backend: 'cuda' is not one of"):
        resolve_backend("cuda", False)
    loss = ContrastiveLoss(LossConfig(backend="auto", auto_chunked_min=64))
    q = torch.zeros(4, 8)
    assert loss.backend_for(q, 63) == "torch" and loss.backend_for(q, 64) == "chunked"
