"""MIMIC-CXR (DICOM) importer: `files/pXX/pXXXXXXXX/sXXXXXXXX/*.dcm` + the study's report `sXXXXXXXX.txt`.

Layout (as PhysioNet distributes it):
  files/p10/p10000032/s50414267/02aa804e-....dcm     one radiograph per file (DICOM, MONOCHROME1 or 2)
  files/p10/p10000032/s50414267.txt                  the study's free-text report
  mimic-cxr-2.0.0-split.csv[.gz]                     dicom_id, study_id, subject_id, split (train|validate|test)
  mimic-cxr-2.0.0-chexpert.csv[.gz]                  subject_id, study_id, one column per finding (1/0/-1/blank)
One sample per DICOM file; patient = subject (pXXXXXXXX), so splits stay patient-level. The report text is its
FINDINGS and IMPRESSION sections (the whole report when it has neither). The split CSV wins over the patient
hash when present; the label CSV gives the labels (finding names lower-cased). Pixels go through
`medvlp.data_shards.readers.dicom` (rescale, VOI window, MONOCHROME1 inversion, 16 bits kept); only allow-listed header
values reach the shards, and `hash_ids=true salt_file=F` also hashes subject, study and dicom ids.
"""
from __future__ import annotations

import csv
import gzip
import io
import re
from pathlib import Path
from typing import Any

from medvlp.data_shards.importers.common import (CLINICAL_OPTIONS, IMAGE_FILE_OPTIONS, build_image_rows, clinical_read,
                                          coerce_options, source_policy)
from medvlp.data_shards.paths import PathError, decode_text
from medvlp.data_shards.manifest import Row, parse_label_value, sanitise_key

OPTIONS = {**IMAGE_FILE_OPTIONS, **CLINICAL_OPTIONS,
           "split_csv": (str, "", "split CSV (default: mimic-cxr-2.0.0-split.csv[.gz] in the source folder)"),
           "labels_csv": (str, "", "label CSV (default: mimic-cxr-2.0.0-chexpert.csv[.gz] in the source folder)")}
_SPLITS = {"train": "train", "validate": "val", "val": "val", "valid": "val", "test": "test"}
_SECTION = re.compile(r"^\s*([A-Z][A-Z /&]+):", re.M)
_NON_LABEL = {"subject_id", "study_id"}


def report_text(raw: str) -> str:
    """FINDINGS + IMPRESSION sections of a report (whitespace collapsed), else the whole report."""
    parts: dict[str, str] = {}
    marks = list(_SECTION.finditer(raw))
    for i, m in enumerate(marks):
        end = marks[i + 1].start() if i + 1 < len(marks) else len(raw)
        parts[m.group(1).strip()] = raw[m.end():end]
    picked = [parts[k] for k in ("FINDINGS", "IMPRESSION") if k in parts]
    text = " ".join(" ".join(p.split()) for p in (picked or [raw]))
    return text.strip()


def _read_csv(path: Path, need: tuple[str, ...]) -> list[dict[str, str]]:
    """Rows of a (gzipped) UTF-8 CSV that has the columns `need`; ValueError naming the file otherwise."""
    data = path.read_bytes()
    if path.suffix == ".gz":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as e:
            raise ValueError(f"{path}: not a gzip file ({e})") from None
    text = decode_text(data, str(path))
    reader = csv.DictReader(io.StringIO(text))
    missing = [c for c in need if c not in (reader.fieldnames or [])]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing} (has {reader.fieldnames or 'no header'})")
    return list(reader)


def _default(src: Path, given: str, name: str) -> Path | None:
    if given:
        if not Path(given).is_file():
            raise FileNotFoundError(f"{given}: not found")
        return Path(given)
    for cand in (src / name, src / (name + ".gz")):
        if cand.is_file():
            return cand
    return None


