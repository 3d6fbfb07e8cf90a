"""Organ tokens and zero-shot organ scores of one set of CT shards with a trained anatomy model.

    python -m medvlp.finetune.anatomy.extract anatomy-synth --shards data/real-ct --weights runs/anatomy \
        --split train --out runs/real-ct-organs [--set k=v ...]

Streams the shards through the stage's CT view (HU window, resize to `data.volume_size`, a TotalSegmentator mask
merged to the organs by the manifest's organ_merge is relabelled), then per volume and organ writes
  OUT/organs.csv        key, organ, present, voxels on the stage grid, tokens touched at the finest and the last
                        scale, size in last-scale tokens, smaller_than_token, label (-1 = unknown), p_abnormal
  OUT/organ_tokens.npz  keys (N,), organ_names (O,), pooled (N, O, C) organ tokens, embedding (N, O, E), present
and prints the organs smaller than one last-scale token (reported, never dropped: such an organ keeps the cells
it touches; an organ the resize erases is reported absent). The zero-shot AUC is printed when the shards carry
both classes for an organ. --weights: a stage run folder (its model.safetensors) or the file; without it the
model is the recipe's (model.name from scratch, or finetune.checkpoint) - useful only to check the plumbing.
Bad input -> one line naming it, exit 2.
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np
import torch


def _weights(path: str) -> Path:
    p = Path(path)
    if p.is_dir():
        p = p / "model.safetensors"
    if not p.is_file():
        raise FileNotFoundError(f"--weights: {p} does not exist (a stage run folder or its model.safetensors)")
    return p


@torch.no_grad()
def extract(cfg, weights: str | None, split: str, out: str | Path, max_samples: int = 0) -> dict:
    """Run the extraction (module doc); returns {"n", "small": [(key, organ, size)], "metrics"}."""
    import dataclasses

    from medvlp.data_shards.stream import make_loader
    from medvlp.finetune.anatomy.evaluate import check_organ_names, organ_metrics, organ_scores, prompt_embeddings
    from medvlp.finetune.anatomy.organs import organ_size_report
    from medvlp.finetune.anatomy.stage import AnatomyStage, ct_transform
    from medvlp.finetune.runner import load_pretrained_model

    cfg.data = dataclasses.replace(cfg.data, split=split)  # the organ names are read from the extracted split
    pre = load_pretrained_model(cfg.finetune.checkpoint) if cfg.finetune.checkpoint else None
    model = AnatomyStage().build(pre, cfg)
    if weights:
        from safetensors.torch import load_file

        sd = load_file(str(_weights(weights)))
        missing, unexpected = model.load_state_dict(sd, strict=False)
        bad = [k for k in missing if not k.startswith("momentum.")] + list(unexpected)
        if bad:
            raise ValueError(f"--weights: {weights} does not fit the recipe's model ({len(bad)} keys, e.g. {bad[0]}); "
                             "use the recipe and --set overrides the run was trained with")
    model.eval()
    names = model.organ_names
    P = prompt_embeddings(model, names, cfg.eval.prompts or None, cfg.eval.normal_template,
                          cfg.eval.abnormal_template)
    scale = float(model.scale())
    dc = dataclasses.replace(cfg.data, batch_size=cfg.eval.batch_size, shuffle_buffer=0, resampled=False)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows, keys, pooled, embs, present, labels, scores = [], [], [], [], [], [], []
    strides = None
    for batch in make_loader(dc, train=False, split=split, transform=ct_transform(cfg, False)):
        check_organ_names(batch, names)
        emb, feats = model.encode_organs(batch["volume"], batch["mask"])
        p = organ_scores(emb, P, scale)
        if strides is None:
            _, tok = model.encoder.visual(batch["volume"][:1], return_tokens=True)
            strides = tok.strides
        y = batch["organ_labels"] if "organ_labels" in batch else torch.full(p.shape, -1.0)
        for b, rep in enumerate(organ_size_report(batch["mask"], names, strides)):
            k = str(batch["key"][b])
            for o, r in enumerate(rep):
                rows.append({"key": k, **r, "label": int(y[b, o]), "p_abnormal": round(float(p[b, o]), 6)})
            keys.append(k)
        pooled.append(feats.pooled)
        embs.append(emb)
        present.append(feats.present)
        labels.append(y)
        scores.append(p)
        if max_samples and len(keys) >= max_samples:
            break
    if not keys:
        raise ValueError(f"--shards: no {split} samples in {cfg.data.train_shards}")
    with (out / "organs.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    pr = torch.cat(present).numpy()
    np.savez(out / "organ_tokens.npz", keys=np.asarray(keys), organ_names=np.asarray(names),
             pooled=torch.cat(pooled).numpy(), embedding=torch.cat(embs).numpy(), present=pr)
    y, s = torch.cat(labels).numpy(), torch.cat(scores).numpy()
    metrics = organ_metrics(np.where(y < 0, -1, y), s, pr, names) if (y >= 0).any() else {}
    small = [(r["key"], r["organ"], r["size_in_last_tokens"]) for r in rows if r["smaller_than_token"]]
    return {"n": len(keys), "small": small, "absent": [(r["key"], r["organ"]) for r in rows if not r["present"]],
            "metrics": metrics}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m medvlp.finetune.anatomy.extract", description=__doc__.split("\n")[0])
    ap.add_argument("recipe", help="an anatomy recipe (kind: anatomy), e.g. anatomy-synth")
    ap.add_argument("--shards", required=True, help="CT shards with organ masks (medvlp shards build / synth)")
    ap.add_argument("--weights", default="", help="a trained anatomy run folder or its model.safetensors")
    ap.add_argument("--split", default="test", help="split to read (train, val, test)")
    ap.add_argument("--out", required=True, help="folder for organs.csv and organ_tokens.npz")
    ap.add_argument("--max-samples", type=int, default=0)
    ap.add_argument("--set", action="append", default=[], metavar="K=V", help="recipe override (repeatable)")
    a = ap.parse_args(argv)
    try:
        from medvlp.finetune.registry import load_stage_config

        if not Path(a.shards).exists():
            raise FileNotFoundError(f"--shards: {a.shards} does not exist")
        cfg, _ = load_stage_config("anatomy", a.recipe, [*a.set, f"data.train_shards={a.shards}", "data.val_shards=",
                                                          "tracking.enabled=false"])
        res = extract(cfg, a.weights or None, a.split, a.out, a.max_samples)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{res['n']} volumes -> {a.out}/organs.csv, {a.out}/organ_tokens.npz")
    for key, organ, size in res["small"]:
        print(f"  {key}: {organ} is smaller than one last-scale token ({size} tokens of volume)")
    for key, organ in res["absent"]:
        print(f"  {key}: {organ} is absent on the stage grid")
    m = res["metrics"]
    if m and np.isfinite(m.get("auc_macro", float("nan"))):
        print(f"zero-shot macro AUC {m['auc_macro']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
