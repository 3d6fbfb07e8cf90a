"""Embedding cache (GradCache, Gao et al. 2021): a contrastive batch larger than activation memory, exact gradients.

The contrastive loss couples every sample through the N×N logits, so plain gradient accumulation over micro
batches changes the loss (fewer negatives). But the loss depends on the towers only through the embeddings, so
    dL/dθ = Σ_chunks (dL/d emb_chunk) · (d emb_chunk / dθ)
and `cached_step` computes exactly that in three passes:
  1. encode the batch chunk by chunk under `torch.no_grad()` (activations of one chunk at a time);
  2. make the embeddings (and the scale / bias outputs) leaf tensors, compute the loss on them (gathering across
     ranks inside `loss_fn`), backward -> dL/d emb, dL/ds (cheap: no tower in this graph);
  3. re-encode chunk by chunk WITH a graph and backpropagate the surrogate Σ ⟨emb_chunk, dL/d emb_chunk⟩
     (+ ⟨s, dL/ds⟩ once), whose gradient w.r.t. θ is the chunk's share of dL/dθ. Parameter `.grad`s accumulate
     over the chunks, exactly as over accumulation micro batches; the caller steps the optimizer afterwards.
The CPU (and CUDA) RNG state is saved before each chunk's first encoding and restored before its re-encoding, so
dropout / patch dropout draw the same masks twice; afterwards the RNG continues from where pass 1 left it.

Exactness needs towers whose output for a sample does not depend on the other samples of its chunk: true for
LayerNorm / GroupNorm towers (ViT, text transformers, BERT, ResNet3D); a BatchNorm tower (ModifiedResNet) sees
per-chunk batch statistics in training mode, and its running statistics are updated in both passes.

With DeepSpeed: pass the engine as `model` (its forward gathers ZeRO-3 partitions) and `backward=engine.backward`,
so every chunk's surrogate goes through the engine (loss scaling, ZeRO-2 gradient partitioning, ZeRO-3 hooks).
The engine's accumulation boundary is held False for all chunks but the last (which gets the boundary the engine
had on entry), so gradients are reduced once per micro batch, then the caller runs `engine.step()`.

Shape legend: B batch, c chunk rows, E embed dim.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Sequence

import torch
import torch.nn as nn


def surrogate_loss(outputs: Sequence[torch.Tensor], grads: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """Σ_j ⟨outputs_j, grads_j⟩ (grads constant): its gradient w.r.t. anything upstream is the chain-rule share."""
    terms = [(o * g.to(o.dtype)).sum() for o, g in zip(outputs, grads) if g is not None]
    if not terms:
        raise ValueError("surrogate_loss: no output has a gradient (does the loss depend on the embeddings?)")
    return torch.stack([t.float() for t in terms]).sum()


class _RngState:
    """CPU RNG state (+ the CUDA one of `device`): captured, and put back."""

    def __init__(self, device: torch.device) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        self.device = device

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)


@contextlib.contextmanager
def _boundary_control(model: nn.Module) -> Iterator[Callable[[bool], None]]:
    """Yield set(is_last): holds a DeepSpeed engine's accumulation boundary off until the last chunk.

    For a plain module it is a no-op. The engine's override attribute is restored afterwards (DeepSpeed does the
    same around its own internal boundary changes), so managed accumulation continues unchanged.
    """
    if not all(hasattr(model, a) for a in ("set_gradient_accumulation_boundary", "is_gradient_accumulation_boundary")):
        yield lambda is_last: None
        return
    saved = getattr(model, "_is_gradient_accumulation_boundary", None)
    at_boundary = bool(model.is_gradient_accumulation_boundary())
    try:
        yield lambda is_last: model.set_gradient_accumulation_boundary(at_boundary if is_last else False)
    finally:
        model._is_gradient_accumulation_boundary = saved


def _call_loss(loss_fn: Callable, args: list[torch.Tensor], rank: int | None, world_size: int | None):
    if rank is None and world_size is None:
        return loss_fn(*args)
    return loss_fn(*args, rank=0 if rank is None else rank, world_size=1 if world_size is None else world_size)


def cached_step(model: nn.Module, images: torch.Tensor, tokens: torch.Tensor, loss_fn: Callable, chunk: int,
                rank: int | None = None, world_size: int | None = None,
                backward: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
    """Loss of the whole batch with parameter gradients accumulated into `.grad`, encoding `chunk` rows at a time.

    model: returns (img_emb, txt_emb, scale[, bias]) from `model(images, tokens)` (MedCLIP or its engine).
    loss_fn: called as loss_fn(img_emb, txt_emb, scale[, bias]) — plus rank=, world_size= when those are given
      (e.g. a `ContrastiveLoss`); it does its own cross-rank gathering.
    backward: how a surrogate is backpropagated (default `Tensor.backward`; `engine.backward` under DeepSpeed).
    Returns the detached loss.
    """
    if chunk < 1:
        raise ValueError(f"chunk: must be >= 1, got {chunk}")
    if images.shape[0] != tokens.shape[0]:
        raise ValueError(f"images ({images.shape[0]}) and tokens ({tokens.shape[0]}) differ in batch size")
    backward = backward or (lambda t: t.backward())
    img_chunks, tok_chunks = images.split(chunk), tokens.split(chunk)

    # 1. embeddings without activations; the RNG state before each chunk is kept for its re-encoding
    rng, embs, extras = [], [], None
    with torch.no_grad():
        for img_c, tok_c in zip(img_chunks, tok_chunks):
            rng.append(_RngState(img_c.device))
            out = model(img_c, tok_c)
            embs.append((out[0], out[1]))
            extras = extras if extras is not None else list(out[2:])
    rng_after = _RngState(images.device)

    # 2. loss on leaf embeddings -> d loss / d embeddings (and d loss / d scale, bias)
    img_BE = torch.cat([e[0] for e in embs]).detach().requires_grad_(True)
    txt_BE = torch.cat([e[1] for e in embs]).detach().requires_grad_(True)
    extra_leaves = [x.detach().requires_grad_(True) for x in extras]
    with torch.enable_grad():
        loss = _call_loss(loss_fn, [img_BE, txt_BE, *extra_leaves], rank, world_size)
        loss.backward()
    g_img, g_txt = img_BE.grad.split(chunk), txt_BE.grad.split(chunk)
    g_extra = [x.grad for x in extra_leaves]

    # 3. re-encode with a graph, chunk by chunk, and push the cached gradients through the towers
    with _boundary_control(model) as set_boundary:
        for i, (img_c, tok_c) in enumerate(zip(img_chunks, tok_chunks)):
            rng[i].restore()
            out = model(img_c, tok_c)
            # The scale / bias are shared by all chunks: their gradient enters once; later chunks add a zero
            # term so that every parameter takes part in every backward (DeepSpeed's hooks expect that).
            outs = [out[0], out[1], *out[2:]]
            grads = [g_img[i], g_txt[i], *(g if i == 0 else torch.zeros_like(g) for g in g_extra)]
            set_boundary(i == len(img_chunks) - 1)
            backward(surrogate_loss(outs, grads))
    rng_after.restore()
    return loss.detach()

