"""Rung (b) trained end to end: can the anatomy stage's vision path learn the organ lesions at all?

    python -m medvlp.finetune.anatomy.e2e anatomy-synth --heldout data/synth-ct32-s11 --out runs/e2e \
        [--train-n 400] [--set finetune.steps=300 --set finetune.lr=1e-3 ...]

A supervised organ-normality head (one logistic unit per organ on the organ token `pooled`, the organ query output)
is trained together with the tower, the scale projection and the organ pooling on the training corpus
(data.train_shards, its train split, the first --train-n volumes held in memory; no text, no contrastive loss).
The head's AUC per organ is reported on the held-out corpus's test split (the learning rate and steps are the
recipe's finetune section; choose them on the held-out val split, whose AUC is reported too). This separates
"the tower cannot represent the lesions" (this rung fails) from "the contrastive objective does not teach them"
(this rung holds, rung (c) fails). OUT/e2e.json holds the per-organ AUCs and the loss curve; OUT/e2e_vision.pt is
not written (nothing is saved but numbers).

Shape legend: N volumes, B batch, O organs, C token width.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class OrganNormalityHead(nn.Module):
    """Per organ a logistic unit on the organ token: (B, O, C) -> (B, O) logits of P(abnormal)."""

    def __init__(self, n_organs: int, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n_organs, width))
        self.bias = nn.Parameter(torch.zeros(n_organs))

    def forward(self, pooled_BOC: torch.Tensor) -> torch.Tensor:
        return torch.einsum("boc,oc->bo", pooled_BOC, self.weight) + self.bias


def organ_bce(logits_BO: torch.Tensor, labels_BO: torch.Tensor, present_BO: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy over the organs present in each volume (absent organs are not scored)."""
    keep = present_BO & (labels_BO >= 0)
    if not keep.any():
        return logits_BO.sum() * 0.0
    return F.binary_cross_entropy_with_logits(logits_BO[keep], labels_BO[keep].float())


@torch.no_grad()
def head_scores(model, head: OrganNormalityHead, arrays: dict, batch_size: int = 32) -> np.ndarray:
    """(N, O) logits of the organ-normality head on in-memory volumes (evaluation mode)."""
    was = model.training
    model.eval()
    out = []
    for i in range(0, len(arrays["volume"]), batch_size):
        feats = model.encoder(arrays["volume"][i:i + batch_size], arrays["mask"][i:i + batch_size])
        out.append(head(feats.pooled).float().numpy())
    model.train(was)
    return np.concatenate(out)


def organ_aucs(y_NO: np.ndarray, s_NO: np.ndarray, organs: Sequence[str]) -> dict[str, float]:
    """{organ: AUC, "macro": mean} over present organs (label -1 = absent)."""
    from medvlp.pretrain.metrics import roc_auc

    out = {o: roc_auc(y_NO[y_NO[:, j] >= 0, j], s_NO[y_NO[:, j] >= 0, j], warn=False) for j, o in enumerate(organs)}
    out["macro"] = float(np.nanmean([out[o] for o in organs]))
    return out


def train_e2e(cfg, arrays_tr: dict, arrays_eval: dict[str, dict], seed: int = 0, augment: bool = True,
              log=print) -> dict:
    """Train tower + organ pooling + the organ-normality head with BCE; -> {"val": aucs, "test": aucs, "curve"}."""
    from medvlp.finetune.anatomy.ladder import _labels
    from medvlp.finetune.anatomy.stage import AnatomyStage

    torch.manual_seed(seed)
    model = AnatomyStage().build(None, cfg)
    organs = list(model.organ_names)
    head = OrganNormalityHead(len(organs), cfg.head.width)
    params = list(model.encoder.parameters()) + list(head.parameters())
    ft = cfg.finetune
    opt = torch.optim.AdamW(params, lr=ft.lr, weight_decay=ft.weight_decay)
    warm = max(1, int(ft.warmup_steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + np.cos(np.pi * min(1.0, s / max(1, ft.steps)))))
    y_tr = torch.from_numpy(_labels(arrays_tr))
    gen = torch.Generator().manual_seed(seed)
    N, B = len(y_tr), int(ft.batch_size)
    curve, t0 = [], time.process_time()
    model.train()
    for step in range(int(ft.steps)):
        idx = torch.randint(0, N, (B,), generator=gen)
        vol = arrays_tr["volume"][idx]
        if augment:  # the stream's intensity jitter (RandIntensity3D: scale 1 +- 0.1, shift +- 0.1)
            a = 1 + 0.1 * (2 * torch.rand(B, 1, 1, 1, 1, generator=gen) - 1)
            b = 0.1 * (2 * torch.rand(B, 1, 1, 1, 1, generator=gen) - 1)
            vol = (vol * a + b).clamp(-1, 1)
        feats = model.encoder(vol, arrays_tr["mask"][idx])
        loss = organ_bce(head(feats.pooled), y_tr[idx], feats.present)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if ft.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, ft.grad_clip)
        opt.step()
        sched.step()
        curve.append(loss.item())
        if (step + 1) % max(1, int(ft.log_every)) == 0:
            log(f"step {step + 1} loss {np.mean(curve[-int(ft.log_every):]):.4f} cpu {time.process_time() - t0:.0f}s")
    res = {"organs": organs, "curve": curve, "cpu_s": time.process_time() - t0}
    for split, arr in arrays_eval.items():
        res[split] = organ_aucs(_labels(arr), head_scores(model, head, arr), organs)
    res["model"], res["head"] = model, head
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m medvlp.finetune.anatomy.e2e", description=__doc__.split("\n")[0])
    ap.add_argument("recipe", help="anatomy recipe (name or YAML)")
    ap.add_argument("--heldout", required=True, help="CT shards of a corpus seed never used while tuning")
    ap.add_argument("--out", required=True)
    ap.add_argument("--train-n", type=int, default=400, help="training volumes held in memory")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--no-augment", action="store_true", help="no intensity jitter on the training volumes")
    ap.add_argument("--set", action="append", default=[], metavar="K=V", help="recipe override")
    a = ap.parse_args(argv)
    from medvlp.finetune.anatomy.config import AnatomyConfig
    from medvlp.finetune.anatomy.probe import collect_split
    from medvlp.pretrain.config import load_config

    try:
        if not Path(a.heldout).exists():
            raise FileNotFoundError(f"--heldout: {a.heldout} does not exist")
        cfg = load_config(a.recipe, a.set, cls=AnatomyConfig)
        cfg.tracking.enabled = False
        tr = collect_split(cfg, "train", a.train_n, shards=cfg.data.train_shards)
        ev = {s: collect_split(cfg, s, 0, shards=a.heldout) for s in ("val", "test")}
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    for s in a.seeds:
        r = train_e2e(cfg, tr, ev, seed=s, augment=not a.no_augment)
        r.pop("model"), r.pop("head")
        r["seed"] = s
        runs.append(r)
        print(f"seed {s}: val macro {r['val']['macro']:.3f} test macro {r['test']['macro']:.3f} "
              + " ".join(f"{o} {r['test'][o]:.3f}" for o in r["organs"]) + f" cpu {r['cpu_s']:.0f}s", flush=True)
    (out / "e2e.json").write_text(json.dumps({"recipe": a.recipe, "set": a.set, "train_n": a.train_n, "runs": runs},
                                             indent=1, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
