"""Zero-shot protocols by label kind, the label spec of a shard set, and which samples an evaluation uses.

    spec = shard_label_spec(data_cfg)                      # index.json["labels"] (kind, class names, prompts)
    scores_NK, protocol = zero_shot(model, img_NE, spec, names, device)
    keys = choose_keys(data_cfg, "train", n=2000, seed=0)  # stratified, seeded subset of the whole split

Protocols (docs/methods.md §1/§3), picked by `LabelSpec.kind`:
* single-label (one class per sample): each class prompt set (its templates / prompts, L2-normalised, averaged,
  renormalised: a prompt ensemble) is embedded once; score_NK = softmax_k(s·cos(img, class_k)) with the model's
  learned scale s (CLIP's protocol). Per-class AUC is one-vs-rest on that probability; top-1 accuracy too.
* multi-label / binary (findings present or absent independently): per finding a positive and a negative prompt
  set; score = softmax(s·cos_pos, s·cos_neg)[pos] = sigmoid(s·(cos_pos − cos_neg)).

Sample choice: an evaluation limited to N samples draws them at random (seeded, stratified by label where the
labels allow, `metrics.stratified_indices`) from the WHOLE split, not the first N in shard order (shards of a
class-sorted source would otherwise give one class). Labels are read from the shards' json members only (tar
headers are skipped over; no image is decoded); a custom loader is read once for its labels instead.
Legend: N samples, K classes / findings, E embedding width.
"""
from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from medvlp.data_shards.schema import LabelSpec
from medvlp.pretrain import metrics as M

log = logging.getLogger("medvlp.eval")

PromptsFn = Callable[[str, str], tuple[Sequence[str], Sequence[str]]]  # (modality, finding) -> (pos, neg) prompts


# ----------------------------------------------------------------------------------------------- label spec
def _index_of(data_cfg, shards: str | None) -> dict | None:
    """index.json of the shard set the evaluation streams (None when there is none to read)."""
    spec = shards or getattr(data_cfg, "val_shards", "") or getattr(data_cfg, "train_shards", "")
    if not spec:
        return None
    try:
        from medvlp.data_shards.reader import find_index

        return find_index(spec, getattr(data_cfg, "index", ""))[0]
    except (FileNotFoundError, ValueError, OSError, IndexError):
        return None


def shard_label_spec(data_cfg, shards: str | None = None) -> LabelSpec | None:
    """The label spec recorded in the shard set's index.json (inferred for older indexes); None without one."""
    from medvlp.data_shards.writer import label_spec

    index = _index_of(data_cfg, shards)
    return label_spec(index) if index is not None else None


def resolve_spec(spec: LabelSpec | None, names: Sequence[str]) -> LabelSpec:
    """`spec` restricted to the evaluated `names` (a single-label set keeps all its classes); a spec inferred
    from the names when none is given."""
    names = list(names)
    if spec is None:
        return LabelSpec.infer(names)
    missing = sorted(set(names) - set(spec.class_names))
    if missing:
        raise ValueError(f"labels {missing} are not classes of the label spec ({spec.class_names})")
    return spec


# ----------------------------------------------------------------------------------------------- prompts
# Held-out paraphrases: generic prompt wordings built from the class name alone, in words none of the project's
# corpora or importers use for captions or reports ("compatible", "demonstrates", "evidence", "negative for"). The
# index's own prompts measure in-distribution prompt matching; these measure transfer to unseen phrasing.
PARAPHRASE_POSITIVE = ["Findings compatible with {c}.", "The image demonstrates {c}."]
PARAPHRASE_NEGATIVE = ["There is no evidence of {c}.", "Negative for {c}."]
PARAPHRASE_CLASS = ["An image that demonstrates {c}.", "Findings compatible with {c}."]


def paraphrase_spec(spec: LabelSpec, positive: Sequence[str] | None = None, negative: Sequence[str] | None = None,
                    classes: Sequence[str] | None = None) -> LabelSpec:
    """The same label kind and classes prompted with held-out paraphrase templates (no per-class prompts)."""
    if spec.kind == "single-label":
        return LabelSpec(spec.kind, list(spec.class_names), templates=list(classes or PARAPHRASE_CLASS),
                         negative_templates=[], prompts={})
    return LabelSpec(spec.kind, list(spec.class_names), templates=list(positive or PARAPHRASE_POSITIVE),
                     negative_templates=list(negative or PARAPHRASE_NEGATIVE), prompts={})


