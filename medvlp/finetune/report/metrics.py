"""Report metrics and the two baselines.

* BLEU-4: `sacrebleu` corpus BLEU (default 13a tokenisation, case-insensitive), 0-100.
* ROUGE-L: `rouge-score` F-measure, mean over reports, 0-100.
* Clinical correctness: the labels parsed back from each generated report (`medvlp.finetune.report.text`) against the
  ground truth of the slide: diagnosis accuracy and macro F1 (a report without a parsable diagnosis counts as
  wrong), tissue presence F1 (micro over the non-normal tissues: stated in the report vs. present in the slide),
  the composition error (mean absolute difference in percentage points over all tissues) and the composition
  accuracy (share of (slide, tissue) pairs stated within 5 percentage points of the truth; the references round
  to 5%, so they score about 1). `clinical` = mean of diagnosis accuracy, tissue F1 and composition accuracy (all
  0-1); without a composition ground truth (no tissues) the tissue and composition measures are NaN and
  `clinical` is the diagnosis accuracy.
* Facts (`fact_correct`, per slide): diagnosis; composition (share of tissues stated within 5 points); for the
  carcinomas, position facts (region, foci count, largest focus size within 1 mm, margin status, clear-margin
  distance within 1 mm) and rare-patch facts (grade from the worst area, mitoses within 1, and the diagnosis of a
  microinvasive carcinoma, tumour < 5 % of the section). A fact a report does not state is wrong; facts that do not
  apply to a slide are NaN. `position` / `rare` = mean accuracy of their facts (`fact_summary`).
* Template baseline: for each slide, the most common training report of its predicted class (stage-1 head); when
  every report of a class is unique, the one with the largest mean unigram F1 to the others (its medoid).
* Retrieval baseline: the report of the nearest training slide (cosine similarity of the mean resampled latent).
"""
from __future__ import annotations

from collections import Counter

import numpy as np

from medvlp.finetune.report.text import composition_vector, parse_diagnosis, parse_facts

FACT_COLUMNS = ["diagnosis", "composition", "region", "foci", "size_mm", "margin", "margin_mm", "grade", "mitoses",
                "micro"]
FACT_GROUPS = {"position": ["region", "foci", "size_mm", "margin", "margin_mm"],
               "rare": ["grade", "mitoses", "micro"]}
MICRO_PCT = 5.0


def bleu4(hyps: list[str], refs: list[str]) -> float:
    import sacrebleu

    return float(sacrebleu.corpus_bleu(hyps, [refs], lowercase=True).score)


def rouge_l(hyps: list[str], refs: list[str]) -> float:
    from rouge_score import rouge_scorer

    sc = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return 100.0 * float(np.mean([sc.score(r, h)["rougeL"].fmeasure for h, r in zip(hyps, refs)])) if hyps else 0.0


def clinical(hyps: list[str], classes: list[str], true_class: list[int], tissues: list[str],
             true_comp: np.ndarray, rest: str = "normal") -> dict[str, float]:
    """Diagnosis accuracy / macro F1, tissue presence F1 and composition MAE of generated reports (module doc)."""
    from sklearn.metrics import f1_score

    pred = [parse_diagnosis(h, classes) for h in hyps]
    pred_i = np.array([classes.index(p) if p is not None else -1 for p in pred])
    true_i = np.asarray(true_class)
    acc = float(np.mean(pred_i == true_i)) if len(hyps) else 0.0
    f1 = float(f1_score(true_i, pred_i, labels=list(range(len(classes))), average="macro", zero_division=0))
    if not tissues:  # bags without a composition ground truth (e.g. real slides): the diagnosis only
        nan = float("nan")
        return {"diag_acc": acc, "diag_f1": f1, "tissue_f1": nan, "comp_mae": nan, "comp_acc": nan, "clinical": acc,
                "parsed": float(np.mean(pred_i >= 0)) if len(hyps) else 0.0}
    comp = np.array([composition_vector(h, tissues, rest) for h in hyps]).reshape(len(hyps), len(tissues))
    true_pct = 100.0 * np.asarray(true_comp, dtype=np.float64).reshape(len(hyps), len(tissues))
    others = [i for i, t in enumerate(tissues) if t != rest]
    tp = float(np.sum((comp[:, others] > 0) & (true_pct[:, others] > 0)))
    fp = float(np.sum((comp[:, others] > 0) & (true_pct[:, others] <= 0)))
    fn = float(np.sum((comp[:, others] <= 0) & (true_pct[:, others] > 0)))
    tissue_f1 = 2 * tp / max(2 * tp + fp + fn, 1.0)
    err = np.abs(comp - true_pct)
    mae = float(np.mean(err)) if len(hyps) else 0.0
    comp_acc = float(np.mean(err <= 5.0 + 1e-6)) if len(hyps) else 0.0
    return {"diag_acc": acc, "diag_f1": f1, "tissue_f1": tissue_f1, "comp_mae": mae, "comp_acc": comp_acc,
            "clinical": (acc + tissue_f1 + comp_acc) / 3, "parsed": float(np.mean(pred_i >= 0)) if len(hyps) else 0.0}


def score(hyps: list[str], refs: list[str], classes: list[str], true_class: list[int], tissues: list[str],
          true_comp: np.ndarray) -> dict[str, float]:
    """BLEU-4, ROUGE-L and the clinical metrics of one method."""
    return {"bleu4": bleu4(hyps, refs), "rougeL": rouge_l(hyps, refs),
            **clinical(hyps, classes, true_class, tissues, true_comp)}


def _unigram_f1(a: Counter, b: Counter) -> float:
    common = sum((a & b).values())
    return 0.0 if common == 0 else 2 * common / (sum(a.values()) + sum(b.values()))


