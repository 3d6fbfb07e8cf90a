"""PcamHead: the four poolings against hand-written loops (values and gradients), weights, bad input."""
import math

import pytest
import torch

from medvlp.finetune.pcam.model import PcamHead, lse_pool, pcam_pool


def _reference_pcam_logits(feat, weight, bias):
    """Per image, per finding, in plain loops: p = sigmoid(s), w = p / sum p, x = sum w X, logit = fc(x)."""
    B, C, h, w = feat.shape
    K = weight.shape[0]
    rows = []
    for b in range(B):
        row = []
        for k in range(K):
            s = [[sum(weight[k, c] * feat[b, c, i, j] for c in range(C)) + bias[k] for j in range(w)]
                 for i in range(h)]
            p = [[1 / (1 + torch.exp(-s[i][j])) for j in range(w)] for i in range(h)]
            z = sum(p[i][j] for i in range(h) for j in range(w))
            x = [sum(p[i][j] / z * feat[b, c, i, j] for i in range(h) for j in range(w)) for c in range(C)]
            row.append(sum(weight[k, c] * x[c] for c in range(C)) + bias[k])
        rows.append(torch.stack(row))
    return torch.stack(rows)


def _head(pooling, C=3, K=2, **kw):
    torch.manual_seed(0)
    head = PcamHead(C, K, pooling=pooling, **kw)
    with torch.no_grad():  # larger weights than the init, so the attention is far from uniform
        head.fc.weight.normal_(0, 1.0)
        head.fc.bias.normal_(0, 0.5)
    return head


