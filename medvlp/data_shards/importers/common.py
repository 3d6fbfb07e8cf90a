"""What every importer shares: typed options from `KEY=VALUE` strings, and writing samples as shards + index."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterable

from medvlp.data_shards.paths import PathPolicy
from medvlp.data_shards.schema import LabelSpec, Sample
from medvlp.data_shards.writer import write_index, write_shards

# Options every importer accepts (name -> (type, default, one-line doc)).
COMMON_OPTIONS: dict[str, tuple[type, Any, str]] = {
    "maxcount": (int, 1000, "samples per shard at most"),
    "maxsize": (int, 1 << 30, "shard size cap in bytes (estimated from the decoded arrays)"),
    "limit": (int, 0, "import at most this many samples per split (0 = all); for quick tries"),
    "command": (str, None, "build command recorded in index.json (default: sys.argv)"),
}


def coerce_options(kind: str, opts: dict[str, Any], spec: dict[str, tuple[type, Any, str]]) -> dict[str, Any]:
    """Defaults + given options, converted to their types; an unknown or unparsable option names itself."""
    spec = {**COMMON_OPTIONS, **spec}
    unknown = sorted(set(opts) - set(spec))
    if unknown:
        raise ValueError(f"{kind} importer: unknown option(s) {unknown}; known: {sorted(spec)}")
    out = {k: d for k, (_, d, _) in spec.items()}
    for k, v in opts.items():
        typ = spec[k][0]
        try:
            if typ is bool and isinstance(v, str):
                if v.lower() not in ("1", "0", "true", "false", "yes", "no"):
                    raise ValueError(v)
                out[k] = v.lower() in ("1", "true", "yes")
            else:
                out[k] = v if v is None or isinstance(v, typ) else typ(v)
        except (TypeError, ValueError):
            raise ValueError(f"{kind} importer: option {k}={v!r} is not a valid {typ.__name__}") from None
    return out


def write_dataset(samples: Iterable[Sample], out_dir: str | os.PathLike, *, modality: str,
                  label_names: Iterable[str], opts: dict[str, Any], extra: dict,
                  labels: LabelSpec | Callable[[], LabelSpec] | None = None) -> dict:
    """Stream samples into shards (one pass, constant memory) and write index.json.

    `label_names` is read after the samples are consumed, so a set the sample generator fills works; `labels`
    (the label spec, or a function returning it, called then too) goes into index.json["labels"]."""
    out = Path(out_dir)
    infos = write_shards(samples, out, maxcount=opts["maxcount"], maxsize=opts["maxsize"])
    if not infos:
        raise ValueError(f"{out}: the importer produced no samples")
    spec = labels() if callable(labels) else labels
    return write_index(out, infos, modality, sorted(label_names), command=opts["command"], extra=extra,
                       labels=spec)


# Options of importers whose layout is "a CSV of image files": they reuse the manifest builder's pipeline.
IMAGE_FILE_OPTIONS: dict[str, tuple[type, Any, str]] = {
    "root": (str, "", "folder the CSV's image paths are relative to (default: tried beside the CSV, then above)"),
    "image_size": (int, 512, "longer image side at most (resized at build time)"),
    "workers": (int, 2, "encoding processes (one shard each)"),
    "on_error": (str, "skip", "skip | fail: public data sets have known gaps, so bad rows are reported and skipped"),
    "split": (str, "auto", "auto (patient hash) | train | val | test: the split of every row"),
    "val_frac": (float, 0.1, "fraction of patients in val when split=auto"),
    "test_frac": (float, 0.1, "fraction of patients in test when split=auto"),
    "seed": (int, 0, "seed of the patient-hash split and of the within-split sample order"),
    "progress": (bool, True, "show a progress bar"),
    "follow_symlinks": (bool, False, "accept symlinks that point outside the source folder (refused by default)"),
}


def resolve_image(given: str, csv_path: Path, root: str) -> str:
    """An image path from a CSV: under `root` if given, else beside the CSV, else beside its parent folder."""
    p = Path(given)
    if p.is_absolute():
        return str(p)
    if root:
        return str(Path(root) / p)
    for base in (csv_path.parent, csv_path.parent.parent):
        if (base / p).exists():
            return str(base / p)
    return str(csv_path.parent / p)


# Options of importers of clinical formats (DICOM, NIfTI): see medvlp.data_shards.readers.
CLINICAL_OPTIONS: dict[str, tuple[type, Any, str]] = {
    "hash_ids": (bool, False, "replace patient/study ids and keys by salted hashes (needs salt_file)"),
    "salt_file": (str, "", "file of >= 16 secret bytes salting hash_ids"),
    "window": (str, "", "C,W: window for DICOM radiographs without a VOI of their own"),
    "voi": (str, "auto", "auto: use the file's VOI LUT / window when present; none: ignore it"),
    "spacing": (str, "", "D,H,W mm: resample volumes (masks nearest) to this spacing"),
    "organs": (str, "", "A,B,...: label order of segmentations/ mask folders (default: sorted names)"),
    "keep_burned_in": (bool, False, "keep DICOM files with BurnedInAnnotation=YES (flagged in meta); refused by default"),
    "dicom_modality": (str, "", "A,B,...: DICOM Modality codes accepted (default: CR,DX for radiographs, CT for volumes)"),
}


def clinical_read(kind: str, o: dict[str, Any], rows: list) -> Any:
    """ReadOptions from the CLINICAL_OPTIONS of `o`; with hash_ids the rows' identifiers are hashed in place."""
    from medvlp.data_shards.readers import ReadOptions, parse_modalities
    from medvlp.data_shards.readers.phi import hash_rows, read_salt

    def nums(name: str, n: int):
        if not o[name]:
            return None
        try:
            vals = tuple(float(v) for v in str(o[name]).split(","))
        except ValueError:
            vals = ()
        if len(vals) != n:
            raise ValueError(f"{kind} importer: option {name}={o[name]!r} is not {n} comma-separated numbers")
        return vals

    if o["hash_ids"] != bool(o["salt_file"]):
        raise ValueError(f"{kind} importer: options hash_ids and salt_file go together")
    if o["hash_ids"]:
        hash_rows(rows, read_salt(o["salt_file"]))
    return ReadOptions(window=nums("window", 2), voi=o["voi"], spacing=nums("spacing", 3),
                       organs=tuple(x for x in o["organs"].split(",") if x), hash_ids=o["hash_ids"],
                       keep_burned_in=o["keep_burned_in"],
                       dicom_modalities=parse_modalities(o["dicom_modality"], f"{kind} importer: option dicom_modality"))