@torch.no_grad()
def encode_texts(model, texts: Sequence[str], device, batch_size: int = 64) -> torch.Tensor:
    """(len(texts), E) L2-normalised float32 text embeddings, embedded in batches."""
    out = []
    for i in range(0, len(texts), batch_size):
        tok = model.tokenize(list(texts[i:i + batch_size])).to(device)
        out.append(model.encode_text(tok, normalize=True).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, 0)


def ensemble(model, prompts: Sequence[str], device, batch_size: int = 64) -> torch.Tensor:
    """(E,) the renormalised mean of the L2-normalised embeddings of `prompts`."""
    if not prompts:
        raise ValueError("an empty prompt set")
    return torch.nn.functional.normalize(encode_texts(model, list(prompts), device, batch_size).mean(0), dim=-1)


def model_scale(model) -> float:
    """s = exp(t) clamped at 100, from `model.scale()` or the `logit_scale` parameter (log)."""
    if callable(getattr(model, "scale", None)):
        return float(model.scale().detach().float().reshape(-1)[0])
    t = float(model.logit_scale.detach().float().reshape(-1)[0])
    return math.exp(min(t, math.log(100.0)))


def pair_prompts(spec: LabelSpec, name: str, modality: str, prompts_fn: PromptsFn | None) -> tuple[list, list]:
    """(positive, negative) prompts of a finding: `prompts_fn` when given, else the label spec's."""
    if prompts_fn is not None:
        pos, neg = prompts_fn(modality, name)
    else:
        pos, neg = spec.positive_prompts(name), spec.negative_prompts(name)
    if not pos or not neg:
        raise ValueError(f"prompts for finding {name!r} ({modality}): need >= 1 positive and >= 1 negative")
    return list(pos), list(neg)


