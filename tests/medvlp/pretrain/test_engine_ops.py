"""A one-process engine must not build (or load) DeepSpeed's C++ shared-memory communication op."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = r"""
import json, torch
import deepspeed.ops, deepspeed.comm.comm as ds_comm
from medvlp.pretrain import engine as eng
from medvlp.pretrain.config import OptimConfig, TrainConfig
would_build = bool(deepspeed.ops.__compatible_ops__.get("deepspeed_shm_comm", False))
rank, world, _ = eng.init_distributed()
model = torch.nn.Linear(4, 2)
engine, *_ = eng.create_engine(model, TrainConfig(steps=2), OptimConfig(), micro_batch=2, world_size=world)
loss = engine(torch.randn(2, 4)).square().mean()
engine.backward(loss)
engine.step()
print("RESULT " + json.dumps({"would_build": would_build, "shm_op": ds_comm.cdb.shm_comm_op is not None,
                              "compatible": deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"]}))
"""


def test_engine_skips_shm_comm_op(tmp_path: Path) -> None:
    ext = tmp_path / "torch_extensions"
    ext.mkdir()
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(ext), OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[3]), env.get("PYTHONPATH", "")])
    p = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-3000:]
    res = json.loads(next(line for line in p.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert res["shm_op"] is False and res["compatible"] is False
    assert "deepspeed_shm_comm" not in out, out[-3000:]  # DeepSpeed prints "... built successfully" / ninja lines
    assert list(ext.iterdir()) == [], f"torch extensions were built: {sorted(p.name for p in ext.rglob('*'))[:10]}"
    # On a machine with a C++ compiler the probe says DeepSpeed would have compiled it without the skip.
    print("deepspeed would have built deepspeed_shm_comm:", res["would_build"])
