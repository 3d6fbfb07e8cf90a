"""Evaluation of a CLIP model on held-out shards: zero-shot AUC, retrieval R@K, linear probe, k-shot probe.

    metrics = evaluate(model, data_cfg, eval_cfg, modality="cxr", label_names=None)   # flat {name: float}
    print(format_table(metrics))                                                       # markdown tables
    run_eval("debug", "runs/debug/model.safetensors", "demo_out/shards/cxr", "cxr", EvalConfig(), "runs/debug/eval")
    evaluate_model(load_pretrained("runs/debug").model, "demo_out/shards/cxr", "cxr")          # any loadable model

The eval split is streamed once (no augmentation, no resampling); with `eval.max_samples` > 0 a seeded random,
label-stratified subset of the WHOLE split is embedded (`medvlp.pretrain.zeroshot.choose_keys`), never the first N in
shard order. Images and report texts are embedded in eval mode without gradients; the probe split (train) is
streamed once more, its subset drawn the same way. A split where a label has one class gets a warning naming it.
During training (`evaluate_for_training` before the last step) the metrics are measured on `eval.val_split`; the
final evaluation reads `eval.split` (test) once.
* zero-shot (CLIP, docs/methods.md §1/§3), by the label kind recorded in the shards' index.json (`LabelSpec`):
  single-label → softmax over the class prompts (CLIP's protocol; prompt ensembles over templates), AUC one-vs-rest
  per class plus top-1 / balanced accuracy; multi-label and binary → per finding a positive and a negative prompt
  set, score = softmax(s·cos(img, pos), s·cos(img, neg))[pos] = sigmoid(s·(cos_pos − cos_neg)) with the model's
  learned scale s. Prompts come from the index (the data set's own caption templates), never from the synthetic
  corpus' code. The protocol is printed above the table, logged as the MLflow tag `eval.zeroshot_protocol` and as
  the metric "zeroshot/single_label" (1 / 0). AUC (`sklearn.metrics`) per finding over samples whose label is not
  uncertain (-1), macro mean, BCa bootstrap 95% CIs (`scipy.stats.bootstrap`), and accuracy / sensitivity /
  specificity at per-finding thresholds picked on `eval.val_split` (the ROC point nearest (0, 1) there; not
  reported without a validation split, never picked on the evaluated split). The same images are scored with
  held-out paraphrase prompts too (`zeroshot_para/...`, `zeroshot.PARAPHRASE_*`), reported beside the data set's
  own prompts. The per-sample scores go to eval_scores.npz, which `medvlp runs compare --ci` pairs across runs.
* several runs (training seeds): `medvlp eval --model-dir A B C --out DIR` -> DIR/eval_seeds.md (`seed_rows`:
  mean ± sample sd over runs beside the per-run test-resampling CI, `medvlp.pretrain.sweep`).
* retrieval: image→text and text→image R@1/5/10 over the eval samples' own reports. A candidate counts as correct
  when its report text is *identical* to the query's (templated corpora repeat reports; distinguishing identical
  strings is impossible), which for unique reports is "same index". Ties are pessimistic (see `recall_at_k`).
* probes: logistic regression per finding on frozen image embeddings (train split → eval split; C by
  `LogisticRegressionCV`), and k-shot.

Metric names: "zeroshot/auc/<finding>", "zeroshot/auc_macro", "zeroshot/auc_macro_ci_lo", "retrieval/i2t_r1",
"probe/auc/<finding>", "probe/auc_macro", "kshot/<k>/auc_mean", "kshot/<k>/auc_std", ... (see `format_table`).
Legend: N samples of a split, K findings, E embedding width, B batch.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from medvlp.data_shards.schema import LabelSpec
from medvlp.pretrain import metrics as M
from medvlp.pretrain import zeroshot as Z
from medvlp.pretrain.checkpoint import load_run_config  # noqa: F401 - re-exported (it reads a run folder's config)
from medvlp.pretrain.config import EvalConfig
from medvlp.pretrain.zeroshot import PromptsFn

log = logging.getLogger("medvlp.eval")
RETRIEVAL_KS = (1, 5, 10)


# ----------------------------------------------------------------------------------------------- embedding
@dataclass
class Embedded:
    """One split's frozen embeddings and what came with them."""

    img_NE: np.ndarray  # L2-normalised image embeddings
    txt_NE: np.ndarray | None  # L2-normalised report embeddings (None when texts were not embedded)
    labels_NK: np.ndarray  # 1 / 0 / -1 (uncertain)
    label_names: list[str]
    texts: list[str]
    examples: list[torch.Tensor] = field(default_factory=list)  # the first few images, for figures
    keys: list[str] = field(default_factory=list)  # sample keys, row order


def _image_of(batch: dict, where: str) -> torch.Tensor:
    for k in ("image", "volume"):
        if k in batch:
            return batch[k]
    raise KeyError(f"{where}: batch has no 'image' or 'volume' member (keys: {sorted(batch)})")


def _model_dtype(model: torch.nn.Module) -> torch.dtype:
    p = next(model.parameters(), None)
    return p.dtype if p is not None and p.is_floating_point() else torch.float32


