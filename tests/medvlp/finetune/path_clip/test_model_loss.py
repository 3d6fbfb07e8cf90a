"""Path-CLIP head and losses: adapter shapes, alpha bounds, perturbation, DVC NT-Xent against a hand-written
reference (values and gradients)."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medvlp.finetune.path_clip.loss import dvc_loss, nt_xent, path_clip_loss
from medvlp.finetune.path_clip.model import PathCLIPHead, ResidualRatio, RFRAdapter, perturb, rfr_widths, view_agreement


def test_rfr_widths_scale_with_the_embedding():
    assert rfr_widths(1024) == [1024, 512, 256, 512, 1024]
    assert rfr_widths(64) == [64, 32, 16, 32, 64]
    a = RFRAdapter(1024)
    shapes = [tuple(p.shape) for p in a.parameters()]
    assert shapes == [(512, 1024), (256, 512), (512, 256), (1024, 512)]  # bias-free
    assert a(torch.randn(3, 1024)).shape == (3, 1024)


@pytest.mark.parametrize("theta", [-30.0, -1.0, 0.0, 2.0, 30.0])
def test_adaptive_alpha_stays_in_bounds(theta):
    r = ResidualRatio("adaptive", alpha=0.5, lo=0.1, hi=0.8)
    with torch.no_grad():
        r.theta.fill_(theta / r.gain)
    for tau in (0.0, 0.3, 1.0):
        a = r(torch.tensor(tau)).item()
        assert 0.1 - 1e-6 <= a <= 0.8 + 1e-6
    # formula: lo + (hi - lo) * sigmoid(g * theta) * tau
    expect = 0.1 + 0.7 * (1 / (1 + math.exp(-theta))) * 0.3
    assert r(torch.tensor(0.3)).item() == pytest.approx(expect, rel=1e-6)
    # starts at alpha (=0.5) at full agreement
    assert ResidualRatio("adaptive", alpha=0.5, lo=0.1, hi=0.8)(torch.tensor(1.0)).item() == pytest.approx(0.5)


def test_alpha_grows_with_agreement_and_fixed_mode_is_constant():
    r = ResidualRatio("adaptive", alpha=0.6)
    assert r(torch.tensor(0.9)).item() > r(torch.tensor(0.4)).item()
    f = ResidualRatio("fixed", alpha=0.3)
    assert f(torch.tensor(0.1)).item() == pytest.approx(0.3) and not f.theta.requires_grad
    r.update_tau(torch.tensor(0.4))
    assert float(r.tau) == pytest.approx(0.4)  # first update sets it
    r.update_tau(torch.tensor(1.0))
    assert float(r.tau) == pytest.approx(0.9 * 0.4 + 0.1 * 1.0)


def test_bad_ratio_settings_fail_clearly():
    with pytest.raises(ValueError, match="alpha_mode"):
        ResidualRatio("learned")
    with pytest.raises(ValueError, match="outside"):
        ResidualRatio("fixed", alpha=0.95, hi=0.9)


def test_view_agreement_bounds():
    z = F.normalize(torch.randn(5, 8), dim=-1)
    assert float(view_agreement(z, z)) == pytest.approx(1.0)
    assert float(view_agreement(z, -z)) == pytest.approx(0.0)


def test_perturbation_only_in_training_and_scaled():
    torch.manual_seed(0)
    f = F.normalize(torch.randn(4000, 64), dim=-1)
    eps = perturb(f, 0.5) - f
    assert float(eps.std()) == pytest.approx(0.5 / math.sqrt(64), rel=0.05)
    head = PathCLIPHead(F.normalize(torch.randn(2, 64), dim=-1), 10.0, noise_std=0.5)
    head.eval()
    assert torch.equal(head.refine(f[:3]), head.refine(f[:3]))  # no noise in eval
    head.train()
    assert not torch.equal(head.refine(f[:3]), head.refine(f[:3]))


def _nt_xent_reference(a, b, t):
    """Loop form of SimCLR's NT-Xent, straight from the definition."""
    u = [x / np.linalg.norm(x) for x in np.concatenate([a, b])]
    n, B = len(u), len(a)
    total = 0.0
    for j in range(n):
        p = j + B if j < B else j - B
        den = sum(math.exp(float(u[j] @ u[k]) / t) for k in range(n) if k != j)
        total += -math.log(math.exp(float(u[j] @ u[p]) / t) / den)
    return total / n


