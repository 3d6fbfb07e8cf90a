"""Camelyon17-WILDS patches: `metadata.csv` + `patches/` (the layout of the WILDS release `camelyon17_v1.0`).

    medvlp shards import camelyon17 camelyon17_v1.0 --out shards/c17-source --opt centers=0,1,2
    medvlp shards import camelyon17 camelyon17_v1.0 --out shards/c17-target --opt centers=4 --opt split_by=slide

metadata.csv columns used: patient, node, x_coord, y_coord, tumor (0/1), slide, center (the hospital, 0-4). The
patch of a row is patches/patient_{patient:03d}_node_{node}/patch_patient_{patient:03d}_node_{node}_x_{x}_y_{y}.png
(96 x 96 RGB). Labels {"tumor": 0 | 1}; captions and class prompts are PCam's ("this is a photo of healthy lymph
node tissue" / "... lymph node tumor tissue"); meta carries center, slide, node and the coordinates; patient_id is
f"camelyon17/patient_{patient:03d}".

Splits. `split_by=center` (default): the hospital is the split, as WILDS does it: `train_centers` (0,1,2) -> train,
`val_centers` (3) -> val, `test_centers` (4) -> test, so train and test differ by hospital (stain, scanner).
`split_by=slide`: the rows of `centers` are split by a seeded hash of the patient into train / val / test
(`val_frac`, `test_frac`): one hospital's own few-label task. A domain-shift experiment imports the source
hospitals (`centers=0,1,2`) for pretraining or as the source split, and the target hospital with `split_by=slide`
as the few-label task. Only `centers` are imported (default: all five).

Paths: every patch path is built from the row's integer columns and must resolve inside the source folder; a
symlink leading out of it is refused by name. A bad row (missing column, non-integer field, tumor not 0/1)
stops the import with its line number.
"""
from __future__ import annotations

import csv
import hashlib
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from medvlp.data_shards.importers.class_folders import ImportLayoutError, inside
from medvlp.data_shards.importers.common import coerce_options, write_dataset
from medvlp.data_shards.schema import LabelSpec, Sample

CAPTIONS = {0: "this is a photo of healthy lymph node tissue", 1: "this is a photo of lymph node tumor tissue"}
COLUMNS = ("patient", "node", "x_coord", "y_coord", "tumor", "slide", "center")
OPTIONS = {"centers": (str, "0,1,2,3,4", "comma-separated hospital ids to import"),
           "split_by": (str, "center", "center (hospital = split, WILDS) | slide (hash of the patient)"),
           "train_centers": (str, "0,1,2", "split_by=center: hospitals of the train split"),
           "val_centers": (str, "3", "split_by=center: hospitals of the val split"),
           "test_centers": (str, "4", "split_by=center: hospitals of the test split"),
           "val_frac": (float, 0.1, "split_by=slide: fraction of patients in val"),
           "test_frac": (float, 0.2, "split_by=slide: fraction of patients in test"),
           "seed": (int, 0, "seed of the slide split and of the within-split order")}


def _ints(name: str, text: str) -> set[int]:
    try:
        return {int(v) for v in text.split(",") if v.strip()}
    except ValueError:
        raise ImportLayoutError(f"camelyon17 importer: option {name}={text!r} is not comma-separated "
                                "integers") from None


