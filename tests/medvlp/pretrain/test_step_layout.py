"""The train step's speed knobs keep the maths: NHWC image batches for ResNet towers, fused AdamW on CPU."""
import pytest
import torch

from medvlp.launch.config import load_config
from tests.conftest import tiny_overrides


class _Same:
    def __init__(self, batch):
        self.batch = batch

    def next(self):
        return self.batch


def _trainer(shards, out, model, fmt):
    from medvlp.pretrain.train import Trainer

    cfg = load_config("debug", tiny_overrides(shards, out, steps=3, **{
        "model.name": model, "train.memory_format": fmt, "tracking.enabled": "false", "train.seed": 3}))
    return Trainer(cfg, progress=False)


def _batch(seed=0, n=8, size=64):
    g = torch.Generator().manual_seed(seed)
    tok = torch.zeros(n, 77, dtype=torch.long)
    tok[:, 0], tok[:, 1:6], tok[:, 6] = 49406, torch.randint(1, 49406, (n, 5), generator=g), 49407
    return {"image": torch.randn(n, 3, size, size, generator=g), "tokens": tok}


def _layouts_seen(trainer):
    seen = []
    trainer.model.visual.register_forward_pre_hook(
        lambda _m, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last)))
    trainer.batches = _Same(_batch())
    trainer.train_step()
    return seen


@pytest.mark.parametrize("model,fmt,nhwc", [("debug-rn", "auto", True), ("debug-rn", "contiguous", False),
                                            ("debug", "auto", False), ("debug", "channels_last", True)])
def test_image_layout_follows_memory_format(cxr_shards, tmp_path, model, fmt, nhwc):
    """auto = NHWC for ResNet towers only; the explicit values force it either way."""
    assert _layouts_seen(_trainer(cxr_shards, tmp_path, model, fmt)) == [nhwc]


def test_nhwc_steps_match_contiguous_steps(cxr_shards, tmp_path):
    """Same seed, same batches: three optimizer steps in NHWC and in NCHW give the same losses and weights (to fp32
    rounding: the convolutions accumulate in another order)."""
    runs = {}
    for fmt in ("channels_last", "contiguous"):
        tr = _trainer(cxr_shards, tmp_path / fmt, "debug-rn", fmt)
        losses = []
        for s in range(3):
            tr.batches = _Same(_batch(seed=s))
            losses.append(tr.train_step())
        runs[fmt] = (losses, {k: v.detach().clone() for k, v in tr.model.state_dict().items()})
    (la, wa), (lb, wb) = runs["channels_last"], runs["contiguous"]
    assert la == pytest.approx(lb, rel=1e-5, abs=1e-5)
    assert la[0] != la[2]  # the steps did update the model
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")


def test_cpu_adamw_is_fused_and_matches_the_loop():
    from medvlp.pretrain.config import OptimConfig
    from medvlp.pretrain.engine import build_optimizer

    torch.manual_seed(0)
    nets = [torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.LayerNorm(32), torch.nn.Linear(32, 4))
            for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    fused = build_optimizer(nets[0], OptimConfig(lr=1e-2, weight_decay=0.1))
    if tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 4):
        assert fused.defaults["fused"] is True
    p1 = dict(nets[1].named_parameters())
    loop = torch.optim.AdamW([{"params": [p1[n] for n in names], "weight_decay": g["weight_decay"]}
                              for g, names in zip(fused.param_groups, _group_names(nets[0], fused))],
                             lr=1e-2, betas=fused.defaults["betas"], eps=fused.defaults["eps"], foreach=False)
    x = torch.randn(64, 16)
    for _ in range(5):
        for net, opt in zip(nets, (fused, loop)):
            opt.zero_grad()
            net(x).square().mean().backward()
            opt.step()
    for (k, a), b in zip(nets[0].state_dict().items(), nets[1].state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")


def _group_names(net, opt):
    by_id = {id(p): n for n, p in net.named_parameters()}
    return [[by_id[id(p)] for p in g["params"]] for g in opt.param_groups]


def test_bad_memory_format_is_refused_by_name(cxr_shards, tmp_path):
    from medvlp.launch.config import ConfigError

    with pytest.raises((ValueError, ConfigError), match="memory_format"):
        load_config("debug", tiny_overrides(cxr_shards, tmp_path, **{"train.memory_format": "nhwc"}))


_FAULTS = r"""
import resource, sys, torch
sys.path.insert(0, sys.argv[2])
if sys.argv[1] == "keep":
    from medvlp.pretrain.engine import keep_freed_host_memory
    assert keep_freed_host_memory()
faults = []
for _ in range(8):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = torch.ones(64 * 2**20)  # 256 MiB, written: every page is touched
    del t
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(faults[-1])
"""


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="glibc malloc tuning is Linux-only")
def test_kept_host_memory_is_reused_without_page_faults():
    """A 256 MiB tensor allocated again after being freed: ~65k page faults each time by default, none once the
    freed memory is kept (what the train loop turns on for CPU runs; torch's 64-byte aligned allocations need a
    few rounds before a freed block fits the next request)."""
    import subprocess
    import sys
    from pathlib import Path

    repo = str(Path(__file__).resolve().parents[3])
    run = lambda mode: int(subprocess.run([sys.executable, "-c", _FAULTS, mode, repo], capture_output=True,  # noqa: E731
                                          text=True, check=True).stdout.split()[-1])
    default, keep = run("default"), run("keep")
    assert default > 30_000, default
    assert keep < 2_000, keep
