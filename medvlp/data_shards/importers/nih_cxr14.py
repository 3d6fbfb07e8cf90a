"""NIH ChestX-ray14 importer: the only public chest data set here with expert boxes, i.e. a real localisation test.

Layout (as released; `SRC` is the folder, or its Data_Entry_2017.csv):

    SRC/Data_Entry_2017.csv    Image Index, Finding Labels ("A|B" or "No Finding"), Follow-up #, Patient ID,
                               Patient Age, Patient Gender, View Position, OriginalImage[Width, Height], ...
    SRC/BBox_List_2017.csv     Image Index, Finding Label, Bbox [x, y, w, h] (pixels of the 1024 x 1024 PNG);
                               optional (without it: labels only)
    SRC/images*/**/*.png       the images (images/, or images_001/images/ ... as unpacked from the archives)

Samples: 14 findings (multi-label, 1 / 0; the data set has no uncertain labels), a caption synthesised from them
("Chest radiograph. There is cardiomegaly and effusion." — the data set has no reports), and the boxes as the
`boxes` json member ([x0, y0, x1, y1] pixels of the STORED image, rescaled with the build's resize), which
`medvlp finetune pcam` scores with the pointing game and IoU and `medvlp localize` draws. The box list's
"Infiltrate" is the label "Infiltration".

Splits are by patient (`Patient ID`): with `box_patients=test` (default) every patient with a box goes to the test
split, so the boxes are held out; the other patients get train / val / test by a seeded patient hash.

Paths: `Image Index` must be a bare file name, and every CSV, image folder and image file must resolve (symlinks
followed) inside SRC; anything else is reported by name and skipped (`on_error=fail`: the import stops).
"""
from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import Any

from medvlp.data_shards.importers.common import IMAGE_FILE_OPTIONS, build_image_rows, coerce_options
from medvlp.data_shards.manifest import Row, sanitise_key
from medvlp.data_shards.paths import PathError, PathPolicy

FINDINGS = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Effusion", "Emphysema", "Fibrosis", "Hernia",
            "Infiltration", "Mass", "Nodule", "Pleural_Thickening", "Pneumonia", "Pneumothorax"]
BOX_ALIASES = {"Infiltrate": "Infiltration"}
ENTRY_CSV, BBOX_CSV = "Data_Entry_2017.csv", "BBox_List_2017.csv"
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+\.png$")


def _readable(f: str) -> str:
    return f.replace("_", " ").lower()


LABEL_SPEC = {"kind": "multi-label", "prompts": {f: {"positive": [f"There is {_readable(f)}."],
                                                     "negative": [f"No {_readable(f)}."]} for f in FINDINGS}}
OPTIONS = {**{k: v for k, v in IMAGE_FILE_OPTIONS.items() if k != "root"},
           "box_patients": (str, "test", "test | auto: split of the patients that have a box (test keeps the boxes "
                                         "held out)"),
           "boxes": (bool, True, "read BBox_List_2017.csv when present")}


def _inside(path: Path, root: Path) -> bool:
    """`path` resolves (symlinks followed) to `root` or below it, and is no FIFO, socket or device: the data-root
    policy (`medvlp.data_shards.paths.PathPolicy`)."""
    try:
        PathPolicy.for_source(root).check(path.resolve(), walk=False)
        return True
    except (PathError, OSError, RuntimeError):
        return False


def synthesise_caption(labels: dict[str, int]) -> str:
    pos = [_readable(f) for f in FINDINGS if labels.get(f) == 1]
    if not pos:
        return "Chest radiograph. No acute cardiopulmonary abnormality."
    joined = pos[0] if len(pos) == 1 else ", ".join(pos[:-1]) + " and " + pos[-1]
    return f"Chest radiograph. There is {joined}."


def _csv_rows(path: Path) -> list[list[str]]:
    with path.open(newline="", encoding="utf-8-sig") as f:
        return [row for row in csv.reader(f)]


