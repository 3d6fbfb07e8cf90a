"""ContrastiveLoss: values vs hand-written loops, gradcheck, backend agreement, auto choice, SigLIP, errors."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medvlp.pretrain.config import LossConfig, ModelConfig
from medvlp.pretrain.loss import ContrastiveLoss, gather_features, siglip_loss


def _feats(n=5, d=4, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=-1)
    txt = F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=-1)
    return img, txt


def _clip_loops(img: np.ndarray, txt: np.ndarray, s: float) -> float:
    """Symmetric InfoNCE written out with explicit loops (no vectorised softmax)."""
    n = img.shape[0]
    total = 0.0
    for i in range(n):
        row_it = [s * sum(img[i, k] * txt[j, k] for k in range(img.shape[1])) for j in range(n)]
        row_ti = [s * sum(txt[i, k] * img[j, k] for k in range(img.shape[1])) for j in range(n)]
        ce_it = -row_it[i] + math.log(sum(math.exp(v) for v in row_it))
        ce_ti = -row_ti[i] + math.log(sum(math.exp(v) for v in row_ti))
        total += 0.5 * (ce_it + ce_ti)
    return total / n


def _siglip_loops(img: np.ndarray, txt: np.ndarray, s: float, b: float) -> float:
    n = img.shape[0]
    total = 0.0
    for i in range(n):
        for j in range(n):
            z = 1.0 if i == j else -1.0
            logit = s * float(np.dot(img[i], txt[j])) + b
            total += -math.log(1.0 / (1.0 + math.exp(-z * logit)))
    return total / n


@pytest.mark.parametrize("backend", ["torch", "chunked"])
def test_clip_loss_matches_hand_written_loops(backend):
    img, txt = _feats(5, 4, dtype=torch.float64)
    s = torch.tensor(1 / 0.07, dtype=torch.float64)
    want = _clip_loops(img.numpy(), txt.numpy(), float(s))
    got = ContrastiveLoss(LossConfig(backend=backend, chunk_size=2))(img, txt, s)
    # the chunked backend accumulates in fp32 whatever the input dtype
    assert got.item() == pytest.approx(want, rel=1e-10 if backend == "torch" else 1e-6)


def test_siglip_loss_matches_hand_written_loops():
    img, txt = _feats(5, 4, seed=1, dtype=torch.float64)
    s, b = torch.tensor(10.0, dtype=torch.float64), torch.tensor(-3.0, dtype=torch.float64)
    want = _siglip_loops(img.numpy(), txt.numpy(), 10.0, -3.0)
    got = ContrastiveLoss(LossConfig(kind="siglip"))(img, txt, s, b)
    assert got.item() == pytest.approx(want, rel=1e-10)


@pytest.mark.parametrize("kind,backend", [("clip", "torch"), ("siglip", "torch")])
def test_gradcheck_float64(kind, backend):
    loss = ContrastiveLoss(LossConfig(kind=kind, backend=backend, chunk_size=2))
    g = torch.Generator().manual_seed(3)
    img = torch.randn(4, 3, dtype=torch.float64, generator=g, requires_grad=True)
    txt = torch.randn(4, 3, dtype=torch.float64, generator=g, requires_grad=True)
    t = torch.tensor(1.2, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(-0.5, dtype=torch.float64, requires_grad=True)

    def f(img, txt, t, b):
        i, x = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
        return loss(i, x, t.exp(), b if kind == "siglip" else None)

    assert torch.autograd.gradcheck(f, (img, txt, t, b), eps=1e-6, atol=1e-6)


def test_chunked_gradients_equal_the_gradchecked_reference():
    """The chunked backend computes in fp32, so it is held to the float64-gradchecked torch backend instead."""
    img, txt = _feats(7, 5, seed=4, dtype=torch.float64)
    grads = []
    for backend in ("torch", "chunked"):
        i, x = img.clone().requires_grad_(True), txt.clone().requires_grad_(True)
        s = torch.tensor(12.0, dtype=torch.float64, requires_grad=True)
        ContrastiveLoss(LossConfig(backend=backend, chunk_size=3))(i, x, s).backward()
        grads.append((i.grad, x.grad, s.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(b.double(), a, rtol=1e-5, atol=1e-6)


def test_backends_agree_on_a_training_step():
    """torch vs chunked backend: same loss, same gradients, same parameters after one SGD step.

    (SGD, not Adam: Adam's first step is ~lr·sign(g), which turns the ~1e-10 noise on gradients that are zero in
    exact arithmetic, e.g. the attention key biases, into full-size differences.)"""
    from medvlp.pretrain.model import build_model

    torch.manual_seed(0)
    img = torch.randn(8, 3, 64, 64)
    results = []
    for backend in ("torch", "chunked"):
        torch.manual_seed(0)
        model = build_model(ModelConfig(name="debug"))
        tok = model.tokenize([f"finding {i} in the left lung" for i in range(8)])
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        loss = ContrastiveLoss(LossConfig(backend=backend, chunk_size=3))(*model(img, tok))
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
        results.append((loss.item(), grads, {n: p.detach().clone() for n, p in model.named_parameters()}))
    (l0, g0, p0), (l1, g1, p1) = results
    assert l1 == pytest.approx(l0, rel=1e-6)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-4, atol=1e-6, msg=lambda m: f"grad {n}: {m}")
        torch.testing.assert_close(p1[n], p0[n], rtol=1e-5, atol=1e-6, msg=lambda m: f"param {n}: {m}")


def test_auto_backend_threshold_is_a_knob():
    img, txt = _feats(8, 4)
    assert ContrastiveLoss(LossConfig(backend="auto", auto_chunked_min=8)).backend_for(img, 8) == "chunked"
    assert ContrastiveLoss(LossConfig(backend="auto", auto_chunked_min=9)).backend_for(img, 8) == "torch"
    assert ContrastiveLoss(LossConfig(backend="auto")).backend_for(img, 512) == "chunked"
    assert ContrastiveLoss(LossConfig(kind="siglip", backend="auto")).backend_for(img, 4096) == "torch"
    a = ContrastiveLoss(LossConfig(backend="auto", auto_chunked_min=2))(img, txt, torch.tensor(10.0))
    b = ContrastiveLoss(LossConfig(backend="torch"))(img, txt, torch.tensor(10.0))
    assert a.item() == pytest.approx(b.item(), rel=1e-6)


def test_triton_unavailable_message(monkeypatch):
    import medvlp.kernels.contrastive as kc

    why = "no CUDA device and TRITON_INTERPRET is not set to 1"
    monkeypatch.setattr(kc, "triton_available", lambda: (False, why))
    msg = r"^triton backend unavailable: no CUDA device .*; use loss.backend=chunked$"
    with pytest.raises(RuntimeError, match=msg):
        ContrastiveLoss(LossConfig(backend="triton"))


def test_config_and_input_errors():
    with pytest.raises(ValueError, match="SigLIP needs torch or auto"):
        ContrastiveLoss(LossConfig(kind="siglip", backend="chunked"))
    with pytest.raises(ValueError, match="kind: 'infonce'"):
        ContrastiveLoss(LossConfig(kind="infonce"))
    img, txt = _feats(4, 4)
    with pytest.raises(ValueError, match=r"img \(4, 4\) and txt \(3, 4\)"):
        ContrastiveLoss()(img, txt[:3], torch.tensor(1.0))
    with pytest.raises(ValueError, match="needs the model's logit_bias"):
        ContrastiveLoss(LossConfig(kind="siglip"))(img, txt, torch.tensor(1.0))
    if not torch.distributed.is_initialized():  # an in-process training earlier in the session initialises it
        with pytest.raises(RuntimeError, match="torch.distributed is not initialised"):
            gather_features(img, txt, 0, 2)
    with pytest.raises(ValueError, match="does not fit"):
        siglip_loss(img, txt, torch.tensor(1.0), torch.tensor(0.0), q_offset=2)


def test_clip_loss_is_minimal_for_matching_pairs():
    img, _ = _feats(6, 8)
    loss = ContrastiveLoss()
    aligned = loss(img, img.clone(), torch.tensor(100.0))
    shuffled = loss(img, img.roll(1, 0), torch.tensor(100.0))
    assert aligned.item() < 0.05 < shuffled.item()
