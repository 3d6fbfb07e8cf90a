"""DeepSpeed in one place: process group, the engine (ZeRO 0-3), the optimizer, the schedule, checkpoints.

* Process group: under a launcher (torchrun / deepspeed / srun+torchrun) RANK, WORLD_SIZE, MASTER_ADDR/PORT come from
  the environment; a bare ``python -m ...`` run is a world of one on a free loopback port, so no launcher is needed.
  NCCL on GPUs, gloo on CPU.
* Optimizer: torch AdamW (fused: one kernel over all tensors, on CUDA and, with torch >= 2.4, on CPU) with two
  groups: weight decay on matrices only; biases, norm weights, embeddings-like 1-d params and the logit scale get none.
  DeepSpeed wraps it (ZeRO partitions its states), so the same code runs on CPU (gloo) and GPU.
* Schedule: linear warmup then cosine to ``min_lr_ratio·lr``, stepped by the engine at accumulation boundaries.
  Optimizer groups and schedule are the run spine's (`medvlp.pretrain.spine`), shared with fine-tuning.
* Checkpoints: see `medvlp.pretrain.checkpoint` (re-exported here): DeepSpeed's files for tag ``step_XXXXXXXX`` plus our
  client state, the config as JSON and per-rank RNG states as JSON; a ``COMPLETE`` marker is written last.
"""
from __future__ import annotations

import json
import os
import random
import socket
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from medvlp.pretrain.config import OptimConfig, TrainConfig
from medvlp.pretrain.spine import build_adamw, lr_multiplier

# ----------------------------------------------------------------------------------------------- process group
# DeepSpeed ops that training never calls but that DeepSpeed would build with a C++ compiler at start-up.
# deepspeed_shm_comm: every TorchBackend on the CPU accelerator JIT-compiles it (about 34 s on a fresh 2-core machine,
# then loaded from ~/.cache/torch_extensions) for `inference_all_reduce` only, used by DeepSpeed's tensor-parallel
# inference layers. Our all-reduces, all-gathers and reduce-scatters go through torch.distributed (gloo/NCCL).
UNUSED_DEEPSPEED_OPS = ("deepspeed_shm_comm",)


def skip_unused_deepspeed_ops() -> None:
    """Mark `UNUSED_DEEPSPEED_OPS` incompatible so DeepSpeed neither compiles nor loads them (idempotent).

    Must run before the first TorchBackend exists (deepspeed.init_distributed or deepspeed.initialize)."""
    import deepspeed.ops

    compatible = deepspeed.ops.__compatible_ops__  # probed on first access (cheap), then one shared dict
    for name in UNUSED_DEEPSPEED_OPS:
        compatible[name] = False


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(timeout_s: float = 600.0) -> tuple[int, int, int]:
    """Initialise torch.distributed (idempotent). Returns (rank, world_size, local_rank)."""
    import datetime

    import deepspeed

    skip_unused_deepspeed_ops()
    if not dist.is_initialized():
        if "RANK" not in os.environ:  # single process, no launcher
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=os.environ.get("MASTER_PORT", str(free_port())))
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        deepspeed.init_distributed(dist_backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    return dist.get_rank(), dist.get_world_size(), local_rank


def device_for(local_rank: int) -> torch.device:
    return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")


def seed_everything(seed: int, rank: int = 0) -> None:
    s = seed + 1000 * rank
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)


# ----------------------------------------------------------------------------------------------- optimizer
def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """The spine's AdamW (`medvlp.pretrain.spine.build_adamw`: decay on matrices/kernels only; no biases, norms,
    positions, logit scale), fused where torch has a fused kernel for the device."""
    # fused: one kernel over all tensors; on CPU 4x faster than the per-tensor loop (RN50)
    return build_adamw(model, cfg.lr, cfg.betas, cfg.weight_decay, eps=cfg.eps,
                       fused=torch.cuda.is_available() or _fused_adamw_on_cpu())