def read_rows(meta: Path) -> list[dict[str, int]]:
    """The integer columns of every metadata.csv row (a bad row names its line)."""
    rows = []
    with open(meta, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ImportLayoutError(f"{meta}: missing column(s) {missing}")
        for line, r in enumerate(reader, start=2):
            try:
                row = {c: int(float(r[c])) for c in COLUMNS}
            except (TypeError, ValueError):
                raise ImportLayoutError(f"{meta} line {line}: {', '.join(COLUMNS)} must be integers") from None
            if row["tumor"] not in (0, 1):
                raise ImportLayoutError(f"{meta} line {line}: tumor {row['tumor']} is not 0 or 1")
            if min(row["patient"], row["node"], row["x_coord"], row["y_coord"]) < 0:
                raise ImportLayoutError(f"{meta} line {line}: negative patient / node / coordinate")
            row["line"] = line
            rows.append(row)
    if not rows:
        raise ImportLayoutError(f"{meta}: no rows")
    return rows


def patch_path(root: Path, r: dict[str, int]) -> Path:
    p, n = r["patient"], r["node"]
    name = f"patch_patient_{p:03d}_node_{n}_x_{r['x_coord']}_y_{r['y_coord']}.png"
    return root / "patches" / f"patient_{p:03d}_node_{n}" / name


def _split(r: dict[str, int], o: dict, sets: dict[str, set[int]]) -> str | None:
    if o["split_by"] == "center":
        for name in ("train", "val", "test"):
            if r["center"] in sets[name]:
                return name
        return None
    key = f"{o['seed']}:{r['patient']}".encode()
    h = int.from_bytes(hashlib.sha256(key).digest()[:8], "big") / 2**64
    return "test" if h < o["test_frac"] else "val" if h < o["test_frac"] + o["val_frac"] else "train"


def _samples(root: Path, rows: list[dict[str, int]], o: dict, sets: dict[str, set[int]]) -> Iterator[Sample]:
    from PIL import Image

    picked = [(s, r) for r in rows if r["center"] in sets["centers"] for s in [_split(r, o, sets)] if s]
    if not picked:
        raise ImportLayoutError(f"{root}: no metadata.csv row of centers {sorted(sets['centers'])} falls in a split")
    order = np.random.default_rng(o["seed"]).permutation(len(picked))
    counts: dict[str, int] = {}
    for i in order:
        split, r = picked[int(i)]
        if o["limit"] and counts.get(split, 0) >= o["limit"]:
            continue
        counts[split] = counts.get(split, 0) + 1
        path = inside(patch_path(root, r), root, "patch")
        if not path.is_file():
            raise FileNotFoundError(f"metadata.csv line {r['line']}: patch {path} not found")
        try:
            with Image.open(path) as im:
                img = np.asarray(im.convert("RGB"), dtype=np.uint8)
        except OSError as e:
            raise ImportLayoutError(f"patch {path}: not a readable image ({e})") from None
        t = r["tumor"]
        rel = path.relative_to(root).as_posix()
        yield Sample(key=f"camelyon17/{split}/{Path(rel).stem}", text=CAPTIONS[t], image=img, labels={"tumor": t},
                     meta={"dataset": "camelyon17", "modality": "patho", "split": split,
                           "patient_id": f"camelyon17/patient_{r['patient']:03d}", "center": r["center"],
                           "slide": r["slide"], "node": r["node"], "x": r["x_coord"], "y": r["y_coord"], "file": rel})


def import_camelyon17(src: str | Path, out_dir: str | Path, **opts: Any) -> dict:
    """The Camelyon17-WILDS folder (metadata.csv + patches/) -> shards + index.json."""
    o = coerce_options("camelyon17", opts, OPTIONS)
    if o["split_by"] not in ("center", "slide"):
        raise ImportLayoutError(f"camelyon17 importer: option split_by={o['split_by']!r} is not center or slide")
    if not (0 <= o["val_frac"] and 0 <= o["test_frac"] and o["val_frac"] + o["test_frac"] < 1):
        raise ImportLayoutError("camelyon17 importer: val_frac and test_frac must be >= 0 with a sum below 1")
    src = Path(src)
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: Camelyon17-WILDS folder not found (metadata.csv + patches/)")
    root = src.resolve()
    meta = inside(src / "metadata.csv", root, "file")
    if not meta.is_file():
        raise FileNotFoundError(f"{src}: no metadata.csv (the WILDS camelyon17_v1.0 layout)")
    sets = {"centers": _ints("centers", o["centers"]), "train": _ints("train_centers", o["train_centers"]),
            "val": _ints("val_centers", o["val_centers"]), "test": _ints("test_centers", o["test_centers"])}
    if o["split_by"] == "center" and (sets["train"] & sets["val"] or sets["train"] & sets["test"]
                                      or sets["val"] & sets["test"]):
        raise ImportLayoutError("camelyon17 importer: train_centers, val_centers and test_centers must not overlap")
    rows = read_rows(meta)
    extra = {"source": {"kind": "camelyon17", "root": str(root), "centers": sorted(sets["centers"]),
                        "split_by": o["split_by"]},
             "notes": ["split by hospital (WILDS): train " + str(sorted(sets["train"])) + ", val "
                       + str(sorted(sets["val"])) + ", test " + str(sorted(sets["test"]))
                       if o["split_by"] == "center" else
                       f"split by patient hash within centers {sorted(sets['centers'])} (val {o['val_frac']}, "
                       f"test {o['test_frac']}, seed {o['seed']})"]}
    labels = LabelSpec("binary", ["tumor"], prompts={"tumor": {"positive": [CAPTIONS[1]], "negative": [CAPTIONS[0]]}})
    return write_dataset(_samples(root, rows, o, sets), out_dir, modality="patho", label_names=["tumor"], opts=o,
                         extra=extra, labels=labels)
