"""The pooling comparison: one PCAM config trained once per pooling (same backbone, seed, steps, data), one table.

    medvlp pcam-table RECIPE --out DIR [--poolings avg,max,lse,pcam] [--seeds 0,1,2] [--set KEY=VALUE ...]

Each (pooling, seed) runs in DIR/<pooling>[-s<seed>]/ (its own MLflow run `pcam-<pooling>-s<seed>` in the
recipe's experiment, with its evaluation metrics and heatmap overlays); a seed sets both `finetune.seed` (weights,
dropout) and `data.seed` (stream order, augmentation). The table (mean, and +- the standard deviation over seeds
when there are several) goes to DIR/poolings.md, every run's metrics to DIR/poolings.json.
"""
from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path
from typing import Sequence

from medvlp.finetune.pcam.config import PcamConfig
from medvlp.finetune.pcam.model import POOLINGS

COLUMNS = [("auc_mean", "AUC"), ("pointing_mean", "pointing"), ("iou_mean", "IoU"), ("acc@0.1_mean", "acc@0.1"),
           ("acc@0.25_mean", "acc@0.25"), ("acc@0.5_mean", "acc@0.5")]


def _fmt(vals: Sequence[float] | None) -> str:
    vals = [v for v in (vals or []) if v is not None and not math.isnan(v)]
    if not vals:
        return "n/a"
    mean = sum(vals) / len(vals)
    if len(vals) == 1:
        return f"{mean:.3f}"
    sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))
    return f"{mean:.3f} ± {sd:.3f}"


def table_markdown(runs: dict[str, list[dict[str, float]]], names: Sequence[str]) -> str:
    """Mean (± sd over seeds) metrics per pooling, then per finding the AUC, pointing game and acc@0.25."""
    def col(pooling: str, key: str) -> list[float]:
        return [m.get(key, float("nan")) for m in runs[pooling]]

    lines = ["| pooling | " + " | ".join(c for _, c in COLUMNS) + " | train s (per run) |",
             "| --- |" + " ---: |" * (len(COLUMNS) + 1)]
    for pooling in runs:
        secs = col(pooling, "seconds")
        lines.append(f"| {pooling} | " + " | ".join(_fmt(col(pooling, k)) for k, _ in COLUMNS)
                     + f" | {sum(secs) / len(secs):.0f} |")
    lines += ["", "| pooling | metric | " + " | ".join(names) + " |", "| --- | --- |" + " ---: |" * len(names)]
    for pooling in runs:
        for key in ("auc", "pointing", "acc@0.25"):
            lines.append(f"| {pooling} | {key} | " + " | ".join(_fmt(col(pooling, f"{key}/{n}")) for n in names)
                         + " |")
    first = next(iter(runs.values()), [{}])[0]
    lines += ["", "localisation cases per finding (test images where it is present with a box): "
              + ", ".join(f"{n} {int(first.get(f'n_loc/{n}', 0))}" for n in names)]
    return "\n".join(lines) + "\n"


def compare_poolings(cfg: PcamConfig, out_dir: str | Path, poolings: Sequence[str] = POOLINGS,
                     seeds: Sequence[int] | None = None, command: str = "") -> dict[str, list[dict[str, float]]]:
    """Train `cfg` once per pooling and seed; write poolings.md / .json; -> {pooling: [metrics per seed]}."""
    from medvlp.finetune.pcam.stage import PcamStage
    from medvlp.finetune.runner import run_stage

    bad = [p for p in poolings if p not in POOLINGS]
    if bad:
        raise ValueError(f"--poolings: {bad} are not among {', '.join(POOLINGS)}")
    seeds = list(seeds) if seeds else [cfg.finetune.seed]
    out = Path(out_dir)
    runs: dict[str, list[dict[str, float]]] = {}
    names: list[str] = []
    for seed in seeds:
        for pooling in poolings:
            run_cfg = copy.deepcopy(cfg)
            run_cfg.head.pooling = pooling
            run_cfg.finetune.seed, run_cfg.data.seed = seed, seed
            tag = pooling if len(seeds) == 1 else f"{pooling}-s{seed}"
            run_cfg.finetune.out_dir = str(out / tag)
            run_cfg.tracking.run_name = f"pcam-{tag}"
            t0 = time.time()
            stage = PcamStage()
            result = run_stage(stage, run_cfg)
            runs.setdefault(pooling, []).append({**result.metrics, "seed": seed, "seconds": time.time() - t0,
                                                 "run_id": result.run_id or ""})
            names = stage.names
            _write(out, runs, names, cfg, seeds, command)
    return runs


def _write(out: Path, runs: dict, names: list[str], cfg: PcamConfig, seeds: list[int], command: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    head = (f"PCAM pooling comparison: {cfg.finetune.steps} steps x batch {cfg.finetune.batch_size}, seeds "
            f"{', '.join(map(str, seeds))}, backbone {cfg.head.backbone} "
            f"({cfg.finetune.checkpoint or 'registry ' + cfg.head.model}), map level {cfg.head.feature_level}, "
            f"threshold {cfg.eval.threshold}, split {cfg.eval.split}\n")
    text = head + (f"\ncommand: `{command}`\n" if command else "") + "\n" + table_markdown(runs, names)
    (out / "poolings.md").write_text(text)
    (out / "poolings.json").write_text(json.dumps({"command": command, "findings": names, "seeds": seeds,
                                                   "runs": runs}, indent=1))
