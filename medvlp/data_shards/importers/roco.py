"""ROCO importer (Radiology Objects in COntext, Pelka et al. 2018; github razorx89/roco-dataset): radiology figures
from PubMed Central with their captions, in the release's split folders.

Expected folder (the `data/` folder of the release, after its download script fetched the images):

    roco/
      train/radiology/captions.txt        ROCO_00002<TAB>caption      (one line per image)
      train/radiology/images/ROCO_00002.jpg
      validation/radiology/...            (or val/, dev/)
      test/radiology/...
  A CSV with columns `id` (or `name`) and `caption` in the radiology folder is read instead of captions.txt when
  captions.txt is absent (the re-packaged releases: radiologytraindata.csv with id, name, caption).
  `non-radiology/` folders are not read.

Read: one sample per caption line; the image is images/<id>.jpg (or `name` from the CSV). A line without a tab,
an empty caption or a missing image is a bad row (`train/radiology/captions.txt line N`). No labels: ROCO's
UMLS concept files are not read; evaluate it by retrieval.

Splits: the release's folders (train / validation / test; validation = val). ROCO has no patient or article id
in these files, so the group of a sample is its image id: the official split is by image, and figures of one
article may sit in two splits (recorded in index.json["build"]["splits_by"]). Option `official=false` splits by
a seeded hash of the image id instead (same caveat). Paths stay inside the source folder.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from medvlp.data_shards.importers.common import IMAGE_FILE_OPTIONS, build_image_rows
from medvlp.data_shards.importers.layout import (LayoutError, limit_rows, options, place_rows, require_columns,
                                                 resolve_within, source_root, split_record, usable_rows)
from medvlp.data_shards.manifest import Row, iter_csv_rows, read_text, sanitise_key

OPTIONS = {**{k: v for k, v in IMAGE_FILE_OPTIONS.items() if k != "root"},
           "official": (bool, True, "use the release's split folders (else a seeded hash of the image id)")}
SPLIT_DIRS = {"train": "train", "validation": "val", "val": "val", "dev": "val", "test": "test"}


def _caption_rows(root: Path, folder: str) -> tuple[list[tuple[str, int, str, str]], list[str], str]:
    """(source name, line, image file, caption) of one split folder; errors; the source file's relative name."""
    rad = f"{folder}/radiology"
    txt, err = resolve_within(root, f"{rad}/captions.txt")
    if err is not None:
        raise LayoutError(f"roco importer: {rad}/captions.txt: {err}")
    out, errors = [], []
    if Path(txt).is_file():
        name = f"{rad}/captions.txt"
        for line, text in enumerate(re.split(r"\r\n|\r|\n", read_text(Path(txt))), start=1):
            if not text.strip():
                continue
            ident, tab, cap = text.partition("\t")
            if not tab:
                errors.append(f"{name} line {line}: no tab between image id and caption")
                continue
            out.append((name, line, f"{ident.strip()}.jpg", cap.strip()))
        return out, errors, name
    csvs = sorted(p for p in (root / rad).glob("*.csv")) if (root / rad).is_dir() else []
    if not csvs:
        raise LayoutError(f"roco importer: {root / rad} has neither captions.txt nor a captions CSV")
    path, err = resolve_within(root, f"{rad}/{csvs[0].name}")
    if err is not None:
        raise LayoutError(f"roco importer: {rad}/{csvs[0].name}: {err}")
    name = f"{rad}/{csvs[0].name}"
    for line, raw, rerr in iter_csv_rows(Path(path)):
        if raw is not None and "__header__" in raw:
            require_columns(raw["__header__"], ["caption"], f"{name} line 1")
            if not {"id", "name"} & set(raw["__header__"]):
                raise LayoutError(f"{name} line 1: missing column 'id' or 'name'")
            continue
        if rerr is not None:
            errors.append(f"{name} line {line}: {rerr}")
            continue
        image = (raw.get("name") or "").strip() or f"{(raw.get('id') or '').strip()}.jpg"
        out.append((name, line, image, raw["caption"].strip()))
    return out, errors, name


def import_roco(src: str | Path, out_dir: str | Path, **opts: Any) -> dict:
    """ROCO data folder (split folders with radiology/captions + images) -> shards + index.json."""
    o = options("roco", opts, OPTIONS)
    o["root"] = ""
    root = source_root(src, "roco")
    folders = [d for d in SPLIT_DIRS if (root / d / "radiology").is_dir()]
    if not folders:
        raise LayoutError(f"roco importer: {root} has no train/radiology, validation/radiology or test/radiology "
                          "folder")
    rows, errors, sources = [], [], []
    for folder in folders:
        items, errs, name = _caption_rows(root, folder)
        errors += errs
        sources.append(name)
        for source, line, image, caption in items:
            where = f"{source} line {line}"
            if not caption:
                errors.append(f"{where}: empty caption (image {image})")
                continue
            given = f"{folder}/radiology/images/{image}"
            path, why = resolve_within(root, given)
            if why is not None:
                errors.append(f"{where}: image: {why}")
                continue
            ident = Path(image).stem
            rows.append(Row(source=source, line=line, key=sanitise_key(f"roco/{ident}"), kind="image",
                            paths={"image": path}, given={"image": given}, text=caption, labels={},
                            patient_id=ident, split=SPLIT_DIRS[folder] if o["official"] else None, modality="cxr",
                            dataset="roco", meta={"roco_id": ident, "release_split": folder}))
    rows = usable_rows(rows, errors, "roco", root, "caption", "no lines")
    place_rows(rows, o, release_splits=bool(o["official"]))
    rows = limit_rows(rows, o["limit"])
    extra = {"source": {"kind": "roco", "path": str(root.resolve()), "captions": sources},
             "splits_by": {**split_record(rows, "image id"), "official": bool(o["official"]),
                           "note": "ROCO has no patient/article id: figures of one article may be in two splits"},
             "notes": ["no labels: evaluate by retrieval"]}
    return build_image_rows(rows, errors, out_dir, {**o, "split": "auto"}, extra)
