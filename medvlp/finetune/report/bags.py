"""Real slide feature bags -> slide-bag shards the report stage trains and generates from.

    python -m medvlp.finetune.report.bags --manifest slides.csv --out shards/real-bags

One bag file per slide, as CLAM / TRIDENT-style extractors write them: `.h5` with datasets `features` (n, d) (a
leading batch axis of 1 is dropped) and `coords` (n, 2); or `.npz` with arrays `features` (or `feats`) and `coords`,
read with `np.load(allow_pickle=False)` (nothing is ever unpickled). The manifest (CSV with a header, or JSONL) has
one row per slide:

  bag          path of the bag file, relative to the manifest's folder; it must stay under that folder
  report       the report text (or `report_file`: a UTF-8 text file under the manifest's folder)
  diagnosis    the slide's class (stage 1's MIL label; "Final diagnosis: <diagnosis>." is appended to the report
               when the report has no "Final diagnosis:" sentence)
  split        train | val | test
  slide_id     optional key (default: the bag file's stem); patient_id optional (default: slide_id)

Every bag must have the same feature width. Bad rows fail with one message naming the line and the column
(`BagManifestError`, exit 2 from the command line). The shards hold feats (float16), coords (int32), the report and
the class (meta.class_index, one-hot labels) and an empty composition, so that the report stage's stage 1, stage 2,
`medvlp generate` and `medvlp report eval` (BLEU-4, ROUGE-L, diagnosis) run on them unchanged.
"""
from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from pathlib import Path

import numpy as np

from medvlp.data_shards.paths import PathError, PathPolicy
from medvlp.data_shards.schema import Sample
from medvlp.data_shards.writer import write_index, write_shards

SPLITS = ("train", "val", "test")


class BagManifestError(ValueError):
    """A bad manifest row or bag file; the message names the line and the column."""

    user_facing = True


def _rows(manifest: Path) -> list[tuple[int, dict]]:
    text = manifest.read_text(encoding="utf-8")
    if manifest.suffix.lower() == ".jsonl":
        out = []
        for i, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise BagManifestError(f"{manifest} line {i}: not JSON ({e.msg})") from None
                if not isinstance(row, dict):
                    raise BagManifestError(f"{manifest} line {i}: not a JSON object")
                out.append((i, row))
        return out
    reader = csv.DictReader(text.splitlines())
    return [(i + 2, row) for i, row in enumerate(reader)]


def _inside(root: Path, rel: str, where: str) -> Path:
    if not rel:
        raise BagManifestError(f"{where}: empty path")
    p = Path(rel)
    if p.is_absolute():
        raise BagManifestError(f"{where}: {rel!r} is absolute; paths are relative to the manifest's folder")
    try:  # the data-root policy (medvlp.data_shards.paths): written path and real location under the folder
        full = PathPolicy.for_source(root).resolve(p, base=root, walk=False)
    except PathError as e:
        raise BagManifestError(f"{where}: {rel!r} " + ("is not a regular file (a FIFO, socket or device)"
                                                       if e.reason == "special" else "leaves the manifest's folder")) \
            from None
    if not full.is_file():
        raise BagManifestError(f"{where}: {rel!r} does not exist")
    return full


def read_bag(path: Path, where: str = "") -> tuple[np.ndarray, np.ndarray]:
    """(features (n, d) float16, coords (n, 2) int32) of one .h5 / .npz bag file."""
    where = where or str(path)
    suffix = path.suffix.lower()
    try:
        if suffix in (".h5", ".hdf5"):
            import h5py

            with h5py.File(path, "r") as f:
                if "features" not in f or "coords" not in f:
                    raise BagManifestError(f"{where}: {path.name} has no 'features' and 'coords' datasets")
                feats, coords = np.asarray(f["features"][()]), np.asarray(f["coords"][()])
        elif suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                key = "features" if "features" in z.files else "feats" if "feats" in z.files else None
                if key is None or "coords" not in z.files:
                    raise BagManifestError(f"{where}: {path.name} has no 'features' (or 'feats') and 'coords' arrays")
                feats, coords = z[key], z["coords"]
        else:
            raise BagManifestError(f"{where}: {path.name} is not a .h5 or .npz bag")
    except BagManifestError:
        raise
    except (OSError, ValueError) as e:
        raise BagManifestError(f"{where}: cannot read {path.name} ({type(e).__name__}: {e})") from None
    if feats.ndim == 3 and feats.shape[0] == 1:
        feats = feats[0]
    if coords.ndim == 3 and coords.shape[0] == 1:
        coords = coords[0]
    if feats.ndim != 2 or feats.shape[0] < 1 or not np.issubdtype(feats.dtype, np.number):
        raise BagManifestError(f"{where}: features must be a numeric (n, d) array with n >= 1, got {feats.shape}")
    if coords.shape != (feats.shape[0], 2):
        raise BagManifestError(f"{where}: coords {coords.shape} do not match features {feats.shape} (want (n, 2))")
    if not np.isfinite(feats).all():
        raise BagManifestError(f"{where}: features hold NaN or inf")
    return feats.astype(np.float16), np.rint(coords).astype(np.int32)