@torch.no_grad()
def embed_split(model, data_cfg, *, split: str, max_samples: int, device, batch_size: int = 64,
                with_text: bool = True, n_examples: int = 0, loader_fn: Callable | None = None,
                shards: str | None = None, keys: set[str] | None = None) -> Embedded:
    """Stream `split` once (train=False) and embed its images (and report texts). `max_samples` <= 0: no limit.

    `shards` None = the loader's eval choice (data.val_shards, else data.train_shards). `keys`: embed only the
    samples with these keys (the chosen subset; None = all)."""
    if loader_fn is None:
        from medvlp.data_shards.stream import make_loader as loader_fn
    cfg = dataclasses.replace(data_cfg, batch_size=batch_size, augment=False)
    where = f"{shards or getattr(cfg, 'val_shards', '') or getattr(cfg, 'train_shards', '')} [{split}]"
    dtype = _model_dtype(model)
    imgs, txts, labels, texts, examples, all_keys = [], [], [], [], [], []
    names: list[str] | None = None
    n = 0
    extra = {"shards": shards} if shards else {}
    from medvlp.pretrain.progress import progress_bar  # a bar on a terminal, plain lines off it
    bar = progress_bar(total=len(keys) if keys is not None else (max_samples if max_samples > 0 else None),
                       desc=f"embed {split}", unit="sample", leave=False)
    for batch in loader_fn(cfg, rank=0, world_size=1, tokenizer=None, train=False, split=split, **extra):
        x = _image_of(batch, where)
        b_keys = [str(k) for k in batch.get("key", [f"{split}/{n + i}" for i in range(x.shape[0])])]
        if keys is not None:  # the chosen subset: keep its rows of this batch
            rows = [i for i, k in enumerate(b_keys) if k in keys]
            if not rows:
                continue
            if len(rows) < len(b_keys):
                sel = torch.tensor(rows, dtype=torch.long)
                batch = {**batch, "labels": batch["labels"][sel] if batch.get("labels") is not None else None,
                         "text": [batch["text"][i] for i in rows] if "text" in batch else None}
                batch = {k: v for k, v in batch.items() if v is not None}
                x, b_keys = x[sel], [b_keys[i] for i in rows]
        take = x.shape[0] if max_samples <= 0 else min(x.shape[0], max_samples - n)
        if take <= 0:
            break
        b_names = list(batch.get("label_names") or [])
        if names is None:
            names = b_names
        elif b_names != names:
            raise ValueError(f"{where}: label names changed between batches ({names} vs {b_names}, keys "
                             f"{b_keys[:3]})")
        x = x[:take]
        all_keys.extend(b_keys[:take])
        if len(examples) < n_examples:
            examples.extend(x[: n_examples - len(examples)].cpu())
        imgs.append(model.encode_image(x.to(device, dtype=dtype if x.is_floating_point() else None),
                                       normalize=True).float().cpu())
        batch_texts = list(batch.get("text", [""] * take))[:take]
        texts.extend(batch_texts)
        if with_text:
            txts.append(encode_texts(model, batch_texts, device, batch_size))
        lab = batch.get("labels")
        labels.append(lab[:take].float().cpu() if lab is not None else torch.zeros(take, 0))
        n += take
        bar.update(take)
    bar.close()
    if n == 0:
        raise ValueError(f"{where}: the split yielded no samples (is it empty, or the split name wrong?)")
    return Embedded(img_NE=torch.cat(imgs).numpy(), txt_NE=torch.cat(txts).numpy() if with_text else None,
                    labels_NK=torch.cat(labels).numpy(), label_names=names or [], texts=texts, examples=examples,
                    keys=all_keys)


# ----------------------------------------------------------------------------------------------- zero-shot
def default_prompts(finding: str) -> tuple[list[str], list[str]]:
    """"X." vs "No X." from the label name (underscores read as spaces)."""
    return LabelSpec.infer([finding]).positive_prompts(finding), LabelSpec.infer([finding]).negative_prompts(finding)


def corpus_prompts_fn() -> PromptsFn | None:
    """None: prompts now travel with the data (index.json["labels"], read by `evaluate_detailed`). Kept so that
    callers passing `prompts_fn=corpus_prompts_fn()` get the index's prompts."""
    return None


