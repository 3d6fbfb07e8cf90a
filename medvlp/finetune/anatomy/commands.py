"""The anatomy stage's command: `medvlp anatomy-ablation RECIPE` (base / +VSE / +VSD / both, same seeds); added to
the CLI through the stage registry."""
from __future__ import annotations

import argparse


def _cmd_anatomy_ablation(a: argparse.Namespace) -> int:
    from medvlp.finetune.anatomy.ablation import VARIANTS, merge_ablations, run_ablation
    from medvlp.finetune.registry import load_stage_config

    cfg, _ = load_stage_config("anatomy", a.recipe, list(a.set))
    if a.merge:
        out = merge_ablations(a.merge, a.out, cfg)
        print(out["markdown"])
        print(f"table: {a.out}/ablation.md")
        return 0
    bad = [v for v in a.variants if v not in VARIANTS]
    if bad:
        from medvlp.pretrain.configtree import ConfigError

        raise ConfigError(f"--variants: {bad} are not among {', '.join(VARIANTS)}")
    out = run_ablation(cfg, a.seeds, a.out, a.variants)
    print(out["markdown"])
    print(f"table: {a.out}/ablation.md")
    return 0


def add_commands(sub: argparse._SubParsersAction, help_cmd: str | None = None) -> None:  # noqa: ARG001
    """Add `anatomy-ablation`."""
    s = sub.add_parser("anatomy-ablation", help="anatomy stage ablation: base / +VSE / +VSD / both, same seeds",
                       epilog="config keys: `medvlp finetune anatomy --help` (the recipe's kind is anatomy)")
    s.add_argument("recipe", help="an anatomy recipe (kind: anatomy)")
    s.add_argument("--seeds", type=int, nargs="+", default=[0], help="finetune.seed of each repetition")
    s.add_argument("--variants", nargs="+", default=["base", "+VSE", "+VSD", "both"])
    s.add_argument("--out", default="runs/anatomy-ablation", help="run folders, ablation.md and ablation.json")
    s.add_argument("--merge", nargs="+", default=None, metavar="DIR",
                   help="only merge the ablation.json of these folders (e.g. seeds run in parallel) into one table")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="dotted override")
    s.set_defaults(fn=_cmd_anatomy_ablation)
