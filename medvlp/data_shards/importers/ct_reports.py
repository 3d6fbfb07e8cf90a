"""CT-report importer: NIfTI volumes + a reports CSV (the layout of public CT-report sets such as CT-RATE), with
optional organ masks as TotalSegmentator-style `segmentations/*.nii.gz` folders merged into one label map.

Layout:
  <volumes>/**/train_1_a_1.nii.gz                  volumes, found by file name anywhere under `volumes`
  reports.csv                                      VolumeName, Findings_EN, Impressions_EN, ... (one row per volume)
  labels.csv (optional)                            VolumeName, one 0/1 column per abnormality
  masks (optional), per volume, the first that exists:
    <volume folder>/segmentations/*.nii.gz         (a TotalSegmentator case: sXXXX/ct.nii.gz + sXXXX/segmentations/)
    <masks>/<volume stem>/segmentations/*.nii.gz, <masks>/<volume stem>/*.nii.gz, <masks>/<volume stem>.nii.gz
Organ masks of a folder merge into one uint8 label map, label k+1 = organ k of the sorted union of organ file
names over the data set (or the `organs` option); the names go to index.json as `organ_names`. Volumes and masks
are reoriented to RAS (stored (D, H, W) = (z, y, x)), kept or resampled to `spacing`, and must share a grid.
Patient ids come from `patient_pattern` applied to the volume name (CT-RATE: `train_1_a_1` -> `train_1`).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from medvlp.data_shards.importers.common import (CLINICAL_OPTIONS, IMAGE_FILE_OPTIONS, build_image_rows, clinical_read,
                                          coerce_options)
from medvlp.data_shards.manifest import Row, iter_csv_rows, parse_label_value, sanitise_key
from medvlp.data_shards.readers import is_nifti
from medvlp.data_shards.readers.volume import organ_name

OPTIONS = {**IMAGE_FILE_OPTIONS, **CLINICAL_OPTIONS,
           "reports": (str, "", "reports CSV (default: the one *report*.csv in the source folder)"),
           "volumes": (str, "", "folder searched for the volume files (default: the source folder)"),
           "labels": (str, "", "label CSV: name column + one 0/1 column per finding (optional)"),
           "masks": (str, "", "folder of per-volume mask folders/files (optional; see the module doc)"),
           "name_column": (str, "VolumeName", "column naming the volume file"),
           "text_columns": (str, "Findings_EN,Impressions_EN", "report columns joined into the text"),
           "patient_pattern": (str, r"^([A-Za-z]+_\d+)_", "regex whose group 1 of the volume name is the patient"),
           "dataset": (str, "ct_reports", "data-set name (key prefix)")}


def _rows(path: Path, need: list[str]) -> tuple[list[tuple[int, dict]], list[str]]:
    out, errors = [], []
    for line, raw, err in iter_csv_rows(path):
        if raw is not None and "__header__" in raw:
            missing = [c for c in need if c not in raw["__header__"]]
            if missing:
                raise ValueError(f"{path.name} line 1: missing column(s) {missing}")
            continue
        if err is not None:
            errors.append(f"{path.name} line {line}: {err}")
        else:
            out.append((line, raw))
    return out, errors


def _stem(name: str) -> str:
    return organ_name(Path(name))


def _mask_for(vol: Path, masks: Path | None) -> Path | None:
    if (vol.parent / "segmentations").is_dir():
        return vol.parent / "segmentations"
    if masks is None:
        return None
    stem = _stem(vol.name)
    for cand in (masks / stem / "segmentations", masks / stem, masks / f"{stem}.nii.gz", masks / f"{stem}.nii"):
        if cand.exists():
            return cand
    return None


def import_ct_reports(src: str | Path, out_dir: str | Path, **opts: Any) -> dict:
    """NIfTI volumes + reports CSV (+ labels CSV, + organ masks) -> shards + index.json. Returns the index."""
    o = coerce_options("ct_reports", opts, OPTIONS)
    src = Path(src)
    if o["reports"]:
        reports = Path(o["reports"])
    else:
        found = sorted(src.glob("*report*.csv")) if src.is_dir() else [src]
        if len(found) != 1:
            raise FileNotFoundError(f"{src}: expected one *report*.csv, found {[p.name for p in found]}; "
                                    "give reports=PATH")
        reports = found[0]
    base = src if src.is_dir() else src.parent
    vol_dir = Path(o["volumes"]) if o["volumes"] else base
    masks = Path(o["masks"]) if o["masks"] else None
    name_col, text_cols = o["name_column"], [c for c in o["text_columns"].split(",") if c]
    volumes: dict[str, Path] = {}
    for p in sorted(vol_dir.rglob("*")):
        if p.is_file() and is_nifti(p.name) and "segmentations" not in p.parts and (masks is None or masks not in p.parents):
            volumes.setdefault(p.name, p)
    report_rows, errors = _rows(reports, [name_col, *text_cols])
    labels: dict[str, dict[str, int]] = {}
    if o["labels"]:
        for line, raw in _rows(Path(o["labels"]), [name_col])[0]:
            lab = {}
            for col, v in raw.items():
                if col == name_col:
                    continue
                try:
                    if (val := parse_label_value(v)) is not None:
                        lab[col.strip()] = val
                except ValueError as e:
                    errors.append(f"{Path(o['labels']).name} line {line}: column {col!r}: {e}")
            labels[raw[name_col].strip()] = lab
    pattern = re.compile(o["patient_pattern"])
    rows: list[Row] = []
    for line, raw in report_rows:
        name = raw[name_col].strip()
        where = f"{reports.name} line {line}"
        name_nii = name if is_nifti(name) else f"{name}.nii.gz"
        if name_nii not in volumes:
            errors.append(f"{where}: column {name_col!r}: volume {name_nii!r} not found under {vol_dir}")
            continue
        text = " ".join(raw[c].strip() for c in text_cols if raw[c].strip())
        if not text:
            errors.append(f"{where}: columns {text_cols}: empty report")
            continue
        vol = volumes[name_nii]
        paths = {"volume": str(vol)}
        if (mask := _mask_for(vol, masks)) is not None:
            paths["mask"] = str(mask)
        stem = _stem(name_nii)
        m = pattern.search(stem)
        rows.append(Row(source=reports.name, line=line, key=sanitise_key(f"{o['dataset']}/{stem}"), kind="volume",
                        paths=paths, given={k: str(Path(v).relative_to(base)) if base in Path(v).parents else v
                                            for k, v in paths.items()},
                        text=text, labels=labels.get(name, labels.get(stem, {})),
                        patient_id=m.group(1) if m and m.groups() else stem, split=None, modality="ct",
                        dataset=o["dataset"], meta={}))
        if o["limit"] and len(rows) >= o["limit"]:
            break
    if not rows:
        raise ValueError(f"{reports}: no row names a volume found under {vol_dir}" +
                         (f" (first problem: {errors[0]})" if errors else ""))
    read = clinical_read("ct_reports", o, rows)
    extra = {"source": {"kind": "ct_reports", "reports": reports.name, "labels": Path(o["labels"]).name or None,
                        "masks": bool(masks) or any("mask" in r.paths for r in rows), "hash_ids": o["hash_ids"]}}
    return build_image_rows(rows, errors, out_dir, o, extra, read, root=[base, vol_dir] + ([masks] if masks else []))