def template_reports(train_reports: list[str], train_class: list[int], n_classes: int) -> list[str]:
    """Per class, the most common training report (ties: the medoid by unigram F1); "" for a class never seen."""
    out = []
    for c in range(n_classes):
        texts = [r for r, y in zip(train_reports, train_class) if y == c]
        if not texts:
            out.append("")
            continue
        counts = Counter(texts)
        top = max(counts.values())
        cands = sorted(t for t, n in counts.items() if n == top)
        if len(cands) > 1:
            bags = {t: Counter(t.lower().split()) for t in set(texts)}
            pool = texts if len(texts) <= 400 else texts[:: max(1, len(texts) // 400)]
            cands.sort(key=lambda t: -np.mean([_unigram_f1(bags[t], bags[o]) for o in pool]))
        out.append(cands[0])
    return out


def retrieval_reports(query_EMB: np.ndarray, train_EMB: np.ndarray, train_reports: list[str]) -> list[str]:
    """The report of the nearest training slide by cosine similarity of the slide embeddings."""
    q = query_EMB / np.maximum(np.linalg.norm(query_EMB, axis=1, keepdims=True), 1e-12)
    k = train_EMB / np.maximum(np.linalg.norm(train_EMB, axis=1, keepdims=True), 1e-12)
    return [train_reports[i] for i in np.argmax(q @ k.T, axis=1)]


def format_table(rows: dict[str, dict[str, float]]) -> str:
    """Markdown table: one row per method."""
    cols = [("bleu4", "BLEU-4", "{:.1f}"), ("rougeL", "ROUGE-L", "{:.1f}"), ("diag_acc", "diagnosis acc", "{:.3f}"),
            ("diag_f1", "diagnosis F1", "{:.3f}"), ("tissue_f1", "tissue F1", "{:.3f}"),
            ("comp_mae", "composition MAE (pp)", "{:.1f}"), ("comp_acc", "composition acc", "{:.3f}"),
            ("clinical", "clinical", "{:.3f}"), ("position", "position facts", "{:.3f}"),
            ("rare", "rare-patch facts", "{:.3f}")]
    cols = [c for c in cols if any(c[0] in m for m in rows.values())]
    lines = ["| method | " + " | ".join(c[1] for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    fmt = lambda f, v: "—" if v is None or v != v else f.format(v)  # noqa: E731
    for name, m in rows.items():
        lines.append(f"| {name} | " + " | ".join(fmt(f, m.get(k)) for k, _, f in cols) + " |")
    return "\n".join(lines)


def fact_correct(hyps: list[str], truth: list[dict], classes: list[str], tissues: list[str]) -> np.ndarray:
    """(N, len(FACT_COLUMNS)) per-slide correctness in {0, 1} (composition: a share), NaN where a fact does not
    apply. `truth`: `baselines.truth_facts` dicts (diagnosis index, composition percent, parsed reference facts)."""
    out = np.full((len(hyps), len(FACT_COLUMNS)), np.nan)
    col = {k: j for j, k in enumerate(FACT_COLUMNS)}
    for i, (h, t) in enumerate(zip(hyps, truth)):
        d = parse_diagnosis(h, classes)
        diag_ok = float(d is not None and classes.index(d) == t["diagnosis"])
        out[i, col["diagnosis"]] = diag_ok
        comp = composition_vector(h, tissues)
        out[i, col["composition"]] = float(np.mean([abs(c - t["composition"][x]) <= 5.0 + 1e-6
                                                    for c, x in zip(comp, tissues)]))
        if t.get("region") is None:  # not a carcinoma with stated findings
            continue
        p = parse_facts(h)
        for k in ("region", "foci", "margin", "grade"):
            if t.get(k) is not None:
                out[i, col[k]] = float(p[k] == t[k])
        for k in ("size_mm", "mitoses"):
            if t.get(k) is not None:
                out[i, col[k]] = float(p[k] is not None and abs(p[k] - t[k]) <= 1)
        if t.get("margin") == "clear" and t.get("margin_mm") is not None:
            out[i, col["margin_mm"]] = float(p["margin"] == "clear" and p["margin_mm"] is not None
                                             and abs(p["margin_mm"] - t["margin_mm"]) <= 1)
        if t["composition"].get("tumor", 100.0) < MICRO_PCT:
            out[i, col["micro"]] = diag_ok
    return out


def fact_summary(C: np.ndarray) -> dict[str, float]:
    """Accuracy per fact (mean over the slides it applies to) and the `position` / `rare` group means."""
    with np.errstate(invalid="ignore"):
        acc = {k: float(np.nanmean(C[:, j])) if np.isfinite(C[:, j]).any() else float("nan")
               for j, k in enumerate(FACT_COLUMNS)}
    out = {f"fact_{k}": v for k, v in acc.items()}
    for g, ks in FACT_GROUPS.items():
        vals = [acc[k] for k in ks if not np.isnan(acc[k])]
        out[g] = float(np.mean(vals)) if vals else float("nan")
    return out


def group_metric(group: str):
    """metric_fn(y, a) for `sweep.paired_bootstrap_diff`: y (N, F) applicability, a (N, F) correctness (0 where
    n/a) -> the group's mean fact accuracy (`all` = every fact column)."""
    idx = [FACT_COLUMNS.index(k) for k in (FACT_COLUMNS if group == "all" else FACT_GROUPS[group])]

    def fn(y: np.ndarray, a: np.ndarray) -> float:
        vals = [float((a[:, j] * y[:, j]).sum() / y[:, j].sum()) for j in idx if y[:, j].sum() > 0]
        return float(np.mean(vals)) if vals else float("nan")

    return fn
