"""`medvlp` command line: thin argument parsing; the work happens in the packages.

    medvlp config show RECIPE [--set k=v ...] [--doc]
    medvlp shards synth|build|inspect|import|merge-index ...
    medvlp tokenizer train --shards DIR --out DIR
    medvlp pretrain RECIPE|RUN/config.yaml [--set k=v ...] [--resume | --overwrite]
    medvlp eval --model-dir RUN_DIR [--step N] [--shards DIR] ...
    medvlp eval few-shot RECIPE [--set k=v ...]
    medvlp export --model-dir RUN_DIR [--step N] --to open_clip|hf|mlflow --out DIR
    medvlp finetune STAGE [RECIPE] [--set k=v ...] [--resume | --overwrite]
    medvlp features extract --checkpoint CKPT --shards PATCHES --out DIR
    medvlp generate --checkpoint RUN --shards SLIDES --out reports.jsonl
    medvlp report eval --checkpoint RUN [--shards SLIDES]
    medvlp anatomy-ablation RECIPE [--seeds 0 1 ...] [--out DIR] [--set k=v ...]
    medvlp launch [...] -- <subcommand ...>
    medvlp runs compare|ui ...
    medvlp localize --checkpoint RUN IMAGE... --out DIR;  medvlp pcam-table RECIPE --out DIR

The commands of a fine-tune stage (eval few-shot, anatomy-ablation, features, generate, report, localize,
pcam-table, pcam-corpus) live in the stage's own `commands.py`; the stage registry (`medvlp.finetune.registry`)
adds them here.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from medvlp.data_shards.importers import IMPORTERS  # the importer kinds (a table; importers load on use)
from medvlp.finetune.registry import command_line, load_stage_config  # noqa: F401 - load_stage_config re-exported


# ----------------------------------------------------------------------------------------------- config
def _cmd_config_show(a: argparse.Namespace) -> int:
    from medvlp.launch.config import dump_yaml, format_docs, load_config

    cfg = load_config(a.recipe, a.set)
    print(format_docs(cfg) if a.doc else dump_yaml(cfg), end="")
    return 0


def _cmd_config_list(a: argparse.Namespace) -> int:  # noqa: ARG001
    from medvlp.launch.config import list_recipes

    print("\n".join(list_recipes()))
    return 0


# ----------------------------------------------------------------------------------------------- shards
def _cmd_synth(a: argparse.Namespace) -> int:
    from medvlp.data_shards.synth import synth_to_shards

    difficulty = {k: v for k, v in (("lesion_contrast", a.lesion_contrast), ("noise_hu", a.noise_hu))
                  if v is not None}
    try:
        if difficulty and a.modality != "ct":
            raise ValueError(f"--lesion-contrast / --noise-hu apply to --modality ct only, not {a.modality}")
        doc = synth_to_shards(a.out, modality=a.modality, n=a.n, seed=a.seed, shard_size=a.shard_size, size=a.size,
                              command=command_line(), domain=a.domain, difficulty=difficulty or None)
    except ValueError as e:
        print(f"error: shards synth: {e}", file=sys.stderr)
        return 2
    docs = doc if a.modality == "all" else {a.modality: doc}
    for mod, d in docs.items():
        print(f"{mod}: {d['num_samples']} samples in {len(d['shards'])} shards, splits {d['splits']}")
    return 0


def _parse_part(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise SystemExit(f"--part: expected I/N (e.g. 0/3), got {text!r}")
    if not 0 <= i < n:
        raise SystemExit(f"--part: need 0 <= I < N, got {text!r}")
    return i, n


def _floats(text: str | None, n: int, flag: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        vals = tuple(float(v) for v in text.split(","))
    except ValueError:
        vals = ()
    if len(vals) != n:
        raise SystemExit(f"{flag}: expected {n} comma-separated numbers, got {text!r}")
    return vals


def _read_options(a: argparse.Namespace):
    """ReadOptions and salt of the clinical-format flags of `shards build`."""
    from medvlp.data_shards.readers import ReadOptions, parse_modalities
    from medvlp.data_shards.readers.phi import read_salt

    if a.hash_ids != bool(a.salt_file):
        raise SystemExit("--hash-ids and --salt-file go together (the salt keeps the hashes from being guessed)")
    read = ReadOptions(window=_floats(a.dicom_window, 2, "--dicom-window"), voi=a.dicom_voi,
                       spacing=_floats(a.spacing, 3, "--spacing"),
                       organs=tuple(o for o in (a.organs or "").split(",") if o), hash_ids=a.hash_ids,
                       keep_burned_in=a.keep_burned_in,
                       dicom_modalities=parse_modalities(a.dicom_modality, "--dicom-modality"))
    return read, (read_salt(a.salt_file) if a.hash_ids else None)


def _label_options(a: argparse.Namespace) -> dict | None:
    """The label spec of `shards build` from --labels FILE, overridden by --label-kind / --template /
    --negative-template; None when none is given (multi-label with "X." / "No X.")."""
    from medvlp.data_shards.build import read_label_spec

    doc = read_label_spec(a.labels) if a.labels else {}
    if a.label_kind:
        doc["kind"] = a.label_kind
    if a.template:
        doc["templates"] = list(a.template)
    if a.negative_template:
        doc["negative_templates"] = list(a.negative_template)
    if doc and "kind" not in doc:
        raise ValueError("--template / --negative-template need --label-kind (or 'kind' in --labels)")
    if doc.get("kind") == "single-label":
        doc.setdefault("negative_templates", [])
    return doc or None


def _cmd_build(a: argparse.Namespace) -> int:
    from medvlp.data_shards.build import ManifestError, build_shards

    from medvlp.data_shards.build import ImageEncoding

    read, salt = _read_options(a)
    try:
        window = None
        if a.jpeg_window:
            try:
                window = tuple(float(v) for v in a.jpeg_window.split(","))
            except ValueError:
                raise ValueError(f"--jpeg-window: {a.jpeg_window!r} is not LO,HI") from None
        encoding = ImageEncoding(resize=a.resize, format=a.image_format, jpeg_quality=a.jpeg_quality,
                                 uint16=a.jpeg_16bit, window=window)
        doc = build_shards(a.manifest, a.out, workers=a.workers, maxcount=a.maxcount, maxsize=int(a.maxsize_mb * 2**20),
                           image_size=a.image_size, on_error=a.on_error, val_frac=a.val_frac, test_frac=a.test_frac,
                           seed=a.seed, part=_parse_part(a.part), modality=a.modality, command=command_line(),
                           read=read, salt=salt, labels=_label_options(a), root=a.root,
                           follow_symlinks=a.follow_symlinks, encoding=encoding)
    except (ManifestError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. a full disk: finished shards are complete and reused by the rerun
        if isinstance(e, FileNotFoundError):
            raise
        print(f"error: writing shards to {a.out} failed: {e}; finished shards are kept, rerun the same command "
              "once fixed", file=sys.stderr)
        return 2
    print(f"{doc['num_samples']} samples in {len(doc['shards'])} shards -> {a.out} (splits {doc['splits']})")
    if doc.get("samples_without_mask"):
        print(f"{doc['samples_without_mask']} volumes have no organ mask (meta has_mask: false; listed by shards inspect)")
    return 0


def _cmd_merge_index(a: argparse.Namespace) -> int:
    from medvlp.data_shards.build import merge_indexes

    try:
        doc = merge_indexes(a.dir)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"merged: {doc['num_samples']} samples in {len(doc['shards'])} shards -> {Path(a.dir) / 'index.json'}")
    return 0


def _cmd_inspect(a: argparse.Namespace) -> int:
    from medvlp.data_shards.inspect import inspect_report

    sheet = a.sheet or str(Path(a.dir) / "contact_sheet.png")
    text, problems = inspect_report(a.dir, n_examples=a.n, sheet_path=sheet)
    print(text)
    if a.strict and problems:
        shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        print(f"error: {len(problems)} integrity problems in {a.dir}:\n  {shown}", file=sys.stderr)
        return 1
    return 0


def _cmd_import(a: argparse.Namespace) -> int:
    from medvlp.data_shards.importers import import_dataset

    opts = dict(kv.split("=", 1) for kv in a.opt)
    doc = import_dataset(a.kind, a.src, a.out, **opts)
    print(f"{a.kind}: {doc['num_samples']} samples in {len(doc['shards'])} shards -> {a.out} (splits {doc['splits']})")
    return 0


# ----------------------------------------------------------------------------------------------- models
def _cmd_tokenizer_train(a: argparse.Namespace) -> int:
    from medvlp.pretrain.tokenizer import train_tokenizer_from_shards

    train_tokenizer_from_shards(a.shards, a.out, vocab_size=a.vocab_size)
    print(f"tokenizer written to {a.out}")
    return 0


def _cmd_pretrain(a: argparse.Namespace) -> int:
    from medvlp.launch.config import load_config
    from medvlp.pretrain.train import RunDirError, Trainer, TrainingInterrupted, check_out_dir

    if a.resume and a.overwrite:
        print("error: --resume and --overwrite: choose one (continue the run, or replace it)", file=sys.stderr)
        return 2
    overrides = list(a.set) + (["train.resume=true"] if a.resume else [])
    cfg = load_config(a.recipe, overrides)
    if cfg.kind != "pretrain":
        print(f"error: recipe {a.recipe!r} is a {cfg.kind!r} recipe, not a pretraining one", file=sys.stderr)
        return 2
    try:
        check_out_dir(cfg, a.overwrite)  # before the minutes a large model takes to build
        res = Trainer(cfg, overwrite=a.overwrite).fit()
    except RunDirError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingInterrupted as e:
        print(f"pretrain interrupted: {e}", file=sys.stderr)
        return 128 + int(e.signum or 15)
    except KeyboardInterrupt:  # Ctrl-C while the model is still being built
        print("pretrain interrupted before training started", file=sys.stderr)
        return 130
    if res.metrics:
        from medvlp.pretrain.eval import format_table
        print(format_table(res.metrics))
    status = "stopped by signal (checkpoint written)" if res.stopped_by_signal else "done"
    print(f"pretrain {status}: {res.steps_done} steps, out_dir {res.out_dir}, mlflow run {res.run_id}")
    return 0


def _cmd_finetune(a: argparse.Namespace) -> int:
    from medvlp.finetune import run_stage
    from medvlp.pretrain.spine import TrainingInterrupted

    if a.resume and a.overwrite:
        print("error: --resume and --overwrite: choose one (continue the run, or replace it)", file=sys.stderr)
        return 2
    cfg, factory = load_stage_config(a.stage, a.recipe, list(a.set) + (["finetune.resume=true"] if a.resume else []))
    try:
        res = run_stage(factory(), cfg, overwrite=a.overwrite)
    except ValueError as e:  # bad input found while setting up (freeze patterns, a pretrained path, a used folder)
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingInterrupted as e:
        print(f"finetune interrupted: {e}", file=sys.stderr)
        return 128 + int(e.signum or 15)
    if res.metrics:
        print("\n".join(f"{k:>24s}  {v:.4f}" for k, v in res.metrics.items()))
    status = ("stopped by signal (checkpoint written)" if res.stopped_by_signal
              else "stopped (checkpoint written)" if res.stopped else "done")
    print(f"finetune {a.stage} {status}: {res.steps_done} steps, {res.n_trainable:,} trainable parameters, "
          f"out_dir {res.out_dir}, mlflow run {res.run_id}")
    return 0


def _cmd_eval(a: argparse.Namespace) -> int:
    from medvlp.pretrain.eval import run_eval_cli

    return run_eval_cli(a)


def _cmd_export(a: argparse.Namespace) -> int:
    from medvlp.pretrain.export import export
    from medvlp.pretrain.pretrained import LoadError

    try:
        out = export(a.model_dir, a.to, a.out, step=a.step)
    except (LoadError, ValueError) as e:  # ExportError and LoadError are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported to {out}" + (f" (16-bit images: see {out}/PREPROCESSING.md)" if a.to != "mlflow" else
                                  f" (mlflow.pyfunc.load_model({str(out)!r}).predict(DataFrame with text / image))"))
    return 0


def _cmd_runs_compare(a: argparse.Namespace) -> int:
    from medvlp.launch.runs import compare_runs

    print(compare_runs(a.experiment, metrics=a.metric or None, uri=a.uri, out=a.out, ci=a.ci, baseline=a.baseline,
                       filter_string=a.filter))
    return 0


def _cmd_runs_ui(a: argparse.Namespace) -> int:
    from medvlp.launch.runs import runs_ui

    return runs_ui(port=a.port, uri=a.uri)


def _cmd_launch(a: argparse.Namespace) -> int:
    from medvlp.launch.multinode import launch_main

    return launch_main(a)


# ----------------------------------------------------------------------------------------------- parser
def build_parser(help_stage: str | None = None, help_cmd: str | None = None) -> argparse.ArgumentParser:
    """The `medvlp` parser; `help_stage`: the fine-tune stage whose config keys `finetune --help` lists; `help_cmd`:
    the command whose `--help` is asked for (a stage command builds its config-key epilog only then)."""
    from medvlp.finetune.registry import keys_epilog, known_stages, stage_keys_epilog

    p = argparse.ArgumentParser(prog="medvlp", description="Medical vision-language pretraining at scale.")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="debug logging, the libraries' INFO lines and warnings with their source")
    sub = p.add_subparsers(dest="cmd", required=True)

    cfg = sub.add_parser("config", help="show / list recipes").add_subparsers(dest="sub", required=True)
    s = cfg.add_parser("show", help="print the resolved config of a recipe")
    s.add_argument("recipe")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="dotted override")
    s.add_argument("--doc", action="store_true", help="one line per key: value and its doc")
    s.set_defaults(fn=_cmd_config_show)
    cfg.add_parser("list", help="list recipes").set_defaults(fn=_cmd_config_list)

    sh = sub.add_parser("shards", help="build, import, inspect shards").add_subparsers(dest="sub", required=True)
    s = sh.add_parser("synth", help="write the embedded synthetic corpus as shards")
    s.add_argument("--out", required=True)
    s.add_argument("--modality", default="cxr", choices=["cxr", "patho", "ct", "slide", "all"])
    s.add_argument("--n", type=int, default=512, help="samples per modality")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--shard-size", type=int, default=128, help="samples per shard")
    s.add_argument("--size", type=int, default=None, help="image side (2D) override")
    s.add_argument("--domain", default=None, choices=["he", "lab2"],
                   help="patho only: the lab look of the patches (lab2 = a target domain for adaptation)")
    s.add_argument("--lesion-contrast", type=float, default=None,
                   help="ct only: scale on each lesion's HU offset from its organ (> 0; default 1 = the original)")
    s.add_argument("--noise-hu", type=float, default=None,
                   help="ct only: sd of the per-voxel noise in HU (>= 0; default 8 = the original)")
    s.set_defaults(fn=_cmd_synth)
    s = sh.add_parser("build", help="build shards from a CSV/JSONL manifest")
    s.add_argument("--manifest", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--workers", type=int, default=2)
    s.add_argument("--maxcount", type=int, default=1000, help="samples per shard at most")
    s.add_argument("--maxsize-mb", type=float, default=1024, help="shard size cap in MiB")
    s.add_argument("--image-size", type=int, default=512,
                   help="longer image side at most (resized at build time); with --resize shortest the shorter side")
    s.add_argument("--resize", choices=["longest", "shortest"], default="longest",
                   help="which side --image-size sets: longest (a bound) or shortest (e.g. 256 for 224^2 training)")
    s.add_argument("--image-format", choices=["png", "jpeg"], default="png",
                   help="png: lossless (8/16-bit); jpeg: img.jpg, 8-bit, decodes several times faster")
    s.add_argument("--jpeg-quality", type=int, default=90, help="JPEG quality 1..95")
    s.add_argument("--jpeg-16bit", choices=["window", "png"], default="window",
                   help="jpeg: 16-bit images windowed to 8 bits (window) or kept as 16-bit PNG (png)")
    s.add_argument("--jpeg-window", default=None, metavar="LO,HI",
                   help="jpeg: the 16-bit values mapped to 0..255 (default 0,65535: the stream's scale)")
    s.add_argument("--on-error", choices=["fail", "skip"], default="fail")
    s.add_argument("--val-frac", type=float, default=0.1)
    s.add_argument("--test-frac", type=float, default=0.1)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--modality", default=None, choices=[None, "cxr", "patho", "ct", "slide"])
    s.add_argument("--part", default=None, help="I/N: build only slice I of N (parallel builders)")
    s.add_argument("--root", default=None, metavar="DIR",
                   help="data root: manifest paths may point under DIR too (default: only under the manifest's folder)")
    s.add_argument("--keep-burned-in", action="store_true",
                   help="keep DICOM files whose BurnedInAnnotation is YES (refused by default; flagged in meta)")
    s.add_argument("--follow-symlinks", action="store_true",
                   help="accept symlinks that point outside the data root (refused by default)")
    s.add_argument("--hash-ids", action="store_true",
                   help="replace patient ids, sample keys and identifier columns by salted hashes (needs --salt-file)")
    s.add_argument("--salt-file", default=None, help="file of >= 16 secret bytes salting --hash-ids")
    s.add_argument("--dicom-window", default=None, metavar="C,W",
                   help="window centre,width for DICOM radiographs without a VOI of their own")
    s.add_argument("--dicom-modality", default=None, metavar="CODES",
                   help="DICOM Modality codes the build accepts, e.g. CR,DX,MG (default: CR,DX for cxr, CT for ct); "
                        "a file whose header names another modality is refused")
    s.add_argument("--dicom-voi", choices=["auto", "none"], default="auto",
                   help="auto: use the file's VOI LUT / window when present; none: ignore it")
    s.add_argument("--spacing", default=None, metavar="D,H,W",
                   help="resample NIfTI / DICOM-series volumes (and masks, nearest) to this spacing in mm")
    s.add_argument("--organs", default=None, metavar="A,B,...",
                   help="label order of segmentations/ mask folders (default: sorted organ file names)")
    s.add_argument("--labels", default=None, metavar="FILE",
                   help="label spec YAML/JSON: kind, class_names, templates, negative_templates, prompts")
    s.add_argument("--label-kind", default=None, choices=["multi-label", "single-label", "binary"])
    s.add_argument("--template", action="append", default=[], metavar="TEXT",
                   help="caption/prompt template with {c} (repeat for an ensemble)")
    s.add_argument("--negative-template", action="append", default=[], metavar="TEXT",
                   help="negative prompt template with {c} (multi-label / binary)")
    s.set_defaults(fn=_cmd_build)
    s = sh.add_parser("merge-index", help="join index.part*.json of parallel builds into index.json")
    s.add_argument("dir")
    s.set_defaults(fn=_cmd_merge_index)
    s = sh.add_parser("inspect", help="counts, prevalence, samples, contact sheet")
    s.add_argument("dir")
    s.add_argument("--n", type=int, default=4, help="examples to show")
    s.add_argument("--sheet", default=None, help="contact-sheet PNG path (default DIR/contact_sheet.png)")
    s.add_argument("--strict", action="store_true",
                   help="exit 1 on any sha256 mismatch, missing shard, corrupt sample or count mismatch (CI gates)")
    s.set_defaults(fn=_cmd_inspect)
    s = sh.add_parser("import", help="import a public data set layout")
    s.add_argument("kind", choices=sorted(IMPORTERS))
    s.add_argument("src")
    s.add_argument("--out", required=True)
    s.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE", help="importer option")
    s.set_defaults(fn=_cmd_import)

    tk = sub.add_parser("tokenizer", help="train a WordPiece tokenizer").add_subparsers(dest="sub", required=True)
    s = tk.add_parser("train", help="train on the reports of a shard set")
    s.add_argument("--shards", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--vocab-size", type=int, default=2000)
    s.set_defaults(fn=_cmd_tokenizer_train)

    from medvlp.pretrain.config import PretrainConfig

    s = sub.add_parser("pretrain", help="contrastive pretraining (DeepSpeed)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=keys_epilog(PretrainConfig))
    s.add_argument("recipe", nargs="?", default="debug", help="recipe name or YAML path (a run's config.yaml too)")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="dotted override")
    s.add_argument("--resume", action="store_true",
                   help="continue the run in train.out_dir from its latest complete checkpoint")
    s.add_argument("--overwrite", action="store_true",
                   help="move the run already in train.out_dir to train.out_dir/replaced/<stamp>/ and start afresh")
    s.set_defaults(fn=_cmd_pretrain)

    s = sub.add_parser("finetune", help="fine-tune a pretrained model (accelerate; a stage per method)",
                       description="Run a fine-tune stage through the shared accelerate runner. Stages: "
                                   + (", ".join(known_stages()) or "(none installed)")
                                   + ". Start several processes with "
                                   "`accelerate launch --multi_gpu --num_processes N -m medvlp.launch.cli finetune ...`.",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=stage_keys_epilog(help_stage))
    s.add_argument("stage", help="stage name (e.g. path-clip, pcam, anatomy, report)")
    s.add_argument("recipe", nargs="?", default=None, help="recipe YAML (its kind must be the stage's)")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="dotted override")
    s.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    s.add_argument("--overwrite", action="store_true",
                   help="move the run already in finetune.out_dir to finetune.out_dir/replaced/<stamp>/ and start afresh")
    s.set_defaults(fn=_cmd_finetune)

    s = sub.add_parser("eval", help="zero-shot / retrieval / linear-probe evaluation of a trained model "
                                    "(few-label protocol: `medvlp eval few-shot RECIPE`)")
    s.add_argument("--model-dir", required=True, nargs="+",
                   help="a run folder, a model.safetensors (config beside it) or an exported folder; several "
                        "(training seeds of one recipe): mean ± sd over them in OUT/eval_seeds.md")
    s.add_argument("--step", type=int, default=None, help="evaluate this COMPLETE checkpoint of the run folder")
    s.add_argument("--shards", default=None, help="shard dir (default: the run's data.train_shards)")
    s.add_argument("--split", default="test")
    s.add_argument("--out", default=None, help="where tables go (default: MODEL_DIR/eval; required for several runs)")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override eval.* / data.* keys")
    s.set_defaults(fn=_cmd_eval)

    s = sub.add_parser("export", help="write a trained model for open_clip, Hugging Face transformers or MLflow",
                       description="open_clip / hf: a folder the library loads (with its own 8-bit image "
                                   "transform / processor config) plus PREPROCESSING.md: 16-bit images need "
                                   "medvlp.pretrain.export.image_preprocess. mlflow: a pyfunc model with a "
                                   "signature, embedding texts and images (docs/models.md).")
    s.add_argument("--model-dir", required=True,
                   help="a run folder, a model.safetensors (config beside it) or an exported folder")
    s.add_argument("--step", type=int, default=None, help="export this COMPLETE checkpoint of the run folder")
    s.add_argument("--to", required=True, choices=["open_clip", "hf", "mlflow"], help="target library layout")
    s.add_argument("--out", required=True, help="new (or empty) output folder")
    s.set_defaults(fn=_cmd_export)

    rn = sub.add_parser("runs", help="compare tracked runs").add_subparsers(dest="sub", required=True)
    s = rn.add_parser("compare", help="table + loss-curve overlay of an experiment's runs")
    s.add_argument("--experiment", required=True)
    s.add_argument("--metric", action="append", default=[])
    s.add_argument("--uri", default=None, help="tracking store (default: $MLFLOW_TRACKING_URI, else ./mlruns.db, "
                                                 "the store every command uses)")
    s.add_argument("--out", default=None, help="overlay PNG path (default: medvlp-outputs/compare-EXPERIMENT-"
                                                 "TIMESTAMP.png beside the store's database)")
    s.add_argument("--filter", default="", help="MLflow filter string, e.g. \"params.`optim.lr` = '0.003'\"")
    s.add_argument("--ci", action="store_true", help="paired bootstrap CI of each run's macro AUC vs the baseline")
    s.add_argument("--baseline", default=None, help="run name or id the others are compared with (default: first)")
    s.set_defaults(fn=_cmd_runs_compare)
    s = rn.add_parser("ui", help="mlflow ui on 127.0.0.1 over the same store")
    s.add_argument("--port", type=int, default=5000)
    s.add_argument("--uri", default=None)
    s.set_defaults(fn=_cmd_runs_ui)

    from medvlp.finetune.registry import add_stage_commands
    add_stage_commands(sub, help_cmd)  # each stage's own commands (eval-few-shot, anatomy-ablation, localize, ...)

    s = sub.add_parser("launch", help="single/multi-node launch (torchrun, deepspeed, SLURM)")
    try:
        from medvlp.launch.multinode import add_launch_arguments
        add_launch_arguments(s)
    except ImportError:
        s.add_argument("rest", nargs=argparse.REMAINDER)
    s.set_defaults(fn=_cmd_launch)

    from medvlp.launch.plan import add_plan_parser
    add_plan_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    from medvlp.finetune.registry import expand_aliases

    argv = expand_aliases(list(sys.argv[1:] if argv is None else argv))  # e.g. `eval few-shot` -> `eval-few-shot`
    asks_help = any(x in ("-h", "--help") for x in argv)
    help_stage = help_cmd = None
    if asks_help and argv[:1] == ["finetune"] and len(argv) > 1 and not argv[1].startswith("-"):
        help_stage = argv[1]
    if asks_help and argv:
        help_cmd = argv[0]
    args = build_parser(help_stage, help_cmd).parse_args(argv)
    from medvlp.pretrain.progress import setup_logging

    setup_logging(args.verbose)  # library INFO chatter at WARNING and warnings on one line, unless -v
    from medvlp.launch.errors import run_command

    return run_command(args.fn, args, verbose=args.verbose)


if __name__ == "__main__":
    sys.exit(main())
