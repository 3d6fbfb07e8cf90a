"""The path-clip stage's command: `medvlp eval few-shot RECIPE` (also `medvlp eval-few-shot`), the few-label
protocol table; added to the CLI through the stage registry."""
from __future__ import annotations

import argparse
import sys


def _cmd_eval_few_shot(a: argparse.Namespace) -> int:
    from medvlp.finetune.path_clip.protocol import run_protocol
    from medvlp.finetune.registry import command_line, load_stage_config

    cfg, _ = load_stage_config("path-clip", a.recipe, list(a.set))
    try:
        res = run_protocol(cfg, command=command_line().replace("medvlp eval-few-shot", "medvlp eval few-shot"))
    except ValueError as e:  # bad input found while setting up (task, shards, budgets, pretrained path)
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(res["table"], end="")
    print(f"few-shot protocol done in {res['seconds']:.0f} s: {cfg.protocol.out_dir}/fewshot.md, fewshot.png, "
          f"results.json; mlflow run {res.get('run_id')}")
    return 0


def add_commands(sub: argparse._SubParsersAction, help_cmd: str | None = None) -> None:
    """Add `eval-few-shot` (its `--help` lists the stage's config keys)."""
    from medvlp.finetune.registry import stage_keys_epilog

    s = sub.add_parser("eval-few-shot", help="`medvlp eval few-shot RECIPE`: the few-label protocol (Path-CLIP and "
                       "baselines at every label budget and seed; one table)",
                       description="Every method of protocol.methods at every label budget (protocol.label_fractions "
                                   "and protocol.shots) and seed: a Markdown table, a PNG and one MLflow parent run "
                                   "with a child per cell. See docs/path_clip.md.",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=stage_keys_epilog("path-clip") if help_cmd == "eval-few-shot" else
                       "config keys: `medvlp finetune path-clip --help` (the recipe's kind is path_clip)")
    s.add_argument("recipe", help="a kind: path_clip recipe (e.g. path-clip-patho)")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="dotted override")
    s.set_defaults(fn=_cmd_eval_few_shot)