@torch.no_grad()
def pair_embeddings(model, spec: LabelSpec, names: Sequence[str], modality: str, prompts_fn: PromptsFn | None,
                    device, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(pos_KE, neg_KE): per finding the ensemble embedding of its positive and of its negative prompts."""
    pos_KE, neg_KE = [], []
    for name in names:
        pos, neg = pair_prompts(spec, name, modality, prompts_fn)
        pos_KE.append(ensemble(model, pos, device, batch_size))
        neg_KE.append(ensemble(model, neg, device, batch_size))
    return torch.stack(pos_KE).numpy(), torch.stack(neg_KE).numpy()


def pair_scores(img_NE: np.ndarray, pos_KE: np.ndarray, neg_KE: np.ndarray, scale: float) -> np.ndarray:
    """score_NK = P(positive prompt) = softmax over (s·cos_pos, s·cos_neg) = sigmoid(s·(cos_pos − cos_neg))."""
    diff_NK = scale * (img_NE @ pos_KE.T - img_NE @ neg_KE.T)
    return 1.0 / (1.0 + np.exp(-diff_NK.astype(np.float64)))


@torch.no_grad()
def class_embeddings(model, spec: LabelSpec, classes: Sequence[str], device, batch_size: int = 64) -> np.ndarray:
    """(K, E): per class the ensemble embedding of its class prompts (templates filled with the class name)."""
    return torch.stack([ensemble(model, spec.positive_prompts(c), device, batch_size) for c in classes]).numpy()


def softmax_scores(img_NE: np.ndarray, cls_KE: np.ndarray, scale: float) -> np.ndarray:
    """score_NK = softmax over the K classes of s·cos(img, class_k) (float64, rows sum to 1)."""
    logits = scale * (img_NE.astype(np.float64) @ cls_KE.T.astype(np.float64))
    logits -= logits.max(axis=1, keepdims=True)
    e = np.exp(logits)
    return e / e.sum(axis=1, keepdims=True)


def zero_shot(model, img_NE: np.ndarray, spec: LabelSpec, names: Sequence[str], modality: str, device,
              prompts_fn: PromptsFn | None = None, batch_size: int = 64) -> tuple[np.ndarray, str]:
    """(score_NK for the columns `names`, the protocol line) by the spec's label kind."""
    scale = model_scale(model)
    if spec.kind == "single-label":
        cls_KE = class_embeddings(model, spec, spec.class_names, device, batch_size)
        probs = softmax_scores(img_NE, cls_KE, scale)
        cols = [spec.class_names.index(n) for n in names]
        return probs[:, cols], spec.protocol()
    pos_KE, neg_KE = pair_embeddings(model, spec, names, modality, prompts_fn, device, batch_size)
    return pair_scores(img_NE, pos_KE, neg_KE, scale), spec.protocol()


def single_label_metrics(labels_NK: np.ndarray, score_NK: np.ndarray) -> dict[str, float]:
    """Top-1 and balanced accuracy of argmax over the class scores (rows with exactly one positive label)."""
    one = (labels_NK == 1).sum(axis=1) == 1
    if not one.any():
        return {}
    y = labels_NK[one].argmax(axis=1)
    pred = score_NK[one].argmax(axis=1)
    recalls = [float((pred[y == k] == k).mean()) for k in range(labels_NK.shape[1]) if (y == k).any()]
    return {"zeroshot/top1": float((pred == y).mean()), "zeroshot/balanced_acc": float(np.mean(recalls))}


# ----------------------------------------------------------------------------------------------- sample choice
def _local_tars(data_cfg, split: str, shards: str | None) -> list[str] | None:
    """The local tar files of the stream (None when a URL / pipe spec cannot be read as files)."""
    from medvlp.data_shards.reader import resolve_shards

    spec = shards or getattr(data_cfg, "val_shards", "") or getattr(data_cfg, "train_shards", "")
    try:
        urls = resolve_shards(spec, split, getattr(data_cfg, "index", "")).urls
    except (ValueError, FileNotFoundError):
        return None
    return urls if all(Path(u).is_file() for u in urls) else None


def scan_labels(urls: Sequence[str], split: str, label_names: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """(keys, labels_NK) of the samples of `split` in local tar shards, read from their json members only."""
    from medvlp.data_shards.reader import SampleDecodeError, iter_raw, sample_doc, sample_split

    keys, rows = [], []
    for raw in iter_raw(urls, members=("json",)):
        try:
            doc = sample_doc(raw)
        except SampleDecodeError:
            continue  # the stream skips and counts corrupt samples; so does the choice
        if sample_split(doc) != split:
            continue
        labels = doc.get("labels") or {}
        keys.append(raw["__key__"])
        rows.append([float(labels.get(n, 0)) if labels.get(n) in (1, 0, -1) else 0.0 for n in label_names])
    return keys, np.asarray(rows, dtype=np.float32).reshape(len(rows), len(label_names))


def choose_keys(data_cfg, split: str, n: int, seed: int, *, loader_fn: Callable | None = None,
                shards: str | None = None, label_names: Sequence[str] | None = None,
                batch_size: int = 256) -> tuple[set[str] | None, list[str], np.ndarray]:
    """(the keys an evaluation of at most `n` samples of `split` uses, or None for all; the split's label names;
    the labels of the chosen samples). `n <= 0`: all."""
    names = list(label_names or [])
    if loader_fn is None:
        urls = _local_tars(data_cfg, split, shards)
        if urls is None:
            return None, names, np.zeros((0, len(names)))
        if not names:
            from medvlp.data_shards.reader import resolve_shards

            spec = shards or getattr(data_cfg, "val_shards", "") or getattr(data_cfg, "train_shards", "")
            names = resolve_shards(spec, split, getattr(data_cfg, "index", "")).label_names
        keys, Y = scan_labels(urls, split, names)
    else:
        import dataclasses

        cfg = dataclasses.replace(data_cfg, batch_size=batch_size, augment=False)
        extra = {"shards": shards} if shards else {}
        keys, ys = [], []
        for batch in loader_fn(cfg, rank=0, world_size=1, tokenizer=None, train=False, split=split, **extra):
            names = names or list(batch.get("label_names") or [])
            keys.extend(batch["key"])
            lab = batch.get("labels")
            ys.append(lab.float().cpu().numpy() if lab is not None else np.zeros((len(batch["key"]), 0)))
        Y = np.concatenate(ys) if ys else np.zeros((0, len(names)))
    if Y.shape[1]:
        warn_single_class(Y, names, split)
    idx = M.stratified_indices(Y, n, seed) if Y.shape[1] else np.arange(len(keys))[: n if n > 0 else None]
    if n <= 0 or len(idx) == len(keys):
        return None, names, Y
    return {keys[i] for i in idx}, names, Y[idx]


def warn_single_class(labels_NK: np.ndarray, names: Sequence[str], split: str) -> list[str]:
    """Warn (naming the split and the classes) when a label column has a single class; returns those names."""
    one = M.single_class_columns(labels_NK, names)
    if one and len(one) == len(names):
        warnings.warn(f"split {split!r}: every label has a single class ({', '.join(one)}): AUCs and probes on it "
                      "are undefined", RuntimeWarning, stacklevel=3)
    elif one:
        warnings.warn(f"split {split!r}: {', '.join(one)} has a single class there (AUC and probe n/a for it)",
                      RuntimeWarning, stacklevel=3)
    return one
