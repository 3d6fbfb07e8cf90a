"""The few-label protocol: every method at every label budget and seed, one table.

    medvlp eval few-shot RECIPE --set finetune.checkpoint=RUN        # -> OUT/fewshot.md, OUT/fewshot.png

Budgets: `protocol.label_fractions` (stratified fractions of the training split, as in the method's own protocol:
0.1 %, 0.5 %, 2 %) and `protocol.shots` (k labelled images per class). For each budget and each seed
s = 0 .. `protocol.seeds` - 1 the labelled subset is drawn with seed s (the same subset for every method), the
view cache is embedded once, and every method of `protocol.methods` is measured on the eval split:

  zero_shot              class-prompt logits of the frozen model (no labels; the same number at every budget)
  linear_probe           logistic regression on the labelled images' frozen embeddings, C from `protocol.probe_C`
  tip_adapter            training-free cache: s f.T^T + a exp(-b (1 - f.K^T)) L  (keys K = labelled embeddings,
                         L their one-hot labels; a, b from `protocol.tip_alpha` x `protocol.tip_beta`)
  residual_adapter       CLIPath-style residual adapter, alpha picked from `protocol.alpha_grid` on the val split
  path_clip              the method (adapter.* settings)
  path_clip_fixed_alpha  the method with alpha fixed at `adapter.alpha` (ablation of the self-adaptive ratio)
  full_finetune          the whole image tower trained on the labelled images (`protocol.full_lr`, `full_steps`)

Every setting a method picks from a grid (probe C, Tip-Adapter a and b, the residual adapter's alpha) is picked by
accuracy on the val split (`data.val_split`), as CLIPath and Tip-Adapter do; the eval split is never used to
choose. The trained methods run through the fine-tune runner (`run_stage`), seeded with s. MLflow: one parent run
for the protocol and a child run per (method, budget, seed) cell. Same config and seeds -> the same numbers.
Legend: N eval samples, n labelled, E embedding width, C classes.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from medvlp.finetune.path_clip.config import PathCLIPConfig
from medvlp.finetune.path_clip.metrics import classification_metrics
from medvlp.finetune.path_clip.sampling import budget_name
from medvlp.finetune.path_clip.stage import Budget, PathCLIPStage, TaskContext, draw_budget

log = logging.getLogger("medvlp.path_clip")

METRICS = ("acc", "f1_macro", "auc")
LABELS = {"zero_shot": "zero-shot", "linear_probe": "linear probe", "tip_adapter": "Tip-Adapter (training-free)",
          "residual_adapter": "residual adapter (fixed α, grid)", "path_clip": "**Path-CLIP**",
          "path_clip_fixed_alpha": "Path-CLIP, fixed α", "full_finetune": "full fine-tune (image tower)"}


# ----------------------------------------------------------------------------------------------- baselines
def zero_shot_logits(ctx: TaskContext) -> np.ndarray:
    return (ctx.scale * ctx.f_eval @ ctx.text_CE.t()).numpy()


def linear_probe_logits(b: Budget, f_NE: torch.Tensor, C: float, num_classes: int) -> np.ndarray:
    """Log-probabilities of a multinomial logistic regression on the labelled embeddings (classes absent from the
    labelled subset cannot occur: budgets keep every class)."""
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(C=C, max_iter=5000)
    clf.fit(b.f_eval.numpy(), b.y.numpy())
    out = np.full((f_NE.shape[0], num_classes), -1e9)
    out[:, clf.classes_] = np.log(np.clip(clf.predict_proba(f_NE.numpy()), 1e-12, 1.0))
    return out


def tip_adapter_logits(ctx: TaskContext, b: Budget, f_NE: torch.Tensor, alpha: float, beta: float) -> np.ndarray:
    """Tip-Adapter (Zhang et al., 2022), training-free: zero-shot logits + alpha * exp(-beta(1 - cos)) @ one-hot."""
    aff = torch.exp(-beta * (1 - f_NE @ b.f_eval.t()))
    onehot = F.one_hot(b.y, ctx.task.num_classes).float()
    return (ctx.scale * f_NE @ ctx.text_CE.t() + alpha * aff @ onehot).numpy()


def pick_on_val(ctx: TaskContext, settings: list, logits_fn) -> tuple[Any, dict]:
    """(best setting by val accuracy (first on ties), eval-split metrics with it); logits_fn(setting, f) -> logits."""
    y_val, f_val = ctx.val()
    accs = [classification_metrics(y_val, logits_fn(s, f_val))["acc"] for s in settings]
    best = settings[int(np.argmax(accs))]
    return best, {**classification_metrics(ctx.eval_split.y_N, logits_fn(best, ctx.f_eval)), "val_acc": max(accs)}


# ----------------------------------------------------------------------------------------------- cells
def _cell_cfg(cfg: PathCLIPConfig, out: Path, method: str, seed: int, **adapter: Any) -> PathCLIPConfig:
    f = cfg.finetune
    p = cfg.protocol
    ft = dataclasses.replace(f, checkpoint="", out_dir=str(out), seed=seed, progress=False, resume=False,
                             views=f.views if method != "full_finetune" else 0)
    if method == "full_finetune":
        ft = dataclasses.replace(ft, lr=p.full_lr, steps=p.full_steps, weight_decay=f.weight_decay)
    ad = dataclasses.replace(cfg.adapter, method=method, **adapter)
    return dataclasses.replace(cfg, adapter=ad, finetune=ft,
                               tracking=dataclasses.replace(cfg.tracking, enabled=False))


def _train(ctx: TaskContext, b: Budget, cfg: PathCLIPConfig, tracker=None, with_val: bool = False) -> dict:
    from medvlp.finetune.runner import run_stage

    stage = PathCLIPStage(ctx, b, with_val=with_val)
    res = run_stage(stage, cfg, tracker=tracker)
    return dict(res.metrics)


def run_cell(method: str, ctx: TaskContext, b: Budget, cfg: PathCLIPConfig, seed: int, out: Path,
             tracker=None) -> dict:
    """Metrics of one (method, budget, seed) cell on the eval split (+ what the method chose, e.g. alpha)."""
    p = cfg.protocol
    y = ctx.eval_split.y_N
    if method == "zero_shot":
        return classification_metrics(y, zero_shot_logits(ctx))
    if method == "linear_probe":
        C, m = pick_on_val(ctx, list(p.probe_C),
                           lambda c, f: linear_probe_logits(b, f, c, ctx.task.num_classes))
        return {**m, "C": float(C)}
    if method == "tip_adapter":
        (a, be), m = pick_on_val(ctx, [(a, be) for a in p.tip_alpha for be in p.tip_beta],
                                 lambda s, f: tip_adapter_logits(ctx, b, f, *s))
        return {**m, "tip_alpha": float(a), "tip_beta": float(be)}
    if method == "residual_adapter":
        best: dict | None = None
        for a in p.alpha_grid:
            m = _train(ctx, b, _cell_cfg(cfg, out / f"alpha{a:g}", method, seed, alpha_mode="fixed", alpha=a,
                                         alpha_lo=0.0, alpha_hi=1.0), with_val=True)
            if best is None or m["val_acc"] > best["val_acc"]:
                best = {**m, "alpha": a}
        return best
    if method == "path_clip_fixed_alpha":
        return _train(ctx, b, _cell_cfg(cfg, out, method, seed, alpha_mode="fixed"), tracker)
    if method in ("path_clip", "full_finetune"):
        return _train(ctx, b, _cell_cfg(cfg, out, method, seed), tracker)
    raise ValueError(f"protocol.methods: unknown method {method!r}")


# ----------------------------------------------------------------------------------------------- tables
def aggregate(rows: list[dict]) -> dict[tuple[str, str], dict[str, float]]:
    """(method, budget) -> {metric_mean, metric_std, n_labelled, seeds} over seeds (std: population, ddof=0)."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["budget"]), []).append(r)
    out = {}
    for key, rs in groups.items():
        agg = {"seeds": len(rs), "n_labelled": float(np.mean([r["n_labelled"] for r in rs]))}
        for m in METRICS:
            vals = np.array([r[m] for r in rs], dtype=np.float64)
            agg[f"{m}_mean"] = float(np.nanmean(vals)) if np.isfinite(vals).any() else math.nan
            agg[f"{m}_std"] = float(np.nanstd(vals)) if np.isfinite(vals).any() else math.nan
        out[key] = agg
    return out