def import_mimic_cxr(src: str | Path, out_dir: str | Path, **opts: Any) -> dict:
    """MIMIC-CXR DICOM tree (+ reports, split and label CSVs) -> shards + index.json. Returns the index document."""
    o = coerce_options("mimic_cxr", opts, OPTIONS)
    src = Path(src)
    files = src / "files" if (src / "files").is_dir() else src
    if not files.is_dir():
        raise FileNotFoundError(f"{src}: no files/ folder (expected files/pXX/pXXXXXXXX/sXXXXXXXX/*.dcm)")
    split_csv = _default(src, o["split_csv"], "mimic-cxr-2.0.0-split.csv")
    labels_csv = _default(src, o["labels_csv"], "mimic-cxr-2.0.0-chexpert.csv")
    splits: dict[str, str | None] = {}
    for i, r in enumerate(_read_csv(split_csv, ("dicom_id", "split")) if split_csv else [], start=2):
        dicom_id, value = (r["dicom_id"] or "").strip(), (r["split"] or "").strip().lower()
        if value not in _SPLITS:
            raise ValueError(f"{split_csv.name} line {i}: column 'split': {value!r} is not one of "
                             f"{sorted(_SPLITS)}")
        if dicom_id in splits and splits[dicom_id] != _SPLITS[value]:
            raise ValueError(f"{split_csv.name} line {i}: dicom_id {dicom_id!r} listed twice with different splits")
        splits[dicom_id] = _SPLITS[value]
    labels: dict[tuple[str, str], dict[str, int]] = {}
    errors: list[str] = []
    if labels_csv:
        for i, r in enumerate(_read_csv(labels_csv, ("subject_id", "study_id")), start=2):
            lab = {}
            for col, v in r.items():
                if col in _NON_LABEL or col is None:
                    continue
                try:
                    if (val := parse_label_value(v)) is not None:
                        lab[col.strip().lower()] = val
                except ValueError as e:
                    errors.append(f"{labels_csv.name} line {i}: column {col!r}: {e}")
            study_key = ((r["subject_id"] or "").strip(), (r["study_id"] or "").strip())
            if study_key in labels and labels[study_key] != lab:
                raise ValueError(f"{labels_csv.name} line {i}: subject {study_key[0]} study {study_key[1]} is listed "
                                 "twice with different labels")
            labels[study_key] = lab
    policy = source_policy([src], o)
    rows: list[Row] = []
    for study in sorted(files.glob("p*/p*/s*")):
        if not study.is_dir():
            continue
        subject, study_id = study.parent.name[1:], study.name[1:]
        report = study.with_suffix(".txt")
        dcms = sorted(p for p in study.iterdir() if p.suffix.lower() == ".dcm")
        if not report.is_file():
            errors.extend(f"{p.relative_to(src)}: no report {report.relative_to(src)}" for p in dcms)
            continue
        try:  # under the source folder (no symlink out), UTF-8, no NUL: else the study's images are reported
            text = report_text(policy.read_text(report, what=str(report.relative_to(src))))
        except PathError as e:
            errors.extend(f"{p.relative_to(src)}: {e}" for p in dcms)
            continue
        if not text:
            errors.append(f"{report.relative_to(src)}: empty report")
            continue
        for p in dcms:
            dicom_id = p.stem
            rows.append(Row(source=str(p.relative_to(src)), line=1, key=sanitise_key(
                f"mimic_cxr/p{subject}/s{study_id}/{dicom_id}"), kind="image", paths={"image": str(p)},
                given={"image": str(p.relative_to(src))}, text=text,
                labels=dict(labels.get((subject, study_id), {})), patient_id=subject,
                split=splits.get(dicom_id), modality="cxr", dataset="mimic_cxr",
                meta={"study_id": study_id, "dicom_id": dicom_id}))
        if o["limit"] and len(rows) >= o["limit"]:
            break
    if not rows:
        raise ValueError(f"{files}: no study folders with .dcm files (expected pXX/pXXXXXXXX/sXXXXXXXX/*.dcm)")
    read = clinical_read("mimic_cxr", o, rows)
    extra = {"source": {"kind": "mimic_cxr", "split_csv": split_csv.name if split_csv else None,
                        "labels_csv": labels_csv.name if labels_csv else None, "hash_ids": o["hash_ids"]}}
    return build_image_rows(rows, errors, out_dir, o, extra, read, root=policy)
