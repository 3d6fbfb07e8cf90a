"""Check `medvlp plan`'s memory model against real CPU training steps, and write the scaling table.

For each (model, batch), the peak bytes of live tensors during a real fp32 CPU step (forward, loss, backward,
AdamW; measured on the second step, so the optimizer state exists) beside the planner's estimate for one rank,
ZeRO-0, fp32. Then the planner's table for 8 -> 1,024 H100s at global batch 32k -> 1M.

    python benchmarks/bench_plan.py                      # debug, debug-rn, RN50, ViT-B-16 at small batches
    python benchmarks/bench_plan.py --rows debug:8       # one row
    python benchmarks/bench_plan.py --rows none          # only the scaling table

Writes benchmarks/results/plan-<date>-<cpu>.md (the check) and plan-scaling-<date>.md (the table).
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.hw import cpu_model  # noqa: E402
from medvlp.launch.plan import make_plan, measure_step_bytes, scaling_table  # noqa: E402

MiB = 1024 ** 2
DEFAULT_ROWS = "debug:8,debug:32,debug-rn:8,RN50:2,RN50:4,ViT-B-16:2,ViT-B-16:4"
SCALING = [(8, 32_768), (64, 65_536), (256, 262_144), (1024, 1_048_576)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default=DEFAULT_ROWS, help="model:batch,...")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    a = ap.parse_args()
    lines = [f"# `medvlp plan` against measured CPU steps ({dt.date.today()}, {cpu_model()}, "
             f"{os.cpu_count()} cores)", "",
             "Measured: peak bytes of live tensors during the second fp32 training step on CPU (forward, torch "
             "loss, backward, AdamW). Planned: `make_plan(model, gpus=1, global_batch=batch, zero=0, "
             "precision='fp32')`, torch loss backend.", "",
             "| model | batch | measured MiB | planned MiB | planned / measured | seconds |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    worst = 0.0
    rows = [] if a.rows == "none" else a.rows.split(",")
    for item in rows:
        name, batch = item.split(":")
        t0 = time.time()
        m = measure_step_bytes(name, int(batch))
        p = make_plan(name, 1, int(batch), zero=0, precision="fp32", gpus_per_node=1)
        est = p.total(False, "torch")
        ratio = est / m["peak"]
        worst = max(worst, abs(ratio - 1))
        lines.append(f"| {name} | {batch} | {m['peak'] / MiB:.1f} | {est / MiB:.1f} | {ratio:.3f} | "
                     f"{time.time() - t0:.0f} |")
        print(lines[-1], flush=True)
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if rows:
        lines += ["", f"Largest deviation: {worst:.1%} (target: within 20%).", ""]
        out = out_dir / f"plan-{dt.date.today()}-{cpu_model().split()[0].lower()}-{os.cpu_count()}c.md"
        out.write_text("\n".join(lines) + "\n")
        print(f"wrote {out}")
    table = [f"# `medvlp plan` scaling table ({dt.date.today()}; planned, not measured)", "",
             "H100 80 GiB defaults (989 TFLOP/s bf16 at 40% MFU, NVLink 450 GB/s, InfiniBand 50 GB/s per GPU), "
             "8 GPUs per node, bf16. Each row keeps the whole global batch in one contrastive loss; where the "
             "per-GPU batch does not fit, the towers run in embedding-cache chunks (`loss.cache_chunk`), then with "
             "activation checkpointing.", ""]
    for model, zero in (("ViT-B-16", 1), ("ViT-B-16", 3), ("RN50", 1)):
        table += [f"## {model}, ZeRO-{zero}", "", scaling_table(model, zero, SCALING), ""]
    out = out_dir / f"plan-scaling-{dt.date.today()}.md"
    out.write_text("\n".join(table) + "\n")
    print("\n".join(table))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
