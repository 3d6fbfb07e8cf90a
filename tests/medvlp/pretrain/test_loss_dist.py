"""Global-batch equivalence on CPU: 2 gloo ranks x n samples == 1 process x 2n samples (loss and every gradient).

The 2-rank gradients are averaged across ranks here (all_reduce SUM / W), as DDP / DeepSpeed do.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from medvlp.pretrain.cache import cached_step
from medvlp.pretrain.config import LossConfig, ModelConfig
from medvlp.pretrain.loss import ContrastiveLoss
from medvlp.pretrain.model import build_model

pytestmark = pytest.mark.dist

WORLD, N_LOCAL = 2, 4
VARIANTS = {
    "local": LossConfig(backend="torch", local_loss=True),
    "global": LossConfig(backend="torch", local_loss=False),
    "chunked": LossConfig(backend="chunked", chunk_size=3),
    "siglip": LossConfig(kind="siglip"),
    "no_grad_gather": LossConfig(backend="torch", gather_with_grad=False),
}
CACHED = "cached"  # the embedding cache (chunk 2) on top of the "local" loss


def _model(cfg: LossConfig):
    torch.manual_seed(0)
    return build_model(ModelConfig(name="debug"), cfg)


def _step(model, loss_fn, img, tok, rank, world, cached=False):
    model.zero_grad(set_to_none=True)
    if cached:
        loss = cached_step(model, img, tok, loss_fn, chunk=2, rank=rank, world_size=world)
    else:
        loss = loss_fn(*model(img, tok), rank=rank, world_size=world)
        loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    return loss.detach().clone(), grads


def _worker(rank: int, init_file: str, out_file: str, img, tok) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    sl = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
    results = {}
    for name, cfg in [*VARIANTS.items(), (CACHED, VARIANTS["local"])]:
        model = _model(cfg)
        loss, grads = _step(model, ContrastiveLoss(cfg), img[sl], tok[sl], rank, WORLD, cached=name == CACHED)
        for t in [loss, *grads.values()]:  # DDP-style average over ranks
            dist.all_reduce(t)
            t.div_(WORLD)
        results[name] = (loss, grads)
    if rank == 0:
        torch.save(results, out_file)
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    torch.manual_seed(1)
    img = torch.randn(WORLD * N_LOCAL, 3, 64, 64)
    tok = _model(LossConfig()).tokenize([f"report {i}: opacity in zone {i % 3}" for i in range(WORLD * N_LOCAL)])
    # `fork` where the platform has it: the ranks inherit the imported torch/open_clip (a spawned interpreter
    # re-imports them, ~10 s per rank on a shared 2-core machine); `spawn` elsewhere. Same API as mp.spawn.
    # Forking a process that already runs threads (an earlier in-process training leaves gloo/MLflow threads) can
    # deadlock the children, so fork only from a single-threaded parent.
    # An in-process training earlier in the session leaves the default group initialised: children must not inherit it.
    import threading
    clean = threading.active_count() == 1 and not torch.distributed.is_initialized()
    method = "fork" if "fork" in mp.get_all_start_methods() and clean else "spawn"
    mp.start_processes(_worker, args=(str(tmp / "init"), str(tmp / "out.pt"), img, tok), nprocs=WORLD, join=True,
                       start_method=method)
    return img, tok, torch.load(tmp / "out.pt")


def _single(cfg: LossConfig, img, tok):
    model = _model(cfg)
    return _step(model, ContrastiveLoss(copy.deepcopy(cfg)), img, tok, 0, 1)


@pytest.mark.parametrize("name", [*[k for k in VARIANTS if k != "no_grad_gather"], CACHED])
def test_two_ranks_equal_one_rank_with_the_doubled_batch(two_rank_results, name):
    img, tok, results = two_rank_results
    cfg = VARIANTS["local" if name == CACHED else name]
    want_loss, want_grads = _single(cfg, img, tok)
    loss, grads = results[name]
    assert loss.item() == pytest.approx(want_loss.item(), abs=1e-5, rel=1e-5)
    assert set(grads) == set(want_grads)
    for n, g in want_grads.items():
        torch.testing.assert_close(grads[n], g, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: grad {n}: {m}")


def test_gather_without_grad_is_the_documented_approximation(two_rank_results):
    """Same loss value, but the gradient lacks the other rank's use of local rows as keys."""
    img, tok, results = two_rank_results
    want_loss, want_grads = _single(VARIANTS["local"], img, tok)
    loss, grads = results["no_grad_gather"]
    assert loss.item() == pytest.approx(want_loss.item(), abs=1e-5)
    n = "visual.net.proj"
    assert not torch.allclose(grads[n], want_grads[n], rtol=1e-3, atol=1e-5)
