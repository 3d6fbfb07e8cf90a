"""MedMNIST(+) `.npz` importer: `train_images`, `train_labels`, `val_*`, `test_*` -> shards with the official splits.

2D arrays are (N, H, W) grey or (N, H, W, 3) RGB uint8; 3D ones (N, D, H, W) (e.g. organmnist3d) become CT
volumes (int16). Labels are (N, 1) class indices, or (N, C) multi-hot for the multi-label chestmnist. Each label
becomes a caption from the flavour's class-name table below (class names as in MedMNIST's INFO table; unknown
flavours get "class k"). The flavour comes from the file name: `pneumoniamnist.npz`, `pathmnist_64.npz`.

MedMNIST has no patient ids: patient_id is the proxy f"{flavour}/{split}/{i}" and the splits are the official
ones, kept exactly. Some official splits are stored sorted by class, so each split is written in a seeded random
order (option `seed`; keys keep the official index i): the first shard of a split is never one class. Arrays are
streamed from the zip member in chunks into a temporary memory-mapped file beside the output, so the 224-pixel
files never sit in memory.

index.json["labels"] records the label kind (single-label multi-class, or multi-label for chestmnist), the class
names in MedMNIST's order and the caption template as the prompt template, so the zero-shot evaluation prompts
with the captions the model was trained on.

Legend: N = samples, HW = image height/width, D = slices, C = classes.
"""
from __future__ import annotations

import itertools
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from medvlp.data_shards.importers.common import coerce_options, write_dataset
from medvlp.data_shards.schema import LabelSpec, Sample

_ORGANS = ["liver", "right kidney", "left kidney", "right femur", "left femur", "bladder", "heart", "right lung",
           "left lung", "spleen", "pancreas"]
# flavour -> (modality, caption template with {c}, class names, multi-label?)
FLAVOURS: dict[str, tuple[str, str, list[str], bool]] = {
    "pneumoniamnist": ("cxr", "a chest x-ray: {c}.", ["normal", "pneumonia"], False),
    "chestmnist": ("cxr", "a chest x-ray with {c}.", [
        "atelectasis", "cardiomegaly", "effusion", "infiltration", "mass", "nodule", "pneumonia", "pneumothorax",
        "consolidation", "edema", "emphysema", "fibrosis", "pleural thickening", "hernia"], True),
    "pathmnist": ("patho", "a histopathology image of {c}.", [
        "adipose tissue", "background", "debris", "lymphocytes", "mucus", "smooth muscle", "normal colon mucosa",
        "cancer-associated stroma", "colorectal adenocarcinoma epithelium"], False),
    "breastmnist": ("cxr", "a breast ultrasound image: {c}.", ["malignant", "normal or benign"], False),
    "dermamnist": ("patho", "a dermatoscopic image of {c}.", [
        "actinic keratosis", "basal cell carcinoma", "benign keratosis-like lesion", "dermatofibroma", "melanoma",
        "melanocytic nevus", "vascular lesion"], False),
    "octmnist": ("cxr", "a retinal OCT scan: {c}.", [
        "choroidal neovascularization", "diabetic macular edema", "drusen", "normal"], False),
    "bloodmnist": ("patho", "a blood smear image of {c}.", [
        "basophil", "eosinophil", "erythroblast", "immature granulocytes", "lymphocyte", "monocyte", "neutrophil",
        "platelet"], False),
    "organamnist": ("cxr", "an axial CT slice of the {c}.", _ORGANS, False),
    "organcmnist": ("cxr", "a coronal CT slice of the {c}.", _ORGANS, False),
    "organsmnist": ("cxr", "a sagittal CT slice of the {c}.", _ORGANS, False),
    "organmnist3d": ("ct", "a CT volume of the {c}.", _ORGANS, False),
    "nodulemnist3d": ("ct", "a chest CT of a {c} lung nodule.", ["benign", "malignant"], False),
    "adrenalmnist3d": ("ct", "an adrenal gland CT: {c}.", ["normal", "hyperplasia"], False),
    "fracturemnist3d": ("ct", "a rib CT showing {c}.", [
        "buckle rib fracture", "nondisplaced rib fracture", "displaced rib fracture"], False),
    "vesselmnist3d": ("ct", "a brain vessel segment: {c}.", ["vessel", "aneurysm"], False),
    "synapsemnist3d": ("ct", "an electron microscopy volume of an {c}.", ["inhibitory synapse",
                                                                          "excitatory synapse"], False),
}
OPTIONS = {"flavour": (str, "", "MedMNIST flavour (default: from the file name)"),
           "chunk": (int, 256, "samples read from the npz per chunk"),
           "shuffle": (bool, True, "write each split in a seeded random order (official splits may be class-sorted)"),
           "seed": (int, 0, "seed of the within-split order")}
