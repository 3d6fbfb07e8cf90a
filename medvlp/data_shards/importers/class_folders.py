"""Class-folder tile sets (NCT-CRC-HE-100K, Kather-2016 `Kather_texture_2016_image_tiles_5000`, ...): one folder
per tissue class holding TIFF / PNG / JPEG tiles.

    medvlp shards import class_folders NCT-CRC-HE-100K --out shards/nct --opt test_dir=CRC-VAL-HE-7K
    medvlp shards import class_folders Kather_texture_2016_image_tiles_5000 --out shards/kather

The class root is `src` itself or the one folder below it whose sub-folders hold the tiles (the Kather-2016 zip
unpacks to `Images/Samples/01_TUMOR/...`, NCT to `NCT-CRC-HE-100K/ADI/...`). A class folder's name gives the
class: a leading `NN_` is dropped and the known abbreviations are spelled out (NCT's ADI, BACK, DEB, LYM, MUC, MUS,
NORM, STR, TUM; Kather-2016's TUMOR, STROMA, COMPLEX, LYMPHO, DEBRIS, MUCOSA, ADIPOSE, EMPTY); other names are
lower-cased with `_` as spaces. Classes are single-label (one-hot labels, meta["class_index"] in sorted class-name
order); the caption and the class prompt are "a histopathology image of {class}.".

Splits: `split=auto` hashes each tile's relative path (seeded) into train / val / test by `val_frac` / `test_frac`;
a fixed `split` puts every tile in that split. `test_dir` names a second class-folder tree imported as the test
split (then `src` gives train and val only; NCT's own test set CRC-VAL-HE-7K comes from other patients, the
tiles of NCT-CRC-HE-100K carry no patient id, so a hash split of them puts tiles of one slide on both sides).
patient_id is the tile's relative path.

Paths: only regular files under the class root are read; a symlink (file or folder) whose target lies outside
the source folder is refused by name, and so is a class folder that would be reached through one.
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from medvlp.data_shards.importers.common import coerce_options, write_dataset
from medvlp.data_shards.paths import PathError, PathPolicy
from medvlp.data_shards.schema import LabelSpec, Sample

EXTENSIONS = (".tif", ".tiff", ".png", ".jpg", ".jpeg")
TEMPLATE = "a histopathology image of {c}."
NAMES = {  # NCT-CRC-HE-100K (Kather et al. 2019)
    "adi": "adipose tissue", "back": "background", "deb": "debris", "lym": "lymphocytes", "muc": "mucus",
    "mus": "smooth muscle", "norm": "normal colon mucosa", "str": "cancer-associated stroma",
    "tum": "colorectal adenocarcinoma epithelium",
    # Kather et al. 2016
    "tumor": "tumor epithelium", "stroma": "simple stroma", "complex": "complex stroma",
    "lympho": "immune cells", "debris": "debris and mucus", "mucosa": "normal mucosal glands",
    "adipose": "adipose tissue", "empty": "background"}
OPTIONS = {"split": (str, "auto", "auto (hash of the tile path) | train | val | test: the split of every tile"),
           "val_frac": (float, 0.1, "fraction of tiles in val when split=auto"),
           "test_frac": (float, 0.1, "fraction of tiles in test when split=auto"),
           "test_dir": (str, "", "a second class-folder tree imported as the test split (e.g. CRC-VAL-HE-7K)"),
           "seed": (int, 0, "seed of the hash split and of the within-split order"),
           "image_size": (int, 0, "longer tile side at most (0 = keep the stored size)")}


class ImportLayoutError(ValueError):
    """A source folder the importer cannot read as its layout (printed as one line by `medvlp`)."""

    user_facing = True


def class_name(folder: str) -> str:
    """'01_TUMOR' -> 'tumor epithelium', 'ADI' -> 'adipose tissue', 'Some_Class' -> 'some class'."""
    base = re.sub(r"^\d+[_\- ]+", "", folder).strip().lower()
    return NAMES.get(base, base.replace("_", " "))


def inside(path: Path, root: Path, what: str) -> Path:
    """`path` resolved; refuses one whose target (after symlinks) lies outside `root`, or that is a FIFO, socket or
    device (the data-root policy, `medvlp.data_shards.paths.PathPolicy`)."""
    real = path.resolve()
    try:
        PathPolicy.for_source(root).check(real, walk=False)
    except PathError as e:
        if e.reason == "special":
            raise ImportLayoutError(f"{what} {path}: not a regular file (a FIFO, socket or device); refused") from None
        raise ImportLayoutError(f"{what} {path}: resolves to {real}, outside the source folder {root}; refused") \
            from None
    return real


def _tiles(folder: Path, root: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in EXTENSIONS and inside(p, root, "tile").is_file())


def find_classes(src: Path) -> tuple[Path, dict[str, list[Path]]]:
    """(class root, {folder name: tiles}) of a class-folder tree at `src` (or one folder below it, at any depth
    while there is a single sub-folder)."""
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: class-folder tile set not found (a folder with one folder per class)")
    root = src.resolve()
    here = src
    while True:
        subs = sorted(d for d in here.iterdir() if d.is_dir())
        for d in subs:
            inside(d, root, "folder")
        classes = {d.name: _tiles(d, root) for d in subs}
        classes = {k: v for k, v in classes.items() if v}
        if classes:
            return here, classes
        if len(subs) != 1:
            raise ImportLayoutError(f"{src}: no class folders with {'/'.join(EXTENSIONS)} tiles found "
                                    f"(expected SRC/<class>/<tile> or SRC/<one folder>/.../<class>/<tile>)")
        here = subs[0]


def _read(path: Path, image_size: int) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if image_size and max(im.size) > image_size:
                s = image_size / max(im.size)
                im = im.resize((max(1, round(im.size[0] * s)), max(1, round(im.size[1] * s))), Image.BILINEAR)
            return np.asarray(im, dtype=np.uint8)
    except (OSError, ValueError) as e:
        raise ImportLayoutError(f"tile {path}: not a readable image ({e})") from None


def _split_of(rel: str, o: dict) -> str:
    if o["split"] != "auto":
        return o["split"]
    h = int.from_bytes(hashlib.sha256(f"{o['seed']}:{rel}".encode()).digest()[:8], "big") / 2**64
    return "test" if h < o["test_frac"] else "val" if h < o["test_frac"] + o["val_frac"] else "train"


def _samples(trees: list[tuple[Path, dict[str, list[Path]], str | None]], names: list[str], o: dict,
             dataset: str) -> Iterator[Sample]:
    rows = []
    for base, classes, fixed in trees:
        for folder, tiles in classes.items():
            for t in tiles:
                rel = f"{folder}/{t.name}"
                rows.append((fixed or _split_of(rel, o), class_name(folder), rel, t))
    order = np.random.default_rng(o["seed"]).permutation(len(rows))  # class folders are sorted: mix them
    counts: dict[str, int] = {}
    for i in order:
        split, cls, rel, path = rows[int(i)]
        if o["limit"] and counts.get(split, 0) >= o["limit"]:
            continue
        counts[split] = counts.get(split, 0) + 1
        k = names.index(cls)
        key = f"{dataset}/{split}/" + re.sub(r"[^A-Za-z0-9_/-]", "_", rel)
        yield Sample(key=key, text=TEMPLATE.format(c=cls), image=_read(path, o["image_size"]),
                     labels={n: int(n == cls) for n in names},
                     meta={"dataset": dataset, "modality": "patho", "split": split, "patient_id": f"{dataset}/{rel}",
                           "class": cls, "class_index": k, "file": rel})


def import_class_folders(src: str | Path, out_dir: str | Path, **opts: Any) -> dict:
    """A class-folder tile set -> shards + index.json (single-label classes from the folder names)."""
    o = coerce_options("class_folders", opts, OPTIONS)
    if o["split"] not in ("auto", "train", "val", "test"):
        raise ImportLayoutError(f"class_folders importer: option split={o['split']!r} is not auto, train, val or test")
    if not (0 <= o["val_frac"] and 0 <= o["test_frac"] and o["val_frac"] + o["test_frac"] < 1):
        raise ImportLayoutError("class_folders importer: val_frac and test_frac must be >= 0 with a sum below 1")
    base, classes = find_classes(Path(src))
    trees = [(base, classes, None)]
    if o["test_dir"]:  # the test split is the second tree: the hash split of the first gives train and val only
        o = {**o, "test_frac": 0.0}
        tbase, tclasses = find_classes(Path(o["test_dir"]))
        trees.append((tbase, tclasses, "test"))
    names = sorted({class_name(f) for _, cl, _ in trees for f in cl})
    if len(names) < 2:
        raise ImportLayoutError(f"{src}: one class folder only ({names}); a class-folder set needs >= 2 classes")
    clash = {}
    for _, cl, _ in trees:
        for f in cl:
            clash.setdefault(class_name(f), set()).add(f)
    for n, fs in clash.items():
        if len({re.sub(r"^\d+[_\- ]+", "", f).lower() for f in fs}) > 1:
            raise ImportLayoutError(f"class folders {sorted(fs)} all map to the class {n!r}; rename one")
    dataset = re.sub(r"[^A-Za-z0-9_-]+", "_", Path(src).resolve().name) or "tiles"
    extra = {"source": {"kind": "class_folders", "root": str(base.resolve()),
                        "test_dir": str(Path(o["test_dir"]).resolve()) if o["test_dir"] else "",
                        "folders": {f: class_name(f) for _, cl, _ in trees for f in cl}},
             "notes": ["labels from the class folder names; split " + (o["split"] if o["split"] != "auto" else
                       f"auto: hash of the tile path (val {o['val_frac']}, test {o['test_frac']}, seed {o['seed']})")
                       + ("; test split = test_dir" if o["test_dir"] else "")]}
    spec = LabelSpec("single-label", names, templates=[TEMPLATE], negative_templates=[])
    return write_dataset(_samples(trees, names, o, dataset), out_dir, modality="patho", label_names=names, opts=o,
                         extra=extra, labels=spec)