def markdown_table(agg: dict, budgets: list[str], methods: list[str], title: str = "") -> str:
    """One block per metric: rows = methods, columns = budgets, cells = mean ± std over seeds (best in bold)."""
    lines = [title] if title else []
    n_lab = {bud: agg[(methods[0], bud)]["n_labelled"] for bud in budgets if (methods[0], bud) in agg}
    for metric, name in (("acc", "Accuracy"), ("f1_macro", "Macro-F1"), ("auc", "AUC")):
        lines += ["", f"**{name}** (mean ± std over seeds)", "",
                  "| method | " + " | ".join(f"{b} (n={n_lab.get(b, 0):g})" for b in budgets) + " |",
                  "| --- |" + " --- |" * len(budgets)]
        best = {b: max((agg[(m, b)][f"{metric}_mean"] for m in methods if (m, b) in agg
                        and math.isfinite(agg[(m, b)][f"{metric}_mean"])), default=math.nan) for b in budgets}
        for m in methods:
            cells = []
            for b in budgets:
                a = agg.get((m, b))
                if a is None or not math.isfinite(a[f"{metric}_mean"]):
                    cells.append("n/a")
                    continue
                txt = f"{a[f'{metric}_mean']:.3f} ± {a[f'{metric}_std']:.3f}"
                cells.append(f"**{txt}**" if a[f"{metric}_mean"] >= best[b] - 1e-12 else txt)
            lines.append(f"| {LABELS.get(m, m)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_accuracy(agg: dict, budgets: list[str], methods: list[str], path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.5))
    xs = np.arange(len(budgets))
    for m in methods:
        mean = np.array([agg.get((m, b), {}).get("acc_mean", np.nan) for b in budgets])
        std = np.array([agg.get((m, b), {}).get("acc_std", np.nan) for b in budgets])
        ax.errorbar(xs, mean, yerr=std, marker="o", capsize=3, label=LABELS.get(m, m).replace("*", ""),
                    linewidth=2.5 if m == "path_clip" else 1.2)
    ax.set_xticks(xs, [f"{b}\n(n={agg.get((methods[0], b), {}).get('n_labelled', 0):g})" for b in budgets],
                  fontsize=8)
    ax.set_xlabel("label budget (labelled training images)")
    ax.set_ylabel("accuracy (eval split)")
    ax.set_title(title or "accuracy vs label budget", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------- driver
def budgets_of(cfg: PathCLIPConfig) -> list[tuple[str, int, float]]:
    """(name, shots, label_fraction) of every budget, fractions first, then k-shot."""
    p = cfg.protocol
    return ([(budget_name(label_fraction=f), 0, f) for f in p.label_fractions] +
            [(budget_name(shots=k), k, 0.0) for k in p.shots])


def _child(tracker_cfg, parent, name: str, params: dict):
    from medvlp.pretrain.tracking import Tracker

    if parent is None or parent.run_id is None:
        return None
    child = Tracker(dataclasses.replace(tracker_cfg, run_name=name), 0, params).start()
    child.set_tags({"mlflow.parentRunId": parent.run_id})
    return child


def run_protocol(cfg: PathCLIPConfig, pretrained: Any = None, command: str = "") -> dict:
    """Run the whole protocol; write OUT/fewshot.md, OUT/fewshot.png, OUT/results.json; return the results."""
    from medvlp.pretrain.tracking import Tracker, flatten
    from medvlp.finetune.runner import config_dict

    t0 = time.time()
    if pretrained is None:
        if not cfg.finetune.checkpoint:
            raise ValueError("finetune.checkpoint: set the pretrained model (a run folder, a model.safetensors or "
                             "an exported folder)")
        from medvlp.finetune.runner import load_pretrained_model

        pretrained = load_pretrained_model(cfg.finetune.checkpoint)
    p = cfg.protocol
    out = Path(p.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # hundreds of runner calls: no per-save INFO lines
    ctx = TaskContext(pretrained, cfg)
    budgets = budgets_of(cfg)
    parent = None
    if cfg.tracking.enabled:
        tcfg = dataclasses.replace(cfg.tracking, run_name=cfg.tracking.run_name or "few-shot protocol")
        parent = Tracker(tcfg, 0, flatten(config_dict(cfg))).start()
        parent.set_tags({"medvlp.command": command} if command else {})
    rows: list[dict] = []
    status = "FAILED"
    try:
        zs = classification_metrics(ctx.eval_split.y_N, zero_shot_logits(ctx))
        for bname, shots, frac in budgets:
            for seed in range(p.seeds):
                b = draw_budget(ctx, shots, frac, seed, cfg.finetune.views)
                for method in p.methods:
                    tag = f"{method}/{bname}/seed{seed}"
                    params = {"method": method, "budget": bname, "seed": seed, "n_labelled": len(b.idx)}
                    child = _child(cfg.tracking, parent, f"{method} {bname} seed{seed}", params)
                    cell_out = out / "cells" / method / bname.replace("%", "pct") / f"seed{seed}"
                    tc = time.time()
                    m = dict(zs) if method == "zero_shot" else run_cell(method, ctx, b, cfg, seed, cell_out, child)
                    row = {"method": method, "budget": bname, "seed": seed, "n_labelled": len(b.idx),
                           **{k: float(v) for k, v in m.items() if k != "n_labelled"},
                           "seconds": time.time() - tc}
                    rows.append(row)
                    if child is not None:
                        child.log_metrics({k: v for k, v in row.items() if isinstance(v, float)})
                        child.end("FINISHED")
                    log.info("%s: acc %.3f f1 %.3f auc %.3f (%.1fs)", tag, row["acc"], row["f1_macro"],
                             row["auc"], row["seconds"])
        status = "FINISHED"
    finally:
        if parent is not None and status != "FINISHED":
            parent.end(status)
    agg = aggregate(rows)
    names = [b[0] for b in budgets]
    title = (f"Few-label protocol on `{cfg.data.shards}` ({ctx.task.num_classes} classes: "
             f"{', '.join(ctx.task.class_names)}; eval split `{cfg.data.eval_split}`, N={len(ctx.eval_split)}; "
             f"{p.seeds} seeds)")
    table = markdown_table(agg, names, list(p.methods), title)
    if command:
        table += f"\nMade by `{command}`.\n"
    (out / "fewshot.md").write_text(table)
    plot_accuracy(agg, names, list(p.methods), out / "fewshot.png", f"{cfg.data.shards}: accuracy vs label budget")
    result = {"rows": rows, "summary": [{"method": m, "budget": b, **v} for (m, b), v in agg.items()],
              "budgets": names, "methods": list(p.methods), "classes": ctx.task.class_names,
              "n_eval": len(ctx.eval_split), "seconds": time.time() - t0, "command": command}
    (out / "results.json").write_text(json.dumps(result, indent=1))
    if parent is not None:
        parent.log_metrics({f"{k}/{m}/{b}": v[f"{k}_mean"] for (m, b), v in agg.items() for k in METRICS
                            if math.isfinite(v[f"{k}_mean"])})
        for f in ("fewshot.md", "fewshot.png", "results.json"):
            parent.log_artifact(out / f)
        parent.end("FINISHED")
        result["run_id"] = parent.run_id
    result["table"] = table
    return result
