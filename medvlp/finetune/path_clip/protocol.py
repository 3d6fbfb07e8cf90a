"""The few-label protocol: every method at every label budget and seed, tables that can tell.

    medvlp eval few-shot RECIPE --set finetune.checkpoint=RUN        # -> OUT/fewshot.md, OUT/fewshot.png

Budgets: `protocol.label_fractions` (stratified fractions of the training split) and `protocol.shots` (k labelled
images per class). For each budget and each seed s = 0 .. `protocol.seeds` - 1 the labelled subset is drawn with
seed s (the same subset for every method), the view cache is embedded once, and every method of `protocol.methods`
is measured on the eval split and, when `protocol.source_shards` is set, on the source domain's split (forgetting):

  shortcut_rgb           logistic regression on the labelled images' patch-mean RGB (the cheapest statistic)
  zero_shot              class-prompt logits of the frozen model (no labels; the same number at every budget)
  linear_probe           logistic regression on the labelled images' frozen embeddings, C from `protocol.probe_C`
  tip_adapter            training-free cache: s f.T^T + a exp(-b (1 - f.K^T)) L  (keys K = labelled embeddings,
                         L their one-hot labels; a, b from `protocol.tip_alpha` x `protocol.tip_beta`)
  residual_adapter       CLIPath-style residual adapter on the same weak and strong views as Path-CLIP (prompt CE
                         on both), no noise, no DVC, alpha picked from `protocol.alpha_grid` on the val split
  path_clip              the method (adapter.* settings)
  path_clip_no_dvc       the method without the DVC loss (dvc_weight 0)
  path_clip_no_noise     the method without the feature noise (noise_std 0)
  path_clip_fixed_alpha  the method with alpha fixed at `adapter.alpha` (ablation of the self-adaptive ratio)
  full_finetune          the image tower trained whole (tower.py; lr and steps picked on val)
  fixmatch               FixMatch on the tower with the rest of the training split unlabelled (tower.py)

Besides, rows without a budget: the ceiling (linear probe on every training label) and the shortcut on every
training label. Every setting a method picks (probe C, Tip-Adapter a and b, the residual adapter's alpha, the
tower arms' lr and steps) is picked by accuracy on the val split (`data.val_split`); the eval split is never used
to choose. Statistics come from `medvlp.finetune.sweep`: mean ± sample sd over seeds, and for Path-CLIP minus each
arm a paired bootstrap over seeds x eval items (`protocol.bootstrap` draws). The adapter methods train in-process
with the fine-tune runner's maths (`fit_head`: AdamW, warmup + cosine, gradient clip; no checkpoints), seeded with
s; the tower arms are in tower.py. Cells are saved under OUT/cells and reused (`protocol.run_seeds` splits the
seeds over processes, `protocol.wait_s` lets a gathering run wait for them). MLflow: one parent run for the
protocol and a child run per
(method, budget, seed) cell. Same config and seeds -> the same numbers.
Legend: N eval samples, n labelled, E embedding width, C classes, S seeds.
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
import torch.nn as nn
import torch.nn.functional as F

from medvlp.finetune.path_clip.config import PathCLIPConfig
from medvlp.finetune.path_clip.metrics import classification_metrics
from medvlp.finetune.path_clip.sampling import budget_name
from medvlp.finetune.path_clip.stage import Budget, PathCLIPStage, TaskContext, draw_budget
from medvlp.finetune.runner import StageContext

log = logging.getLogger("medvlp.path_clip")

METRICS = ("acc", "f1_macro", "auc")
LABELS = {"shortcut_rgb": "shortcut: patch-mean RGB, logistic", "zero_shot": "zero-shot (pretrained)",
          "linear_probe": "linear probe (frozen)", "tip_adapter": "Tip-Adapter (training-free)",
          "residual_adapter": "residual adapter (weak+strong views, α on val)", "path_clip": "**Path-CLIP**",
          "path_clip_no_dvc": "Path-CLIP without DVC", "path_clip_no_noise": "Path-CLIP without the noise",
          "path_clip_fixed_alpha": "Path-CLIP, fixed α", "full_finetune": "full fine-tune (lr, steps on val)",
          "fixmatch": "FixMatch (+ unlabelled train)", "probe_all": "ceiling: linear probe, all train labels",
          "shortcut_all": "shortcut: patch-mean RGB, all train labels"}
ADAPTIVE = ("path_clip", "path_clip_no_dvc", "path_clip_no_noise")
ONCE = ("zero_shot", "probe_all", "shortcut_all")  # no label budget: one number per seed-free cell


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


def mean_rgb(images: list[np.ndarray]) -> np.ndarray:
    """(N, 3) patch-mean colour of uint8 images: the shortcut feature."""
    return np.stack([np.asarray(im, dtype=np.float64).reshape(-1, im.shape[-1] if im.ndim == 3 else 1).mean(0)
                     for im in images])


def _logreg(X: np.ndarray, y: np.ndarray, C: float, num_classes: int):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=5000)).fit(X, y)

    def logits(Z: np.ndarray) -> np.ndarray:
        out = np.full((Z.shape[0], num_classes), -1e9)
        out[:, clf.classes_] = np.log(np.clip(clf.predict_proba(Z), 1e-12, 1.0))
        return out
    return logits


# ----------------------------------------------------------------------------------------------- cells
def _cell_cfg(cfg: PathCLIPConfig, out: Path, method: str, seed: int, **adapter: Any) -> PathCLIPConfig:
    f = cfg.finetune
    ft = dataclasses.replace(f, checkpoint="", out_dir=str(out), seed=seed, progress=False, resume=False)
    ad = dataclasses.replace(cfg.adapter, method=method, **adapter)
    return dataclasses.replace(cfg, adapter=ad, finetune=ft, tracking=dataclasses.replace(cfg.tracking, enabled=False))


def fit_head(stage: PathCLIPStage, cfg: PathCLIPConfig) -> nn.Module:
    """Train a head stage in-process with the runner's maths (AdamW with decay on matrices, linear warmup + cosine
    lr, gradient-norm clip, epochs of `stage.batches`) but without its checkpoints and output folder: the
    protocol trains hundreds of small heads."""
    from medvlp.finetune.runner import build_optimizer, lr_multiplier

    f = cfg.finetune
    torch.manual_seed(int(f.seed))
    model = stage.build(None, cfg)
    model.train()
    opt = build_optimizer(model, f)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: lr_multiplier(k, f.warmup_steps, f.steps, f.min_lr_ratio))
    step, epoch = 0, 0
    while step < f.steps:
        for batch in stage.batches(cfg, "train", StageContext(), epoch=epoch, start_step=0):
            loss, _ = stage.loss(model, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if f.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), f.grad_clip)
            opt.step()
            sched.step()
            step += 1
            if step >= f.steps:
                break
        epoch += 1
    model.eval()
    return model


def _train(ctx: TaskContext, b: Budget, cfg: PathCLIPConfig, tracker=None, with_val: bool = False) -> tuple[dict, dict]:
    stage = PathCLIPStage(ctx, b, with_val=with_val)
    m = stage.evaluate(fit_head(stage, cfg), cfg, StageContext())
    if tracker is not None:
        tracker.log_metrics({k: float(v) for k, v in m.items()})
    return dict(m), dict(stage.preds)


def _with_source(ctx: TaskContext, m: dict, preds: dict, source_logits: np.ndarray | None) -> tuple[dict, dict]:
    if source_logits is not None and ctx.source is not None:
        m.update({f"source_{k}": v for k, v in classification_metrics(ctx.source.y_N, source_logits).items()})
        preds["source"] = source_logits.argmax(1)
    return m, preds


def _picked(ctx: TaskContext, settings: list, logits_fn, f_source) -> tuple[Any, dict, dict]:
    """pick_on_val, plus the eval / source predictions of the chosen setting."""
    best, m = pick_on_val(ctx, settings, logits_fn)
    preds = {"eval": logits_fn(best, ctx.f_eval).argmax(1)}
    m, preds = _with_source(ctx, m, preds, None if f_source is None else logits_fn(best, f_source))
    return best, m, preds


def run_cell(method: str, ctx: TaskContext, b: Budget, cfg: PathCLIPConfig, seed: int, out: Path,
             tracker=None, tower=None, picked_lr: float | None = None) -> tuple[dict, dict]:
    """(metrics, predictions) of one (method, budget, seed) cell: metrics on the eval split (+ source_* on the
    source split and what the method chose, e.g. alpha), predictions = class ids per eval (and source) item."""
    p = cfg.protocol
    C = ctx.task.num_classes
    if method == "zero_shot":
        m = classification_metrics(ctx.eval_split.y_N, zero_shot_logits(ctx))
        src = None if ctx.f_source is None else (ctx.scale * ctx.f_source @ ctx.text_CE.t()).numpy()
        return _with_source(ctx, m, {"eval": zero_shot_logits(ctx).argmax(1)}, src)
    if method == "shortcut_rgb":
        X = mean_rgb(b.images)
        feats = {id(ctx.f_eval): mean_rgb(ctx.eval_images)}
        if ctx.f_source is not None:
            feats[id(ctx.f_source)] = mean_rgb(ctx.source_images)
        val_rgb = mean_rgb(ctx.val_images())
        fn = lambda c, f: _logreg(X, b.y.numpy(), c, C)(feats.get(id(f), val_rgb))  # noqa: E731
        c, m, preds = _picked(ctx, list(p.probe_C), fn, ctx.f_source)
        return {**m, "C": float(c)}, preds
    if method == "linear_probe":
        c, m, preds = _picked(ctx, list(p.probe_C), lambda c, f: linear_probe_logits(b, f, c, C), ctx.f_source)
        return {**m, "C": float(c)}, preds
    if method == "tip_adapter":
        (a, be), m, preds = _picked(ctx, [(a, be) for a in p.tip_alpha for be in p.tip_beta],
                                    lambda s, f: tip_adapter_logits(ctx, b, f, *s), ctx.f_source)
        return {**m, "tip_alpha": float(a), "tip_beta": float(be)}, preds
    if method == "residual_adapter":
        best = None
        for a in p.alpha_grid:
            m, preds = _train(ctx, b, _cell_cfg(cfg, out / f"alpha{a:g}", method, seed, alpha_mode="fixed", alpha=a,
                                                alpha_lo=0.0, alpha_hi=1.0), with_val=True)
            if best is None or m["val_acc"] > best[0]["val_acc"]:
                best = ({**m, "alpha": a}, preds)
        return best
    if method in ("path_clip", "path_clip_no_dvc", "path_clip_no_noise", "path_clip_fixed_alpha"):
        over = {"path_clip": {}, "path_clip_no_dvc": {"dvc_weight": 0.0}, "path_clip_no_noise": {"noise_std": 0.0},
                "path_clip_fixed_alpha": {"alpha_mode": "fixed"}}[method]
        base = "path_clip_fixed_alpha" if method == "path_clip_fixed_alpha" else "path_clip"
        return _train(ctx, b, _cell_cfg(cfg, out, base, seed, **over), tracker)
    if method in ("full_finetune", "fixmatch"):
        if tower is None:
            raise ValueError(f"{method}: needs the tower-arm context (TowerArms)")
        lrs = [picked_lr] if method == "fixmatch" and picked_lr is not None else None
        return tower.cell(method, b, cfg, seed, lrs)
    raise ValueError(f"protocol.methods: unknown method {method!r}")


def once_cells(ctx: TaskContext, cfg: PathCLIPConfig, tower) -> dict[str, tuple[dict, dict]]:
    """Rows without a label budget: the ceiling (linear probe on every training label) and the shortcut on every
    training label; their settings picked on val as the budgeted arms'."""
    p, C = cfg.protocol, ctx.task.num_classes
    pos, imgs = tower.unlabelled()
    full = Budget(idx=pos, y=torch.from_numpy(ctx.train.y_N[pos]), images=imgs, f_eval=ctx.embed(imgs, "eval"))
    out = {}
    _, m, preds = _picked(ctx, list(p.probe_C), lambda c, f: linear_probe_logits(full, f, c, C), ctx.f_source)
    out["probe_all"] = (m, preds)
    m, preds = run_cell("shortcut_rgb", ctx, full, cfg, 0, Path("."))
    out["shortcut_all"] = (m, preds)
    return out