UNKNOWN_TEMPLATE = "an image of {c}."
NEGATIVE_TEMPLATES = {"a chest x-ray with {c}.": "a chest x-ray without {c}."}
SPLIT_NAMES = ("train", "val", "test")  # MedMNIST split names are ours


def flavour_of(path: Path) -> str:
    """'pathmnist_64.npz' -> 'pathmnist' (the size suffix of MedMNIST+ files is dropped)."""
    return re.sub(r"_\d+$", "", path.stem.lower())


def npz_rows(zf: zipfile.ZipFile, name: str, chunk: int) -> tuple[tuple[int, ...], Iterator[np.ndarray]]:
    """Shape of array `name` in an open npz and an iterator over chunks of its rows (read lazily from the zip)."""
    member = f"{name}.npy"
    if member not in zf.namelist():
        raise KeyError(name)
    f = zf.open(member)
    version = np.lib.format.read_magic(f)
    reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = reader(f)
    if dtype.hasobject:
        raise ValueError(f"{name}: object arrays are not supported")
    row = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize

    def it() -> Iterator[np.ndarray]:
        with f:
            if fortran:  # column-major cannot be read by rows: load it whole (small in practice)
                yield np.asfortranarray(np.frombuffer(f.read(), dtype).reshape(shape, order="F"))
                return
            left = shape[0]
            while left:
                k = min(chunk, left)
                buf = f.read(k * row)
                if len(buf) != k * row:
                    raise ValueError(f"{name}: truncated array data")
                yield np.frombuffer(buf, dtype).reshape((k, *shape[1:]))
                left -= k

    return shape, it()


def caption(flavour: str, y: np.ndarray) -> tuple[str, dict[str, int], int | None]:
    """Label row -> (caption, labels dict, class index or None for multi-label)."""
    _, template, names, multi = FLAVOURS.get(flavour, ("", "an image of {c}.", [], False))
    if multi:
        names = names or [f"class {k}" for k in range(len(y))]
        pos = [names[k] for k in np.flatnonzero(y)]
        return template.format(c=" and ".join(pos) or "no finding"), {n: int(v) for n, v in zip(names, y)}, None
    k = int(y.reshape(-1)[0])
    name = names[k] if 0 <= k < len(names) else f"class {k}"
    labels = {n: int(i == k) for i, n in enumerate(names)} if names else {name: 1}
    return template.format(c=name), labels, k


def _split_order(n: int, limit: int, shuffle: bool, seed: int, split: str) -> np.ndarray:
    """The official indices of a split in the order they are written (the first `limit` of a seeded permutation)."""
    order = (np.random.default_rng([seed, SPLIT_NAMES.index(split)]).permutation(n) if shuffle
             else np.arange(n))
    return order[: min(n, limit or n)]


