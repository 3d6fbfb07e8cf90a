"""Zero-shot organ abnormality and codebook usage of an `AnatomyModel` (docs/anatomy.md).

Per organ o, a prompt pair (normal, abnormal), each possibly an ensemble of sentences whose embeddings are
averaged; the organ embedding of a volume scores P(abnormal) = softmax(s * [cos(v, t_normal), cos(v, t_abnormal)])[1]
(s the CLIP temperature). Metrics per organ over the volumes that contain it: AUC, and accuracy / sensitivity /
specificity at the ROC point nearest (0, 1); the macro AUC is the mean over organs with both classes.
Codebook usage (VSD): assignments of every ROI token in the evaluated volumes -> perplexity and dead codes per
codebook (averaged / summed over codebooks in per-anatomy mode).

Shape legend: N volumes, O organs, E embedding width, K codes.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import torch

from medvlp.finetune.anatomy.vsd import codebook_usage
from medvlp.pretrain.metrics import macro_auc, operating_point, roc_auc

NORMAL_TEMPLATE = "The {organ} appears normal."
ABNORMAL_TEMPLATE = "The {organ} shows a lesion."


def organ_text(organ: str) -> str:
    return organ.replace("_", " ")


def default_prompts(organ: str, normal_template: str = NORMAL_TEMPLATE,
                    abnormal_template: str = ABNORMAL_TEMPLATE) -> tuple[list[str], list[str]]:
    """(normal prompts, abnormal prompts) of one organ: the synthetic CT corpus's prompt ensembles for its organs,
    else the templates with "{organ}" filled in."""
    from medvlp.data_shards.synth.ct import CT_ORGANS, CT_PROMPTS

    if organ in CT_ORGANS and normal_template == NORMAL_TEMPLATE and abnormal_template == ABNORMAL_TEMPLATE:
        pos, neg = CT_PROMPTS[f"{organ}_lesion"]
        return list(neg), list(pos)
    return [normal_template.format(organ=organ_text(organ))], [abnormal_template.format(organ=organ_text(organ))]


@torch.no_grad()
def prompt_embeddings(model, organ_names: Sequence[str], prompts: dict[str, Sequence[Sequence[str]]] | None = None,
                      normal_template: str = NORMAL_TEMPLATE, abnormal_template: str = ABNORMAL_TEMPLATE
                      ) -> torch.Tensor:
    """(O, 2, E): L2-normalised mean embedding of each organ's normal (0) and abnormal (1) prompts."""
    out = []
    for o in organ_names:
        pair = (prompts or {}).get(o) or default_prompts(o, normal_template, abnormal_template)
        if len(pair) != 2 or not all(pair):
            raise ValueError(f"eval.prompts.{o}: expected [normal prompts, abnormal prompts], got {pair!r}")
        embs = []
        for group in pair:
            group = [group] if isinstance(group, str) else list(group)
            embs.append(torch.nn.functional.normalize(model.encode_texts(group).mean(0), dim=-1))
        out.append(torch.stack(embs))
    return torch.stack(out)


def organ_scores(emb_NOE: torch.Tensor, prompts_O2E: torch.Tensor, scale: float) -> torch.Tensor:
    """(N, O) P(abnormal) from the prompt pair softmax."""
    logits = scale * torch.einsum("noe,oke->nok", emb_NOE, prompts_O2E)
    return torch.softmax(logits, dim=-1)[..., 1]


def organ_thresholds(labels_NO: np.ndarray, scores_NO: np.ndarray, present_NO: np.ndarray,
                     organ_names: Sequence[str]) -> dict[str, float]:
    """Per organ, the threshold of the ROC point nearest (0, 1) on these (validation) scores; NaN without both
    classes."""
    y = np.where(present_NO, labels_NO, -1)
    return {name: operating_point(y[:, o], scores_NO[:, o])["threshold"] for o, name in enumerate(organ_names)}


def _at_threshold(y_N: np.ndarray, s_N: np.ndarray, thr: float) -> dict[str, float]:
    keep = y_N >= 0
    y, pred = y_N[keep] > 0, s_N[keep] >= thr
    nan = float("nan")
    if not np.isfinite(thr) or y.all() or not y.any():
        return {"accuracy": nan, "sensitivity": nan, "specificity": nan}
    return {"accuracy": float((pred == y).mean()), "sensitivity": float(pred[y].mean()),
            "specificity": float((~pred[~y]).mean())}


