"""Two gloo processes: per-rank losses on gathered features reproduce the single-device loss and gradients."""
import os
import socket
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from medvlp.kernels import clip_loss
from medvlp.pretrain.loss import AllGatherRows

WORLD, N_LOCAL, D = 2, 9, 24


def _global_batch():
    g = torch.Generator().manual_seed(123)
    img = F.normalize(torch.randn(WORLD * N_LOCAL, D, generator=g), dim=-1)
    txt = F.normalize(img + 0.6 * torch.randn(WORLD * N_LOCAL, D, generator=g), dim=-1)
    return img, txt


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _threads() -> list[str]:
    names = []
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                names.append(f.read().strip())
        except OSError:  # the thread ended meanwhile
            pass
    return names


def _worker(rank, port, backends, out_dir):
    if "triton" in backends:
        os.environ["TRITON_INTERPRET"] = "1"  # before the Triton module is first imported
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    results = {}
    try:
        img, txt = _global_batch()
        rows = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
        for backend in backends:
            img_q = img[rows].clone().requires_grad_()
            txt_q = txt[rows].clone().requires_grad_()
            scale = torch.tensor(15.0, requires_grad=True)
            img_k = AllGatherRows.apply(img_q)  # gathered with autograd: gradients flow back to each rank
            txt_k = AllGatherRows.apply(txt_q)
            loss = clip_loss(img_q, txt_q, scale, img_k=img_k, txt_k=txt_k, q_offset=rank * N_LOCAL,
                             backend=backend)
            loss.backward()
            results[backend] = (loss.detach(), img_q.grad, txt_q.grad, scale.grad)
    finally:
        dist.destroy_process_group()
    # A process group that outlives destroy_process_group keeps its gloo threads running into interpreter exit,
    # where tearing them down can abort the process (SIGABRT, "terminate called without an active exception").
    if os.path.isdir("/proc/self/task"):
        results["gloo_threads_after_destroy"] = [t for t in _threads() if "gloo" in t or "tcpstore" in t]
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


def _run(backends):
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_worker, args=(_free_port(), backends, out_dir), nprocs=WORLD, join=True)
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(WORLD)]


@pytest.mark.dist
def test_gloo_ranks_reproduce_single_device():
    backends = ("reference", "chunked", "triton")
    per_rank = _run(backends)
    img, txt = _global_batch()
    img, txt = img.clone().requires_grad_(), txt.clone().requires_grad_()
    scale = torch.tensor(15.0, requires_grad=True)
    single = clip_loss(img, txt, scale, backend="reference")
    single.backward()
    for rank, res in enumerate(per_rank):
        assert not res.get("gloo_threads_after_destroy"), (
            f"rank {rank}: the process group outlived destroy_process_group: {res['gloo_threads_after_destroy']}")
    for backend in backends:
        losses = torch.stack([r[backend][0] for r in per_rank])
        torch.testing.assert_close(losses.mean(), single.detach(), rtol=1e-6, atol=1e-6,
                                   msg=lambda m: f"{backend} mean loss: {m}")
        for rank, res in enumerate(per_rank):
            rows = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
            # The all-gather backward sums every rank's key gradient into the owner, so the local gradient is
            # W × the single-device one; DDP's averaging over W ranks brings it back.
            pairs = (("d_img", res[backend][1], img.grad[rows]), ("d_txt", res[backend][2], txt.grad[rows]))
            for name, got, want in pairs:
                torch.testing.assert_close(got / WORLD, want, rtol=1e-5, atol=1e-6,
                                           msg=lambda m: f"{backend} rank {rank} {name}: {m}")
        # The scale is replicated: DDP averages its per-rank gradients.
        ds = torch.stack([r[backend][3] for r in per_rank]).mean()
        torch.testing.assert_close(ds, scale.grad, rtol=1e-5, atol=1e-7, msg=lambda m: f"{backend} d_scale: {m}")
