"""The chunked backward's softmax weights: the rank-1 column rescale and its exact fallback vs fp64."""
import pytest
import torch
import torch.nn.functional as F

from medvlp.kernels import clip_loss, clip_loss_reference
from medvlp.kernels import contrastive as kc


def _block(n, d, s, seed=0, flip=False):
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(n, d, generator=g), dim=-1)
    k = F.normalize(q + 0.7 * torch.randn(n, d, generator=g), dim=-1)
    if flip:  # queries bunched around one direction, half the keys opposite: column LSEs ~2s below row LSEs
        u = F.normalize(torch.randn(1, d, generator=g), dim=-1)
        q = F.normalize(u + 0.2 * q, dim=-1)
        k = torch.cat([F.normalize(u + 0.2 * k[: n // 2], dim=-1), F.normalize(-u + 0.2 * k[n // 2:], dim=-1)])
    z64 = s * q.double() @ k.double().T
    lse_r, lse_c = torch.logsumexp(z64, 1), torch.logsumexp(z64, 0)
    want = torch.exp(z64 - lse_r[:, None]) + torch.exp(z64 - lse_c[None, :])
    return q * s, k, lse_r.float(), lse_c.float(), want


@pytest.mark.parametrize("s,flip,fast", [(1 / 0.07, False, True), (30.0, False, True), (100.0, True, False)])
def test_block_weights_match_fp64(s, flip, fast):
    qs, k, lse_r, lse_c, want = _block(96, 64, s, flip=flip)
    assert (float(lse_r.max() - lse_c.min()) <= kc._SPREAD) == fast  # which path this case exercises
    z, w = torch.empty(96, 96), torch.empty(96, 96)
    got = kc._block_weights(qs, k, lse_r, lse_c, z, w)
    # fp32 logits and LSEs of size s carry a few s·2^-24 of absolute error, so each weight that much relative.
    torch.testing.assert_close(got.double(), want, rtol=8 * s * 2**-24 + 1e-6, atol=1e-7)


def test_rank1_and_exact_paths_agree_on_the_loss_gradients(monkeypatch):
    g = torch.Generator().manual_seed(5)
    img = F.normalize(torch.randn(300, 64, generator=g), dim=-1)
    txt = F.normalize(img + 0.5 * torch.randn(300, 64, generator=g), dim=-1)
    scale = torch.tensor(20.0)

    def grads(fn):
        leaves = [t.clone().requires_grad_() for t in (img, txt)]
        return torch.autograd.grad(fn(leaves[0], leaves[1], scale), leaves)

    want = grads(lambda i, t, s: clip_loss_reference(i.double(), t.double(), s.double()))
    fast = grads(lambda i, t, s: clip_loss(i, t, s, backend="chunked", block=64, tile=100))
    monkeypatch.setattr(kc, "_SPREAD", -1.0)  # force the exact two-exp path
    exact = grads(lambda i, t, s: clip_loss(i, t, s, backend="chunked", block=64, tile=100))
    for a, b, w in zip(fast, exact, want):
        err_fast, err_exact = (a.double() - w).abs().max().item(), (b.double() - w).abs().max().item()
        assert err_fast <= 2 * err_exact + 1e-8, (err_fast, err_exact)