def organ_metrics(labels_NO: np.ndarray, scores_NO: np.ndarray, present_NO: np.ndarray,
                  organ_names: Sequence[str], thresholds: dict[str, float] | None = None) -> dict[str, float]:
    """Per-organ AUC and accuracy / sensitivity / specificity, and their macro means. The operating point is
    `thresholds[organ]` (picked on the validation split, `organ_thresholds`); without thresholds, the ROC point
    nearest (0, 1) of these scores themselves (optimistic: only for a split that is not the reported test)."""
    out: dict[str, float] = {}
    y = np.where(present_NO, labels_NO, -1)  # organs absent from a volume are not scored
    for o, name in enumerate(organ_names):
        out[f"auc/{name}"] = roc_auc(y[:, o], scores_NO[:, o], warn=False)
        if thresholds is None:
            op = operating_point(y[:, o], scores_NO[:, o])
        else:
            op = _at_threshold(y[:, o], scores_NO[:, o], thresholds.get(name, float("nan")))
        for k in ("accuracy", "sensitivity", "specificity"):
            out[f"{k}/{name}"] = op[k]
    out["auc_macro"] = macro_auc(y, scores_NO)
    for k in ("accuracy", "sensitivity", "specificity"):
        vals = [out[f"{k}/{n}"] for n in organ_names if np.isfinite(out[f"{k}/{n}"])]
        out[f"{k}_macro"] = float(np.mean(vals)) if vals else float("nan")
    return out


@torch.no_grad()
def evaluate_organs(model, batches: Iterable[dict], *, max_samples: int = 0,
                    prompts: dict[str, Sequence[Sequence[str]]] | None = None,
                    normal_template: str = NORMAL_TEMPLATE, abnormal_template: str = ABNORMAL_TEMPLATE,
                    thresholds: dict[str, float] | None = None, scores_out: dict | None = None
                    ) -> dict[str, float]:
    """Zero-shot organ abnormality metrics (+ codebook usage with VSD) over `batches` (volume, mask, organ_labels).
    thresholds: per-organ operating points from the validation split (see `organ_metrics`). scores_out: a dict that
    receives the per-item arrays "labels", "scores", "present" (N, O) and "keys" (N,) for paired comparisons."""
    was_training = model.training
    model.eval()
    dev = model.logit_scale.device
    names = model.organ_names
    P = prompt_embeddings(model, names, prompts, normal_template, abnormal_template)
    scale = float(model.scale())
    ys, ss, ps, keys = [], [], [], []
    counts = None
    n = 0
    for batch in batches:
        if "organ_labels" not in batch:
            raise ValueError("anatomy eval: batches need organ_labels (data.members: [organ_labels, ...])")
        check_organ_names(batch, names)
        emb, feats = model.encode_organs(batch["volume"].to(dev), batch["mask"].to(dev))
        ss.append(organ_scores(emb, P, scale).cpu())
        ys.append(batch["organ_labels"].cpu())
        ps.append(feats.present.cpu())
        keys += [str(k) for k in batch.get("key", [""] * len(batch["volume"]))]
        if feats.vsd is not None:
            codes = feats.vsd.codes  # (B, O, L)
            K = model.encoder.vsd.codebooks[0].size
            nb = len(model.encoder.vsd.codebooks)
            c = torch.zeros(nb, K, dtype=torch.float64)
            for b in range(nb):
                sel = codes if nb == 1 else codes[:, b]
                sel = sel[sel >= 0]
                c[b] += torch.bincount(sel.cpu(), minlength=K).double()
            counts = c if counts is None else counts + c
        n += len(batch["volume"])
        if max_samples and n >= max_samples:
            break
    model.train(was_training)
    if not ss:
        raise ValueError("anatomy eval: no evaluation samples (check data.val_shards / eval.split)")
    y, s, p = (torch.cat(t).numpy() for t in (ys, ss, ps))
    if scores_out is not None:
        scores_out.update(labels=y, scores=s, present=p.astype(bool), keys=np.asarray(keys))
    out = organ_metrics(y, s, p.astype(bool), names, thresholds)
    out["n_samples"] = float(len(y))
    if counts is not None:
        usage = [codebook_usage(c) for c in counts]
        out["codebook_perplexity"] = float(np.mean([u["perplexity"] for u in usage]))
        out["codebook_dead_codes"] = float(sum(u["dead_codes"] for u in usage))
    return out


def check_organ_names(batch: dict, names: Sequence[str]) -> None:
    got = batch.get("organ_names")
    if got is not None and list(got) != list(names):
        raise ValueError(f"anatomy: the data's organ_names {list(got)} differ from the model's {list(names)}")
