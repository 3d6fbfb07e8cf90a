"""The pooling comparison: one PCAM config trained once per pooling (same backbone, seed, steps, data), one table.

    medvlp pcam-table RECIPE --out DIR [--poolings avg,max,lse,pcam] [--set KEY=VALUE ...]

Each pooling runs in DIR/<pooling>/ (its own MLflow run named `pcam-<pooling>` in the recipe's experiment, with
its evaluation metrics and heatmap overlays); the table goes to DIR/poolings.md and DIR/poolings.json.
"""
from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path
from typing import Sequence

from finetune.pcam.config import PcamConfig
from finetune.pcam.model import POOLINGS

COLUMNS = [("auc_mean", "AUC"), ("pointing_mean", "pointing"), ("iou_mean", "IoU"), ("acc@0.1_mean", "acc@0.1"),
           ("acc@0.25_mean", "acc@0.25"), ("acc@0.5_mean", "acc@0.5")]


def _fmt(v: float) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def table_markdown(rows: dict[str, dict[str, float]], names: Sequence[str]) -> str:
    """Mean metrics per pooling, then the per-finding pointing game and acc@0.25."""
    lines = ["| pooling | " + " | ".join(c for _, c in COLUMNS) + " | train s |",
             "| --- |" + " ---: |" * (len(COLUMNS) + 1)]
    for pooling, m in rows.items():
        lines.append(f"| {pooling} | " + " | ".join(_fmt(m.get(k)) for k, _ in COLUMNS)
                     + f" | {m.get('seconds', float('nan')):.0f} |")
    lines += ["", "| pooling | metric | " + " | ".join(names) + " |", "| --- | --- |" + " ---: |" * len(names)]
    for pooling, m in rows.items():
        for key in ("auc", "pointing", "acc@0.25"):
            lines.append(f"| {pooling} | {key} | " + " | ".join(_fmt(m.get(f"{key}/{n}")) for n in names) + " |")
    n_loc = next(iter(rows.values()), {})
    lines += ["", "localisation cases per finding (images where it is present with a box): "
              + ", ".join(f"{n} {int(n_loc.get(f'n_loc/{n}', 0))}" for n in names)]
    return "\n".join(lines) + "\n"


def compare_poolings(cfg: PcamConfig, out_dir: str | Path, poolings: Sequence[str] = POOLINGS,
                     command: str = "") -> dict[str, dict[str, float]]:
    """Train `cfg` once per pooling into out_dir/<pooling>; write poolings.md / .json; -> {pooling: metrics}."""
    from finetune.pcam.stage import PcamStage
    from finetune.runner import run_stage

    bad = [p for p in poolings if p not in POOLINGS]
    if bad:
        raise ValueError(f"--poolings: {bad} are not among {', '.join(POOLINGS)}")
    out = Path(out_dir)
    rows: dict[str, dict[str, float]] = {}
    names: list[str] = []
    for pooling in poolings:
        run_cfg = copy.deepcopy(cfg)
        run_cfg.head.pooling = pooling
        run_cfg.finetune.out_dir = str(out / pooling)
        run_cfg.tracking.run_name = f"pcam-{pooling}"
        t0 = time.time()
        stage = PcamStage()
        result = run_stage(stage, run_cfg)
        rows[pooling] = {**result.metrics, "seconds": time.time() - t0}
        names = stage.names
        _write(out, rows, names, cfg, command)
    return rows


def _write(out: Path, rows: dict, names: list[str], cfg: PcamConfig, command: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    head = (f"PCAM pooling comparison: {cfg.finetune.steps} steps x batch {cfg.finetune.batch_size}, seed "
            f"{cfg.finetune.seed}, backbone {cfg.head.backbone} "
            f"({cfg.finetune.checkpoint or 'registry ' + cfg.head.model}), map level {cfg.head.feature_level}, "
            f"threshold {cfg.eval.threshold}, split {cfg.eval.split}\n")
    text = head + (f"\ncommand: `{command}`\n" if command else "") + "\n" + table_markdown(rows, names)
    (out / "poolings.md").write_text(text)
    (out / "poolings.json").write_text(json.dumps({"command": command, "findings": names, "rows": rows}, indent=1))
