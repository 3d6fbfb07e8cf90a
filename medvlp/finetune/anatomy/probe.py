"""Where does the lesion information go? Per-organ measurements along the anatomy stage's vision path.

    arrays = collect_split(cfg, "train")                       # volumes, masks, organ labels of one split
    mask_statistic_auc(arrays, organs)                          # rung (a): a parameter-free statistic in the mask
    feats = path_features(model, arrays)                        # step -> (N, O, F) organ features
    probe_auc(feats_train[step], y_train, feats_test[step], y_test, present...)   # rung (b): a linear probe

The steps of the path (docs/anatomy.md, "Diagnosis"):
  voxels       the windowed voxels inside the organ mask: mean, sd, max |x - median| (no learned parameters)
  map<i>       tower map i, mean of the tokens the stage flags for the organ (any voxel of the cell in the organ)
  map<i>_in    tower map i, mean and sd of the tokens mostly inside the organ (the stage's interior weighting)
  tokens       the projected tokens (ScaleProjection) the organ query attends to, mean over the flagged ones
  pooled       the organ query output (what the organ self-attention and the projection receive)
  embedding    the L2-normalised organ embedding in the CLIP space (what zero-shot scoring compares with prompts)
The linear probe is a standardised L2 logistic regression per organ, its C picked on the validation split.

Shape legend: N volumes, O organs, F features, D/H/W volume.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
import torch

from medvlp.pretrain.metrics import roc_auc

PROBE_CS = (0.01, 0.1, 1.0, 10.0)


def collect_split(cfg, split: str, max_samples: int = 0, shards: str | None = None) -> dict[str, torch.Tensor]:
    """{"volume" (N, 1, D, H, W) windowed, "mask" (N, D, H, W), "labels" (N, O)} of one split of the stage's data
    (the evaluation view: no augmentation). `shards` overrides data.val_shards / data.train_shards."""
    from medvlp.data_shards.stream import make_loader
    from medvlp.finetune.anatomy.stage import ct_transform

    dc = dataclasses.replace(cfg.data, batch_size=32, shuffle_buffer=0, resampled=False)
    if shards is not None:
        dc = dataclasses.replace(dc, val_shards=shards)
    vols, masks, labels = [], [], []
    n = 0
    for b in make_loader(dc, train=False, split=split, transform=ct_transform(cfg, False)):
        vols.append(b["volume"])
        masks.append(b["mask"])
        labels.append(b["organ_labels"])
        n += len(b["volume"])
        if max_samples and n >= max_samples:
            break
    if not vols:
        raise ValueError(f"anatomy probe: no {split} samples in {shards or cfg.data.val_shards or cfg.data.train_shards}")
    out = {"volume": torch.cat(vols), "mask": torch.cat(masks), "labels": torch.cat(labels)}
    if max_samples:
        out = {k: v[:max_samples] for k, v in out.items()}
    return out


def voxel_statistics(vol_N1DHW: torch.Tensor, mask_NDHW: torch.Tensor, n_organs: int) -> dict[str, np.ndarray]:
    """Per organ, over its mask voxels: mean, sd and the largest |x - median|; (N, O) each, NaN where absent."""
    N = vol_N1DHW.shape[0]
    out = {k: np.full((N, n_organs), np.nan) for k in ("mean", "sd", "maxdev")}
    v = vol_N1DHW[:, 0].numpy()
    m = mask_NDHW.numpy()
    for i in range(N):
        for o in range(n_organs):
            x = v[i][m[i] == o + 1]
            if x.size == 0:
                continue
            out["mean"][i, o] = x.mean()
            out["sd"][i, o] = x.std()
            out["maxdev"][i, o] = np.abs(x - np.median(x)).max()
    return out


def mask_statistic_auc(arrays: dict, organs: Sequence[str]) -> dict[str, dict[str, float]]:
    """Rung (a): AUC of the voxel sd and of the max |x - median| inside each organ mask (higher = abnormal);
    parameter-free, so no split is used for fitting. -> {"sd": {organ: auc, "macro": m}, "maxdev": {...}}."""
    stats = voxel_statistics(arrays["volume"], arrays["mask"], len(organs))
    y = arrays["labels"].numpy()
    out = {}
    for k in ("sd", "maxdev"):
        aucs = {o: roc_auc(y[:, j], np.nan_to_num(stats[k][:, j], nan=-1.0), warn=False)
                for j, o in enumerate(organs)}
        aucs["macro"] = float(np.nanmean(list(aucs.values())))
        out[k] = aucs
    return out


def _masked_mean_sd(x_NLC: torch.Tensor, w_NOL: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted mean and sd of the tokens per organ: (N, O, C) each (zeros where an organ has no weight)."""
    s = w_NOL.sum(-1, keepdim=True).clamp_min(1e-6)
    mean = torch.einsum("nol,nlc->noc", w_NOL, x_NLC) / s
    var = torch.einsum("nol,nlc->noc", w_NOL, x_NLC.pow(2)) / s - mean.pow(2)
    return mean, var.clamp_min(0).sqrt()