def bags_to_shards(manifest: str | Path, out: str | Path, slides_per_shard: int = 256,
                   command: str | None = None) -> dict:
    """Read the manifest's bags and reports, write slide-bag shards + index.json to `out`; returns the index."""
    manifest = Path(manifest)
    if not manifest.is_file():
        raise BagManifestError(f"--manifest {manifest}: no such file")
    root = manifest.parent
    rows = _rows(manifest)
    if not rows:
        raise BagManifestError(f"{manifest}: no rows")
    classes = sorted({str(r.get("diagnosis") or "").strip() for _, r in rows} - {""})
    samples, dim, seen = [], None, set()
    for line, r in rows:
        where = f"{manifest.name} line {line}"
        diag = str(r.get("diagnosis") or "").strip()
        if not diag:
            raise BagManifestError(f"{where}: column 'diagnosis' is empty (the slide's class)")
        split = str(r.get("split") or "").strip().lower()
        if split not in SPLITS:
            raise BagManifestError(f"{where}: column 'split': {split!r} is not one of {', '.join(SPLITS)}")
        bag = _inside(root, str(r.get("bag") or "").strip(), f"{where}: column 'bag'")
        if r.get("report"):
            report = str(r["report"]).strip()
        elif r.get("report_file"):
            report = _inside(root, str(r["report_file"]).strip(), f"{where}: column 'report_file'").read_text(
                encoding="utf-8").strip()
        else:
            raise BagManifestError(f"{where}: no 'report' (or 'report_file')")
        if not re.search(r"final\s+diagnosis\s*:", report, re.IGNORECASE):
            report = f"{report.rstrip()} Final diagnosis: {diag}.".strip()
        feats, coords = read_bag(bag, f"{where}: column 'bag'")
        if dim is None:
            dim = feats.shape[1]
        elif feats.shape[1] != dim:
            raise BagManifestError(f"{where}: column 'bag': feature width {feats.shape[1]}, the first bag's is {dim}")
        slide = str(r.get("slide_id") or bag.stem).strip()
        key = "slide-" + "".join(c if c.isalnum() or c in "-_" else "_" for c in slide)
        if key in seen:
            raise BagManifestError(f"{where}: slide {slide!r} appears twice")
        seen.add(key)
        meta = {"dataset": str(r.get("dataset") or "slide-bags"), "modality": "slide", "split": split,
                "patient_id": str(r.get("patient_id") or slide), "slide_id": slide,
                "class_index": classes.index(diag), "n_patches": int(feats.shape[0])}
        samples.append(Sample(key=key, text=report, feats=feats, coords=coords,
                              labels={c: int(c == diag) for c in classes}, meta=meta,
                              extra={"composition": {}, "tissue_names": []}))
    infos = write_shards(samples, out, prefix="slides", maxcount=slides_per_shard)
    return write_index(out, infos, "slide", classes, command=command,
                       extra={"bags": {"manifest": manifest.name, "dim": int(dim)}})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m medvlp.finetune.report.bags",
                                description="real slide feature bags (.h5 / .npz) + reports -> slide-bag shards")
    p.add_argument("--manifest", required=True, help="CSV or JSONL: bag, report | report_file, diagnosis, split")
    p.add_argument("--out", required=True, help="output shard dir")
    p.add_argument("--slides-per-shard", type=int, default=256)
    a = p.parse_args(argv)
    try:
        doc = bags_to_shards(a.manifest, a.out, a.slides_per_shard, command=" ".join(["medvlp-report-bags", *(
            argv if argv is not None else sys.argv[1:])]))
    except BagManifestError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{doc['num_samples']} slide bags -> {a.out} (splits {doc['splits']}, classes {doc['label_names']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
