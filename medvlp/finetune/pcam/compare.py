"""The pooling comparison: one PCAM config trained once per pooling and seed (same backbone, steps, data), tables
with seed statistics, paired bootstrap differences and a lesion-size sweep.

    medvlp pcam-table RECIPE --out DIR [--poolings avg,max,lse,pcam] [--seeds 0,1,2,3,4] [--reference avg]
                      [--resume] [--set KEY=VALUE ...]

Each (pooling, seed) runs in DIR/<pooling>-s<seed>/ (its own MLflow run `pcam-<pooling>-s<seed>`); a seed sets
both `finetune.seed` (weights, dropout) and `data.seed` (stream order, augmentation). Each run picks its box
threshold on the validation split and writes its test cases to eval_items.npz (`PcamStage.evaluate`).
`--resume` reuses a finished run (result.json and eval_items.npz present) instead of training it again;
`--tables-only` trains nothing and tabulates the finished runs among the asked (pooling, seed) pairs, naming the
missing ones (so poolings may have different seeds; paired differences use the seeds both poolings have).

Tables (`medvlp.finetune.sweep`: "±" = sample sd over seeds; differences = `paired_bootstrap_diff` over test
images x seeds, the same draw for both poolings):
  DIR/poolings.md / .json       the overview, per-finding rows, paired differences vs the reference pooling and
                                the lesion-size sweep (below), with the run metrics of every seed
  DIR/summary.{md,csv}, DIR/per_finding.{md,csv}, DIR/paired.{md,csv}, DIR/lesion_size.{md,csv}
Lesion-size sweep: nodule cases binned by the ground-truth box side (max(w, h) / image side); per pooling and
bin the pointing game, IoU and the box-area ratio (predicted box area / ground-truth box area, geometric mean
over cases; > 1 = the box is larger than the lesion) with a bootstrap CI over images x seeds.
"""
from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from medvlp.finetune.pcam.config import PcamConfig
from medvlp.finetune.pcam.model import POOLINGS
from medvlp.finetune.sweep import paired_bootstrap_diff, pm, seed_summary, write_table

ITEMS_FILE = "eval_items.npz"
COLUMNS = [("auc_mean", "AUC"), ("pointing_mean", "pointing"), ("iou_mean", "IoU"), ("acc@0.1_mean", "acc@0.1"),
           ("acc@0.25_mean", "acc@0.25"), ("acc@0.5_mean", "acc@0.5")]
SIZE_BINS = (0.0, 0.06, 0.10, 0.15, 1.01)  # nodule box side / image side
SIZE_FINDING = "nodule"


def _pm(vals: Sequence[float]) -> str:
    s = seed_summary(list(vals))
    return "n/a" if s["n"] == 0 or math.isnan(s["mean"]) else pm(s)


# ------------------------------------------------------------------------------------------------ case arrays
def load_items(path: str | Path) -> dict[str, np.ndarray]:
    """An eval_items.npz (no pickled objects) as a dict of arrays."""
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def case_grid(items: dict[str, np.ndarray], keys: Sequence[str]) -> dict[str, np.ndarray]:
    """Per image (rows in the order of `keys`) and finding: pointing hit, IoU and log2 box-area ratio at the run's
    chosen threshold (NaN where the finding has no localisation case), the ground-truth box side (pixels), the
    logits and labels."""
    row_of = {k: i for i, k in enumerate(items["keys"].tolist())}
    missing = [k for k in keys if k not in row_of]
    if missing:
        raise ValueError(f"eval_items: {len(missing)} test images missing (e.g. {missing[0]})")
    order = np.asarray([row_of[k] for k in keys])
    back = np.full(len(items["keys"]), -1)
    back[order] = np.arange(len(keys))
    N, K = len(keys), items["labels"].shape[1]
    j = int(np.argmin(np.abs(items["thresholds"] - float(items["threshold"]))))
    grid = {name: np.full((N, K), np.nan) for name in ("hit", "iou", "log_area", "gt_side")}
    r, k = back[items["case_row"]], items["case_finding"]
    ok = r >= 0
    gt_area = np.maximum(items["case_gt_w"] * items["case_gt_h"], 1.0)
    pred_area = items["case_area"][:, j]
    grid["hit"][r[ok], k[ok]] = items["case_hit"][ok].astype(float)
    grid["iou"][r[ok], k[ok]] = items["case_iou"][ok, j]
    with np.errstate(divide="ignore"):
        grid["log_area"][r[ok], k[ok]] = np.where(pred_area[ok] > 0, np.log2(pred_area[ok] / gt_area[ok]), np.nan)
    grid["gt_side"][r[ok], k[ok]] = np.maximum(items["case_gt_w"], items["case_gt_h"])[ok]
    grid["logits"], grid["labels"] = items["logits"][order], items["labels"][order]
    return grid


