"""Size a pretraining job before queueing it: `medvlp plan --gpus N --global-batch B --model M --zero S`.

Per GPU it estimates the memory of the model states (weights, gradients, optimizer state) by ZeRO stage, the
activations at the local batch (with and without activation checkpointing), the contrastive loss's extra memory
by backend, the bytes each GPU sends per step, and a step time from a peak FLOP/s and link bandwidths.

Where the numbers come from:
* parameters P and training FLOPs per sample: the model built from its registry config (meta device for FLOPs);
* activations: the bytes autograd saves for backward, measured once per model on CPU with
  `torch.autograd.graph.saved_tensors_hooks` (two batch sizes, so constant terms cancel), in fp32; bf16 halves them;
* model states (mixed precision, as DeepSpeed keeps them): bf16 weights 2P, bf16 gradients 2P, fp32 master
  weights + Adam moments 12P; fp32 training: 4P + 4P + 8P. ZeRO-1 partitions the optimizer state over the data-
  parallel ranks, ZeRO-2 also the gradients, ZeRO-3 also the weights;
* communication (ring algorithms, φ = (W-1)/W of the buffer per collective): ZeRO-0/1/2 move 2φ·(gradient bytes)
  (reduce-scatter + all-gather, or one all-reduce), ZeRO-3 3φ·(weight bytes) (weights gathered in forward and in
  backward, gradients reduce-scattered); the feature gather for the loss moves φ·N·E·2 towers forward and again
  backward;
* peak = weights + optimizer state + max(activations + loss extra, gradients + the Adam update's temporaries):
  during backward the gradients take the room of the activations they free (checked against a real CPU step);
* step time: compute = FLOPs/sample × local batch / (peak × MFU) (× 4/3 with activation checkpointing, for the
  second forward); communication = bytes / bandwidth, NVLink inside a node, InfiniBand per GPU across nodes (the
  ring's slowest link). Printed without overlap and with full overlap: the truth lies between.

* data feed: the DataLoader workers per GPU that stream `--feed-margin` (default 1.5) x the GPU's compute rate
  (per-GPU batch / compute time), at `--worker-rate` samples/s per worker; by default the rate measured for the
  model's recipe on the fast stream path (`WORKER_RATES`, from `benchmarks/bench_stream.py --feed`: one core of
  the project's CPU box, JPEG-256 shards, worker side). A core of another CPU differs: measure yours.

It is a model, not a measurement: `benchmarks/bench_plan.py` checks its memory against a real CPU step.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from functools import lru_cache

import torch

GiB = 1024 ** 3


@dataclass
class Hardware:
    """What one GPU and its links can do (defaults: H100 SXM, NVLink 4, InfiniBand NDR 400 Gb/s per GPU)."""

    peak_tflops: float = 989.0  # dense bf16 TFLOP/s of one GPU
    mfu: float = 0.40  # fraction of the peak the towers reach
    gpu_mem_gib: float = 80.0  # memory of one GPU
    nvlink_gbs: float = 450.0  # GB/s per GPU inside a node (one direction)
    ib_gbs: float = 50.0  # GB/s per GPU between nodes


# Per-worker samples/s of the fast stream path (data.pipeline=fast) on JPEG-256 shards, worker side (the batch-side
# normalisation runs on the GPU), samples per CPU second of one core of the project's 2-core AMD EPYC box (medians of
# 3 interleaved rounds): `python benchmarks/bench_stream.py --feed --feed-n 256 --rounds 3 --feed-unique 8 --tag
# persistent` (benchmarks/results/stream-feed-2026-12-07-amd-epyc-2c-persistent.md, 1-min load average 3.2-5.8 on
# the 2 cores). model -> (samples/s, the recipe measured)
WORKER_RATES: dict[str, tuple[float, str]] = {"RN50": (1114.0, "rn50-cxr"), "ViT-B-16": (1028.0, "vitb16-patho")}


def feed_workers(plan: "Plan", worker_rate: float, margin: float = 1.5) -> tuple[float, int]:
    """(samples/s one GPU consumes at its compute rate, DataLoader workers per GPU streaming margin x that)."""
    per_gpu = plan.global_batch // plan.gpus
    rate = per_gpu / plan.compute_s if plan.compute_s > 0 else 0.0
    return rate, math.ceil(margin * rate / worker_rate) if worker_rate > 0 else 0


@dataclass
class ModelStats:
    """What the planner needs to know about a model, measured once."""

    name: str
    params: int
    embed_dim: int
    flops_per_sample: float  # training FLOPs (3 x forward)
    act_bytes_per_sample: float  # saved-for-backward bytes per sample, fp32, no checkpointing
    act_ckpt_bytes_per_sample: float  # the same with activation checkpointing on


@dataclass
class Plan:
    """One job's estimate (bytes per GPU unless said otherwise)."""

    gpus: int
    gpus_per_node: int
    global_batch: int
    micro_batch: int
    grad_accum: int
    zero: int
    precision: str
    model: ModelStats
    weights: float = 0.0
    grads: float = 0.0
    optimizer: float = 0.0
    optimizer_temp: float = 0.0  # temporaries of the Adam update (one fp32 copy of the owned parameters)
    activations: float = 0.0
    activations_ckpt: float = 0.0
    loss_extra: dict = field(default_factory=dict)  # backend -> bytes
    comm_model_bytes: float = 0.0  # per optimizer step
    comm_feature_bytes: float = 0.0  # per optimizer step
    compute_s: float = 0.0
    comm_s: float = 0.0
    cache_chunk: int = 0  # embedding-cache chunk (0 = off)

    @property
    def states(self) -> float:
        return self.weights + self.grads + self.optimizer

    def total(self, ckpt: bool = False, backend: str = "chunked") -> float:
        """The peak: weights and optimizer state always; then either forward/backward (activations and the loss,
        whose gradients reuse the freed activations' room) or the optimizer step (gradients + the update's
        temporaries), whichever is larger."""
        act = self.activations_ckpt if ckpt else self.activations
        return self.weights + self.optimizer + max(act + self.loss_extra[backend], self.grads + self.optimizer_temp)


