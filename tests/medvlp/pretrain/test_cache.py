"""Embedding cache: gradients equal the direct ones (with and without dropout), RNG handling, engine hooks."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from medvlp.pretrain import cache
from medvlp.pretrain.cache import cached_step, surrogate_loss
from medvlp.pretrain.config import LossConfig, ModelConfig
from medvlp.pretrain.loss import ContrastiveLoss
from medvlp.pretrain.model import build_model

B, CHUNK = 16, 4


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="debug"))
    torch.manual_seed(1)
    img = torch.randn(B, 3, 64, 64)
    tok = model.tokenize([f"case {i}: {'no ' if i % 2 else ''}effusion, zone {i % 5}" for i in range(B)])
    return model, img, tok


@pytest.fixture(scope="module")
def bert_dropout():
    """Tiny BERT text tower with dropout 0.1 (hidden and attention) + ViT; random WordPiece-like ids."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="debug-bert"))
    g = torch.Generator().manual_seed(2)
    tok = torch.randint(5, 2000, (B, model.context_length), generator=g)
    lengths = torch.randint(4, model.context_length, (B,), generator=g)
    tok[torch.arange(model.context_length)[None, :] >= lengths[:, None]] = 0  # right padding
    tok[:, 0] = 2
    img = torch.randn(B, 3, 64, 64, generator=g)
    return model, img, tok


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _direct(model, img, tok, loss_fn, chunk=None):
    """One backward of the whole-batch loss. With `chunk`, the forward runs chunk by chunk (same dropout draws as
    the cache's first pass) but the graph and the loss still span the whole batch."""
    model.zero_grad(set_to_none=True)
    if chunk is None:
        out = model(img, tok)
    else:
        outs = [model(i, t) for i, t in zip(img.split(chunk), tok.split(chunk))]
        out = (torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs]), outs[0][2])
    loss = loss_fn(*out)
    loss.backward()
    return loss.detach(), _grads(model)


def _cached(model, img, tok, loss_fn, **kw):
    model.zero_grad(set_to_none=True)
    loss = cached_step(model, img, tok, loss_fn, chunk=CHUNK, **kw)
    return loss, _grads(model)


def _assert_same(a, b, what=""):
    assert set(a) == set(b)
    for n in a:
        torch.testing.assert_close(b[n], a[n], rtol=1e-5, atol=1e-6, msg=lambda m: f"{what} grad {n}: {m}")


def test_cached_gradients_equal_direct(vit):
    model, img, tok = vit
    model.train()
    loss_fn = ContrastiveLoss(LossConfig())
    want_loss, want = _direct(model, img, tok, loss_fn)
    got_loss, got = _cached(model, img, tok, loss_fn, rank=0, world_size=1)
    assert got_loss.item() == pytest.approx(want_loss.item(), rel=1e-6)
    assert not got_loss.requires_grad
    _assert_same(want, got)
    assert "logit_scale" in got and got["logit_scale"].abs().item() > 0


def test_cached_gradients_equal_direct_with_dropout(bert_dropout):
    model, img, tok = bert_dropout
    model.train()
    loss_fn = ContrastiveLoss(LossConfig())
    torch.manual_seed(5)
    want_loss, want = _direct(model, img, tok, loss_fn, chunk=CHUNK)
    after_direct = torch.rand(3)
    torch.manual_seed(5)
    got_loss, got = _cached(model, img, tok, loss_fn)
    assert torch.equal(torch.rand(3), after_direct)  # the RNG continues as after one forward
    assert got_loss.item() == pytest.approx(want_loss.item(), rel=1e-6)
    _assert_same(want, got, "dropout")


def test_without_rng_restore_dropout_gradients_differ(bert_dropout, monkeypatch):
    """The restore is what makes the dropout case exact (guards the test above against passing vacuously)."""
    model, img, tok = bert_dropout
    model.train()
    loss_fn = ContrastiveLoss(LossConfig())
    torch.manual_seed(5)
    _, want = _direct(model, img, tok, loss_fn, chunk=CHUNK)
    monkeypatch.setattr(cache._RngState, "restore", lambda self: None)
    torch.manual_seed(5)
    _, got = _cached(model, img, tok, loss_fn)
    n = "text.proj.weight"
    assert not torch.allclose(got[n], want[n], rtol=1e-3, atol=1e-6)


def test_siglip_bias_and_scale_gradients_through_cache(vit):
    model, img, tok = vit
    torch.manual_seed(0)
    sig = build_model(ModelConfig(name="debug"), LossConfig(kind="siglip"))
    loss_fn = ContrastiveLoss(LossConfig(kind="siglip"))
    want_loss, want = _direct(sig, img, tok, loss_fn)
    got_loss, got = _cached(sig, img, tok, loss_fn)
    assert got_loss.item() == pytest.approx(want_loss.item(), rel=1e-6)
    _assert_same(want, got, "siglip")
    assert got["logit_bias"].abs().item() > 0


class _FakeEngine(nn.Module):
    """The DeepSpeed engine surface cached_step uses: forward, boundary get/set, backward."""

    def __init__(self, module):
        super().__init__()
        self.module = module
        self._is_gradient_accumulation_boundary = None
        self.set_calls, self.backward_calls = [], 0

    def forward(self, *a):
        return self.module(*a)

    def is_gradient_accumulation_boundary(self):
        return True if self._is_gradient_accumulation_boundary is None else self._is_gradient_accumulation_boundary

    def set_gradient_accumulation_boundary(self, b):
        self.set_calls.append(b)
        self._is_gradient_accumulation_boundary = b

    def backward(self, loss):
        assert loss.ndim == 0
        self.backward_calls += 1
        loss.backward()


def test_engine_backward_and_boundary(vit):
    model, img, tok = vit
    engine = _FakeEngine(copy.deepcopy(model))
    loss_fn = ContrastiveLoss(LossConfig())
    _, want = _direct(engine.module, img, tok, loss_fn)
    engine.zero_grad(set_to_none=True)
    cached_step(engine, img, tok, loss_fn, chunk=CHUNK, backward=engine.backward)
    assert engine.backward_calls == B // CHUNK
    assert engine.set_calls == [False, False, False, True]
    assert engine._is_gradient_accumulation_boundary is None  # managed accumulation restored
    _assert_same({f"module.{k}": v for k, v in want.items()}, _grads(engine), "engine")


def test_uneven_last_chunk_and_errors(vit):
    model, img, tok = vit
    loss_fn = ContrastiveLoss(LossConfig())
    _, want = _direct(model, img[:10], tok[:10], loss_fn)
    _, got = _cached(model, img[:10], tok[:10], loss_fn)  # chunks of 4, 4, 2
    _assert_same(want, got, "uneven")
    with pytest.raises(ValueError, match="chunk: must be >= 1"):
        cached_step(model, img, tok, loss_fn, chunk=0)
    with pytest.raises(ValueError, match=r"images \(16\) and tokens \(15\)"):
        cached_step(model, img, tok[:15], loss_fn, chunk=4)
    with pytest.raises(ValueError, match="no output has a gradient"):
        surrogate_loss([torch.zeros(2)], [None])
