"""The report stage's commands: `medvlp features extract` (patch shards -> slide-bag shards), `medvlp generate` and
`medvlp report eval`; added to the CLI through the stage registry."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _cmd_features_extract(a: argparse.Namespace) -> int:
    from medvlp.finetune.registry import command_line
    from medvlp.finetune.report.features import extract_features
    from medvlp.pretrain.pretrained import LoadError

    try:
        doc = extract_features(a.checkpoint, a.shards, a.out, batch_size=a.batch_size, slide_key=a.slide_key,
                               slides_per_shard=a.slides_per_shard, command=command_line())
    except (LoadError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{doc['num_samples']} slide bags in {len(doc['shards'])} shards -> {a.out} (splits {doc['splits']})")
    return 0


def _report_run(checkpoint: str, overrides: list[str]):
    """(config, model, tokenizer) of a trained report run (its config.yaml, a `kind: report` recipe, + overrides)."""
    from medvlp.finetune.report.config import ReportConfig
    from medvlp.finetune.report.run import load_report_run, run_paths
    from medvlp.pretrain.config import ConfigError, load_config

    run, _ = run_paths(checkpoint)
    path = run / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"--checkpoint {checkpoint}: no config.yaml beside the weights")
    cfg = load_config(str(path), overrides)
    if not isinstance(cfg, ReportConfig):
        raise ConfigError(f"--checkpoint {checkpoint}: a {getattr(cfg, 'kind', '?')!r} run, not a report run")
    if cfg.finetune.stage != 2:
        raise ConfigError(f"--checkpoint {checkpoint}: a stage-1 run (its LM is untrained); give the stage-2 run")
    model, tok = load_report_run(checkpoint, cfg)
    return cfg, model, tok


def _cmd_generate(a: argparse.Namespace) -> int:
    from medvlp.finetune.report.run import write_generations

    overrides = list(a.set) + ([f"gen.strategy={a.strategy}"] if a.strategy else [])
    cfg, model, tok = _report_run(a.checkpoint, overrides)
    try:
        rows = write_generations(model, tok, cfg, a.shards, a.out, split=a.split, max_samples=a.max_samples)
    except ValueError as e:  # shards without the split, bags of another width, ...
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{len(rows)} reports ({cfg.gen.strategy}) -> {a.out}")
    for r in rows[:2]:
        print(f"  {r['key']}: {r['report']}")
    return 0


def _cmd_report_eval(a: argparse.Namespace) -> int:
    from medvlp.finetune.report.run import report_table
    from medvlp.pretrain.configtree import flatten, to_dict

    cfg, model, tok = _report_run(a.checkpoint, list(a.set))
    out = a.out or str(Path(a.checkpoint if Path(a.checkpoint).is_dir() else Path(a.checkpoint).parent) / "eval")
    try:
        res, run_id = report_table(model, tok, cfg, a.shards, out, split=a.split, config_flat=flatten(to_dict(cfg)))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"split {res.split}, {res.n} slides ({cfg.gen.strategy} decoding)")
    print(res.table())
    print(f"table and generations -> {out}; mlflow run {run_id}")
    return 0


def add_commands(sub: argparse._SubParsersAction, help_cmd: str | None = None) -> None:  # noqa: ARG001
    """Add `features extract`, `generate` and `report eval`."""
    ft = sub.add_parser("features", help="slide feature bags").add_subparsers(dest="sub", required=True)
    s = ft.add_parser("extract", help="embed patch shards with a frozen pretrained tower into slide-bag shards")
    s.add_argument("--checkpoint", required=True, help="pretrained model: run folder, model.safetensors or export")
    s.add_argument("--shards", required=True, help="patch shard dir (with index.json)")
    s.add_argument("--out", required=True, help="slide-bag shard dir (a rerun skips finished input shards)")
    s.add_argument("--batch-size", type=int, default=64, help="patches per forward pass")
    s.add_argument("--slide-key", default="slide_id", help="meta field naming a patch's slide (else patient_id)")
    s.add_argument("--slides-per-shard", type=int, default=256)
    s.set_defaults(fn=_cmd_features_extract)

    s = sub.add_parser("generate", help="write a report per slide with a trained report model")
    s.add_argument("--checkpoint", required=True, help="a `medvlp finetune report` stage-2 run folder")
    s.add_argument("--shards", required=True, help="slide-bag shard dir")
    s.add_argument("--out", required=True, help="JSON-lines file: key, report, predicted_class, reference")
    s.add_argument("--split", default="test")
    s.add_argument("--max-samples", type=int, default=0, help="slides at most (0 = all)")
    s.add_argument("--strategy", choices=["greedy", "beam", "nucleus"], default=None, help="default: gen.strategy")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override gen.* / model.* keys")
    s.set_defaults(fn=_cmd_generate)

    rp = sub.add_parser("report", help="report-generation evaluation").add_subparsers(dest="sub", required=True)
    s = rp.add_parser("eval", help="BLEU-4, ROUGE-L, clinical correctness vs template and retrieval baselines")
    s.add_argument("--checkpoint", required=True, help="a `medvlp finetune report` stage-2 run folder")
    s.add_argument("--shards", default=None, help="slide-bag shard dir (default: the run's data.train_shards)")
    s.add_argument("--split", default=None, help="default: eval.split")
    s.add_argument("--out", default=None, help="where table.md / generations.jsonl go (default: RUN/eval)")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override gen.* / eval.* keys")
    s.set_defaults(fn=_cmd_report_eval)