# --------------------------------------------------------------------------------------------- measurement
def _saved_bytes(model, image, tokens, params: set[int]) -> int:
    """Bytes autograd saves for backward in one forward (parameters excluded, each storage counted once)."""
    seen: set[int] = set()
    total = 0

    def pack(t: torch.Tensor):
        nonlocal total
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if ptr not in seen and ptr not in params:
            seen.add(ptr)
            total += st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(image, tokens)
    return total


def _inputs(model, batch: int):
    size = model.image_size
    if model.image_kind == "3d":
        image = torch.randn(batch, model.visual.in_channels, *size)
    else:
        image = torch.randn(batch, 3, size, size)
    tokens = torch.randint(1, 1000, (batch, model.context_length))
    return image, tokens


@lru_cache(maxsize=16)
def model_stats(name: str) -> ModelStats:
    """Build the model on CPU and measure what the plan needs (a few seconds for ViT-B-16/RN50)."""
    from medvlp.pretrain.config import ModelConfig
    from medvlp.pretrain.model import build_model, flops_per_sample

    torch.manual_seed(0)
    model = build_model(ModelConfig(name=name)).train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    per = []
    for ckpt in (False, True):
        model.set_grad_checkpointing(ckpt)
        b1, b2 = 1, 3
        s1 = _saved_bytes(model, *_inputs(model, b1), params)
        s2 = _saved_bytes(model, *_inputs(model, b2), params)
        per.append((s2 - s1) / (b2 - b1))
    n_params = sum(p.numel() for p in model.parameters())
    return ModelStats(name=name, params=n_params, embed_dim=int(model.spec["embed_dim"]),
                      flops_per_sample=flops_per_sample(model), act_bytes_per_sample=per[0],
                      act_ckpt_bytes_per_sample=per[1])