def source_policy(roots: Iterable[str | os.PathLike | None], o: dict[str, Any]) -> PathPolicy:
    """The path policy of an importer: files must lie under one of `roots` (its source folder(s), plus the `root`
    option when given); symlinks out of them are refused unless the option follow_symlinks=true."""
    roots = [r for r in (*roots, o.get("root") or None) if r]
    return PathPolicy.for_source(roots[0], roots[1:], bool(o.get("follow_symlinks", False)))


def build_image_rows(rows: list, errors: list[str], out_dir: str | os.PathLike, o: dict[str, Any],
                     extra: dict, read: Any = None, labels: LabelSpec | dict | None = None,
                     root: str | os.PathLike | Iterable[str | os.PathLike] | PathPolicy | None = None) -> dict:
    """Rows of image files -> the builder's validation, patient splits, seeded within-split order, parallel
    encoding and index (with the label spec `labels`).

    `root`: the source folder(s) (or a ready `PathPolicy`) every row's files must lie under
    (`medvlp.data_shards.paths`); None = the `root` option, else the folder the rows' paths have in common."""
    from medvlp.data_shards.build import build_rows
    from medvlp.data_shards.manifest import assign_splits, check_files, check_global

    if isinstance(root, PathPolicy):
        policy = root
    elif root is not None:
        policy = source_policy([root] if isinstance(root, (str, os.PathLike)) else list(root), o)
    else:
        dirs = [os.path.dirname(os.path.abspath(p)) for r in rows for p in r.paths.values()]
        policy = source_policy([os.path.commonpath(dirs)] if dirs else [os.getcwd()], o)

    if o["on_error"] not in ("skip", "fail"):
        raise ValueError(f"option on_error={o['on_error']!r} is not 'skip' or 'fail'")
    if o["split"] not in ("auto", "train", "val", "test"):
        raise ValueError(f"option split={o['split']!r} is not auto, train, val or test")
    rows, more = check_global(rows)
    errors = errors + more
    if o["split"] != "auto":
        for r in rows:
            r.split = o["split"]
    assign_splits(rows, o["val_frac"], o["test_frac"], o["seed"])
    rows, more = check_files(rows, policy)
    return build_rows(rows, out_dir, errors=errors + more, workers=o["workers"], maxcount=o["maxcount"],
                      maxsize=o["maxsize"], image_size=o["image_size"], on_error=o["on_error"],
                      command=o["command"], progress=o["progress"], extra=extra, read=read, seed=o.get("seed", 0),
                      labels=labels)