def _image_index(src: Path, errors: list[str]) -> dict[str, Path]:
    """File name -> path of every PNG under SRC/images*/ (first found wins); escaping folders / files reported."""
    found: dict[str, Path] = {}
    for folder in sorted(p for p in src.glob("images*") if p.is_dir()):
        if not _inside(folder, src):
            errors.append(f"{folder.name}: image folder leaves the source folder {src} (symlink to "
                          f"{folder.resolve()}); skipped")
            continue
        for p in sorted(folder.rglob("*.png")):
            if not _inside(p, src):
                errors.append(f"{p.relative_to(src)}: image leaves the source folder {src}; skipped")
                continue
            found.setdefault(p.name, p)
    return found


def _read_boxes(path: Path, errors: list[str]) -> dict[str, list[tuple[str, list[float]]]]:
    """Image name -> [(finding, [x, y, w, h] in original pixels)]."""
    out: dict[str, list[tuple[str, list[float]]]] = {}
    rows = _csv_rows(path)
    if not rows or not rows[0] or rows[0][0].strip() != "Image Index":
        raise ValueError(f"{path.name} line 1: expected the header 'Image Index,Finding Label,Bbox [x,y,w,h]'")
    for line, row in enumerate(rows[1:], start=2):
        if not row or not any(c.strip() for c in row):
            continue
        where = f"{path.name} line {line}"
        if len(row) < 6:
            errors.append(f"{where}: expected Image Index, Finding Label, x, y, w, h; got {len(row)} columns")
            continue
        name, finding = row[0].strip(), BOX_ALIASES.get(row[1].strip(), row[1].strip())
        if finding not in FINDINGS:
            errors.append(f"{where}: column 'Finding Label': {row[1].strip()!r} is not one of {FINDINGS}")
            continue
        try:
            x, y, w, h = (float(v) for v in row[2:6])
        except ValueError:
            errors.append(f"{where}: column 'Bbox [x,y,w,h]': {row[2:6]} are not numbers")
            continue
        if not (w > 0 and h > 0 and x >= 0 and y >= 0):
            errors.append(f"{where}: column 'Bbox [x,y,w,h]': {[x, y, w, h]} is not a box")
            continue
        out.setdefault(name, []).append((finding, [x, y, w, h]))
    return out


def _stored_boxes(boxes: list[tuple[str, list[float]]], image: Path, limit: int) -> list[dict]:
    """[x, y, w, h] of the original image -> {"finding", "box": [x0, y0, x1, y1]} of the stored (resized) image."""
    from PIL import Image

    from medvlp.data_shards.build import bounded_size

    with Image.open(image) as im:
        w0, h0 = im.size
    nw, nh = bounded_size(w0, h0, limit)
    sx, sy = nw / w0, nh / h0
    return [{"finding": f, "box": [round(x * sx, 2), round(y * sy, 2), round(min(x + w, w0) * sx, 2),
                                   round(min(y + h, h0) * sy, 2)]} for f, (x, y, w, h) in boxes]