def test_pcam_matches_reference_values_and_gradients():
    head = _head("pcam")
    feat = torch.randn(2, 3, 3, 4, dtype=torch.float64, requires_grad=True)
    out = head(feat.float())
    W, b = head.fc.weight.view(2, 3).double(), head.fc.bias.double()
    W_ref, b_ref = W.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    feat_ref = feat.detach().clone().requires_grad_()
    ref = _reference_pcam_logits(feat_ref, W_ref, b_ref)
    torch.testing.assert_close(out.logits.double(), ref, atol=1e-5, rtol=1e-5)
    g = torch.randn(2, 2, dtype=torch.float64)
    (out.logits.double() * g).sum().backward()
    (ref * g).sum().backward()
    torch.testing.assert_close(feat.grad, feat_ref.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(head.fc.weight.grad.view(2, 3).double(), W_ref.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(head.fc.bias.grad.double(), b_ref.grad, atol=1e-5, rtol=1e-4)
    # The logit maps are the same 1x1 conv applied at every cell.
    maps_ref = torch.einsum("kc,bchw->bkhw", W_ref.detach(), feat.detach()) + b_ref.detach()[None, :, None, None]
    torch.testing.assert_close(out.maps.double(), maps_ref, atol=1e-5, rtol=1e-5)


def test_pcam_weights_sum_to_one_and_follow_the_map():
    feat = torch.randn(3, 4, 5, 6)
    logit = torch.randn(3, 2, 5, 6) * 3
    x, w = pcam_pool(feat, logit)
    torch.testing.assert_close(w.sum(dim=(-2, -1)), torch.ones(3, 2))
    assert (w > 0).all()
    p = torch.sigmoid(logit)
    torch.testing.assert_close(w, p / p.sum(dim=(-2, -1), keepdim=True))
    # A map that is very high on one cell puts (almost) all weight there.
    logit = torch.full((1, 1, 5, 6), -30.0)
    logit[0, 0, 2, 3] = 30.0
    x, w = pcam_pool(feat[:1], logit)
    assert w[0, 0, 2, 3] > 0.999
    torch.testing.assert_close(x[0, 0], feat[0, :, 2, 3], atol=1e-3, rtol=0)


def test_avg_pooling_logit_is_mean_of_logit_map():
    head = _head("avg")
    out = head(torch.randn(2, 3, 4, 4))
    torch.testing.assert_close(out.logits, out.maps.mean(dim=(-2, -1)), atol=1e-6, rtol=1e-5)


def test_max_and_lse_poolings():
    feat = torch.randn(2, 3, 4, 5)
    head = _head("max")
    out = head(feat)
    x = feat.amax(dim=(-2, -1))
    torch.testing.assert_close(out.logits, x @ head.fc.weight.view(2, 3).T + head.fc.bias)
    r = 2.5
    lse = lse_pool(feat, r)
    ref = torch.tensor([[math.log(sum(math.exp(r * v) for v in feat[b, c].flatten().tolist()) / 20) / r
                         for c in range(3)] for b in range(2)])
    torch.testing.assert_close(lse, ref, atol=1e-5, rtol=1e-5)
    # r -> 0 approaches the mean, r large approaches the max; the pooled value always lies between them.
    torch.testing.assert_close(lse_pool(feat, 1e-2), feat.mean(dim=(-2, -1)), atol=2e-2, rtol=0)
    torch.testing.assert_close(lse_pool(feat, 1e4), feat.amax(dim=(-2, -1)), atol=1e-3, rtol=0)
    head = _head("lse", lse_r=r)
    torch.testing.assert_close(head(feat).logits, lse @ head.fc.weight.view(2, 3).T + head.fc.bias,
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pooling", ["avg", "max", "lse", "pcam"])
def test_batchnorm_and_dropout_train_and_eval(pooling):
    head = _head(pooling, C=4, K=3, batchnorm=True, dropout=0.5)
    feat = torch.randn(6, 4, 3, 3, requires_grad=True)
    head.train()
    out = head(feat)
    out.logits.sum().backward()
    assert feat.grad is not None and torch.isfinite(feat.grad).all()
    assert head.bn.running_mean.abs().sum() > 0  # the per-finding BatchNorm saw the batch
    head.eval()
    a, b = head(feat).logits, head(feat).logits
    torch.testing.assert_close(a, b)  # no dropout at eval


def test_bad_configuration_and_input_are_named():
    with pytest.raises(ValueError, match="pooling: 'mean'"):
        PcamHead(4, 2, pooling="mean")
    with pytest.raises(ValueError, match="lse_r"):
        PcamHead(4, 2, pooling="lse", lse_r=0)
    with pytest.raises(ValueError, match="dropout"):
        PcamHead(4, 2, dropout=1.0)
    with pytest.raises(ValueError, match=r"\(B, 4, h, w\)"):
        PcamHead(4, 2)(torch.randn(2, 5, 3, 3))


@pytest.mark.timeout(60)
def test_lse_and_max_against_hand_values():
    # one image, two channels on a 2x2 map; r = 1: log mean exp, written out
    feat = torch.tensor([[[[0.0, 0.0], [0.0, math.log(3.0)]],
                          [[1.0, 2.0], [3.0, 4.0]]]])
    torch.testing.assert_close(lse_pool(feat, 1.0),
                               torch.tensor([[math.log(1.5), math.log((math.e + math.e ** 2 + math.e ** 3
                                                                       + math.e ** 4) / 4)]]))
    # r = 2 on the second channel: (1/2) log((e^2 + e^4 + e^6 + e^8) / 4) = 4 + (1/2) log((1 + e^-2 + e^-4 + e^-6) / 4)
    want = 4 + 0.5 * math.log((1 + math.exp(-2) + math.exp(-4) + math.exp(-6)) / 4)
    assert lse_pool(feat, 2.0)[0, 1].item() == pytest.approx(want, rel=1e-6)
    head = PcamHead(2, 1, pooling="max")
    with torch.no_grad():
        head.fc.weight.copy_(torch.tensor([1.0, -2.0]).view(1, 2, 1, 1))
        head.fc.bias.fill_(0.5)
    # max pools each channel on its own (ln 3 and 4 come from different cells): 1*ln3 - 2*4 + 0.5
    assert head(feat).logits.item() == pytest.approx(math.log(3.0) - 8.0 + 0.5, rel=1e-6)


@pytest.mark.timeout(60)
def test_max_is_the_large_r_limit_of_lse():
    torch.manual_seed(1)
    feat = 5.0 * torch.randn(3, 4, 6, 6)  # n = 36 cells
    mx, avg = feat.amax(dim=(-2, -1)), feat.mean(dim=(-2, -1))
    gaps = []
    for r in (0.1, 1.0, 10.0, 100.0, 1e3, 1e4, 1e6):
        lse = lse_pool(feat, r)
        assert torch.isfinite(lse).all(), r  # max-shifted: no overflow even at r * |x| ~ 1e7
        # avg <= lse <= max (Jensen), and max - lse <= log(n) / r (all mass on the peak cell)
        assert (lse >= avg - 1e-4).all() and (lse <= mx + 1e-5).all(), r
        gap = (mx - lse).abs().max().item()
        assert gap <= math.log(36) / r + 1e-5, (r, gap)
        gaps.append(gap)
    assert all(b <= a for a, b in zip(gaps, gaps[1:]))  # the gap shrinks as r grows
    assert gaps[-1] < 1e-5
    heads = {p: _head(p, C=4, K=2, **({"lse_r": 1e6} if p == "lse" else {})) for p in ("max", "lse")}
    torch.testing.assert_close(heads["lse"](feat).logits, heads["max"](feat).logits, atol=1e-4, rtol=0)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("pooling", ["max", "lse"])
def test_max_and_lse_gradients_flow(pooling):
    r = 3.0
    torch.manual_seed(2)
    feat = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    if pooling == "lse":
        # analytic gradient: d lse / d x = softmax(r x) over the cells of each channel
        (g,) = torch.autograd.grad(lse_pool(feat, r).sum(), feat)
        want = torch.softmax(r * feat.detach().flatten(2), dim=2).view_as(feat)
        torch.testing.assert_close(g.float(), want.float(), atol=1e-6, rtol=1e-5)
    head = _head(pooling, C=3, K=2, lse_r=r)
    out = head(feat)
    out.logits.sum().backward()
    assert head.fc.weight.grad.abs().sum() > 0 and head.fc.bias.grad.abs().sum() > 0
    g = feat.grad
    assert torch.isfinite(g).all()
    nonzero = (g != 0).flatten(2).sum(dim=2)  # cells per (image, channel) that receive gradient
    if pooling == "max":
        assert (nonzero == 1).all()  # only each channel's peak cell
        peak = feat.detach().flatten(2).argmax(dim=2)
        assert (g.flatten(2).abs().argmax(dim=2) == peak).all()
    else:
        assert (nonzero == 16).all()  # every cell, weighted by softmax(r x)
