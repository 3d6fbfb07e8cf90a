"""PatchCamelyon (PCam) HDF5 importer.

Files `camelyonpatch_level_2_split_{train,valid,test}_{x,y}.h5` (decompressed; the release ships them gzipped):
dataset `x` (N, 96, 96, 3) uint8 and `y` (N, 1, 1, 1) with 1 = the centre 32x32 region holds tumour. The split
comes from the file name (valid -> val); any subset of splits may be present. Captions are class prompts
("this is a photo of healthy lymph node tissue" / "... lymph node tumor tissue"); labels {"tumor": 0 | 1}.
Patches are read in chunks with h5py slicing, never whole. When the release's
`camelyonpatch_level_2_split_{split}_meta.csv` lies beside them, its `wsi` column (the source slide) is the
patient id; otherwise the proxy f"pcam/{split}/{i}" (PCam itself has no patient ids).
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from medvlp.data_shards.importers.common import coerce_options, write_dataset
from medvlp.data_shards.schema import LabelSpec
from medvlp.data_shards.schema import Sample

PREFIX = "camelyonpatch_level_2_split_"
SPLITS = {"train": "train", "valid": "val", "test": "test"}
CAPTIONS = {0: "this is a photo of healthy lymph node tissue", 1: "this is a photo of lymph node tumor tissue"}
OPTIONS = {"chunk": (int, 512, "patches read per h5py slice")}


def find_splits(src: Path) -> dict[str, tuple[Path, Path]]:
    """PCam split name -> (x file, y file) in a folder (or beside a given file)."""
    folder = src if src.is_dir() else src.parent
    found = {}
    for name in SPLITS:
        x, y = folder / f"{PREFIX}{name}_x.h5", folder / f"{PREFIX}{name}_y.h5"
        if x.exists() or y.exists():
            if not (x.exists() and y.exists()):
                raise FileNotFoundError(f"{folder}: split {name!r} needs both {x.name} and {y.name}")
            found[name] = (x, y)
    if not found:
        raise FileNotFoundError(f"{folder}: no {PREFIX}{{train,valid,test}}_{{x,y}}.h5 (gunzip the release files)")
    return found


def _slides(folder: Path, name: str) -> list[str] | None:
    meta = folder / f"{PREFIX}{name}_meta.csv"
    if not meta.exists():
        return None
    with open(meta, newline="") as f:
        return [row.get("wsi", "") for row in csv.DictReader(f)]


def _split_samples(x_path: Path, y_path: Path, name: str, o: dict) -> Iterator[Sample]:
    import h5py

    split = SPLITS[name]
    slides = _slides(x_path.parent, name)
    with h5py.File(x_path, "r") as fx, h5py.File(y_path, "r") as fy:
        x, y = fx["x"], fy["y"]
        if x.ndim != 4 or x.shape[-1] != 3 or x.shape[0] != y.shape[0]:
            raise ValueError(f"{x_path.name}: x {x.shape} / y {y.shape}: expected (N, H, W, 3) and (N, 1, 1, 1)")
        if slides is not None and len(slides) != x.shape[0]:
            raise ValueError(f"{PREFIX}{name}_meta.csv: {len(slides)} rows for {x.shape[0]} patches")
        n = min(x.shape[0], o["limit"] or x.shape[0])
        for start in range(0, n, o["chunk"]):
            stop = min(n, start + o["chunk"])
            img_NHW3 = np.asarray(x[start:stop], dtype=np.uint8)
            lab_N = np.asarray(y[start:stop]).reshape(stop - start)
            for j in range(stop - start):
                i, t = start + j, int(lab_N[j])
                if t not in CAPTIONS:
                    raise ValueError(f"{y_path.name}: label {t} at index {i} is not 0 or 1")
                patient = slides[i] if slides and slides[i] else f"pcam/{split}/{i}"
                yield Sample(key=f"pcam/{split}/{i:07d}", text=CAPTIONS[t], image=img_NHW3[j], labels={"tumor": t},
                             meta={"dataset": "pcam", "modality": "patho", "split": split, "patient_id": patient,
                                   "index": i})


def import_pcam(src: str | Path, out_dir: str | Path, **opts: Any) -> dict:
    """PCam HDF5 files (a folder, or one of its files) -> shards + index.json. Returns the index document."""
    o = coerce_options("pcam", opts, OPTIONS)
    found = find_splits(Path(src))
    samples = (s for name, (x, y) in found.items() for s in _split_samples(x, y, name, o))
    extra = {"source": {"kind": "pcam", "splits": {SPLITS[k]: str(v[0].resolve()) for k, v in found.items()}},
             "notes": ["splits are PCam's official ones; patient_id = source slide when the meta CSV is present"]}
    labels = LabelSpec("binary", ["tumor"], prompts={"tumor": {"positive": [CAPTIONS[1]], "negative": [CAPTIONS[0]]}})
    return write_dataset(samples, out_dir, modality="patho", label_names=["tumor"], opts=o, extra=extra,
                         labels=labels)
