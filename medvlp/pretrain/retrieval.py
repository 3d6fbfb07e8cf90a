"""Retrieval and zero-shot on real captions: R@1/5/10 and median rank with bootstrap CIs and chance levels, and
zero-shot on the label groups an importer declared (index.json["label_groups"]).

    metrics = real_caption_metrics(model, ev, data_cfg, eval_cfg, device="cpu", split="test", sim_NN=sim_NN)
    table, used = format_tables(metrics)

Called by `medvlp.pretrain.eval.evaluate_detailed` after its own retrieval numbers, so the metrics land in
eval_metrics.json, MLflow (the tracker logs the whole dict) and the printed table.

Retrieval (image→text, text→image) over the evaluated split's own samples: the gallery is every sample of the split
(a group-disjoint test split when the importer split by patient / case); a candidate counts as correct when its
text is identical to the query's (several images of a patient share one note, so "the same text" is the only
distinguishable answer). rank = 1 + the number of wrong candidates scoring >= the best correct one (ties
pessimistic, as `metrics.recall_at_k`). R@K = share of queries with rank <= K; median rank over queries.
CIs: percentile bootstrap over the test items (queries resampled with replacement, `eval.bootstrap` rounds, seed
`eval.seed`; the gallery stays whole). Chance: the same statistics for a random ordering of the gallery, exactly:
P(rank <= K) = 1 - C(N - c, K) / C(N, K) for a query with c correct candidates among N; the chance median rank is
the median over queries of the median of that distribution.

Label-group zero-shot (single-label, CLIP protocol: softmax over the class prompt ensembles with the model's scale):
per group the samples whose meta field holds one of the group's classes; top-1 accuracy and balanced accuracy
(mean recall over the classes present) with bootstrap CIs; chance beside: the majority-class share (top-1 of always
answering the commonest class) and 1/K with K the classes present in the split (the balanced accuracy of any
constant answer; uniform guessing over all the group's classes scores less).

Metric names: "retrieval/<d>_r<K>_ci_lo|_ci_hi|_chance", "retrieval/<d>_median_rank" (+ "_ci_lo", "_ci_hi",
"_chance") with d in i2t, t2i; "zeroshot_group/<group>/top1" (+ "_ci_lo", "_ci_hi"), ".../balanced_acc" (+ CIs),
".../chance_top1", ".../chance_balanced", ".../n", ".../n_classes".
Legend: N samples, E embedding width, K classes, Q queries, C candidates.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Sequence

import numpy as np

log = logging.getLogger("medvlp.eval")
KS = (1, 5, 10)
DIRECTIONS = (("i2t", "image → text"), ("t2i", "text → image"))


# ----------------------------------------------------------------------------------------------- retrieval
def ranks(sim_QC: np.ndarray, same_QC: np.ndarray) -> np.ndarray:
    """1-based rank of each query's best correct candidate; ties count against the query
    (`metrics.retrieval_ranks`)."""
    from medvlp.pretrain.metrics import retrieval_ranks

    same_QC = np.asarray(same_QC, dtype=bool)
    if not same_QC.any(axis=1).all():
        raise ValueError("ranks: a query has no correct candidate")
    return retrieval_ranks(sim_QC, same_QC)


def _chance_cdf(c: int, n: int) -> np.ndarray:
    """P(rank <= r) for r = 1..n - c + 1 under a random ordering of n candidates with c correct."""
    r = np.arange(1, n - c + 2)
    # P(rank > r) = C(n - c, r) / C(n, r) = prod_{j < r} (n - c - j) / (n - j)
    j = np.arange(0, n - c + 1)
    surv = np.cumprod((n - c - j) / (n - j))
    return 1.0 - surv[: len(r)]


def chance_levels(n_correct_Q: np.ndarray, n_cand: int, ks: Sequence[int] = KS) -> dict[str, float]:
    """Expected R@K and the median rank of a random ordering, for queries with `n_correct_Q` correct candidates."""
    out: dict[str, float] = {}
    cdfs = {int(c): _chance_cdf(int(c), n_cand) for c in np.unique(n_correct_Q)}
    for k in ks:
        out[f"r{k}"] = float(np.mean([cdfs[int(c)][min(k, len(cdfs[int(c)])) - 1] for c in n_correct_Q]))
    med = [int(np.searchsorted(cdfs[int(c)], 0.5) + 1) for c in n_correct_Q]
    out["median_rank"] = float(np.median(med))
    return out


def _boot(values_Q: np.ndarray, stat, n_boot: int, seed: int) -> tuple[float, float]:
    if n_boot < 1 or len(values_Q) < 2:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    idx_BQ = rng.integers(0, len(values_Q), size=(n_boot, len(values_Q)))
    dist = np.array([stat(values_Q[i]) for i in idx_BQ], dtype=np.float64)
    return float(np.percentile(dist, 2.5)), float(np.percentile(dist, 97.5))


def retrieval_with_ci(img_NE: np.ndarray, txt_NE: np.ndarray, texts: Sequence[str], n_boot: int = 200,
                      seed: int = 0, ks: Sequence[int] = KS, sim_NN: np.ndarray | None = None) -> dict[str, float]:
    """R@K and median rank both ways with bootstrap CIs over the queries and their chance levels."""
    sim_NN = img_NE @ txt_NE.T if sim_NN is None else sim_NN
    _, inv = np.unique(np.asarray(list(texts), dtype=object).astype(str), return_inverse=True)
    same_NN = inv[:, None] == inv[None, :]
    n = len(inv)
    chance = chance_levels(same_NN.sum(axis=1), n, ks)
    out: dict[str, float] = {}
    for d, sim in (("i2t", sim_NN), ("t2i", sim_NN.T)):
        rank_Q = ranks(sim, same_NN)
        for k in ks:
            hit_Q = (rank_Q <= k).astype(np.float64)
            lo, hi = _boot(hit_Q, np.mean, n_boot, seed)
            out.update({f"retrieval/{d}_r{k}_ci_lo": lo, f"retrieval/{d}_r{k}_ci_hi": hi,
                        f"retrieval/{d}_r{k}_chance": chance[f"r{k}"]})
            out.setdefault(f"retrieval/{d}_r{k}", float(hit_Q.mean()))
        lo, hi = _boot(rank_Q.astype(np.float64), np.median, n_boot, seed)
        out.update({f"retrieval/{d}_median_rank": float(np.median(rank_Q)), f"retrieval/{d}_median_rank_ci_lo": lo,
                    f"retrieval/{d}_median_rank_ci_hi": hi, f"retrieval/{d}_median_rank_chance": chance["median_rank"]})
    return out


# ----------------------------------------------------------------------------------------------- label groups
def label_groups(data_cfg, shards: str | None = None) -> dict[str, dict]:
    """index.json["label_groups"] of the evaluated shard set ({} when it declares none)."""
    from medvlp.pretrain.zeroshot import _index_of

    index = _index_of(data_cfg, shards)
    return dict((index or {}).get("label_groups") or {})


def sample_metas(data_cfg, split: str, keys: Sequence[str], shards: str | None = None) -> list[dict] | None:
    """The json meta of each of `keys` (row order), read from the local shards' json members; None when the
    shards are not local files."""
    from medvlp.data_shards.reader import SampleDecodeError, iter_raw, sample_doc
    from medvlp.pretrain.zeroshot import _local_tars

    urls = _local_tars(data_cfg, split, shards)
    if urls is None:
        return None
    want = set(keys)
    found: dict[str, dict] = {}
    for raw in iter_raw(urls, members=("json",)):
        if raw["__key__"] not in want:
            continue
        try:
            found[raw["__key__"]] = sample_doc(raw).get("meta") or {}
        except SampleDecodeError:
            continue
    return [found.get(k, {}) for k in keys]


def _balanced(y: np.ndarray, pred: np.ndarray) -> float:
    return float(np.mean([(pred[y == k] == k).mean() for k in np.unique(y)]))


def group_zero_shot(model, img_NE: np.ndarray, metas: Sequence[dict], groups: dict[str, dict], device,
                    n_boot: int = 200, seed: int = 0, batch_size: int = 64) -> dict[str, float]:
    """Single-label zero-shot per label group (see module doc)."""
    from medvlp.data_shards.schema import LabelSpec
    from medvlp.pretrain import zeroshot as Z

    out: dict[str, float] = {}
    scale = Z.model_scale(model)
    for name, g in sorted(groups.items()):
        spec = LabelSpec.from_dict(g["spec"], f"label_groups.{name}")
        classes = spec.class_names
        rows = [i for i, m in enumerate(metas) if m.get(g["field"]) in classes]
        pre = f"zeroshot_group/{name}"
        out[f"{pre}/n"], out[f"{pre}/n_classes"] = float(len(rows)), float(len(classes))
        if len(rows) < 2:
            continue
        y = np.array([classes.index(metas[i][g["field"]]) for i in rows])
        cls_KE = Z.class_embeddings(model, spec, classes, device, batch_size)
        pred = Z.softmax_scores(img_NE[rows], cls_KE, scale).argmax(axis=1)
        pair = np.stack([y, pred], axis=1)
        out[f"{pre}/top1"] = float((pred == y).mean())
        out[f"{pre}/top1_ci_lo"], out[f"{pre}/top1_ci_hi"] = _boot(pair, lambda p: float((p[:, 0] == p[:, 1]).mean()),
                                                                   n_boot, seed)
        out[f"{pre}/balanced_acc"] = _balanced(y, pred)
        out[f"{pre}/balanced_acc_ci_lo"], out[f"{pre}/balanced_acc_ci_hi"] = _boot(
            pair, lambda p: _balanced(p[:, 0], p[:, 1]), n_boot, seed)
        out[f"{pre}/chance_top1"] = float(np.bincount(y).max() / len(y))
        out[f"{pre}/chance_balanced"] = 1.0 / len(np.unique(y))  # a constant answer: one present class right
    return out


# ----------------------------------------------------------------------------------------------- the eval hook
def real_caption_metrics(model, ev, data_cfg, eval_cfg, *, device="cpu", split: str = "test",
                         sim_NN: np.ndarray | None = None) -> dict[str, float]:
    """Retrieval with CIs + chance (when texts were embedded) and label-group zero-shot (when the index declares
    groups) for an `eval.Embedded` split."""
    out: dict[str, float] = {}
    if getattr(eval_cfg, "retrieval", True) and ev.txt_NE is not None and len(ev.texts) >= 2:
        out.update(retrieval_with_ci(ev.img_NE, ev.txt_NE, ev.texts, eval_cfg.bootstrap, eval_cfg.seed,
                                     sim_NN=sim_NN))
    groups = label_groups(data_cfg) if getattr(eval_cfg, "zero_shot", True) else {}
    if groups and ev.keys:
        metas = sample_metas(data_cfg, split, ev.keys)
        if metas is None:
            log.info("label-group zero-shot skipped: the shards are not local files")
        else:
            out.update(group_zero_shot(model, ev.img_NE, metas, groups, device, eval_cfg.bootstrap, eval_cfg.seed,
                                       eval_cfg.batch_size))
    return out


# ----------------------------------------------------------------------------------------------- tables
def _f(v: Any) -> str:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return "n/a"
    if not math.isfinite(f):
        return "n/a"
    return str(int(f)) if f.is_integer() and abs(f) >= 2 else f"{f:.3f}"


def _cell(m: dict, key: str, chance_key: str) -> str:
    lo, hi = m.get(f"{key}_ci_lo"), m.get(f"{key}_ci_hi")
    ci = f" [{_f(lo)}, {_f(hi)}]" if _f(lo) != "n/a" else ""
    return f"{_f(m.get(key))}{ci} (chance {_f(m.get(chance_key))})"


def format_tables(m: dict[str, Any]) -> tuple[str, set[str]]:
    """(markdown, keys shown): retrieval with 95% CIs and chance; label-group zero-shot with CIs and chance."""
    used: set[str] = set()
    parts = []
    if any(k.endswith("_median_rank") for k in m):
        rows = [f"| retrieval (n = {_f(m.get('retrieval/n'))}, unique texts {_f(m.get('retrieval/unique_texts'))}) | "
                + " | ".join(f"R@{k} [95% CI] (chance)" for k in KS) + " | median rank [95% CI] (chance) |",
                "| --- |" + " --- |" * (len(KS) + 1)]
        for d, label in DIRECTIONS:
            cells = []
            for k in KS:
                key = f"retrieval/{d}_r{k}"
                used.update({key, f"{key}_ci_lo", f"{key}_ci_hi", f"{key}_chance"})
                cells.append(_cell(m, key, f"{key}_chance"))
            key = f"retrieval/{d}_median_rank"
            used.update({key, f"{key}_ci_lo", f"{key}_ci_hi", f"{key}_chance"})
            cells.append(_cell(m, key, f"{key}_chance"))
            rows.append(f"| {label} | " + " | ".join(cells) + " |")
        used.update({"retrieval/n", "retrieval/unique_texts"})
        parts.append("\n".join(rows))
    groups = sorted({k.split("/")[1] for k in m if k.startswith("zeroshot_group/")})
    if groups:
        rows = ["| label group (zero-shot, single-label) | n | classes | top-1 [95% CI] (majority) | "
                "balanced acc [95% CI] (1/K present) |", "| --- | --- | --- | --- | --- |"]
        for g in groups:
            p = f"zeroshot_group/{g}"
            used.update(k for k in m if k.startswith(p + "/"))
            rows.append(f"| {g} | {_f(m.get(p + '/n'))} | {_f(m.get(p + '/n_classes'))} | "
                        f"{_cell(m, p + '/top1', p + '/chance_top1')} | "
                        f"{_cell(m, p + '/balanced_acc', p + '/chance_balanced')} |")
        parts.append("\n".join(rows))
    return "\n\n".join(parts), used