# ----------------------------------------------------------------------------------------------- tables
def _acc(y, pred) -> float:
    return float(np.mean(np.asarray(y) == np.asarray(pred)))


def summarise(rows: list[dict]) -> dict[tuple[str, str], dict[str, dict]]:
    """(method, budget) -> {metric: seed_summary} over seeds (mean, sample sd ddof=1, t-CI)."""
    from medvlp.finetune.sweep import seed_summary

    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["budget"]), []).append(r)
    keys = ("acc", "f1_macro", "auc", "source_acc", "source_drop", "alpha", "tau", "val_acc", "lr", "steps")
    return {k: {m: seed_summary([r[m] for r in rs if m in r]) for m in keys if any(m in r for r in rs)}
            for k, rs in groups.items()}


def markdown_tables(summary: dict, diffs: dict, budgets: list[str], methods: list[str], n_lab: dict,
                    source_ref: float | None, out: Path) -> str:
    """The protocol's tables (each also as .md + .csv through sweep.write_table) joined as Markdown."""
    from medvlp.finetune.sweep import pm, write_table

    cols = {b: f"{b} (n={n_lab.get(b, 0):g})" for b in budgets}
    rowsets = methods + [m for m in ONCE if m not in methods and (m, "") in summary]

    def cell(m: str, b: str, key: str) -> str:
        s = summary.get((m, "" if m in ONCE else b), {}).get(key)
        return "n/a" if s is None or s["n"] == 0 else pm(s)

    parts = []
    acc = [{"method": LABELS.get(m, m), **{cols[b]: cell(m, b, "acc") for b in budgets}} for m in rowsets]
    md, _ = write_table(acc, out / "table_accuracy")
    parts += ["**Target accuracy** (eval split; mean ± sample sd over seeds)", "", md.read_text()]
    auc = [{"method": LABELS.get(m, m), **{cols[b]: cell(m, b, "auc") for b in budgets}} for m in rowsets]
    md, _ = write_table(auc, out / "table_auc")
    parts += ["**Target AUC** (mean ± sample sd over seeds)", "", md.read_text()]
    if diffs:
        def fmt(d: dict | None) -> str:
            return f"{d['diff']:+.3f} [{d['ci_lo']:+.3f}, {d['ci_hi']:+.3f}] p≤0={d['p_le_0']:.2f}" if d else "n/a"

        dr = [{"Path-CLIP minus": LABELS.get(m, m), **{cols[b]: fmt(diffs.get((m, b))) for b in budgets}}
              for m in rowsets if m != "path_clip" and any((m, b) in diffs for b in budgets)]
        md, _ = write_table(dr, out / "table_diff")
        parts += ["**Path-CLIP minus each arm**, accuracy: mean difference over seeds, 95 % paired bootstrap CI "
                  "over seeds × test items, share of draws ≤ 0", "", md.read_text()]
    if source_ref is not None:
        src = [{"method": LABELS.get(m, m), **{cols[b]: f"{cell(m, b, 'source_acc')} (drop {cell(m, b, 'source_drop')})"
                                                for b in budgets}} for m in rowsets if m not in ("zero_shot",)]
        md, _ = write_table(src, out / "table_source")
        parts += [f"**Forgetting**: accuracy on the source split after adaptation (drop = the pretrained model's "
                  f"zero-shot source accuracy {source_ref:.3f} minus it; mean ± sample sd)", "", md.read_text()]
    ad = [{"method": LABELS.get(m, m), "quantity": q, **{cols[b]: cell(m, b, q) for b in budgets}}
          for m in methods if m in ADAPTIVE + ("residual_adapter",) for q in ("alpha", "tau")
          if any(summary.get((m, b), {}).get(q) for b in budgets)]
    if ad:
        md, _ = write_table(ad, out / "table_alpha")
        parts += ["**α and τ per cell** (mean ± sample sd over seeds; the residual adapter's α is its val pick)",
                  "",
                  md.read_text()]
    return "\n".join(parts)