# --------------------------------------------------------------------------------------------- the model
def loss_extra_bytes(n_local: int, n_global: int, embed_dim: int) -> dict[str, float]:
    """Extra memory of the contrastive loss on one rank (fp32): the gathered keys of both towers, plus per backend
    the logits it keeps (torch: logits and log-softmax in both directions, 4·n·N; chunked: ~3 blocks of
    b·N with b from `medvlp.kernels.contrastive.pick_block`; triton: only the row/column log-sum-exps)."""
    from medvlp.kernels.contrastive import pick_block

    keys = 2 * n_global * embed_dim * 4
    block = pick_block(n_local, n_global)
    return {
        "torch": keys + 4 * n_local * n_global * 4,
        "chunked": keys + 3 * block * n_global * 4 + 2 * n_global * 4,
        "triton": keys + 4 * n_global * 4,
    }


def make_plan(model: str | ModelStats, gpus: int, global_batch: int, zero: int = 1, gpus_per_node: int = 8,
              micro_batch: int | None = None, precision: str = "bf16", hw: Hardware | None = None,
              cache_chunk: int | None = None) -> Plan:
    """The estimate for one job; raises ValueError on inconsistent sizes.

    `micro_batch` < per-GPU batch means gradient accumulation: each micro batch's loss sees only W x micro keys.
    `cache_chunk` instead means the embedding cache (`loss.cache_chunk`): the towers run on chunks (activations of
    one chunk), the loss sees the whole global batch, and every sample is encoded twice (compute x 4/3)."""
    hw = hw or Hardware()
    stats = model_stats(model) if isinstance(model, str) else model
    if gpus < 1 or global_batch < 1:
        raise ValueError(f"gpus ({gpus}) and global batch ({global_batch}) must be >= 1")
    if zero not in (0, 1, 2, 3):
        raise ValueError(f"zero: {zero} is not one of 0, 1, 2, 3")
    if precision not in ("bf16", "fp32"):
        raise ValueError(f"precision: {precision!r} is not one of bf16, fp32")
    if global_batch % gpus:
        raise ValueError(f"global batch {global_batch} is not a multiple of {gpus} GPUs")
    per_gpu = global_batch // gpus
    micro = micro_batch or per_gpu
    if per_gpu % micro:
        raise ValueError(f"micro batch {micro} does not divide the per-GPU batch {per_gpu}")
    accum = per_gpu // micro
    if cache_chunk is not None:
        if micro_batch not in (None, per_gpu):
            raise ValueError("cache_chunk and micro_batch < per-GPU batch exclude each other")
        if cache_chunk < 1 or per_gpu % cache_chunk:
            raise ValueError(f"cache chunk {cache_chunk} does not divide the per-GPU batch {per_gpu}")
    act_rows = cache_chunk or micro
    p = stats.params
    w_b, g_b, o_b = (2 * p, 2 * p, 12 * p) if precision == "bf16" else (4 * p, 4 * p, 8 * p)
    t_b = 4 * p  # the Adam update's temporary (sqrt of the second moment): one fp32 copy of what this rank updates
    if zero >= 1:
        o_b /= gpus
        t_b /= gpus
    if zero >= 2:
        g_b /= gpus
    if zero >= 3:
        w_b /= gpus
    act_scale = 0.5 if precision == "bf16" else 1.0
    # With accumulation, each micro batch gathers the other ranks' micro batches: N = W x micro keys.
    n_keys = gpus * micro
    plan = Plan(gpus=gpus, gpus_per_node=min(gpus_per_node, gpus), global_batch=global_batch, micro_batch=micro,
                grad_accum=accum, zero=zero, precision=precision, model=stats, weights=w_b, grads=g_b, optimizer=o_b,
                optimizer_temp=t_b,
                activations=stats.act_bytes_per_sample * act_rows * act_scale,
                activations_ckpt=stats.act_ckpt_bytes_per_sample * act_rows * act_scale,
                loss_extra=loss_extra_bytes(micro, n_keys, stats.embed_dim))
    plan.cache_chunk = cache_chunk or 0
    if cache_chunk:  # the cached embeddings of both towers and their gradients, fp32
        plan.loss_extra = {k: v + 4 * micro * stats.embed_dim * 4 for k, v in plan.loss_extra.items()}
    phi = (gpus - 1) / gpus
    elem = 2 if precision == "bf16" else 4
    plan.comm_model_bytes = (3 * phi * p * elem) if zero == 3 else (2 * phi * p * elem)
    plan.comm_feature_bytes = accum * 2 * (2 * phi * n_keys * stats.embed_dim * elem)
    bw = (hw.nvlink_gbs if gpus <= gpus_per_node else hw.ib_gbs) * 1e9
    plan.compute_s = stats.flops_per_sample * per_gpu / (hw.peak_tflops * 1e12 * hw.mfu)
    if cache_chunk:
        plan.compute_s *= 4 / 3
    plan.comm_s = (plan.comm_model_bytes + plan.comm_feature_bytes) / bw if gpus > 1 else 0.0
    return plan