def keep_freed_host_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of handing it back to the kernel.

    By default every allocation over 32 MiB (most activations of a CNN at a real batch) is its own mmap: freed at
    the end of the step, mapped again in the next, and every 4 KiB page of it is faulted in and zeroed by the
    kernel again (RN50 at batch 32 on CPU: 1-2.5 s of system time per step). With mmap off and trimming at its
    maximum, the heap keeps the step's memory and the next step reuses it: ~10% less time per RN50 CPU step, at
    the price of a resident size that stays at the step's peak (as a GPU caching allocator's does). Returns
    whether it took effect (Linux with glibc only; a no-op elsewhere). Process-wide and not undone."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, ...)
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2**31 - 1))


def _fused_adamw_on_cpu() -> bool:
    """torch >= 2.4 has a fused AdamW for CPU tensors."""
    major, minor = (int(x) for x in torch.__version__.split(".")[:2])
    return (major, minor) >= (2, 4)


def lr_lambda(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Multiplier of the peak lr at optimizer step `step`: the spine's schedule (linear warmup, then cosine to
    min_lr_ratio)."""
    return lr_multiplier(step, cfg.warmup_steps, total_steps, cfg.min_lr_ratio)


# ----------------------------------------------------------------------------------------------- engine
def use_bf16(train: TrainConfig) -> bool:
    """bf16 weights/engine only on GPU; on CPU `precision=bf16` means autocast around the forward (see train loop)."""
    return torch.cuda.is_available() and train.precision in ("auto", "bf16")


def deepspeed_config(train: TrainConfig, optim: OptimConfig, micro_batch: int, world_size: int) -> dict:
    """The DeepSpeed JSON for this run; a template file (train.deepspeed_config, a path) is merged underneath."""
    cfg: dict[str, Any] = {}
    if train.deepspeed_config:
        path = Path(train.deepspeed_config)  # a file path: bundled template names are resolved by the caller
        if not path.is_file():
            raise FileNotFoundError(f"train.deepspeed_config: {train.deepspeed_config} not found (a template file "
                                    f"path; `medvlp` resolves bundled names such as zero2.json)")
        cfg = json.loads(path.read_text())
        for k in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
            cfg.pop(k, None)  # batch arithmetic always comes from our config
    zero = dict(cfg.get("zero_optimization", {}))
    if "stage" in zero and int(zero["stage"]) != train.zero_stage:
        raise ValueError(f"train.zero_stage={train.zero_stage} but the DeepSpeed template {train.deepspeed_config} "
                         f"says stage {zero['stage']}: make them agree")
    zero["stage"] = train.zero_stage
    if train.zero_stage == 3:
        zero.setdefault("stage3_gather_16bit_weights_on_model_save", True)
    cfg.update({
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": train.grad_accum,
        "train_batch_size": micro_batch * train.grad_accum * world_size,
        "zero_optimization": zero,
        "gradient_clipping": optim.grad_clip,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    })
    cfg["bf16"] = {"enabled": use_bf16(train)}
    if not torch.cuda.is_available():
        cfg["zero_allow_untested_optimizer"] = True
        cfg.pop("fp16", None)
    return cfg


def create_engine(model: torch.nn.Module, train: TrainConfig, optim: OptimConfig, micro_batch: int, world_size: int):
    """deepspeed.initialize with our optimizer and schedule. Returns (engine, optimizer, scheduler, ds_config)."""
    import deepspeed

    skip_unused_deepspeed_ops()  # deepspeed.initialize creates the process group if nobody did
    optimizer = build_optimizer(model, optim)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_lambda(s, optim, train.steps))
    ds_cfg = deepspeed_config(train, optim, micro_batch, world_size)
    engine, optimizer, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                           config=ds_cfg)
    if world_size == 1 and train.zero_stage == 0:
        # A world of one: the gradients already are the global ones, but DeepSpeed would still flatten them into one
        # buffer, all-reduce it over one rank and copy it back (2.2 s of a 9 s RN50 step on 2 CPU cores).
        engine.enable_backward_allreduce = False
    return engine, optimizer, scheduler, ds_cfg


# ----------------------------------------------------------------------------------------------- checkpoints
# The checkpoint I/O lives in medvlp.pretrain.checkpoint; these names stay importable from here.
from medvlp.pretrain.checkpoint import (  # noqa: E402,F401
    CKPT_DIR, COMPLETE, complete_checkpoints, latest_complete, load_checkpoint, rng_state as _rng_state,
    save_checkpoint, save_model_weights, set_rng_state as _set_rng_state, tag_for)
