"""Classification metrics of a few-label cell, from scikit-learn: accuracy, macro-F1 and AUC.

AUC: binary tasks score P(class 1); multi-class tasks use one-vs-rest macro AUC over softmax probabilities.
A test set missing a class gives NaN for AUC (never a crash).
Legend: N test samples, C classes.
"""
from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score


def softmax(logits_NC: np.ndarray) -> np.ndarray:
    z = logits_NC - logits_NC.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def classification_metrics(y_N, logits_NC) -> dict[str, float]:
    """{"acc", "f1_macro", "auc"} of class logits (or probabilities) against class ids."""
    y_N = np.asarray(y_N).reshape(-1).astype(np.int64)
    logits_NC = np.asarray(logits_NC, dtype=np.float64)
    if logits_NC.ndim != 2 or logits_NC.shape[0] != y_N.size:
        raise ValueError(f"metrics: logits {logits_NC.shape} do not match {y_N.size} labels")
    C = logits_NC.shape[1]
    prob_NC = softmax(logits_NC)
    pred_N = prob_NC.argmax(1)
    out = {"acc": float(accuracy_score(y_N, pred_N)),
           "f1_macro": float(f1_score(y_N, pred_N, average="macro", labels=list(range(C)), zero_division=0))}
    if len(np.unique(y_N)) < C:
        out["auc"] = math.nan
    elif C == 2:
        out["auc"] = float(roc_auc_score(y_N, prob_NC[:, 1]))
    else:
        out["auc"] = float(roc_auc_score(y_N, prob_NC, multi_class="ovr", average="macro"))
    return out
