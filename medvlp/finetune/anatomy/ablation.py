"""The anatomy ablation: base (fVLM) / +VSE / +VSD / both, the same recipe, data order and seeds.

    medvlp anatomy-ablation anatomy-synth --seeds 0 1 --out runs/anatomy-ablation [--set k=v ...]

Each (variant, seed) is one `run_stage` (its own run folder OUT/<variant>-s<seed> and MLflow run), differing only
in head.vse / head.vsd; finetune.seed is the seed (weights init, augmentation, data order). The table (mean and std
over seeds of the zero-shot organ metrics, codebook usage for the VSD variants) is written as OUT/ablation.md and
OUT/ablation.json and logged as one more MLflow run (metrics `<variant>/<metric>`, the table as an artifact).
"""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np

VARIANTS = {"base": (False, False), "+VSE": (True, False), "+VSD": (False, True), "both": (True, True)}
_SLUG = {"base": "base", "+VSE": "vse", "+VSD": "vsd", "both": "both"}


def variant_config(cfg, variant: str, seed: int, out: Path):
    """A copy of `cfg` for one ablation cell."""
    if variant not in VARIANTS:
        raise ValueError(f"ablation variant {variant!r} is not one of {', '.join(VARIANTS)}")
    c = copy.deepcopy(cfg)
    c.head.vse, c.head.vsd = VARIANTS[variant]
    c.finetune.seed = int(seed)
    c.finetune.out_dir = str(out / f"{_SLUG[variant]}-s{seed}")
    c.tracking.run_name = f"anatomy-{_SLUG[variant]}-s{seed}"
    return c


def _mean_std(vals: list[float]) -> tuple[float, float]:
    v = [x for x in vals if x is not None and math.isfinite(x)]
    if not v:
        return float("nan"), float("nan")
    return float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0


def summarise(results: dict[str, list[dict]], organs: Sequence[str]) -> dict[str, dict[str, tuple[float, float]]]:
    """variant -> metric -> (mean, std) over seeds."""
    keys = (["auc_macro", "accuracy_macro", "sensitivity_macro", "specificity_macro"] + [f"auc/{o}" for o in organs]
            + ["codebook_perplexity", "codebook_dead_codes", "train_seconds"])
    return {v: {k: _mean_std([r.get(k, float("nan")) for r in rs]) for k in keys} for v, rs in results.items()}


def _cell(m: tuple[float, float], digits: int = 3) -> str:
    mean, std = m
    if not math.isfinite(mean):
        return "-"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def markdown_table(summary: dict, organs: Sequence[str], seeds: Sequence[int]) -> str:
    head = ["variant", "macro AUC", "accuracy", "sensitivity", "specificity", *[f"AUC {o}" for o in organs],
            "codebook perplexity", "dead codes", "train s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for v, m in summary.items():
        row = [v, _cell(m["auc_macro"]), _cell(m["accuracy_macro"]), _cell(m["sensitivity_macro"]),
               _cell(m["specificity_macro"]), *[_cell(m[f"auc/{o}"]) for o in organs],
               _cell(m["codebook_perplexity"], 1), _cell(m["codebook_dead_codes"], 1), _cell(m["train_seconds"], 0)]
        lines.append("| " + " | ".join(row) + " |")
    lines.append(f"\nmean ± std over seeds {list(seeds)}; zero-shot organ abnormality on the evaluation split.")
    return "\n".join(lines)


def run_ablation(cfg, seeds: Sequence[int], out_dir: str | Path, variants: Sequence[str] = tuple(VARIANTS)) -> dict:
    """Run every (variant, seed) and write the table; returns {"summary", "results", "markdown"}."""
    from medvlp.finetune.anatomy.stage import AnatomyStage
    from medvlp.finetune.runner import run_stage

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[dict]] = {}
    organs: list[str] = list(cfg.organs)
    for v in variants:
        for seed in seeds:
            c = variant_config(cfg, v, seed, out)
            res = run_stage(AnatomyStage(), c)
            organs = list(c.organs)
            row = {**res.metrics, "seed": seed, "train_seconds": res.seconds, "run_id": res.run_id}
            results.setdefault(v, []).append(row)
            print(f"ablation {v} seed {seed}: macro AUC {row.get('auc_macro', float('nan')):.3f}", flush=True)
    summary = summarise(results, organs)
    md = markdown_table(summary, organs, seeds)
    (out / "ablation.md").write_text(md + "\n")
    (out / "ablation.json").write_text(json.dumps({"seeds": list(seeds), "organs": organs, "results": results,
                                                   "summary": summary}, indent=1, default=str))
    _log_table(cfg, out, summary)
    return {"summary": summary, "results": results, "markdown": md}


def merge_ablations(dirs: Sequence[str | Path], out_dir: str | Path, cfg=None) -> dict:
    """One table from several ablation folders (e.g. one seed each, run in parallel): their ablation.json merged."""
    results: dict[str, list[dict]] = {}
    seeds: list[int] = []
    organs: list[str] = []
    for d in dirs:
        path = Path(d) / "ablation.json"
        if not path.is_file():
            raise FileNotFoundError(f"--merge: {path} does not exist")
        doc = json.loads(path.read_text())
        organs = organs or doc["organs"]
        if doc["organs"] != organs:
            raise ValueError(f"--merge: {path} has organs {doc['organs']}, the others {organs}")
        seeds += [s for s in doc["seeds"] if s not in seeds]
        for v, rows in doc["results"].items():
            results.setdefault(v, []).extend(rows)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarise(results, organs)
    md = markdown_table(summary, organs, seeds)
    (out / "ablation.md").write_text(md + "\n")
    (out / "ablation.json").write_text(json.dumps({"seeds": seeds, "organs": organs, "results": results,
                                                   "summary": summary, "merged_from": [str(d) for d in dirs]},
                                                  indent=1, default=str))
    if cfg is not None:
        _log_table(cfg, out, summary)
    return {"summary": summary, "results": results, "markdown": md}


def _log_table(cfg, out: Path, summary: dict) -> None:
    if not cfg.tracking.enabled:
        return
    from medvlp.pretrain.tracking import Tracker

    tc = copy.deepcopy(cfg.tracking)
    tc.run_name = "anatomy-ablation"
    tr = Tracker(tc, 0, None).start()
    try:
        metrics = {f"{_SLUG[v]}/{k.replace('/', '_')}": m[0] for v, ms in summary.items() for k, m in ms.items()
                   if math.isfinite(m[0])}
        tr.log_metrics(metrics)
        tr.log_artifact(out / "ablation.md")
        tr.log_artifact(out / "ablation.json")
    finally:
        tr.end("FINISHED")
