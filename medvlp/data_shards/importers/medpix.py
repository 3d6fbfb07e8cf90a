"""MedPix 2.0 importer (Siragusa et al. 2024; github CHILab1/MedPix-2.0): CT and MR images with captions, grouped
in clinical cases.

Expected folder:

    MedPix-2-0/
      Descriptions.json       [{"Type": "CT" | "MR", "U_id": case id, "image": file stem,
                                "Description": {"Caption", "Modality", "Plane", "Age", "Sex", "ACR Codes", ...},
                                "Location": ..., "Location Category": ...}, ...]   one record per image
      Case_topic.json         [{"U_id", "Case": {"Title", "History", "Findings", ...}, "Topic": {...}}, ...]
      images/                 <image>.png
      splitted_dataset/       optional: descriptions_{train,dev,test}.jsonl, the case-disjoint splits

Read: one sample per Descriptions.json record; text = `Description.Caption` (option `text=caption_case` appends
the case's Title and Findings from Case_topic.json). Empty captions and MedPix's placeholder ("Replace this -
DESCRIPTION ...") are bad records, reported as `Descriptions.json record N` and skipped.

Labels: the sample labels are the scan type, single-label over CT / MR (one-hot), so the standard zero-shot
evaluation scores CT vs MR. Label groups (single-label, index.json["label_groups"]): modality (CT / MR), plane
(`Description.Plane`: Axial, Coronal, Sagittal, ...) and region (`Location Category`: Head, Thorax, Abdomen, ...),
each over its values with >= `min_count` images. Meta keeps u_id, type, the detailed `Description.Modality`
(e.g. "CT w/contrast (IV)"), plane, location, location_category, age, sex and acr_codes.

Splits: by case (`U_id`). With `splitted_dataset/` present (and `official=true`) its descriptions_{train,dev,test}
files give each image's split (dev = val) and an image in none of them is reported; else a seeded hash of the case.
Either way no case is in two splits (index.json["build"]["splits_by"]). Image paths stay inside the source folder.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from medvlp.data_shards.importers.common import IMAGE_FILE_OPTIONS, build_image_rows
from medvlp.data_shards.importers.layout import (LayoutError, label_group, limit_rows, options, place_rows,
                                                 require_columns, resolve_within, source_file, source_root,
                                                 split_record, usable_rows)
from medvlp.data_shards.manifest import Row, iter_jsonl_rows, sanitise_key

OPTIONS = {**{k: v for k, v in IMAGE_FILE_OPTIONS.items() if k != "root"},
           "text": (str, "caption", "caption | caption_case (caption + the case's Title and Findings)"),
           "official": (bool, True, "use splitted_dataset/ when present (else split by case hash)"),
           "min_count": (int, 5, "images a plane / region / modality needs to become a label-group class")}
SPLIT_FILES = {"train": "descriptions_train.jsonl", "val": "descriptions_dev.jsonl", "test": "descriptions_test.jsonl"}
PLACEHOLDER = "replace this"
TYPE_PROMPTS = {"CT": ["a CT scan."], "MR": ["an MRI scan."]}
SPEC = {"kind": "single-label", "class_names": ["CT", "MR"], "templates": ["a {c} image."],
        "prompts": {c: {"positive": p} for c, p in TYPE_PROMPTS.items()}}


def _load_list(path: Path, what: str) -> list:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LayoutError(f"{path.name}: not valid JSON ({e})") from None
    if not isinstance(doc, list):
        raise LayoutError(f"{path.name}: expected a JSON list of {what}, got {type(doc).__name__}")
    return doc


def _official_splits(root: Path) -> dict[str, str] | None:
    folder = root / "splitted_dataset"
    if not folder.is_dir():
        return None
    out: dict[str, str] = {}
    for split, name in SPLIT_FILES.items():
        path, err = resolve_within(root, f"splitted_dataset/{name}")
        if err is not None or not Path(path).is_file():
            raise LayoutError(f"medpix importer: splitted_dataset/ without {name} ({err or 'not found'}); "
                              "remove the folder or pass official=false")
        for _, raw, _ in iter_jsonl_rows(Path(path)):
            if raw is not None and raw.get("image"):
                out[str(raw["image"])] = split
    return out


def _case_text(case: dict | None) -> str:
    c = (case or {}).get("Case") or {}
    return " ".join(str(c.get(k) or "").strip() for k in ("Title", "Findings") if str(c.get(k) or "").strip())


def import_medpix(src: str | Path, out_dir: str | Path, **opts: Any) -> dict:
    """MedPix 2.0 folder -> shards + index.json. Returns the index."""
    o = options("medpix", opts, OPTIONS)
    o["root"] = ""
    if o["text"] not in ("caption", "caption_case"):
        raise LayoutError(f"medpix importer: option text={o['text']!r} is not caption or caption_case")
    root = source_root(src, "medpix")
    desc_path = source_file(root, "Descriptions.json", "medpix", "one record per image")
    records = _load_list(desc_path, "image records")
    cases = {}
    if (root / "Case_topic.json").exists():
        cases = {str(c.get("U_id")): c for c in _load_list(source_file(root, "Case_topic.json", "medpix", "cases"),
                                                              "cases") if isinstance(c, dict)}
    elif o["text"] == "caption_case":
        raise LayoutError(f"medpix importer: text=caption_case needs {root / 'Case_topic.json'}")
    official = _official_splits(root) if o["official"] else None
    rows, errors = [], []
    for n, rec in enumerate(records, start=1):
        where = f"{desc_path.name} record {n}"
        if not isinstance(rec, dict):
            errors.append(f"{where}: expected an object, got {type(rec).__name__}")
            continue
        if n == 1:
            require_columns(rec, ["Type", "U_id", "image", "Description"], f"{desc_path.name} record 1")
        d = rec.get("Description") if isinstance(rec.get("Description"), dict) else {}
        caption = str(d.get("Caption") or "").strip()
        uid, stem, typ = (str(rec.get(k) or "").strip() for k in ("U_id", "image", "Type"))
        missing = [k for k, v in (("U_id", uid), ("image", stem), ("Type", typ)) if not v]
        if missing:
            errors.append(f"{where}: key(s) {missing} empty or missing")
            continue
        if not caption or caption.lower().startswith(PLACEHOLDER):
            errors.append(f"{where}: 'Description.Caption' {'is a placeholder' if caption else 'empty'} "
                          f"(image {stem})")
            continue
        if o["text"] == "caption_case" and _case_text(cases.get(uid)):
            caption = f"{caption} {_case_text(cases.get(uid))}"
        given = f"images/{stem}" if Path(stem).suffix.lower() in (".png", ".jpg", ".jpeg") else f"images/{stem}.png"
        path, why = resolve_within(root, given)
        if why is not None:
            errors.append(f"{where}: key 'image': {why}")
            continue
        split = None
        if official is not None:
            split = official.get(stem)
            if split is None:
                errors.append(f"{where}: image {stem!r} is in none of splitted_dataset/{list(SPLIT_FILES.values())}")
                continue
        meta = {"u_id": uid, "type": typ, "source_modality": typ, "scan": str(d.get("Modality") or "").strip(),
                "plane": str(d.get("Plane") or "").strip(), "location": str(rec.get("Location") or "").strip(),
                "location_category": str(rec.get("Location Category") or "").strip(),
                "age": str(d.get("Age") or "").strip(), "sex": str(d.get("Sex") or "").strip(),
                "acr_codes": str(d.get("ACR Codes") or "").strip()}
        meta = {k: v for k, v in meta.items() if v}
        labels = {c: int(typ == c) for c in SPEC["class_names"]} if typ in SPEC["class_names"] else {}
        rows.append(Row(source=desc_path.name, line=n, key=sanitise_key("medpix/" + Path(stem).stem), kind="image",
                        paths={"image": path}, given={"image": given}, text=caption, labels=labels, patient_id=uid,
                        split=split, modality="cxr", dataset="medpix", meta=meta))
    rows = usable_rows(rows, errors, "medpix", desc_path, "record", "the list is empty")
    place_rows(rows, o, release_splits=official is not None)
    rows = limit_rows(rows, o["limit"])
    groups = {}
    for name, field, tmpl, prompts in (("modality", "source_modality", ["a {c} image."], TYPE_PROMPTS),
                                       ("plane", "plane", ["a {c} medical image."], None),
                                       ("region", "location_category", ["a medical image of the {c}."], None)):
        g = label_group(field, (r.meta.get(field, "") for r in rows), o["min_count"], tmpl, prompts)
        if g is not None:
            groups[name] = g
    extra = {"source": {"kind": "medpix", "path": str(root.resolve())},
             "splits_by": {**split_record(rows, "U_id"), "official": official is not None},
             "label_groups": groups, "notes": ["text = Description.Caption", "modality cxr = 2D grey radiology "
                                               "image; the scan type is meta['source_modality'] (CT / MR)"]}
    return build_image_rows(rows, errors, out_dir, {**o, "split": "auto"}, extra, labels=SPEC)
