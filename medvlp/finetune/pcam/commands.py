"""The pcam stage's commands (`medvlp localize`, `pcam-table`, `pcam-corpus`): thin argument parsing over
`medvlp.finetune.pcam`, added to the CLI through the stage registry.

    medvlp localize --checkpoint RUN IMAGE... --out DIR [--threshold T] [--findings a,b]
    medvlp pcam-table RECIPE --out DIR [--poolings avg,max,lse,pcam] [--seeds 0,1,2] [--reference avg] [--resume]
                      [--tables-only] [--set KEY=VALUE ...]
    medvlp pcam-corpus --out DIR [--n 2048] [--seed 0] [--nodule-radius 0.02,0.12] [--size 128]
"""
from __future__ import annotations

import argparse
import shlex
import sys


def _cmd_localize(a: argparse.Namespace) -> int:
    from medvlp.finetune.pcam.localize import LocalizeError, localize

    try:
        docs = localize(a.checkpoint, a.images, a.out, threshold=a.threshold,
                        findings=[f for f in a.findings.split(",") if f] if a.findings else None)
    except LocalizeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for doc in docs:
        parts = []
        for name, f in doc["findings"].items():
            box = f["boxes"][0]["box"] if f["boxes"] else None
            parts.append(f"{name} p={f['probability']:.3f} box={box}")
        print(f"{doc['image']}: " + "; ".join(parts))
    print(f"overlays and boxes.json written to {a.out}")
    return 0


def _cmd_pcam_table(a: argparse.Namespace) -> int:
    from medvlp.finetune.pcam.compare import compare_poolings
    from medvlp.finetune.pcam.model import POOLINGS
    from medvlp.finetune.registry import load_stage_config

    poolings = [p for p in a.poolings.split(",") if p]
    bad = [p for p in poolings if p not in POOLINGS]
    if bad or not poolings:
        print(f"error: --poolings: {bad or poolings} are not among {', '.join(POOLINGS)}", file=sys.stderr)
        return 2
    cfg, _ = load_stage_config("pcam", a.recipe, a.set)
    try:
        seeds = [int(s) for s in a.seeds.split(",") if s.strip()] if a.seeds else None
    except ValueError:
        print(f"error: --seeds: {a.seeds!r} is not a comma-separated list of integers", file=sys.stderr)
        return 2
    if a.reference not in poolings:
        print(f"error: --reference: {a.reference!r} is not among --poolings {','.join(poolings)}", file=sys.stderr)
        return 2
    args = ["pcam-table", a.recipe, "--out", a.out, "--poolings", ",".join(poolings), "--reference", a.reference]
    args += ["--seeds", a.seeds] if a.seeds else []
    args += [x for kv in a.set for x in ("--set", kv)]
    args += ["--resume"] if a.resume else []
    args += ["--tables-only"] if a.tables_only else []
    command = "medvlp " + " ".join(shlex.quote(x) for x in args)
    try:
        compare_poolings(cfg, a.out, poolings, seeds, command=command, reference=a.reference, resume=a.resume,
                         train=not a.tables_only)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(open(f"{a.out}/poolings.md").read(), end="")
    return 0


def _cmd_pcam_corpus(a: argparse.Namespace) -> int:
    from medvlp.finetune.pcam.lesions import write_lesion_corpus

    try:
        radius = tuple(float(v) for v in a.nodule_radius.split(","))
        if len(radius) != 2:
            raise ValueError
    except ValueError:
        print(f"error: --nodule-radius: {a.nodule_radius!r} is not LO,HI (fractions of the image side)",
              file=sys.stderr)
        return 2
    try:
        index = write_lesion_corpus(a.out, a.n, a.seed, radius, size=a.size)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{a.out}: {index.get('splits')} (nodule radius {radius[0]:g}-{radius[1]:g} of the image side)")
    return 0


def add_commands(sub: argparse._SubParsersAction, help_cmd: str | None = None) -> None:  # noqa: ARG001
    """Add `localize`, `pcam-table` and `pcam-corpus` to the top-level subparsers."""
    s = sub.add_parser("localize", help="heatmap overlays + boxes (PNG, JSON) from a trained PCAM run")
    s.add_argument("--checkpoint", required=True, help="a PCAM fine-tune run folder (or its model.safetensors)")
    s.add_argument("images", nargs="+", help="image files (PNG/JPEG, 8 or 16 bit)")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--threshold", type=float, default=None,
                   help="box threshold on the peak-normalised heatmap (default: the run's eval.threshold)")
    s.add_argument("--findings", default="", help="comma-separated findings to draw (default: all)")
    s.set_defaults(fn=_cmd_localize)
    s = sub.add_parser("pcam-table", help="train one PCAM recipe per pooling and tabulate AUC and localisation")
    s.add_argument("recipe")
    s.add_argument("--out", required=True, help="folder of the runs and of poolings.md / poolings.json")
    s.add_argument("--poolings", default="avg,max,lse,pcam")
    s.add_argument("--seeds", default="",
                   help="comma-separated seeds (finetune.seed and data.seed); default: the recipe's")
    s.add_argument("--reference", default="avg", help="the pooling every other is compared with (paired)")
    s.add_argument("--resume", action="store_true",
                   help="reuse finished runs in --out (result.json and eval_items.npz present) instead of retraining")
    s.add_argument("--tables-only", action="store_true",
                   help="train nothing: tabulate the finished runs in --out and name the missing (pooling, seed) runs")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="dotted override")
    s.set_defaults(fn=_cmd_pcam_table)
    s = sub.add_parser("pcam-corpus", help="synthetic radiographs with a chosen nodule-radius range (lesion sizes)")
    s.add_argument("--out", required=True, help="output shard folder")
    s.add_argument("--n", type=int, default=2048, help="radiographs")
    s.add_argument("--seed", type=int, default=0, help="corpus seed")
    s.add_argument("--nodule-radius", default="0.02,0.12", help="LO,HI: radius range, fractions of the image side")
    s.add_argument("--size", type=int, default=None, help="stored image side (default 128)")
    s.set_defaults(fn=_cmd_pcam_corpus)