# --------------------------------------------------------------------------------------------- output
def _g(b: float) -> str:
    return f"{b / GiB:.2f}"


def format_plan(plan: Plan, hw: Hardware | None = None) -> str:
    hw = hw or Hardware()
    m = plan.model
    nodes = math.ceil(plan.gpus / plan.gpus_per_node)
    lines = [
        f"model {m.name}: {m.params / 1e6:.1f} M parameters, E = {m.embed_dim}, "
        f"{m.flops_per_sample / 1e9:.1f} GFLOP per training sample",
        f"job: {plan.gpus} GPUs ({nodes} node{'s' if nodes > 1 else ''} x {plan.gpus_per_node}), global batch "
        f"{plan.global_batch} = {plan.gpus} x micro {plan.micro_batch} x accum {plan.grad_accum}, ZeRO-{plan.zero}, "
        f"{plan.precision}",
        "",
        "| per GPU | GiB |", "| --- | ---: |",
        f"| weights | {_g(plan.weights)} |",
        f"| gradients | {_g(plan.grads)} |",
        f"| optimizer state | {_g(plan.optimizer)} |",
        f"| optimizer-step temporaries | {_g(plan.optimizer_temp)} |",
        f"| activations (micro batch {plan.micro_batch}) | {_g(plan.activations)} |",
        f"| activations with checkpointing | {_g(plan.activations_ckpt)} |",
    ]
    lines += [f"| loss extra, {k} backend | {_g(v)} |" for k, v in plan.loss_extra.items()]
    total, total_ck = plan.total(False, "chunked"), plan.total(True, "chunked")
    fits = "fits" if total <= hw.gpu_mem_gib * GiB else "does NOT fit"
    fits_ck = "fits" if total_ck <= hw.gpu_mem_gib * GiB else "does NOT fit"
    lines += [
        f"| **total** (chunked loss) | **{_g(total)}** ({fits} in {hw.gpu_mem_gib:g} GiB) |",
        f"| **total** with checkpointing | **{_g(total_ck)}** ({fits_ck}) |",
        "",
        f"per step and GPU: model-state traffic {plan.comm_model_bytes / 1e9:.2f} GB, feature gather "
        f"{plan.comm_feature_bytes / 1e9:.3f} GB; link {'NVLink' if nodes == 1 else 'InfiniBand'} "
        f"{hw.nvlink_gbs if nodes == 1 else hw.ib_gbs:g} GB/s",
        f"step time: compute {plan.compute_s:.3f} s at {hw.mfu:.0%} of {hw.peak_tflops:g} TFLOP/s, communication "
        f"{plan.comm_s:.3f} s -> {max(plan.compute_s, plan.comm_s):.3f} s (full overlap) to "
        f"{plan.compute_s + plan.comm_s:.3f} s (none); {plan.global_batch / (plan.compute_s + plan.comm_s):,.0f} "
        "samples/s at worst",
    ]
    return "\n".join(lines)