def plot_accuracy(summary: dict, budgets: list[str], methods: list[str], n_lab: dict, path: Path,
                  title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.5))
    xs = np.arange(len(budgets))
    for m in methods:
        s = [summary.get((m, "" if m in ONCE else b), {}).get("acc") for b in budgets]
        mean = np.array([np.nan if v is None else v["mean"] for v in s])
        sd = np.array([np.nan if v is None else v["sd"] for v in s])
        ax.errorbar(xs, mean, yerr=np.nan_to_num(sd), marker="o", capsize=3, label=LABELS.get(m, m).replace("*", ""),
                    linewidth=2.5 if m == "path_clip" else 1.2)
    ax.set_xticks(xs, [f"{b}\n(n={n_lab.get(b, 0):g})" for b in budgets], fontsize=8)
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


def _fingerprint(cfg: PathCLIPConfig) -> str:
    """Hash of everything that changes a cell's numbers (not out_dir / run_seeds / tracking)."""
    import hashlib

    from medvlp.finetune.runner import config_dict

    d = config_dict(cfg)
    for k in ("out_dir", "run_seeds", "wait_s", "methods", "bootstrap", "seeds", "shots", "label_fractions"):
        d.get("protocol", {}).pop(k, None)
    d.pop("tracking", None)
    d.get("finetune", {}).pop("out_dir", None)
    return hashlib.sha1(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _load_cell(path: Path, fp: str) -> tuple[dict, dict] | None:
    if not path.is_file():
        return None
    doc = json.loads(path.read_text())
    if doc.get("fingerprint") != fp:
        return None
    return doc["metrics"], {k: np.asarray(v) for k, v in doc["preds"].items()}


def _save_cell(path: Path, fp: str, m: dict, preds: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"fingerprint": fp, "metrics": {k: float(v) for k, v in m.items()},
           "preds": {k: np.asarray(v).astype(int).tolist() for k, v in preds.items() if k != "eval_prob"}}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc))
    tmp.replace(path)


