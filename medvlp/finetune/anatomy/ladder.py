"""The anatomy sanity ladder on a held-out corpus: where a failure sits (data, features, read-out or objective).

    python -m medvlp.finetune.anatomy.ladder anatomy-synth --heldout data/synth-ct32-s11 \
        --runs runs/abl/base-s0 runs/abl/base-s1 runs/abl/base-s2 --out runs/ladder [--path] [--set k=v ...]

Rungs (rows of OUT/ladder.md / .csv, mean ± sample sd over the trained runs, `medvlp.finetune.sweep`):
  (a) mask-statistic ceiling: the voxel sd / max |x - median| inside each organ mask, parameter-free, on the
      held-out test split;
  (b) supervised linear probe on the organ tokens (the organ query output `pooled`) of each trained run: one
      logistic regression per organ fitted on the held-out corpus's train split, C picked on its val split,
      AUC on its test split;
  (c) the run's zero-shot AUC (its eval_scores.npz: trained on the training corpus, evaluated on the held-out
      test split, operating points from the held-out val split).
--path adds the probe at every step of the vision path (`probe.path_features`: voxels, tower maps, tokens, organ
query output, embedding) for the first run: the diagnosis table of docs/anatomy.md.
The runs are anatomy stage run folders (config.yaml + model.safetensors), all trained with the same recipe.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

import numpy as np


def load_run(run: str | Path, overrides: Sequence[str] = ()):
    """(AnatomyConfig, AnatomyModel with the run's weights) of a stage run folder; `overrides` (k=v) for a run
    saved before a config default changed (e.g. head.stat_pool=0 head.token_select=any)."""
    from safetensors.torch import load_file

    from medvlp.finetune.anatomy.stage import AnatomyStage
    from medvlp.pretrain.config import load_config  # the stage kinds are known once medvlp.finetune is imported

    run = Path(run)
    if not (run / "config.yaml").is_file() or not (run / "model.safetensors").is_file():
        raise FileNotFoundError(f"--runs: {run} is not a finished anatomy run (config.yaml + model.safetensors)")
    cfg = load_config(str(run / "config.yaml"), list(overrides))
    cfg.finetune.checkpoint = ""  # the run's own weights replace any starting point
    model = AnatomyStage().build(None, cfg)
    sd = load_file(str(run / "model.safetensors"))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    bad = [k for k in missing if not k.startswith("momentum.")] + list(unexpected)
    if bad:
        raise ValueError(f"--runs: {run}: weights do not fit its config ({len(bad)} keys, e.g. {bad[0]}); "
                         "pass the head settings it was trained with (--set)")
    return cfg, model.eval()


def _labels(arrays: dict) -> np.ndarray:
    from medvlp.finetune.anatomy.organs import organ_onehot

    y = arrays["labels"].numpy().copy()
    present = organ_onehot(arrays["mask"], y.shape[1]).flatten(2).amax(-1).numpy() > 0
    return np.where(present, y, -1)


def _zero_shot(run: Path, organs: Sequence[str]) -> dict[str, float]:
    from medvlp.finetune.anatomy.evaluate import organ_metrics

    if not (run / "eval_scores.npz").is_file():  # a run from before per-item scores were saved
        return {"auc_macro": float("nan"), **{f"auc/{o}": float("nan") for o in organs}}
    z = np.load(run / "eval_scores.npz", allow_pickle=False)
    return organ_metrics(z["labels"], z["scores"], z["present"], organs)


def run_ladder(runs: Sequence[str], heldout: str, out: str | Path, path: bool = False, probe_train: int = 400,
               command: str = "", overrides: Sequence[str] = ()) -> dict:
    import torch

    with torch.no_grad():  # a library call: grad mode is restored on return
        return _run_ladder(runs, heldout, out, path, probe_train, command, overrides)


def _run_ladder(runs: Sequence[str], heldout: str, out: str | Path, path: bool, probe_train: int, command: str,
                overrides: Sequence[str]) -> dict:
    from medvlp.finetune.anatomy.probe import collect_split, mask_statistic_auc, path_features, probe_auc
    from medvlp.finetune.sweep import pm, seed_summary, write_table

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg0, _ = load_run(runs[0], overrides)
    organs = list(cfg0.organs)
    arrays = {s: collect_split(cfg0, s, probe_train if s == "train" else 0, shards=heldout)
              for s in ("train", "val", "test")}
    ys = {s: _labels(a) for s, a in arrays.items()}
    ceil = mask_statistic_auc(arrays["test"], organs)
    probes, zs, steps = [], [], {}
    for i, run in enumerate(runs):
        _, model = load_run(run, overrides)
        feats = {s: path_features(model, a) for s, a in arrays.items()}
        names = list(feats["train"]) if (path and i == 0) else ["pooled"]
        for k in names:
            r = probe_auc(feats["train"][k], ys["train"], feats["val"][k], ys["val"], feats["test"][k], ys["test"],
                          organs)
            if k == "pooled":
                probes.append(r)
            if path and i == 0:
                steps[k] = r
        zs.append(_zero_shot(Path(run), organs))

    def row(rung, what, per_organ: list[dict], key_fmt: str, macro_key: str, cmd: str):
        r = {"rung": rung, "what": what, "macro AUC": pm(seed_summary([d[macro_key] for d in per_organ]))}
        for o in organs:
            r[f"AUC {o}"] = pm(seed_summary([d[key_fmt.format(o)] for d in per_organ]))
        r["runs"] = len(per_organ)
        r["command"] = cmd
        return r

    cmd = command or "python -m medvlp.finetune.anatomy.ladder"
    rows = [row("(a)", "voxel sd inside the organ mask (ceiling)", [ceil["sd"]], "{}", "macro", cmd),
            row("(a)", "largest deviation from the organ median inside the mask (ceiling)", [ceil["maxdev"]], "{}", "macro", cmd),
            row("(b)", "linear probe on the organ tokens", probes, "{}", "macro", cmd),
            row("(c)", "zero-shot (prompt pair)", zs, "auc/{}", "auc_macro", "medvlp anatomy-ablation (base rows)")]
    write_table(rows, out / "ladder")
    doc = {"organs": organs, "runs": [str(r) for r in runs], "heldout": heldout, "ceiling": ceil, "probe": probes,
           "zero_shot": zs, "path": steps}
    if steps:
        prow = [{"step": k, "features": int(feats["train"][k].shape[-1]), "macro AUC": f"{v['macro']:.3f}",
                 **{f"AUC {o}": f"{v[o]:.3f}" for o in organs}} for k, v in steps.items()]
        write_table(prow, out / "path")
    (out / "ladder.json").write_text(json.dumps(doc, indent=1, default=float))
    return doc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m medvlp.finetune.anatomy.ladder", description=__doc__.split("\n")[0])
    ap.add_argument("--heldout", required=True, help="CT shards of a corpus seed never used while tuning")
    ap.add_argument("--runs", nargs="+", required=True, help="trained anatomy run folders (one per seed)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--path", action="store_true", help="also probe every step of the vision path (first run)")
    ap.add_argument("--probe-train", type=int, default=400, help="held-out train volumes the probe is fitted on")
    ap.add_argument("--set", action="append", default=[], metavar="K=V", help="config override of the runs")
    a = ap.parse_args(argv)
    try:
        if not Path(a.heldout).exists():
            raise FileNotFoundError(f"--heldout: {a.heldout} does not exist")
        doc = run_ladder(a.runs, a.heldout, a.out, a.path, a.probe_train,
                         "python -m medvlp.finetune.anatomy.ladder " + " ".join(argv or sys.argv[1:]), a.set)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print((Path(a.out) / "ladder.md").read_text())
    if doc["path"]:
        print((Path(a.out) / "path.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