def test_nt_xent_matches_reference_values_and_gradients():
    torch.manual_seed(1)
    a = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    got = nt_xent(a, b, 0.2)
    assert got.item() == pytest.approx(_nt_xent_reference(a.detach().numpy(), b.detach().numpy(), 0.2), rel=1e-6)
    # gradients against finite differences of the reference
    got.backward()
    eps = 1e-6
    for src, grad in ((a, a.grad), (b, b.grad)):
        for (i, j) in [(0, 0), (2, 3), (4, 6)]:
            x = src.detach().clone().numpy()
            x2 = x.copy()
            x[i, j] += eps
            x2[i, j] -= eps
            if src is a:
                lp = _nt_xent_reference(x, b.detach().numpy(), 0.2)
                lm = _nt_xent_reference(x2, b.detach().numpy(), 0.2)
            else:
                lp = _nt_xent_reference(a.detach().numpy(), x, 0.2)
                lm = _nt_xent_reference(a.detach().numpy(), x2, 0.2)
            assert float(grad[i, j]) == pytest.approx((lp - lm) / (2 * eps), rel=1e-4, abs=1e-8)


def test_dvc_pairs_weak_weak_and_weak_strong():
    torch.manual_seed(2)
    w1, w2, s = (torch.randn(4, 6) for _ in range(3))
    assert float(dvc_loss(w1, w2, s, 0.5)) == pytest.approx(
        0.5 * (_nt_xent_reference(w1.numpy(), w2.numpy(), 0.5) + _nt_xent_reference(w1.numpy(), s.numpy(), 0.5)),
        rel=1e-5)
    # identical views of distinct orthogonal images: near-zero loss at a low temperature
    e = torch.eye(4, 6)
    assert float(dvc_loss(e, e, e, 0.05)) < 1e-6


def test_nt_xent_bad_input():
    with pytest.raises(ValueError, match=">= 2 images"):
        nt_xent(torch.randn(1, 4), torch.randn(1, 4))
    with pytest.raises(ValueError, match="views must both be"):
        nt_xent(torch.randn(3, 4), torch.randn(2, 4))


def test_path_clip_loss_trains_only_the_adapter_and_alpha():
    torch.manual_seed(3)
    text = F.normalize(torch.randn(2, 16), dim=-1)
    head = PathCLIPHead(text, 20.0, noise_std=0.1, alpha=0.5).train()
    f = [F.normalize(torch.randn(8, 16), dim=-1) for _ in range(3)]
    y = torch.randint(0, 2, (8,))
    loss, m = path_clip_loss(head, *f, y, dvc_weight=1.0)
    loss.backward()
    trained = {n for n, p in head.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert trained == {"rfr.net.0.weight", "rfr.net.2.weight", "rfr.net.4.weight", "rfr.net.6.weight",
                       "ratio.theta"}
    assert set(m) >= {"ce_weak", "ce_strong", "dvc", "tau_batch", "alpha", "loss"}
    # first update: tau = the batch's agreement of the frozen weak / strong views; alpha = sigmoid(g theta) * tau
    assert m["tau_batch"] == pytest.approx(float(view_agreement(f[0], f[2]))) and float(head.ratio.tau_seen) == 1.0
    assert m["alpha"] == pytest.approx(m["tau_batch"] * float(torch.sigmoid(10 * head.ratio.theta)), rel=1e-5)
    assert head(f[0]).shape == (8, 2)