def _split_samples(zf: zipfile.ZipFile, flavour: str, modality: str, split: str, o: dict,
                   seen: set[str], tmp_dir: str) -> Iterator[Sample]:
    shape, images = npz_rows(zf, f"{split}_images", o["chunk"])
    lshape, labels = npz_rows(zf, f"{split}_labels", o["chunk"])
    if lshape[0] != shape[0]:
        raise ValueError(f"{split}: {shape[0]} images but {lshape[0]} labels")
    y_N = np.concatenate([c.reshape(len(c), -1) for c in labels]) if shape[0] else np.zeros((0, 1))
    order = _split_order(shape[0], o["limit"], o["shuffle"], o["seed"], split)
    if o["shuffle"]:  # random access by index: stream the rows once into a memory-mapped file
        store, i = None, 0
        for chunk in images:
            if store is None:
                store = np.lib.format.open_memmap(Path(tmp_dir) / f"{split}.npy", mode="w+", dtype=chunk.dtype,
                                                  shape=shape)
            store[i:i + len(chunk)] = chunk
            i += len(chunk)
        rows = ((int(j), store[j]) for j in order)
    else:
        rows = itertools.islice(enumerate(img for c in images for img in c), len(order))
    for i, img in rows:
        y = y_N[i]
        text, labs, k = caption(flavour, y)
        seen.update(labs)
        meta = {"dataset": f"medmnist/{flavour}", "modality": modality, "split": split,
                "patient_id": f"{flavour}/{split}/{i}", "index": i}
        if k is not None:
            meta["class_index"] = k
        s = Sample(key=f"{flavour}/{split}/{i:07d}", text=text, labels=labs, meta=meta)
        if modality == "ct":
            s.volume = np.asarray(img).astype(np.int16)
        else:
            img = np.asarray(img)
            s.image = np.ascontiguousarray(img if img.dtype in (np.uint8, np.uint16) else img.astype(np.uint8))
        yield s


def label_spec_of(flavour: str, names: list[str]) -> LabelSpec:
    """The flavour's label kind, class names and its caption template as the prompt template."""
    _, template, table, multi = FLAVOURS.get(flavour, ("", UNKNOWN_TEMPLATE, [], False))
    classes = list(table) or sorted(names)
    classes += [n for n in sorted(names) if n not in classes]
    if multi:
        neg = NEGATIVE_TEMPLATES.get(template, "No {c}.")
        return LabelSpec("multi-label", classes, templates=[template], negative_templates=[neg])
    if len(classes) == 1:
        return LabelSpec("binary", classes, templates=[template])
    return LabelSpec("single-label", classes, templates=[template], negative_templates=[])


def import_medmnist(src: str | Path, out_dir: str | Path, **opts: Any) -> dict:
    """One MedMNIST .npz -> shards + index.json. Returns the index document."""
    o = coerce_options("medmnist", opts, OPTIONS)
    src = Path(src)
    if not src.is_file():
        raise FileNotFoundError(f"{src}: MedMNIST .npz not found")
    flavour = o["flavour"] or flavour_of(src)
    with zipfile.ZipFile(src) as zf:
        names = {n[:-4] for n in zf.namelist() if n.endswith(".npy")}
        splits = [s for s in SPLIT_NAMES if f"{s}_images" in names]
        if not splits:
            raise ValueError(f"{src}: no '<split>_images' arrays (found {sorted(names)})")
        missing = [f"{s}_labels" for s in splits if f"{s}_labels" not in names]
        if missing:
            raise ValueError(f"{src}: missing {missing}")
        shape, _ = npz_rows(zf, f"{splits[0]}_images", 1)
        if flavour in FLAVOURS:
            modality = FLAVOURS[flavour][0]
        else:
            modality = "ct" if len(shape) == 4 and shape[-1] != 3 else "patho" if len(shape) == 4 else "cxr"
        if (modality == "ct") != (len(shape) == 4 and shape[-1] != 3):
            raise ValueError(f"{src}: flavour {flavour!r} expects {'3D' if modality == 'ct' else '2D'} arrays, "
                             f"got {splits[0]}_images of shape {shape}")
        seen: set[str] = set()  # label names met in the data (the class table's, or "class k")
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".medmnist-", dir=out_dir) as tmp:
            samples = (s for split in splits for s in _split_samples(zf, flavour, modality, split, o, seen, tmp))
            extra = {"source": {"kind": "medmnist", "path": str(src.resolve()), "flavour": flavour},
                     "notes": ["MedMNIST has no patient ids: patient_id = flavour/split/index; splits are official",
                               "each split is written in a seeded random order" if o["shuffle"] else
                               "each split is written in the file's order"],
                     "shuffle": {"enabled": o["shuffle"], "seed": o["seed"]}}
            return write_dataset(samples, out_dir, modality=modality, label_names=seen, opts=o, extra=extra,
                                 labels=lambda: label_spec_of(flavour, sorted(seen)))
