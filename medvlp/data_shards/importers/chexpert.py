"""CheXpert / MIMIC-CXR-style label CSV importer.

CheXpert: `Path, Sex, Age, Frontal/Lateral, AP/PA, <14 findings>` with 1.0 (positive), 0.0 (negative),
-1.0 (uncertain) or blank (not mentioned). The patient is parsed from the path (`patientNNNNN`).
MIMIC-CXR-JPG: `subject_id`, `study_id` (and `dicom_id`) columns are used when present; without `Path` the image
path is the MIMIC layout files/pXX/pSUBJECT/sSTUDY/DICOM.jpg.

These CSVs carry no report text, so the caption is synthesised from the labels ("There is cardiomegaly. Possible
edema. No pneumothorax."); the index says so in its notes. Images go through the manifest builder (validation with
line numbers, patient-level splits, parallel resizing, idempotent shards).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from medvlp.data_shards.importers.common import IMAGE_FILE_OPTIONS, build_image_rows, coerce_options, resolve_image
from medvlp.data_shards.manifest import Row, derive_key, iter_csv_rows, parse_label_value, sanitise_key

FINDINGS = ["No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
            "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
            "Fracture", "Support Devices"]
# Multi-label; the prompts are worded like the synthesised captions ("There is x." / "No x.").
LABEL_SPEC = {"kind": "multi-label", "prompts": {f: {"positive": [f"There is {f.lower()}."],
                                                     "negative": [f"No {f.lower()}."]} for f in FINDINGS}}
OPTIONS = {**IMAGE_FILE_OPTIONS, "views": (str, "all", "all | frontal | lateral: which projections to import")}
_META_COLUMNS = {"Sex": "sex", "Age": "age", "Frontal/Lateral": "view", "AP/PA": "projection",
                 "study_id": "study_id", "dicom_id": "dicom_id", "ViewPosition": "projection"}


def _join(names: list[str], last: str = "and") -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + f" {last} " + names[-1]


def synthesise_report(labels: dict[str, int], view: str = "") -> str:
    """A short templated report stating positives, uncertain findings ("possible X") and negations."""
    def name(f: str) -> str:
        return f.lower()

    findings = [f for f in labels if f not in ("No Finding", "Support Devices")]
    pos = [name(f) for f in findings if labels[f] == 1]
    unc = [name(f) for f in findings if labels[f] == -1]
    neg = [name(f) for f in findings if labels[f] == 0]
    out = [f"{view[:1].upper()}{view[1:]} chest radiograph." if view else "Chest radiograph."]
    if labels.get("No Finding") == 1 and not pos:
        out.append("No acute cardiopulmonary abnormality.")
    if pos:
        out.append(f"There is {_join(pos)}.")
    if unc:
        out.append(f"Possible {_join(unc)}.")
    if neg:
        out.append(f"No {_join(neg, 'or')}.")
    if labels.get("Support Devices") == 1:
        out.append("Support devices are present.")
    elif labels.get("Support Devices") == -1:
        out.append("Possible support devices.")
    return " ".join(out)


def _image_path(raw: dict[str, str]) -> str:
    if raw.get("Path"):
        return raw["Path"].strip()
    sid, study, dicom = (raw.get(k, "").strip() for k in ("subject_id", "study_id", "dicom_id"))
    if sid and study and dicom:
        return f"files/p{sid[:2]}/p{sid}/s{study}/{dicom}.jpg"
    return ""


def _row(raw: dict[str, str], line: int, csv_path: Path, o: dict) -> tuple[Row | None, list[str]]:
    where = f"{csv_path.name} line {line}"
    given = _image_path(raw)
    if not given:
        return None, [f"{where}: column 'Path': empty (and no subject_id/study_id/dicom_id)"]
    labels, errs = {}, []
    for f in FINDINGS:
        try:
            if (v := parse_label_value(raw.get(f))) is not None:
                labels[f] = v
        except ValueError as e:
            errs.append(f"{where}: column '{f}': {e}")
    if errs:
        return None, errs
    if raw.get("subject_id", "").strip():
        patient, dataset = f"p{raw['subject_id'].strip()}", "mimic-cxr"
    else:
        m = re.search(r"(patient\d+)", given)
        if not m:
            return None, [f"{where}: column 'Path': no 'patientNNNNN' in {given!r} (and no subject_id column)"]
        patient, dataset = m.group(1), "chexpert"
    tail = given[given.find(patient):] if patient in given else given
    key = sanitise_key(f"{dataset}/{Path(tail).with_suffix('').as_posix()}") if patient in given else \
        derive_key(given, csv_path.parent, dataset)
    meta = {v: raw[k].strip() for k, v in _META_COLUMNS.items() if raw.get(k, "").strip()}
    view = meta.get("view", "").lower()
    if o["views"] != "all" and view and view != o["views"]:
        return None, []
    report = synthesise_report(labels, " ".join(t for t in (meta.get("projection", ""), view) if t))
    return Row(source=csv_path.name, line=line, key=key, kind="image",
               paths={"image": resolve_image(given, csv_path, o["root"])}, given={"image": given}, text=report,
               labels=labels, patient_id=patient, split=None, modality="cxr", dataset=dataset, meta=meta), []


def import_chexpert(src: str | Path, out_dir: str | Path, **opts: Any) -> dict:
    """A CheXpert/MIMIC label CSV (+ its images) -> shards + index.json. Returns the index document."""
    o = coerce_options("chexpert", opts, OPTIONS)
    if o["views"] not in ("all", "frontal", "lateral"):
        raise ValueError(f"option views={o['views']!r} is not all, frontal or lateral")
    csv_path = Path(src)
    if not csv_path.is_file():
        raise FileNotFoundError(f"{csv_path}: label CSV not found")
    rows, errors = [], []
    for line, raw, err in iter_csv_rows(csv_path):
        if raw is not None and "__header__" in raw:
            header = raw["__header__"]
            if "Path" not in header and not {"subject_id", "study_id", "dicom_id"} <= set(header):
                raise ValueError(f"{csv_path.name} line 1: missing column 'Path' (or subject_id/study_id/dicom_id)")
            if not any(f in header for f in FINDINGS):
                raise ValueError(f"{csv_path.name} line 1: none of the 14 CheXpert finding columns")
            continue
        if err is not None:
            errors.append(f"{csv_path.name} line {line}: {err}")
            continue
        row, errs = _row(raw, line, csv_path, o)
        errors += errs
        if row is not None and (not o["limit"] or len(rows) < o["limit"]):
            rows.append(row)
    extra = {"source": {"kind": "chexpert", "path": str(csv_path.resolve())},
             "notes": ["no report text in the CSV: captions are synthesised from the labels"]}
    return build_image_rows(rows, errors, out_dir, o, extra, labels=LABEL_SPEC,
                            root=[o["root"]] if o["root"] else [csv_path.parent, csv_path.parent.parent])