@torch.no_grad()
def path_features(model, arrays: dict, batch_size: int = 32) -> dict[str, np.ndarray]:
    """Organ features at each step of the vision path (module doc): step -> (N, O, F)."""
    from medvlp.finetune.anatomy.organs import organ_fractions, pool_organ_masks, stat_pool

    was = model.training
    model.eval()
    enc = model.encoder
    O = len(model.organ_names)
    stats = voxel_statistics(arrays["volume"], arrays["mask"], O)
    feats: dict[str, list] = {}

    def add(k, t):
        feats.setdefault(k, []).append(t.float().cpu().numpy())

    dev = model.logit_scale.device
    for i in range(0, len(arrays["volume"]), batch_size):
        vol = arrays["volume"][i:i + batch_size].to(dev)
        mask = arrays["mask"][i:i + batch_size].to(dev)
        _, tok = enc.visual(vol, return_tokens=True)
        flags = pool_organ_masks(mask, O, tok.strides, tok.grids)
        fracs = organ_fractions(mask, O, tok.strides, tok.grids)
        for s, (m, f, fr) in enumerate(zip(tok.maps, flags, fracs)):
            x = m.flatten(2).transpose(1, 2)
            add(f"map{s}", _masked_mean_sd(x, f.float())[0])
            add(f"map{s}_in", torch.cat(_masked_mean_sd(x, interior_weights(fr)), -1))
            add(f"map{s}_stat", stat_pool(x, interior_weights(fr)))
        xs = enc.tokens(tok.maps)
        add("tokens", _masked_mean_sd(torch.cat(xs, 1), torch.cat(flags, 2).float())[0])
        emb, of = model.encode_organs(vol, mask)
        add("pooled", of.pooled)
        add("embedding", emb)
    out = {k: np.concatenate(v) for k, v in feats.items()}
    out = {"voxels": np.nan_to_num(np.stack([stats["mean"], stats["sd"], stats["maxdev"]], -1)), **out}
    model.train(was)
    return out


def interior_weights(frac_NOL: torch.Tensor) -> torch.Tensor:
    """Token weights of the organ's interior: the cells at least half inside it (all its cells when none is)."""
    from medvlp.finetune.anatomy.organs import organ_token_flags

    return organ_token_flags(frac_NOL).float()


def probe_auc(x_tr: np.ndarray, y_tr: np.ndarray, x_va: np.ndarray, y_va: np.ndarray, x_te: np.ndarray,
              y_te: np.ndarray, organs: Sequence[str], cs: Sequence[float] = PROBE_CS) -> dict[str, float]:
    """Per organ: logistic regression on (N, O, F) organ features, C picked by validation AUC, test AUC reported.
    Labels (N, O) with -1 = absent/unscored. -> {organ: test auc, "macro": mean, "C/<organ>": picked C}."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    out: dict[str, float] = {}
    for j, o in enumerate(organs):
        tr, va, te = y_tr[:, j] >= 0, y_va[:, j] >= 0, y_te[:, j] >= 0
        sc = StandardScaler().fit(x_tr[tr, j])
        best, best_c, best_clf = -1.0, None, None
        for c in cs:
            clf = LogisticRegression(C=c, max_iter=2000).fit(sc.transform(x_tr[tr, j]), y_tr[tr, j])
            a = roc_auc(y_va[va, j], clf.decision_function(sc.transform(x_va[va, j])), warn=False)
            if np.isfinite(a) and a > best:
                best, best_c, best_clf = a, c, clf
        if best_clf is None:
            out[o] = float("nan")
            continue
        out[o] = roc_auc(y_te[te, j], best_clf.decision_function(sc.transform(x_te[te, j])), warn=False)
        out[f"C/{o}"] = float(best_c)
    out["macro"] = float(np.nanmean([out[o] for o in organs]))
    return out