def import_nih_cxr14(src: str | Path, out_dir: str | Path, **opts: Any) -> dict:
    """The NIH ChestX-ray14 folder at `src` -> shards + index.json (labels, boxes, patient splits)."""
    o = coerce_options("nih_cxr14", opts, OPTIONS)
    if o["box_patients"] not in ("test", "auto"):
        raise ValueError(f"nih_cxr14 importer: option box_patients={o['box_patients']!r} is not test or auto")
    src_p = Path(src)
    if src_p.is_file() or src_p.name == ENTRY_CSV:
        src_p = src_p.parent
    if not src_p.is_dir():
        raise FileNotFoundError(f"{src}: not a folder holding {ENTRY_CSV}")
    root = src_p.resolve()
    entry = src_p / ENTRY_CSV
    if not entry.is_file():
        raise FileNotFoundError(f"{src_p}: {ENTRY_CSV} not found")
    if not _inside(entry, root):
        raise ValueError(f"{entry}: leaves the source folder {root} (symlink to {entry.resolve()})")
    errors: list[str] = []
    boxes: dict[str, list[tuple[str, list[float]]]] = {}
    bbox = src_p / BBOX_CSV
    if o["boxes"] and bbox.is_file():
        if not _inside(bbox, root):
            raise ValueError(f"{bbox}: leaves the source folder {root} (symlink to {bbox.resolve()})")
        boxes = _read_boxes(bbox, errors)
    images = _image_index(root, errors)
    table = _csv_rows(entry)
    header = [h.strip() for h in (table[0] if table else [])]
    need = ["Image Index", "Finding Labels", "Patient ID"]
    missing = [c for c in need if c not in header]
    if missing:
        raise ValueError(f"{ENTRY_CSV} line 1: missing column(s) {missing}")
    col = {c: header.index(c) for c in header if c}
    rows: list[Row] = []
    box_patients: set[str] = set()
    seen_boxes: set[str] = set()
    for line, raw in enumerate(table[1:], start=2):
        if not raw or not any(c.strip() for c in raw):
            continue
        where = f"{ENTRY_CSV} line {line}"
        get = lambda c: raw[col[c]].strip() if c in col and col[c] < len(raw) else ""  # noqa: E731
        name = get("Image Index")
        if not _NAME_RE.match(name):
            errors.append(f"{where}: column 'Image Index': {name!r} is not a bare .png file name")
            continue
        found = set(t.strip() for t in get("Finding Labels").split("|") if t.strip())
        unknown = sorted(found - set(FINDINGS) - {"No Finding"})
        if unknown:
            errors.append(f"{where}: column 'Finding Labels': {unknown} are not among {FINDINGS} or 'No Finding'")
            continue
        pid = get("Patient ID")
        if not pid.isdigit():
            errors.append(f"{where}: column 'Patient ID': {pid!r} is not a number")
            continue
        labels = {f: int(f in found) for f in FINDINGS}
        path = images.get(name, root / "images" / name)
        extra: dict[str, Any] = {"boxes": []} if boxes else {}  # every sample: the `boxes` member needs the field
        if name in boxes:
            seen_boxes.add(name)
            if path.is_file():
                try:
                    extra["boxes"] = _stored_boxes(boxes[name], path, o["image_size"])
                except OSError as e:
                    errors.append(f"{where}: column 'Image Index': cannot read {name} ({e})")
                    continue
            box_patients.add(f"nih{int(pid):05d}")
            absent = sorted({f for f, _ in boxes[name]} - found)
            if absent:
                errors.append(f"{where}: {name} has boxes of {absent} but not those labels (boxes kept; "
                              "localisation is scored where a finding is labelled present)")
        meta = {k: get(c) for c, k in (("Follow-up #", "follow_up"), ("Patient Age", "age"),
                                       ("Patient Gender", "sex"), ("View Position", "projection")) if get(c)}
        rows.append(Row(source=ENTRY_CSV, line=line, key=sanitise_key(f"nih-cxr14/{Path(name).stem}"), kind="image",
                        paths={"image": str(path)}, given={"image": name}, text=synthesise_caption(labels),
                        labels=labels, patient_id=f"nih{int(pid):05d}", split=None, modality="cxr",
                        dataset="nih-cxr14", meta=meta, extra=extra))
        if o["limit"] and len(rows) >= o["limit"]:
            break
    for name in sorted(set(boxes) - seen_boxes):
        errors.append(f"{BBOX_CSV}: {name} has boxes but no row in {ENTRY_CSV}; its boxes are not imported")
    if o["box_patients"] == "test":
        for r in rows:
            if r.patient_id in box_patients:
                r.split = "test"
    extra_doc = {"source": {"kind": "nih_cxr14", "path": str(root)},
                 "notes": ["no report text: captions are synthesised from the labels",
                           "boxes: BBox_List_2017.csv rescaled to the stored image; patients with a box are in "
                           "the test split" if o["box_patients"] == "test" else
                           "boxes: BBox_List_2017.csv rescaled to the stored image; patients split by hash"]}
    return build_image_rows(rows, errors, out_dir, {**o, "root": ""}, extra_doc, labels=LABEL_SPEC)