@torch.no_grad()
def prompt_embeddings(model, label_names: Sequence[str], modality: str, prompts_fn: PromptsFn | None, device,
                      batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(pos_KE, neg_KE) of the pair protocol: per finding the renormalised mean of its L2-normalised prompt
    embeddings (`prompts_fn`, else "X." / "No X.")."""
    return Z.pair_embeddings(model, LabelSpec.infer(list(label_names)), label_names, modality, prompts_fn, device,
                             batch_size)


zero_shot_scores = Z.pair_scores
model_scale = Z.model_scale
encode_texts = Z.encode_texts


def zero_shot_metrics(labels_NK: np.ndarray, score_NK: np.ndarray, names: Sequence[str], n_boot: int,
                      seed: int, thresholds_K: Sequence[float] | None = None,
                      prefix: str = "zeroshot") -> dict[str, float]:
    """AUC (+ CI, counts) per finding and macro AUC (+ CI); accuracy / sensitivity / specificity at
    `thresholds_K` (operating points picked on a validation split, `val_thresholds`; None = not reported: a
    threshold picked on the evaluated split itself would flatter it) and their macro means."""
    out: dict[str, float] = {}
    ops = []
    for k, name in enumerate(names):
        y, s = labels_NK[:, k], score_NK[:, k]
        out[f"{prefix}/n_pos/{name}"] = float((y == 1).sum())
        out[f"{prefix}/n_neg/{name}"] = float((y == 0).sum())
        auc = M.roc_auc(y, s, warn=False)
        lo, hi = M.bootstrap_ci(M.roc_auc, y, s, n=n_boot, seed=seed) if math.isfinite(auc) else (math.nan,) * 2
        out.update({f"{prefix}/auc/{name}": auc, f"{prefix}/auc_ci_lo/{name}": lo, f"{prefix}/auc_ci_hi/{name}": hi})
        if thresholds_K is not None:
            op = M.at_threshold(y, s, thresholds_K[k])
            ops.append(op)
            out.update({f"{prefix}/acc/{name}": op["accuracy"], f"{prefix}/sens/{name}": op["sensitivity"],
                        f"{prefix}/spec/{name}": op["specificity"], f"{prefix}/threshold/{name}": op["threshold"]})
    out[f"{prefix}/auc_macro"] = M.macro_auc(labels_NK, score_NK)
    lo, hi = M.bootstrap_ci(M.macro_auc, labels_NK, score_NK, n=n_boot, seed=seed)
    out[f"{prefix}/auc_macro_ci_lo"], out[f"{prefix}/auc_macro_ci_hi"] = lo, hi
    if thresholds_K is not None:
        for short, key in (("acc", "accuracy"), ("sens", "sensitivity"), ("spec", "specificity")):
            vals = [o[key] for o in ops if math.isfinite(o[key])]
            out[f"{prefix}/{short}_macro"] = float(np.mean(vals)) if vals else math.nan
    return out


def val_thresholds(labels_NK: np.ndarray, score_NK: np.ndarray) -> list[float]:
    """Per finding the threshold of the ROC point nearest (0, 1) on a validation split (NaN: one class there)."""
    return [M.operating_point(labels_NK[:, k], score_NK[:, k])["threshold"] for k in range(labels_NK.shape[1])]


# ----------------------------------------------------------------------------------------------- retrieval
def retrieval_metrics(img_NE: np.ndarray, txt_NE: np.ndarray, texts: Sequence[str]) -> tuple[dict, np.ndarray]:
    """R@1/5/10 both ways (identical report texts count as correct); also returns sim_NN (image rows)."""
    sim_NN = img_NE @ txt_NE.T
    _, inv = np.unique(np.asarray(texts, dtype=object).astype(str), return_inverse=True)
    same_NN = inv[:, None] == inv[None, :]
    i2t = M.recall_at_k(sim_NN, same_NN, RETRIEVAL_KS)
    t2i = M.recall_at_k(sim_NN.T, same_NN.T, RETRIEVAL_KS)
    out = {f"retrieval/i2t_r{k}": v for k, v in i2t.items()}
    out.update({f"retrieval/t2i_r{k}": v for k, v in t2i.items()})
    out["retrieval/n"] = float(len(texts))
    out["retrieval/unique_texts"] = float(inv.max() + 1 if len(inv) else 0)
    return out, sim_NN


# ----------------------------------------------------------------------------------------------- driver
@dataclass
class EvalReport:
    """Everything an evaluation produced: the flat metrics and the arrays the figures are drawn from."""

    metrics: dict[str, float]
    label_names: list[str]
    labels_NK: np.ndarray | None = None
    zs_score_NK: np.ndarray | None = None
    sim_NN: np.ndarray | None = None
    texts: list[str] = field(default_factory=list)
    examples: list[torch.Tensor] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)  # sample keys of the rows (pairs runs in `runs compare --ci`)
    protocol: str = ""  # the zero-shot protocol line (printed above the table, logged as a tag)
    split: str = ""


def _probe_metrics(model, data_cfg, eval_cfg: EvalConfig, ev: Embedded, device, max_samples: int,
                   loader_fn) -> dict[str, float]:
    out: dict[str, float] = {}
    shards = getattr(data_cfg, "train_shards", "") or None
    try:
        # the probes fit on the training shards even when the metrics are measured on separate val_shards; the
        # probe set is a seeded, stratified draw from the whole probe split
        chosen, _, _ = Z.choose_keys(data_cfg, eval_cfg.probe_split, max_samples, eval_cfg.seed,
                                     loader_fn=loader_fn, shards=shards, batch_size=eval_cfg.batch_size)
        tr = embed_split(model, data_cfg, split=eval_cfg.probe_split, max_samples=max_samples if chosen is None else 0,
                         device=device, batch_size=eval_cfg.batch_size, with_text=False, loader_fn=loader_fn,
                         shards=shards, keys=chosen)
    except ValueError as e:
        warnings.warn(f"probes skipped: {e}", RuntimeWarning, stacklevel=2)
        return out
    if tr.label_names != ev.label_names:
        if set(ev.label_names) - set(tr.label_names):
            raise ValueError(f"probe split {eval_cfg.probe_split!r} has findings {tr.label_names}, eval split has "
                             f"{ev.label_names}")
        tr.labels_NK = tr.labels_NK[:, [tr.label_names.index(n) for n in ev.label_names]]
    out["probe/n_train"] = float(len(tr.img_NE))
    if eval_cfg.linear_probe:
        res = M.linear_probe(tr.img_NE, tr.labels_NK, ev.img_NE, ev.labels_NK, ev.label_names,
                             C=eval_cfg.probe_C or None, seed=eval_cfg.seed)
        out.update({f"probe/auc/{k}": v for k, v in res["auc"].items()})
        out["probe/auc_macro"] = res["auc_macro"]
    if eval_cfg.kshot:
        res = M.kshot_probe(tr.img_NE, tr.labels_NK, ev.img_NE, ev.labels_NK, ev.label_names, ks=eval_cfg.kshot,
                            n_seeds=eval_cfg.kshot_seeds, seed=eval_cfg.seed, C=eval_cfg.kshot_C)
        for k, r in res.items():
            if r["skipped"]:
                log.info("k-shot k=%d: findings without %d positives and %d negatives: %s", k, k, k, r["skipped"])
            out.update({f"kshot/{k}/auc_mean": r["auc_mean"], f"kshot/{k}/auc_std": r["auc_std"],
                        f"kshot/{k}/n_findings": float(r["n_findings"])})
    return out


def _val_scores(model, data_cfg, eval_cfg: EvalConfig, spec: LabelSpec, names: list[str], modality: str, device,
                prompts_fn, split: str, limit: int, loader_fn) -> tuple[np.ndarray, np.ndarray] | None:
    """(labels_NK, zero-shot scores) of `eval_cfg.val_split` for picking operating points; None (with a warning)
    when there is no validation split. Evaluating the validation split itself picks them there."""
    val_split = getattr(eval_cfg, "val_split", "") or ""
    if not val_split:
        warnings.warn("no eval.val_split: accuracy / sensitivity / specificity are not reported (their threshold "
                      "would be picked on the evaluated split)", RuntimeWarning, stacklevel=3)
        return None
    try:
        chosen, _, _ = Z.choose_keys(data_cfg, val_split, limit, eval_cfg.seed, loader_fn=loader_fn,
                                     batch_size=eval_cfg.batch_size)
        ev = embed_split(model, data_cfg, split=val_split, max_samples=limit if chosen is None else 0,
                         device=device, batch_size=eval_cfg.batch_size, with_text=False, loader_fn=loader_fn,
                         keys=chosen)
    except (ValueError, FileNotFoundError) as e:
        warnings.warn(f"validation split {val_split!r} unavailable ({e}): accuracy / sensitivity / specificity are "
                      "not reported (their threshold would be picked on the evaluated split)", RuntimeWarning,
                      stacklevel=3)
        return None
    missing = [n for n in names if n not in ev.label_names]
    if missing:
        warnings.warn(f"validation split {val_split!r} lacks {missing}: no operating points", RuntimeWarning,
                      stacklevel=3)
        return None
    labels = ev.labels_NK[:, [ev.label_names.index(n) for n in names]]
    scores, _ = Z.zero_shot(model, ev.img_NE, spec, names, modality, device, prompts_fn, eval_cfg.batch_size)
    return labels, scores


def evaluate_detailed(model, data_cfg, eval_cfg: EvalConfig | None = None, *, modality: str | None = None,
                      label_names: Sequence[str] | None = None, prompts_fn: PromptsFn | None = None,
                      device="cpu", max_samples: int | None = None, loader_fn: Callable | None = None,
                      label_spec: LabelSpec | None = None, split: str | None = None) -> EvalReport:
    """`evaluate`, returning the arrays behind the numbers too (for ROC / retrieval figures).

    `label_spec` None = the shards' index.json["labels"] (inferred multi-label when absent); `split` None =
    `eval_cfg.split`."""
    eval_cfg = eval_cfg or EvalConfig()
    modality = modality or getattr(data_cfg, "modality", "cxr")
    limit = eval_cfg.max_samples if max_samples is None else max_samples
    split = split or eval_cfg.split
    spec_in = label_spec if label_spec is not None else Z.shard_label_spec(data_cfg)
    was_training = model.training
    model.eval()
    try:
        chosen, _, _ = Z.choose_keys(data_cfg, split, limit, eval_cfg.seed, loader_fn=loader_fn,
                                     batch_size=eval_cfg.batch_size)
        ev = embed_split(model, data_cfg, split=split, max_samples=limit if chosen is None else 0, device=device,
                         batch_size=eval_cfg.batch_size, with_text=eval_cfg.retrieval,
                         n_examples=eval_cfg.retrieval_examples, loader_fn=loader_fn, keys=chosen)
        if label_names is not None and list(label_names) != ev.label_names:
            if ev.label_names and set(label_names) - set(ev.label_names):
                raise ValueError(f"label_names {list(label_names)} are not all in the split's {ev.label_names}")
            if ev.label_names:  # evaluate the requested subset, in the requested order
                cols = [ev.label_names.index(n) for n in label_names]
                ev.labels_NK = ev.labels_NK[:, cols]
            ev.label_names = list(label_names)
        metrics: dict[str, float] = {"eval/n_samples": float(len(ev.img_NE))}
        report = EvalReport(metrics, ev.label_names, labels_NK=ev.labels_NK, texts=ev.texts, examples=ev.examples,
                            keys=ev.keys, split=split)
        has_labels = len(ev.label_names) > 0 and ev.labels_NK.shape[1] == len(ev.label_names)
        if eval_cfg.zero_shot and has_labels:
            spec = Z.resolve_spec(spec_in, ev.label_names)
            report.zs_score_NK, report.protocol = Z.zero_shot(model, ev.img_NE, spec, ev.label_names, modality,
                                                              device, prompts_fn, eval_cfg.batch_size)
            log.info("zero-shot protocol: %s", report.protocol)
            metrics["zeroshot/single_label"] = float(spec.kind == "single-label")
            if split == (getattr(eval_cfg, "val_split", "") or None):  # evaluating validation itself
                val = (ev.labels_NK, report.zs_score_NK)
            else:
                val = _val_scores(model, data_cfg, eval_cfg, spec, ev.label_names, modality, device, prompts_fn,
                                  split, limit, loader_fn)
            thresholds = val_thresholds(*val) if val is not None else None
            metrics["zeroshot/op_from_val"] = float(val is not None)
            metrics.update(zero_shot_metrics(ev.labels_NK, report.zs_score_NK, ev.label_names, eval_cfg.bootstrap,
                                             eval_cfg.seed, thresholds))
            if spec.kind == "single-label":
                metrics.update(Z.single_label_metrics(ev.labels_NK, report.zs_score_NK))
            para = Z.paraphrase_spec(spec)
            para_NK, _ = Z.zero_shot(model, ev.img_NE, para, ev.label_names, modality, device, None,
                                     eval_cfg.batch_size)
            metrics.update(zero_shot_metrics(ev.labels_NK, para_NK, ev.label_names, eval_cfg.bootstrap, eval_cfg.seed,
                                             prefix="zeroshot_para"))
        elif eval_cfg.zero_shot:
            warnings.warn("zero-shot skipped: the eval split has no labels", RuntimeWarning, stacklevel=2)
        if eval_cfg.retrieval:
            r, report.sim_NN = retrieval_metrics(ev.img_NE, ev.txt_NE, ev.texts)
            metrics.update(r)
        from medvlp.pretrain import retrieval as R  # CIs + chance, label-group zero-shot (real captions)
        metrics.update(R.real_caption_metrics(model, ev, data_cfg, eval_cfg, device=device, split=split,
                                              sim_NN=report.sim_NN))
        if (eval_cfg.linear_probe or eval_cfg.kshot) and has_labels:
            metrics.update(_probe_metrics(model, data_cfg, eval_cfg, ev, device, limit, loader_fn))
    finally:
        model.train(was_training)
    return report


def evaluate(model, data_cfg, eval_cfg: EvalConfig | None = None, *, modality: str | None = None,
             label_names: Sequence[str] | None = None, prompts_fn: PromptsFn | None = None, device="cpu",
             max_samples: int | None = None, loader_fn: Callable | None = None) -> dict[str, float]:
    """Zero-shot, retrieval and probe metrics of `model` on `data_cfg`'s `eval_cfg.split` as a flat dict.

    `label_names` None = the split's own; `prompts_fn(modality, finding) -> (pos, neg)` None = "X." / "No X.".
    `loader_fn` defaults to `medvlp.data_shards.stream.make_loader` (same signature). `max_samples` overrides
    `eval_cfg.max_samples` (<= 0: the whole split).
    """
    return evaluate_detailed(model, data_cfg, eval_cfg, modality=modality, label_names=label_names,
                             prompts_fn=prompts_fn, device=device, max_samples=max_samples,
                             loader_fn=loader_fn).metrics


# ----------------------------------------------------------------------------------------------- tables
def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    if not math.isfinite(f):
        return "n/a"
    return str(int(f)) if f.is_integer() and abs(f) >= 2 else f"{f:.3f}"


def _int(v: Any) -> str:
    """Counts print as integers."""
    return "n/a" if _fmt(v) == "n/a" else str(int(float(v)))


def _ci(m: dict, lo_key: str, hi_key: str) -> str:
    lo, hi = m.get(lo_key), m.get(hi_key)
    return "n/a" if _fmt(lo) == "n/a" or _fmt(hi) == "n/a" else f"[{_fmt(lo)}, {_fmt(hi)}]"


def protocol_line(metrics: dict[str, Any], protocol: str = "") -> str:
    """The zero-shot protocol in words, from `protocol` or from the "zeroshot/single_label" metric."""
    if protocol:
        return f"Zero-shot protocol: {protocol}."
    flag = metrics.get("zeroshot/single_label")
    if flag is None:
        return ""
    return ("Zero-shot protocol: single-label: softmax over the class prompts (CLIP)." if float(flag) == 1.0 else
            "Zero-shot protocol: multi-label: per finding, softmax over its positive / negative prompt pair.")


def prompts_line(metrics: dict[str, Any]) -> str:
    """What the prompt columns and the operating points mean (empty without zero-shot metrics)."""
    if not any(k.startswith("zeroshot/auc/") for k in metrics):
        return ""
    op = metrics.get("zeroshot/op_from_val")
    where = ("acc / sens / spec at per-finding thresholds picked on the validation split (ROC point nearest "
             "(0, 1)), applied unchanged here" if op is not None and float(op) == 1.0 else
             "acc / sens / spec not reported (no validation split to pick their thresholds on)")
    return ("Prompts: zero-shot AUC = the data set's own prompts (index.json; for the synthetic corpora its report "
            "sentences, i.e. in-distribution wording); held-out prompts = generic paraphrases never used as "
            f"captions (medvlp.pretrain.zeroshot.PARAPHRASE_*). {where[0].upper() + where[1:]}.")


def format_table(metrics: dict[str, Any], protocol: str = "") -> str:
    """Markdown tables of a flat metrics dict: the zero-shot protocol line, zero-shot per finding (+ probe AUC),
    retrieval, k-shot, the rest.

    Deterministic: findings in sorted order with the macro row last, k ascending, other keys sorted.
    """
    m = dict(metrics)
    used: set[str] = {"zeroshot/single_label", "zeroshot/op_from_val"}
    parts = []
    line = protocol_line(m, protocol)
    if line:
        parts.append(line)
    note = prompts_line(m)
    if note:
        parts.append(note)
    findings = sorted({k.split("/", 2)[2] for k in m if k.startswith(("zeroshot/auc/", "probe/auc/"))})
    if findings:
        rows = ["| finding | zero-shot AUC | 95% CI | held-out prompts AUC | 95% CI | acc | sens | spec | pos/neg | "
                "probe AUC |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for f in findings:
            keys = [f"zeroshot/{x}/{f}" for x in ("auc", "auc_ci_lo", "auc_ci_hi", "acc", "sens", "spec", "n_pos",
                                                  "n_neg", "threshold")] + [f"probe/auc/{f}"]
            para = [f"zeroshot_para/{x}/{f}" for x in ("auc", "auc_ci_lo", "auc_ci_hi", "n_pos", "n_neg")]
            used.update(keys + para)
            pn = (f"{_int(m.get(keys[6]))}/{_int(m.get(keys[7]))}" if keys[6] in m else "n/a")
            rows.append(f"| {f} | {_fmt(m.get(keys[0]))} | {_ci(m, keys[1], keys[2])} | {_fmt(m.get(para[0]))} | "
                        f"{_ci(m, para[1], para[2])} | {_fmt(m.get(keys[3]))} | {_fmt(m.get(keys[4]))} | "
                        f"{_fmt(m.get(keys[5]))} | {pn} | {_fmt(m.get(keys[9]))} |")
        macro = ["zeroshot/auc_macro", "zeroshot/auc_macro_ci_lo", "zeroshot/auc_macro_ci_hi", "zeroshot/acc_macro",
                 "zeroshot/sens_macro", "zeroshot/spec_macro", "probe/auc_macro"]
        pmacro = ["zeroshot_para/auc_macro", "zeroshot_para/auc_macro_ci_lo", "zeroshot_para/auc_macro_ci_hi"]
        used.update(macro + pmacro)
        rows.append(f"| **macro** | {_fmt(m.get(macro[0]))} | {_ci(m, macro[1], macro[2])} | "
                    f"{_fmt(m.get(pmacro[0]))} | {_ci(m, pmacro[1], pmacro[2])} | {_fmt(m.get(macro[3]))} | "
                    f"{_fmt(m.get(macro[4]))} | {_fmt(m.get(macro[5]))} |  | {_fmt(m.get(macro[6]))} |")
        parts.append("\n".join(rows))
    if any(k.startswith("retrieval/") for k in m):
        rows = ["| retrieval | " + " | ".join(f"R@{k}" for k in RETRIEVAL_KS) + " |",
                "| --- |" + " --- |" * len(RETRIEVAL_KS)]
        for d, label in (("i2t", "image → text"), ("t2i", "text → image")):
            keys = [f"retrieval/{d}_r{k}" for k in RETRIEVAL_KS]
            used.update(keys)
            rows.append(f"| {label} | " + " | ".join(_fmt(m.get(k)) for k in keys) + " |")
        parts.append("\n".join(rows))
    ks = sorted({int(k.split("/")[1]) for k in m if k.startswith("kshot/") and k.split("/")[1].isdigit()})
    if ks:
        rows = ["| k-shot (k pos + k neg) | AUC mean ± std | findings |", "| --- | --- | --- |"]
        for k in ks:
            keys = [f"kshot/{k}/auc_mean", f"kshot/{k}/auc_std", f"kshot/{k}/n_findings"]
            used.update(keys)
            mean, std = _fmt(m.get(keys[0])), _fmt(m.get(keys[1]))
            val = "skipped (too few samples)" if mean == "n/a" else f"{mean} ± {std}"
            rows.append(f"| {k} | {val} | {_int(m.get(keys[2]))} |")
        parts.append("\n".join(rows))
    from medvlp.pretrain.retrieval import format_tables as real_caption_tables
    table, shown = real_caption_tables(m)
    used.update(shown)
    parts += [table] if table else []
    rest = sorted(k for k in m if k not in used)
    if rest:
        parts.append("\n".join(["| metric | value |", "| --- | --- |"] + [f"| {k} | {_fmt(m[k])} |" for k in rest]))
    return "\n\n".join(parts)


# ----------------------------------------------------------------------------------------------- outputs
def write_outputs(report: EvalReport, out_dir: str | Path, n_examples: int = 4, tracker=None,
                  step: int | None = None) -> dict[str, Path]:
    """eval_table.md, eval_metrics.json, roc.png, retrieval_examples.png in `out_dir`; logged when a tracker is
    given (metrics at `step`, files under the artifact folder "eval")."""
    from medvlp.pretrain import plots

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"table": out / "eval_table.md", "metrics": out / "eval_metrics.json"}
    files["table"].write_text(format_table(report.metrics, report.protocol) + "\n")
    clean = {k: (v if math.isfinite(v) else None) for k, v in sorted(report.metrics.items())}
    files["metrics"].write_text(json.dumps(clean, indent=1) + "\n")
    if report.zs_score_NK is not None and report.keys and len(report.keys) == len(report.zs_score_NK):
        files["scores"] = out / "eval_scores.npz"
        np.savez_compressed(files["scores"], keys=np.asarray(report.keys, dtype=str),
                            labels=np.asarray(report.labels_NK, dtype=np.float32),
                            scores=np.asarray(report.zs_score_NK, dtype=np.float64),
                            label_names=np.asarray(report.label_names, dtype=str),
                            protocol=np.asarray(report.protocol), split=np.asarray(report.split))
    if report.zs_score_NK is not None and report.label_names:
        curves = {n: (report.labels_NK[:, k], report.zs_score_NK[:, k]) for k, n in enumerate(report.label_names)}
        files["roc"] = plots.roc_png(curves, out / "roc.png")
    if report.sim_NN is not None and report.examples and n_examples > 0:
        q = min(n_examples, len(report.examples))
        topk = np.argsort(-report.sim_NN[:q], axis=1, kind="stable")[:, :3]
        files["retrieval"] = plots.retrieval_examples_png(report.examples[:q], report.texts, topk,
                                                          out / "retrieval_examples.png", gt_texts=report.texts[:q])
    if tracker is not None:
        tracker.log_metrics(report.metrics, step)
        if report.protocol:
            tracker.set_tags({"eval.zeroshot_protocol": report.protocol, "eval.split": report.split})
        for p in files.values():
            tracker.log_artifact(str(p), "eval")
    return files


def evaluate_for_training(module, cfg, *, device="cpu", out_dir: str | Path = ".", tracker=None,
                          step: int | None = None, final: bool | None = None) -> dict[str, float]:
    """The training loop's hook: evaluate `module` per `cfg.eval` on `cfg.data`, write OUT_DIR/eval/*, log it.

    Periodic evaluations (`final` False; None = "step is before train.steps") measure on `eval.val_split`, so the
    test split is read once, by the final evaluation (`eval.split`)."""
    steps = getattr(getattr(cfg, "train", None), "steps", None)
    if final is None:
        final = step is None or steps is None or step >= steps
    split = cfg.eval.split
    if not final and getattr(cfg.eval, "val_split", ""):
        index = Z._index_of(cfg.data, None)
        if index is None or (index.get("splits") or {}).get(cfg.eval.val_split, 0) > 0:
            split = cfg.eval.val_split
        else:
            log.warning("eval.val_split %r has no samples; the periodic evaluation uses %r", cfg.eval.val_split,
                        split)
    report = evaluate_detailed(module, cfg.data, cfg.eval, modality=cfg.data.modality, device=device, split=split)
    write_outputs(report, Path(out_dir) / "eval", cfg.eval.retrieval_examples, tracker, step)
    return report.metrics


def run_eval(model_name: str, state_dict_path: str | Path, shards: str, modality: str,
             eval_cfg: EvalConfig | None = None, out_dir: str | Path = "eval_out", *, data_cfg=None,
             tokenizer: str = "", device: str = "cpu", max_samples: int | None = None,
             loader_fn: Callable | None = None, model_cfg=None, loss_cfg=None) -> dict[str, float]:
    """Build model `model_name` with the weights at `state_dict_path`, evaluate it on `shards` and write
    eval_table.md, eval_metrics.json, roc.png and retrieval_examples.png into `out_dir`. Returns the metrics.

    `model_cfg` / `loss_cfg` (optional) are the run's own, for architectures whose build depends on them (a SigLIP
    run's logit bias); `model_name`, `tokenizer` and the weights path override their fields."""
    from medvlp.pretrain.config import ModelConfig
    from medvlp.pretrain.model import build_model

    if not Path(state_dict_path).is_file():
        raise FileNotFoundError(f"model weights {state_dict_path} not found")
    model_cfg = dataclasses.replace(model_cfg or ModelConfig(), name=model_name, tokenizer=tokenizer,
                                    checkpoint=str(state_dict_path), grad_checkpointing=False)
    model = build_model(model_cfg, loss_cfg) if loss_cfg is not None else build_model(model_cfg)
    return evaluate_model(model, shards, modality, eval_cfg, out_dir, data_cfg=data_cfg, device=device,
                          max_samples=max_samples, loader_fn=loader_fn)


def evaluate_model(model, shards: str, modality: str, eval_cfg: EvalConfig | None = None,
                   out_dir: str | Path = "eval_out", *, data_cfg=None, device: str = "cpu",
                   max_samples: int | None = None, loader_fn: Callable | None = None) -> dict[str, float]:
    """Evaluate a built model (e.g. `load_pretrained(...).model`) on `shards` (or `data_cfg`) and write the
    tables and figures into `out_dir`. Returns the metrics."""
    from medvlp.data_shards.config import DataConfig

    model.to(device)
    model_name = getattr(model, "name", "model")
    if data_cfg is None:
        size = model.image_size
        data_cfg = DataConfig(train_shards=str(shards), modality=modality,
                              image_size=size if isinstance(size, int) else DataConfig.image_size,
                              volume_size=None if isinstance(size, int) else list(size))
    elif shards:
        data_cfg = dataclasses.replace(data_cfg, train_shards=str(shards), val_shards="")
    size = getattr(model, "image_size", None)
    if isinstance(size, int) and data_cfg.image_size != size:  # the towers have fixed position embeddings
        warnings.warn(f"data.image_size {data_cfg.image_size} != model {model_name!r} input size {size}; "
                      f"evaluating at {size}", RuntimeWarning, stacklevel=2)
        data_cfg = dataclasses.replace(data_cfg, image_size=size)
    eval_cfg = eval_cfg or EvalConfig()
    report = evaluate_detailed(model, data_cfg, eval_cfg, modality=modality, prompts_fn=corpus_prompts_fn(),
                               device=device, max_samples=max_samples, loader_fn=loader_fn)
    write_outputs(report, out_dir, eval_cfg.retrieval_examples)
    return report.metrics


# ----------------------------------------------------------------------------------------------- `medvlp eval`
def run_eval_cli(a) -> int:
    """`medvlp eval --model-dir PATH [PATH ...] [--step N] [--shards DIR] [--split S] [--out DIR]
    [--set eval.k=v|data.k=v]`.

    PATH: a run folder (final weights or latest COMPLETE checkpoint, or `--step`), a `model.safetensors` with its
    config beside it, or an exported folder (see `pretrain.load_pretrained`). Several PATHs (runs of one recipe
    with different training seeds) are evaluated one by one into OUT/run<i>_<name>/ and summarised in
    OUT/eval_seeds.md / .csv: per finding the mean ± sample sd over runs (`medvlp.pretrain.sweep`) beside the
    per-run test-resampling CI; `--out` is then required."""
    import sys

    dirs = [str(d) for d in (a.model_dir if isinstance(a.model_dir, (list, tuple)) else [a.model_dir])]
    if len(dirs) == 1:
        return _eval_one(dirs[0], a, getattr(a, "out", None))[0]
    if not getattr(a, "out", None):
        print("error: --out: needed with several --model-dir runs (per-run tables and eval_seeds.md go there)",
              file=sys.stderr)
        return 2
    for d in dirs:
        if not Path(d).exists():
            print(f"error: {d}: no such file or folder", file=sys.stderr)
            return 2
    results = []
    for i, d in enumerate(dirs):
        p = Path(d)
        name = "".join(c if c.isalnum() or c in "-_." else "_" for c in (p.parent.name if p.is_file() else p.name))
        rc, metrics = _eval_one(d, a, Path(a.out) / f"run{i}_{name}")
        if rc:
            return rc
        results.append((d, metrics))
    text = write_seed_table(results, a.out)
    print("\n" + text)
    return 0


def seed_rows(results: Sequence[tuple[str, dict[str, float]]]) -> list[dict[str, Any]]:
    """Per finding (then macro): zero-shot AUC mean ± sample sd over the runs, the t-CI of that mean, the range,
    the mean per-run test-resampling 95% CI, and the held-out-prompt and probe AUCs (mean ± sd)."""
    from medvlp.pretrain.sweep import pm, seed_summary

    ms = [m for _, m in results]
    findings = sorted({k.split("/", 2)[2] for m in ms for k in m if k.startswith("zeroshot/auc/")})
    rows = []
    for f, auc, lo, hi, para, probe in [(f, f"zeroshot/auc/{f}", f"zeroshot/auc_ci_lo/{f}", f"zeroshot/auc_ci_hi/{f}",
                                         f"zeroshot_para/auc/{f}", f"probe/auc/{f}") for f in findings] + [
            ("macro", "zeroshot/auc_macro", "zeroshot/auc_macro_ci_lo", "zeroshot/auc_macro_ci_hi",
             "zeroshot_para/auc_macro", "probe/auc_macro")]:
        vals = [float(m.get(auc, math.nan)) for m in ms]
        s = seed_summary(vals)
        fin = [v for v in vals if math.isfinite(v)]
        los = [float(m.get(lo, math.nan)) for m in ms]
        his = [float(m.get(hi, math.nan)) for m in ms]
        ci_w = [h - l for l, h in zip(los, his) if math.isfinite(l) and math.isfinite(h)]
        rows.append({"finding": f, "runs": s["n"],
                     "zero-shot AUC (mean ± sd over runs)": pm(s) if s["n"] else "n/a",
                     "95% CI of the mean (t, over runs)": (f"[{s['ci_lo']:.3f}, {s['ci_hi']:.3f}]"
                                                           if math.isfinite(s["ci_lo"]) else "n/a"),
                     "range over runs": f"{min(fin):.3f}-{max(fin):.3f}" if fin else "n/a",
                     "test-resampling 95% CI width (mean per run)": float(np.mean(ci_w)) if ci_w else math.nan,
                     "held-out prompts AUC": pm(seed_summary([float(m.get(para, math.nan)) for m in ms])),
                     "probe AUC": pm(seed_summary([float(m.get(probe, math.nan)) for m in ms]))})
    return rows


def spread_line(results: Sequence[tuple[str, dict[str, float]]]) -> str:
    """One line: how far the zero-shot AUC of the most seed-sensitive finding moves between runs."""
    rows = [r for r in seed_rows(results) if r["finding"] != "macro" and r["range over runs"] != "n/a"]
    if len(results) < 2 or not rows:
        return ""

    def width(r):
        lo, hi = (float(x) for x in r["range over runs"].split("-"))
        return hi - lo
    worst = max(rows, key=width)
    return (f"Between {len(results)} training runs the zero-shot AUC moves most for {worst['finding']}: "
            f"{worst['range over runs']} ({worst['zero-shot AUC (mean ± sd over runs)']}), against a mean "
            f"test-resampling 95% CI width of {worst['test-resampling 95% CI width (mean per run)']:.3f} per run.")


def write_seed_table(results: Sequence[tuple[str, dict[str, float]]], out_dir: str | Path) -> str:
    """OUT/eval_seeds.md / .csv (`seed_rows`) with the runs listed and the spread line; returns the Markdown."""
    from medvlp.pretrain.sweep import write_table

    md, _ = write_table(seed_rows(results), Path(out_dir) / "eval_seeds")
    head = ("Across runs (training seeds): mean ± sample sd over runs (`medvlp.pretrain.sweep`); the test-resampling "
            "CI of one run covers test sampling only, not training variance.\n\nruns: "
            + ", ".join(f"`{d}`" for d, _ in results) + "\n\n")
    line = spread_line(results)
    text = head + md.read_text() + (f"\n{line}\n" if line else "")
    md.write_text(text)
    return text


def _eval_one(model_dir, a, out: str | Path | None) -> tuple[int, dict[str, float]]:
    """One run of `medvlp eval`: (exit code, metrics)."""
    import sys

    from medvlp.data_shards.config import DataConfig
    from medvlp.pretrain.pretrained import EXPORT_MANIFEST, LoadError, load_pretrained, run_config

    src = Path(model_dir)
    if not src.exists():
        print(f"error: {src}: no such file or folder", file=sys.stderr)
        return 2, {}
    home = src.parent if src.is_file() else src
    try:
        if (home / EXPORT_MANIFEST).is_file():
            from medvlp.pretrain.export import export_config
            stored = export_config(home)
        else:
            stored = run_config(home)
    except (LoadError, ValueError) as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2, {}
    if stored is None:
        print(f"warning: no config.yaml / config.json under {home}; using defaults", file=sys.stderr)
    from medvlp.pretrain.configtree import apply_overrides, build, to_dict

    doc = {"data": to_dict(stored.data) if stored is not None else {},
           "eval": to_dict(stored.eval) if stored is not None else {}}
    sets = []
    if getattr(a, "shards", None):
        sets += [f"data.train_shards={a.shards}", "data.val_shards="]
    if getattr(a, "split", None):
        sets.append(f"eval.split={a.split}")
    try:
        for item in getattr(a, "set", []) or []:
            key, sep, _ = item.partition("=")
            sec, _, name = key.partition(".")
            if not sep or sec not in ("eval", "data") or not name:
                raise ValueError(f"--set {item!r}: expected eval.KEY=VALUE or data.KEY=VALUE")
            sets.append(item)
        doc = apply_overrides(doc, sets)
        data_cfg = build(DataConfig, doc["data"], "data")
        eval_cfg = build(EvalConfig, doc["eval"], "eval")
    except ValueError as e:  # ConfigError included: the message names the key path
        print(f"config error: {e}", file=sys.stderr)
        return 2, {}
    if not data_cfg.train_shards and not data_cfg.val_shards:
        print("error: no shards: pass --shards DIR (the run's config names none)", file=sys.stderr)
        return 2, {}
    try:
        pre = load_pretrained(src, step=getattr(a, "step", None))
    except LoadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2, {}
    out_dir = Path(out) if out else home / "eval"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"evaluating {pre.source}" + (f" (step {pre.step})" if pre.step is not None else ""), file=sys.stderr)
    metrics = evaluate_model(pre.model, "", data_cfg.modality, eval_cfg, out_dir, data_cfg=data_cfg, device=device)
    print((out_dir / "eval_table.md").read_text() if (out_dir / "eval_table.md").is_file() else format_table(metrics))
    print(f"\nwritten: {out_dir / 'eval_table.md'}, {out_dir / 'eval_metrics.json'}")
    if stored is not None and not (home / EXPORT_MANIFEST).is_file():
        _log_eval_child(getattr(stored, "tracking", None), home, out_dir, metrics,
                        data_cfg.val_shards or data_cfg.train_shards)
    return 0, metrics


def _log_eval_child(tracking, model_dir: Path, out_dir: Path, metrics: dict, shards: str) -> None:
    """Log the evaluation as a child run of the training run (the store and experiment of the run's config)."""
    from medvlp.pretrain.tracking import log_eval_run

    if tracking is None:
        return
    tags = {}
    scores = out_dir / "eval_scores.npz"
    if scores.is_file():
        with np.load(scores) as z:
            tags = {"eval.zeroshot_protocol": str(z["protocol"]), "eval.split": str(z["split"])}
    run_id = log_eval_run(tracking, model_dir, out_dir, metrics, shards=str(shards), tags=tags)
    if run_id:
        print(f"MLflow: evaluation logged as run {run_id}")