def _check_shards(cfg: PathCLIPConfig) -> None:
    """The stage's declared shards (data.shards) and the forgetting set (protocol.source_shards) are 2D image sets:
    a ShardRequirementError naming the key otherwise, before the checkpoint is loaded or anything is written."""
    import dataclasses

    from medvlp.finetune.registry import stage_spec
    from medvlp.finetune.runner import check_stage_shards

    check_stage_shards(cfg)
    if cfg.protocol.source_shards:  # the same modalities as the stage's declared shards
        need = stage_spec("path-clip").shards
        dataclasses.replace(need, section="protocol", keys=("source_shards",),
                            what="2D images of the source domain").check(cfg, "path-clip")


def run_protocol(cfg: PathCLIPConfig, pretrained: Any = None, command: str = "") -> dict:
    """Run the whole protocol; write OUT/fewshot.md, OUT/fewshot.png, OUT/results.json; return the results.

    Every cell is saved as OUT/cells/METHOD/BUDGET/seedS/cell.json (metrics + predictions) and reused by a later
    run with the same settings, so `protocol.run_seeds` can split the seeds over processes and a last run over
    every seed only gathers the cells and writes the tables."""
    from medvlp.finetune.runner import config_dict
    from medvlp.finetune.sweep import paired_bootstrap_diff
    from medvlp.finetune.path_clip.tower import TowerArms
    from medvlp.pretrain.tracking import Tracker, flatten

    t0 = time.time()
    _check_shards(cfg)
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
    if p.source_shards:
        ctx.load_source(p.source_shards, p.source_split)
    fp = _fingerprint(cfg)
    budgets = budgets_of(cfg)
    seeds = list(p.run_seeds) or list(range(p.seeds))
    needs_tower = any(m in ("full_finetune", "fixmatch") for m in p.methods)
    tower = TowerArms(ctx) if needs_tower or not p.run_seeds else None
    parent = None
    if cfg.tracking.enabled:
        tcfg = dataclasses.replace(cfg.tracking, run_name=cfg.tracking.run_name or "few-shot protocol")
        parent = Tracker(tcfg, 0, flatten(config_dict(cfg))).start()
        parent.set_tags({"medvlp.command": command} if command else {})
    status = "FAILED"
    cells: dict[tuple[str, str, int], tuple[dict, dict]] = {}
    once: dict[str, tuple[dict, dict]] = {}
    if not p.run_seeds:  # the rows without a budget first (a gathering run computes them while others finish)
        zero = run_cell("zero_shot", ctx, None, cfg, 0, out)  # type: ignore[arg-type]
        once = {"zero_shot": zero, **once_cells(ctx, cfg, tower)}
    try:
        tower_methods = [m for m in p.methods if m in ("full_finetune", "fixmatch")]
        head_methods = [m for m in p.methods if m not in tower_methods and m != "zero_shot"]
        drawn: dict[tuple[str, int], Budget] = {}
        for methods in (head_methods, tower_methods):  # the cheap arms of every budget first
            for bname, shots, frac in budgets:
                for seed in seeds:
                    for method in methods:
                        cell_out = out / "cells" / method / bname.replace("%", "pct") / f"seed{seed}"
                        got = _load_cell(cell_out / "cell.json", fp)
                        t_wait = time.time()
                        while got is None and time.time() - t_wait < p.wait_s:  # another process is on it
                            time.sleep(5)
                            got = _load_cell(cell_out / "cell.json", fp)
                        if got is None:
                            if (bname, seed) not in drawn:
                                drawn[(bname, seed)] = draw_budget(ctx, shots, frac, seed, cfg.finetune.views)
                            b = drawn[(bname, seed)]
                            params = {"method": method, "budget": bname, "seed": seed, "n_labelled": len(b.idx)}
                            child = _child(cfg.tracking, parent, f"{method} {bname} seed{seed}", params)
                            tc = time.time()
                            lr = cells.get(("full_finetune", bname, seed), ({}, {}))[0].get("lr")
                            m, preds = run_cell(method, ctx, b, cfg, seed, cell_out, child, tower, lr)
                            m = {**m, "n_labelled": float(len(b.idx)), "seconds": time.time() - tc}
                            _save_cell(cell_out / "cell.json", fp, m, preds)
                            if child is not None:
                                child.end("FINISHED")
                            log.info("%s/%s/seed%d: acc %.3f (%.1fs)", method, bname, seed, m["acc"], m["seconds"])
                            got = (m, preds)
                        cells[(method, bname, seed)] = got
        status = "FINISHED"
    finally:
        if parent is not None and status != "FINISHED":
            parent.end(status)
    if p.run_seeds:  # a share of the seeds: the cells are saved; a run over every seed writes the tables
        if parent is not None:
            parent.end("FINISHED")
        return {"cells": len(cells), "seconds": time.time() - t0, "table": ""}
    source_ref = once["zero_shot"][0].get("source_acc")
    rows = []
    for (method, bname, seed), (m, _) in cells.items():
        r = {"method": method, "budget": bname, "seed": seed, **m}
        if source_ref is not None and "source_acc" in m:
            r["source_drop"] = source_ref - m["source_acc"]
        rows.append(r)
    for method, (m, _) in once.items():
        r = {"method": method, "budget": "", "seed": 0, **m}
        if source_ref is not None and "source_acc" in m:
            r["source_drop"] = source_ref - m["source_acc"]
        rows.append(r)
    summary = summarise(rows)
    y_eval = ctx.eval_split.y_N
    diffs: dict[tuple[str, str], dict] = {}
    names = [b[0] for b in budgets]
    if "path_clip" in p.methods:
        for bname in names:
            a_SN = np.stack([cells[("path_clip", bname, s)][1]["eval"] for s in range(p.seeds)])
            for method in list(p.methods) + ["probe_all", "shortcut_all"]:
                if method == "path_clip":
                    continue
                if method in once:
                    b_SN = np.stack([once[method][1]["eval"]] * p.seeds)
                else:
                    b_SN = np.stack([cells[(method, bname, s)][1]["eval"] for s in range(p.seeds)])
                diffs[(method, bname)] = paired_bootstrap_diff(_acc, y_eval, a_SN, b_SN, n_boot=p.bootstrap)
            if ctx.source is not None and "full_finetune" in p.methods:  # forgetting: Path-CLIP vs full FT on source
                a = np.stack([cells[("path_clip", bname, s)][1]["source"] for s in range(p.seeds)])
                f = np.stack([cells[("full_finetune", bname, s)][1]["source"] for s in range(p.seeds)])
                diffs[("source:full_finetune", bname)] = paired_bootstrap_diff(_acc, ctx.source.y_N, a, f,
                                                                               n_boot=p.bootstrap)
    n_lab = {bn: summary.get((p.methods[-1], bn), {}).get("acc", {}).get("n", 0) and
             float(np.mean([r["n_labelled"] for r in rows if r["budget"] == bn])) for bn in names}
    title = (f"Few-label protocol on `{cfg.data.shards}` ({ctx.task.num_classes} classes: "
             f"{', '.join(ctx.task.class_names)}; eval split `{cfg.data.eval_split}`, N={len(ctx.eval_split)}"
             + (f"; source `{p.source_shards}` [{p.source_split}], N={len(ctx.source)}" if ctx.source else "")
             + f"; {p.seeds} seeds)")
    methods = list(p.methods) + [m for m in ("probe_all", "shortcut_all") if m not in p.methods]
    table = title + "\n\n" + markdown_tables(summary, diffs, names, methods, n_lab, source_ref, out)
    if command:
        table += f"\nMade by `{command}`.\n"
    (out / "fewshot.md").write_text(table)
    plot_accuracy(summary, names, list(p.methods), n_lab, out / "fewshot.png",
                  f"{cfg.data.shards}: accuracy vs label budget")
    result = {"rows": rows, "summary": [{"method": m, "budget": b, **v} for (m, b), v in summary.items()],
              "diffs": [{"arm": m, "budget": b, **d} for (m, b), d in diffs.items()],
              "budgets": names, "methods": methods, "classes": ctx.task.class_names, "source_ref": source_ref,
              "n_eval": len(ctx.eval_split), "seconds": time.time() - t0, "command": command}
    (out / "results.json").write_text(json.dumps(result, indent=1, default=float))
    if parent is not None:
        parent.log_metrics({f"acc/{m}/{b or 'all'}": v["acc"]["mean"] for (m, b), v in summary.items()
                            if "acc" in v and math.isfinite(v["acc"]["mean"])})
        for f in ("fewshot.md", "fewshot.png", "results.json"):
            parent.log_artifact(out / f)
        parent.end("FINISHED")
        result["run_id"] = parent.run_id
    result["table"] = table
    return result
