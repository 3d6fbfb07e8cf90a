"""The anatomy ablation: base (fVLM) / +VSE / +VSD / both, the same recipe, data order and seeds.

    medvlp anatomy-ablation anatomy-synth --seeds 0 1 --out runs/anatomy-ablation [--set k=v ...]

Each (variant, seed) is one `run_stage` (its own run folder OUT/<variant>-s<seed> and MLflow run), differing only
in head.vse / head.vsd; finetune.seed is the seed (weights init, augmentation, data order). The table (mean ± sample
sd over seeds of the zero-shot organ metrics via `medvlp.finetune.sweep`, codebook usage for the VSD variants, and
the paired bootstrap difference of the macro AUC with the base over seeds x test volumes, from each run's
eval_scores.npz) is written as OUT/ablation.md, OUT/ablation.csv and OUT/ablation.json and logged as one more
MLflow run (metrics `<variant>/<metric>`, the table as an artifact).
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


def summarise(results: dict[str, list[dict]], organs: Sequence[str]) -> dict[str, dict[str, dict]]:
    """variant -> metric -> `sweep.seed_summary` over seeds (mean, sample sd ddof=1, n, t-CI)."""
    from medvlp.finetune.sweep import seed_summary

    keys = (["auc_macro", "accuracy_macro", "sensitivity_macro", "specificity_macro"] + [f"auc/{o}" for o in organs]
            + ["codebook_perplexity", "codebook_dead_codes", "train_seconds"])
    return {v: {k: seed_summary([r.get(k, float("nan")) for r in rs]) for k in keys} for v, rs in results.items()}


def _scores(row: dict) -> dict | None:
    path = row.get("scores_path")
    if not path or not Path(path).is_file():
        return None
    z = np.load(path, allow_pickle=False)
    return {k: z[k] for k in ("labels", "scores", "present", "keys")}


def macro_auc_fast(y_NO: np.ndarray, s_NO: np.ndarray) -> float:
    """Mean over organs (columns with both classes; label -1 = not scored) of the rank AUC (ties count one half):
    the same value as `pretrain.metrics.macro_auc`, fast enough for a bootstrap of thousands of draws."""
    from scipy.stats import rankdata

    aucs = []
    for o in range(y_NO.shape[1]):
        keep = y_NO[:, o] >= 0
        y, sc = y_NO[keep, o] > 0, s_NO[keep, o]
        n_pos = int(y.sum())
        n_neg = int(y.size - n_pos)
        if n_pos == 0 or n_neg == 0:
            continue
        r = rankdata(sc)
        aucs.append((r[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
    return float(np.mean(aucs)) if aucs else float("nan")


def paired_vs_base(results: dict[str, list[dict]], base: str = "base", n_boot: int = 1000) -> dict[str, dict]:
    """variant -> `sweep.paired_bootstrap_diff` of the macro AUC (variant - base) over the seeds both ran and the
    test volumes (same items in the same order, checked by key): resampling seeds and volumes together."""
    from medvlp.finetune.sweep import paired_bootstrap_diff

    out: dict[str, dict] = {}
    base_rows = {r["seed"]: r for r in results.get(base, [])}
    for v, rows in results.items():
        if v == base:
            continue
        ys, a, b = [], [], []
        for r in rows:
            br = base_rows.get(r["seed"])
            sa, sb = _scores(r), (_scores(br) if br else None)
            if sa is None or sb is None:
                continue
            if not np.array_equal(sa["keys"], sb["keys"]):
                raise ValueError(f"ablation: {v} seed {r['seed']} was evaluated on other volumes than {base}")
            ys.append(np.where(sa["present"], sa["labels"], -1))
            a.append(sa["scores"])
            b.append(sb["scores"])
        if ys:
            out[v] = paired_bootstrap_diff(macro_auc_fast, np.stack(ys), np.stack(a), np.stack(b), n_boot=n_boot)
    return out


def table_rows(summary: dict, organs: Sequence[str], paired: dict | None = None) -> list[dict]:
    """One row per variant (strings `mean ± sd` from `sweep.pm`), the paired difference with the base last."""
    from medvlp.finetune.sweep import pm

    paired = paired or {}
    rows = []
    for v, m in summary.items():
        d = paired.get(v)
        diff = "—" if d is None else f"{d['diff']:+.3f} [{d['ci_lo']:+.3f}, {d['ci_hi']:+.3f}]"
        rows.append({"variant": v, "macro AUC": pm(m["auc_macro"]), **{f"AUC {o}": pm(m[f"auc/{o}"]) for o in organs},
                     "accuracy": pm(m["accuracy_macro"]), "sensitivity": pm(m["sensitivity_macro"]),
                     "specificity": pm(m["specificity_macro"]),
                     "codebook perplexity": pm(m["codebook_perplexity"], 1), "dead codes": pm(m["codebook_dead_codes"], 1),
                     "Δ macro AUC vs base [95% CI]": diff, "train s": pm(m["train_seconds"], 0), "seeds": m["auc_macro"]["n"]})
    return rows


def markdown_table(summary: dict, organs: Sequence[str], seeds: Sequence[int], paired: dict | None = None,
                   stem: Path | None = None) -> str:
    """The table as Markdown (written with `sweep.write_table` to stem.md / stem.csv when `stem` is given)."""
    from medvlp.finetune.sweep import write_table

    rows = table_rows(summary, organs, paired)
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    note = (f"\nmean ± sample sd (ddof=1) over seeds {list(seeds)}; zero-shot organ abnormality on the evaluation "
            "split, operating points picked on validation; Δ = paired bootstrap over seeds × test volumes "
            "(medvlp.finetune.sweep.paired_bootstrap_diff), variant minus base.")
    if stem is not None:
        md, _ = write_table(rows, stem)
        md.write_text(md.read_text() + note + "\n")
    return "\n".join(lines) + "\n" + note


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
            row = {**res.metrics, "seed": seed, "train_seconds": res.seconds, "run_id": res.run_id,
                   "scores_path": str(Path(c.finetune.out_dir) / "eval_scores.npz")}
            results.setdefault(v, []).append(row)
            print(f"ablation {v} seed {seed}: macro AUC {row.get('auc_macro', float('nan')):.3f}", flush=True)
    summary = summarise(results, organs)
    paired = paired_vs_base(results)
    md = markdown_table(summary, organs, seeds, paired, out / "ablation")
    (out / "ablation.json").write_text(json.dumps({"seeds": list(seeds), "organs": organs, "results": results,
                                                   "summary": summary, "paired_vs_base": paired}, indent=1,
                                                  default=str))
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
    paired = paired_vs_base(results)
    md = markdown_table(summary, organs, seeds, paired, out / "ablation")
    (out / "ablation.json").write_text(json.dumps({"seeds": seeds, "organs": organs, "results": results,
                                                   "summary": summary, "paired_vs_base": paired,
                                                   "merged_from": [str(d) for d in dirs]},
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
        metrics = {f"{_SLUG[v]}/{k.replace('/', '_')}": m["mean"] for v, ms in summary.items()
                   for k, m in ms.items() if math.isfinite(m["mean"])}
        tr.log_metrics(metrics)
        tr.log_artifact(out / "ablation.md")
        tr.log_artifact(out / "ablation.csv")
        tr.log_artifact(out / "ablation.json")
    finally:
        tr.end("FINISHED")