def loc_macro(_y, v_NK: np.ndarray) -> float:
    """Mean over findings of the mean over their cases (NaN entries = no case)."""
    v = np.asarray(v_NK, dtype=float)
    if v.ndim == 1:
        v = v[:, None]
    n = np.sum(~np.isnan(v), axis=0)
    per = np.nansum(v, axis=0)[n > 0] / n[n > 0]
    return float(per.mean()) if per.size else float("nan")


def _auc_macro(y_NK, s_NK) -> float:
    """Mean AUC over findings with both classes (labels 1 / 0; others left out): the Mann-Whitney statistic with
    average ranks for ties, equal to `sklearn.metrics.roc_auc_score` and fast enough for bootstrap draws."""
    from scipy.stats import rankdata

    y_NK, s_NK = np.asarray(y_NK, dtype=float), np.asarray(s_NK, dtype=float)
    aucs = []
    for k in range(y_NK.shape[1]):
        keep = (y_NK[:, k] == 0) | (y_NK[:, k] == 1)
        y, sc = y_NK[keep, k] == 1, s_NK[keep, k]
        n_pos, n_neg = int(y.sum()), int((~y).sum())
        if n_pos == 0 or n_neg == 0:
            continue
        r = rankdata(sc)
        aucs.append((r[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
    return float(np.mean(aucs)) if aucs else float("nan")


def _acc(t: float):
    def fn(_y, v):
        v = np.asarray(v, dtype=float)
        return loc_macro(None, np.where(np.isnan(v), np.nan, (v >= t).astype(float)))
    return fn


# ------------------------------------------------------------------------------------------------ running
def _finished(run_dir: Path) -> dict | None:
    res, items = run_dir / "result.json", run_dir / ITEMS_FILE
    if res.is_file() and items.is_file():
        return json.loads(res.read_text())
    return None


def compare_poolings(cfg: PcamConfig, out_dir: str | Path, poolings: Sequence[str] = POOLINGS,
                     seeds: Sequence[int] | None = None, command: str = "", reference: str = "avg",
                     resume: bool = False, n_boot: int = 1000,
                     train: bool = True) -> dict[str, list[dict[str, float]]]:
    """Train `cfg` once per pooling and seed (or reuse finished runs with `resume`; with `train=False` only the
    finished runs are tabulated and the missing ones named); write the tables; -> {pooling: [metrics per seed]}."""
    from medvlp.finetune.pcam.stage import PcamStage
    from medvlp.finetune.runner import run_stage

    bad = [p for p in poolings if p not in POOLINGS]
    if bad:
        raise ValueError(f"--poolings: {bad} are not among {', '.join(POOLINGS)}")
    if reference not in poolings:
        raise ValueError(f"--reference: {reference!r} is not among the compared poolings {list(poolings)}")
    seeds = list(seeds) if seeds else [cfg.finetune.seed]
    out = Path(out_dir)
    runs: dict[str, list[dict[str, float]]] = {p: [] for p in poolings}
    missing: list[str] = []
    for seed in seeds:
        for pooling in poolings:
            run_cfg = copy.deepcopy(cfg)
            run_cfg.head.pooling = pooling
            run_cfg.finetune.seed, run_cfg.data.seed = seed, seed
            tag = f"{pooling}-s{seed}"
            run_cfg.finetune.out_dir = str(out / tag)
            run_cfg.tracking.run_name = f"pcam-{tag}"
            done = _finished(out / tag) if (resume or not train) else None
            if done is not None:
                runs[pooling].append({**done["metrics"], "seed": seed, "seconds": float("nan"),
                                      "run_id": done.get("run_id") or "", "dir": tag})
                continue
            if not train:
                missing.append(tag)
                continue
            t0 = time.time()
            result = run_stage(PcamStage(), run_cfg)
            runs[pooling].append({**result.metrics, "seed": seed, "seconds": time.time() - t0,
                                  "run_id": result.run_id or "", "dir": tag})
    runs = {p: ms for p, ms in runs.items() if ms}
    if reference not in runs:
        raise ValueError(f"no finished run of the reference pooling {reference!r} in {out}")
    write_tables(out, runs, cfg, seeds, command, reference, n_boot, missing=missing)
    return runs


# ------------------------------------------------------------------------------------------------ tables
def _grids(out: Path, runs: dict[str, list[dict]]) -> tuple[list[str], list[str], dict[str, list[dict]]]:
    """(test image keys, finding names, {pooling: [case grid per seed]}) aligned on the first run's keys."""
    first = load_items(out / next(iter(runs.values()))[0]["dir"] / ITEMS_FILE)
    keys, names = sorted(first["keys"].tolist()), first["names"].tolist()
    grids = {p: [{**case_grid(load_items(out / m["dir"] / ITEMS_FILE), keys), "seed": m.get("seed")} for m in ms]
             for p, ms in runs.items()}
    return keys, names, grids


def _stack(grids: list[dict], name: str, cols=None) -> np.ndarray:
    a = np.stack([g[name] for g in grids])
    return a if cols is None else a[..., cols]


def paired_rows(grids: dict[str, list[dict]], reference: str, n_boot: int, seed: int = 0) -> list[dict]:
    """Pooling - reference per metric: mean difference and its 95% CI over test images x seeds (paired)."""
    rows = []
    ref = grids[reference]
    metrics = [("pointing", "hit", loc_macro), ("IoU", "iou", loc_macro), ("acc@0.25", "iou", _acc(0.25)),
               ("acc@0.5", "iou", _acc(0.5)), ("AUC", "logits", _auc_macro)]
    for pooling, gs in grids.items():
        if pooling == reference:
            continue
        # paired by seed: the seeds both poolings ran (runs without a seed pair by position)
        ref_by = {g.get("seed", i): g for i, g in enumerate(ref)}
        pairs = [(g, ref_by[g.get("seed", i)]) for i, g in enumerate(gs) if g.get("seed", i) in ref_by]
        if not pairs:
            continue
        for label, field, fn in metrics:
            a, b = _stack([g for g, _ in pairs], field), _stack([r for _, r in pairs], field)
            y = _stack([g for g, _ in pairs], "labels")
            d = paired_bootstrap_diff(fn, y, a, b, n_boot=n_boot, seed=seed)
            rows.append({"comparison": f"{pooling} - {reference}", "metric": label, "diff": d["diff"],
                         "ci_lo": d["ci_lo"], "ci_hi": d["ci_hi"], "p_le_0": d["p_le_0"],
                         "held (CI > 0)": "yes" if d["ci_lo"] > 0 else ("no: CI < 0" if d["ci_hi"] < 0 else
                                                                          "no: CI spans 0"),
                         "seeds": d["n_seeds"], "images": d["n_items"]})
    return rows


def lesion_rows(grids: dict[str, list[dict]], names: list[str], image_side: int, n_boot: int,
                bins: Sequence[float] = SIZE_BINS, finding: str = SIZE_FINDING, seed: int = 0) -> list[dict]:
    """Per pooling and nodule-size bin: cases, pointing, IoU (mean ± sd over seeds) and the geometric-mean box-area
    ratio with a bootstrap CI over images x seeds."""
    if finding not in names:
        return []
    k = names.index(finding)
    rows = []
    for pooling, gs in grids.items():
        side = gs[0]["gt_side"][:, k] / float(image_side)  # ground truth: the same in every run
        for lo, hi in zip(bins[:-1], bins[1:]):
            sel = np.where((side >= lo) & (side < hi))[0]
            if sel.size == 0:
                continue
            hit, iou, la = (_stack(gs, f)[:, sel, k] for f in ("hit", "iou", "log_area"))
            la_ci = paired_bootstrap_diff(loc_macro, np.zeros(sel.size), la, np.zeros_like(la), n_boot=n_boot,
                                          seed=seed)
            rows.append({"pooling": pooling, "nodule side / image": f"{lo:.2f}-{min(hi, 1.0):.2f}",
                         "cases": int(sel.size),
                         "pointing": _pm([np.nanmean(h) for h in hit]), "IoU": _pm([np.nanmean(v) for v in iou]),
                         "box area / lesion area": float(2 ** la_ci["diff"]),
                         "95% CI": f"[{2 ** la_ci['ci_lo']:.2f}, {2 ** la_ci['ci_hi']:.2f}]"})
    return rows


def write_tables(out: Path, runs: dict[str, list[dict]], cfg: PcamConfig, seeds: list[int], command: str,
                 reference: str = "avg", n_boot: int = 1000, missing: Sequence[str] = ()) -> None:
    out.mkdir(parents=True, exist_ok=True)
    keys, names, grids = _grids(out, runs)
    summary = []
    for pooling, ms in runs.items():
        row = {"pooling": pooling}
        row.update({label: _pm([m.get(k, float("nan")) for m in ms]) for k, label in COLUMNS})
        row["box threshold (val)"] = ", ".join(f"{m.get('threshold', float('nan')):.1f}" for m in ms)
        row["seeds"] = len(ms)
        row["seed ids"] = ",".join(str(m.get("seed", "?")) for m in ms)
        summary.append(row)
    per_finding = []
    for pooling, ms in runs.items():
        for key in ("auc", "pointing", "iou", "acc@0.25"):
            per_finding.append({"pooling": pooling, "metric": key,
                                **{n: _pm([m.get(f"{key}/{n}", float("nan")) for m in ms]) for n in names}})
    paired = paired_rows(grids, reference, n_boot)
    lesions = lesion_rows(grids, names, cfg.data.image_size, n_boot)
    write_table(summary, out / "summary")
    write_table(per_finding, out / "per_finding")
    if paired:  # none when the reference is the only pooling (one pooling run on its own)
        write_table(paired, out / "paired")
    else:
        for ext in (".md", ".csv"):
            (out / f"paired{ext}").unlink(missing_ok=True)
    if lesions:
        write_table(lesions, out / "lesion_size")
    n_loc = {n: int(runs[reference][0].get(f"n_loc/{n}", 0)) for n in names}
    head = (f"PCAM pooling comparison: {cfg.finetune.steps} steps x batch {cfg.finetune.batch_size}, seeds "
            f"{', '.join(map(str, seeds))}, backbone {cfg.head.backbone} "
            f"({cfg.finetune.checkpoint or 'registry ' + cfg.head.model}), map level {cfg.head.feature_level}, "
            f"image {cfg.data.image_size} px, box threshold picked per run on '{cfg.eval.val_split}' from "
            f"{cfg.eval.thresholds or [cfg.eval.threshold]}, test split '{cfg.eval.split}' ({len(keys)} images)"
            + (f", lse pooling r = {cfg.head.lse_r:g}" if "lse" in runs else "") + "\n")
    if missing:
        head += f"\nnot run (left out of every table): {', '.join(missing)}\n"
    parts = [head + (f"\ncommand: `{command}`\n" if command else "")]
    for title, stem in (("Mean ± sample sd over seeds", "summary"), ("Per finding (mean ± sd over seeds)",
                                                                      "per_finding"),
                        (f"Paired differences vs {reference} (bootstrap over test images x seeds)", "paired"),
                        (f"Lesion-size sweep ({SIZE_FINDING} cases)", "lesion_size")):
        if (out / f"{stem}.md").is_file():
            parts.append(f"## {title}\n\n" + (out / f"{stem}.md").read_text())
    parts.append("localisation cases per finding (test images where it is present with a box): "
                 + ", ".join(f"{n} {c}" for n, c in n_loc.items()) + "\n")
    (out / "poolings.md").write_text("\n".join(parts))
    (out / "poolings.json").write_text(json.dumps({"command": command, "findings": names, "seeds": seeds,
                                                   "reference": reference, "runs": runs, "paired": paired,
                                                   "missing": list(missing),
                                                   "lesion_size": lesions}, indent=1, default=float))


def table_markdown(runs: dict[str, list[dict[str, float]]], names: Sequence[str]) -> str:
    """Mean ± sd over seeds per pooling (the overview only; `write_tables` writes the full set)."""
    lines = ["| pooling | " + " | ".join(c for _, c in COLUMNS) + " |", "| --- |" + " ---: |" * len(COLUMNS)]
    for pooling, ms in runs.items():
        lines.append(f"| {pooling} | " + " | ".join(_pm([m.get(k, float("nan")) for m in ms]) for k, _ in COLUMNS)
                     + " |")
    return "\n".join(lines) + "\n"
