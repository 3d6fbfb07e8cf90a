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
