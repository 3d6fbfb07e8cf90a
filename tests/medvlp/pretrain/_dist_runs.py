"""Several tiny 2-rank pretraining runs in one torchrun launch (one process-group start for all of them).

    torchrun --standalone --nproc_per_node 2 tests/medvlp/pretrain/_dist_runs.py SHARDS OUT

Runs, each through `medvlp.pretrain.train.run_pretrain` with the debug model, same seed:
  zero{0,1,2,3}   4 steps under each ZeRO stage (the per-step global losses must agree across stages);
  resume3         ZeRO-3, stopped after 2 steps (checkpoint), then resumed to 4 (must equal zero3);
  nan_rank1       ZeRO-0, 3 steps; the loss is NaN on rank 1 only at its 2nd forward (both ranks must skip that
                  step and end with identical parameters).
Each rank writes OUT/result_rank{r}.json.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))

from medvlp.launch.config import flatten, load_config, to_dict  # noqa: E402
from tests.conftest import tiny_overrides  # noqa: E402


def _cfg(shards: str, out: Path, **sets):
    base = {"tracking.enabled": "false", "train.final_eval": "false", "train.ckpt_every": 0, "optim.lr": 2e-3,
            "data.batch_size": 4}
    return load_config("debug", tiny_overrides(shards, out, steps=4, **{**base, **sets}))


def _run(cfg):
    from medvlp.pretrain.train import run_pretrain
    return run_pretrain(cfg, flatten(to_dict(cfg)), progress=False)


def main(shards: str, out: str) -> None:
    from medvlp.pretrain import engine as eng
    from medvlp.pretrain import loss as loss_mod

    torch.set_num_threads(1)
    out_p = Path(out)
    res: dict = {}
    for stage in (0, 1, 2, 3):
        r = _run(_cfg(shards, out_p / f"zero{stage}", **{"train.zero_stage": stage}))
        res[f"zero{stage}"] = [v for _, v in r.losses]
    first = _run(_cfg(shards, out_p / "resume3", **{"train.zero_stage": 3, "train.stop_after": 2}))
    second = _run(_cfg(shards, out_p / "resume3", **{"train.zero_stage": 3, "train.resume": "true"}))
    res["resume3"] = {"first_steps": first.steps_done, "steps": second.steps_done,
                      "losses": [v for _, v in second.losses]}

    # NaN on rank 1 only; keep the engine to compare the parameters across ranks afterwards
    rank = dist.get_rank()
    real_forward, real_create = loss_mod.ContrastiveLoss.forward, eng.create_engine
    calls, engines = {"n": 0}, []

    def forward(self, *a, **k):
        calls["n"] += 1
        out = real_forward(self, *a, **k)
        return out * float("nan") if rank == 1 and calls["n"] == 2 else out

    def create(*a, **k):
        made = real_create(*a, **k)
        engines.append(made[0])
        return made

    loss_mod.ContrastiveLoss.forward, eng.create_engine = forward, create
    try:
        r = _run(_cfg(shards, out_p / "nan", **{"train.steps": 3}))
    finally:
        loss_mod.ContrastiveLoss.forward, eng.create_engine = real_forward, real_create
    flat = torch.cat([p.detach().float().reshape(-1) for p in engines[0].module.parameters()])
    both = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(both, flat)
    res["nan_rank1"] = {"steps": r.steps_done, "forwards": calls["n"], "losses": [v for _, v in r.losses],
                        "param_diff": float((both[0] - both[1]).abs().max()), "param_norm": float(flat.norm()),
                        "finite": bool(torch.isfinite(flat).all())}
    (out_p / f"result_rank{rank}.json").write_text(json.dumps(res))
    dist.barrier()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