def fitting_plan(model: str, gpus: int, global_batch: int, zero: int, gpus_per_node: int = 8,
                 hw: Hardware | None = None) -> tuple[Plan, bool]:
    """The plan with the whole per-GPU batch in one loss (embedding cache when needed) whose total fits the GPU:
    the largest power-of-two cache chunk, first without activation checkpointing, then with. -> (plan, ckpt)."""
    hw = hw or Hardware()
    limit = hw.gpu_mem_gib * GiB
    per_gpu = global_batch // max(gpus, 1)
    chunks = [c for c in (2 ** k for k in range(int(math.log2(max(per_gpu, 1))), -1, -1)) if per_gpu % c == 0]
    best = None
    for ckpt in (False, True):
        for c in chunks:
            plan = make_plan(model, gpus, global_batch, zero=zero, gpus_per_node=gpus_per_node, hw=hw,
                             cache_chunk=None if c == per_gpu else c)
            best = best or (plan, ckpt)
            if plan.total(ckpt) <= limit:
                return plan, ckpt
    return best[0], best[1]


def scaling_table(model: str, zero: int, rows: list[tuple[int, int]], gpus_per_node: int = 8,
                  hw: Hardware | None = None) -> str:
    """A Markdown table of plans, one row per (gpus, global batch), each with the cache chunk that fits."""
    hw = hw or Hardware()
    out = ["| GPUs | global batch | per GPU | cache chunk | act. ckpt | states GiB | activations GiB | "
           "loss extra GiB torch / chunked | total GiB (chunked) | comm GB/step | step s (overlap..none) |",
           "| ---: | ---: | ---: | ---: | :---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for gpus, batch in rows:
        p, ckpt = fitting_plan(model, gpus, batch, zero, gpus_per_node, hw)
        comm = (p.comm_model_bytes + p.comm_feature_bytes) / 1e9
        act = p.activations_ckpt if ckpt else p.activations
        out.append(
            f"| {gpus} | {batch:,} | {p.micro_batch} | {p.cache_chunk or '-'} | {'yes' if ckpt else 'no'} "
            f"| {_g(p.states)} | {_g(act)} | {_g(p.loss_extra['torch'])} / {_g(p.loss_extra['chunked'])} "
            f"| {_g(p.total(ckpt))} | {comm:.2f} | {max(p.compute_s, p.comm_s):.2f}..{p.compute_s + p.comm_s:.2f} |")
    return "\n".join(out)


def plan_dict(plan: Plan) -> dict:
    d = asdict(plan)
    d["total_bytes"] = plan.total()
    d["total_ckpt_bytes"] = plan.total(True)
    return d


def run_plan_cli(a) -> int:
    hw = Hardware(peak_tflops=a.peak_tflops, mfu=a.mfu, gpu_mem_gib=a.gpu_mem, nvlink_gbs=a.nvlink_gbs,
                  ib_gbs=a.ib_gbs)
    try:
        plan = make_plan(a.model, a.gpus, a.global_batch, zero=a.zero, gpus_per_node=a.gpus_per_node,
                         micro_batch=a.micro_batch, precision=a.precision, hw=hw,
                         cache_chunk=a.cache_chunk)
    except (ValueError, KeyError, FileNotFoundError) as e:
        print(f"plan: {e}")
        return 2
    rate, source = a.worker_rate, "--worker-rate"
    if rate is None and WORKER_RATES.get(a.model, (0.0, ""))[0] > 0:
        rate, recipe = WORKER_RATES[a.model]
        source = f"measured for {recipe}, fast path, JPEG-256 shards, one core of a 2-core AMD EPYC"
    if rate is not None and rate <= 0 or a.feed_margin <= 0:
        print(f"plan: --worker-rate ({rate}) and --feed-margin ({a.feed_margin}) must be > 0")
        return 2
    if a.json:
        d = plan_dict(plan)
        if rate:
            gpu_rate, workers = feed_workers(plan, rate, a.feed_margin)
            d["feed"] = {"gpu_samples_per_s": gpu_rate, "worker_rate": rate, "margin": a.feed_margin,
                         "workers_per_gpu": workers, "source": source}
        print(json.dumps(d, indent=1, default=str))
        return 0
    print(format_plan(plan, hw))
    if rate:
        gpu_rate, workers = feed_workers(plan, rate, a.feed_margin)
        print(f"data feed: one GPU trains {gpu_rate:,.0f} samples/s (compute); {a.feed_margin:g}x that needs "
              f"{workers} DataLoader workers per GPU at {rate:,.0f} samples/s per worker ({source})")
    return 0


def add_plan_parser(sub) -> None:
    p = sub.add_parser("plan", help="estimate per-GPU memory, communication and step time of a job")
    p.add_argument("--model", default="ViT-B-16", help="model config name (medvlp/pretrain/model_configs)")
    p.add_argument("--gpus", type=int, required=True, help="total GPUs (data-parallel ranks)")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--global-batch", type=int, required=True, help="samples per optimizer step, all GPUs")
    p.add_argument("--micro-batch", type=int, default=None, help="per-GPU micro batch (default: global / gpus)")
    p.add_argument("--zero", type=int, default=1, help="ZeRO stage 0-3")
    p.add_argument("--cache-chunk", type=int, default=None, help="embedding-cache chunk (loss.cache_chunk)")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    hw = Hardware()
    p.add_argument("--peak-tflops", type=float, default=hw.peak_tflops, help="dense TFLOP/s of one GPU")
    p.add_argument("--mfu", type=float, default=hw.mfu, help="fraction of the peak reached")
    p.add_argument("--gpu-mem", type=float, default=hw.gpu_mem_gib, help="GiB per GPU")
    p.add_argument("--nvlink-gbs", type=float, default=hw.nvlink_gbs, help="GB/s per GPU inside a node")
    p.add_argument("--ib-gbs", type=float, default=hw.ib_gbs, help="GB/s per GPU between nodes")
    p.add_argument("--worker-rate", type=float, default=None,
                   help="samples/s one DataLoader worker streams (default: the measured rate for the model, if any)")
    p.add_argument("--feed-margin", type=float, default=1.5,
                   help="data workers are sized to stream this many times the GPU's compute rate")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(fn=run_plan_cli)


# --------------------------------------------------------------------------------------------- validation
def measure_step_bytes(name: str, batch: int, steps: int = 2) -> dict:
    """Peak bytes of live tensors during a real fp32 CPU training step (forward, torch loss, backward, AdamW),
    measured on the last of `steps` steps (so the optimizer state exists). Parameters count from the start.
    Returns {"peak": bytes, "params": bytes}. For checking the planner, not for speed."""
    from torch.multiprocessing.reductions import StorageWeakRef
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    from medvlp.kernels import clip_loss
    from medvlp.pretrain.config import ModelConfig
    from medvlp.pretrain.model import build_model

    class LiveBytes(TorchDispatchMode):
        def __init__(self, base: dict):
            super().__init__()
            self.live = dict(base)  # data_ptr -> (weakref, nbytes)
            self.peak = 0

        def _add(self, t: torch.Tensor) -> None:
            st = t.untyped_storage()
            ptr = st.data_ptr()
            if ptr and ptr not in self.live:
                self.live[ptr] = (StorageWeakRef(st), st.nbytes())

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    self._add(t)
            for ptr in [p for p, (ref, _) in self.live.items() if ref.expired()]:
                del self.live[ptr]
            self.peak = max(self.peak, sum(n for _, n in self.live.values()))
            return out

    torch.manual_seed(0)
    model = build_model(ModelConfig(name=name)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    image, tokens = _inputs(model, batch)
    param_bytes = sum(p.untyped_storage().nbytes() for p in model.parameters())
    mode = None
    for step in range(steps):
        if step == steps - 1:
            base = {p.untyped_storage().data_ptr(): (StorageWeakRef(p.untyped_storage()), p.untyped_storage().nbytes())
                    for p in model.parameters()}
            for st in opt.state.values():
                for v in st.values():
                    if isinstance(v, torch.Tensor):
                        base[v.untyped_storage().data_ptr()] = (StorageWeakRef(v.untyped_storage()),
                                                                v.untyped_storage().nbytes())
            mode = LiveBytes(base)
            mode.__enter__()
        img, txt, scale = model(image, tokens)[:3]
        loss = clip_loss(img, txt, scale, backend="torch")
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if mode is not None:
            mode.__exit__(None, None, None)
    return {"peak": float(mode.peak), "params": float(param_bytes)}
