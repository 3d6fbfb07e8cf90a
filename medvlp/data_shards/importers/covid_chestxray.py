"""covid-chestxray-dataset importer (Cohen et al. 2020, github ieee8023/covid-chestxray-dataset): `metadata.csv`
plus `images/`.

Expected folder (the repository as cloned or downloaded):

    covid-chestxray-dataset/
      metadata.csv        patientid, offset, sex, age, finding, ..., view, modality, date, location, folder,
                          filename, doi, url, license, clinical_notes, other_notes (and a trailing unnamed column)
      images/             the files `filename` names (`folder` column = "images"; CT rows point at volumes/)

Read: one sample per X-ray row (`modality` "X-ray"; CT rows are counted and left out). The text is
`clinical_notes` verbatim (several images of a patient share one note). Required columns: patientid, finding, view,
modality, filename, clinical_notes; a missing one is a one-line error. Image path = `folder`/`filename` (just
`filename` under images/ when there is no `folder` column), relative to the source folder and checked to stay
inside it (`layout.resolve_within`).

Labels:
* sample labels (multi-label, index.json["labels"]): the finding terms. `finding` is "COVID-19", "COVID-19, ARDS"
  (comma list) or, in later releases, a path "Pneumonia/Viral/COVID-19": every term is 1, every other term of the
  vocabulary 0. "No Finding" sets all to 0; "todo" / "Unknown" rows carry no labels. Terms with fewer than
  `min_count` images are left out of the vocabulary (kept in meta["finding"]).
* label groups (single-label zero-shot, index.json["label_groups"]): `view` (PA, AP, AP Supine, L, ...) and
  `finding` (the whole finding string), each over its classes with >= `min_count` images; `modality` too when the
  import keeps more than one.
Meta keeps patientid, offset, sex, age, finding, view, date, location, doi, url, the row's `modality` as
`source_modality` (meta["modality"] is the shard modality, cxr) and the per-image
`license` (always present, "" when the row has none: the licences differ per image; check before sharing).

Splits: by `patientid` (a seeded hash; `val_frac`, `test_frac`), so no patient is in two splits; index.json["build"]
["splits_by"] records the grouping and the patients per split. Bad rows (empty note, missing image, a path leaving
the folder, a duplicated file name) are reported with their CSV line and skipped (`on_error=fail` stops instead).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from medvlp.data_shards.importers.common import IMAGE_FILE_OPTIONS, build_image_rows
from medvlp.data_shards.importers.layout import (LayoutError, label_group, limit_rows, options, place_rows,
                                                 require_columns, resolve_within, source_file, source_root,
                                                 split_record, usable_rows)
from medvlp.data_shards.manifest import Row, iter_csv_rows, sanitise_key

OPTIONS = {**{k: v for k, v in IMAGE_FILE_OPTIONS.items() if k != "root"},
           "metadata": (str, "metadata.csv", "the metadata CSV, relative to the source folder"),
           "modalities": (str, "X-ray", "comma list of `modality` values imported (X-ray rows only by default)"),
           "min_count": (int, 5, "images a finding term / view / finding needs to become a label class")}
REQUIRED = ["patientid", "finding", "view", "modality", "filename", "clinical_notes"]
META = ["patientid", "offset", "sex", "age", "finding", "view", "date", "location", "doi", "url"]
NO_LABEL = {"todo", "unknown", ""}
NORMAL = "no finding"
FINDING_TEMPLATES = ["a chest x-ray showing {c}."]
FINDING_NEGATIVE = ["a chest x-ray without {c}."]
VIEW_PROMPTS = {"PA": ["a posteroanterior (PA) chest x-ray."], "AP": ["an anteroposterior (AP) chest x-ray."],
                "AP Supine": ["a supine anteroposterior chest x-ray."], "L": ["a lateral chest x-ray."],
                "AP Erect": ["an erect anteroposterior chest x-ray."]}


def finding_terms(finding: str) -> list[str]:
    """The terms of a `finding` cell: comma lists and '/' paths split; 'No Finding' / 'todo' -> []."""
    if finding.strip().lower() in NO_LABEL | {NORMAL}:
        return []
    return sorted({t.strip() for t in re.split(r"[,/]", finding) if t.strip().lower() not in NO_LABEL | {NORMAL}})


def _rows(csv_path: Path, root: Path, o: dict) -> tuple[list[Row], list[str], dict]:
    rows, errors = [], []
    kept = {m.strip().lower() for m in o["modalities"].split(",") if m.strip()}
    other = 0
    for line, raw, err in iter_csv_rows(csv_path):
        if raw is not None and "__header__" in raw:
            require_columns(raw["__header__"], REQUIRED, f"{csv_path.name} line 1")
            continue
        where = f"{csv_path.name} line {line}"
        if err is not None:
            errors.append(f"{where}: {err}")
            continue
        if raw["modality"].strip().lower() not in kept:
            other += 1
            continue
        pid = raw["patientid"].strip()
        if not pid:
            errors.append(f"{where}: column 'patientid': empty")
            continue
        text = raw["clinical_notes"].strip()
        if not text:
            errors.append(f"{where}: column 'clinical_notes': empty (no text for the image)")
            continue
        fname = raw["filename"].strip()
        given = f"{raw['folder'].strip()}/{fname}" if raw.get("folder", "").strip() else f"images/{fname}"
        path, why = resolve_within(root, given)
        if why is not None:
            errors.append(f"{where}: column 'filename': {why}")
            continue
        meta = {c: raw[c].strip() for c in META if raw.get(c, "").strip()}
        meta["source_modality"] = raw["modality"].strip()  # meta["modality"] is the shard modality (cxr)
        meta["license"] = raw.get("license", "").strip()
        rows.append(Row(source=csv_path.name, line=line, key=sanitise_key("covid_chestxray/" + Path(fname).stem),
                        kind="image", paths={"image": path}, given={"image": given}, text=text, labels={},
                        patient_id=pid, split=None, modality="cxr", dataset="covid_chestxray", meta=meta))
    return rows, errors, {"rows_other_modality": other}


def import_covid_chestxray(src: str | Path, out_dir: str | Path, **opts: Any) -> dict:
    """covid-chestxray-dataset folder (metadata.csv + images/) -> shards + index.json. Returns the index."""
    o = options("covid_chestxray", opts, OPTIONS)
    o["root"] = ""
    if o["min_count"] < 1:
        raise LayoutError(f"covid_chestxray importer: option min_count={o['min_count']} must be >= 1")
    root = source_root(src, "covid_chestxray")
    csv_path = source_file(root, o["metadata"], "covid_chestxray", "the data set's metadata CSV")
    rows, errors, counts = _rows(csv_path, root, o)
    rows = usable_rows(rows, errors, "covid_chestxray", csv_path, "row",  # a file on two rows is a bad row
                       "none of modality " + o["modalities"])
    term_counts: dict[str, int] = {}
    for r in rows:
        for t in finding_terms(r.meta.get("finding", "")):
            term_counts[t] = term_counts.get(t, 0) + 1
    vocab = sorted(t for t, n in term_counts.items() if n >= o["min_count"])
    for r in rows:
        f = r.meta.get("finding", "")
        if f.strip().lower() not in NO_LABEL:
            terms = set(finding_terms(f))
            r.labels = {t: int(t in terms) for t in vocab}
    place_rows(rows, o)
    rows = limit_rows(rows, o["limit"])
    groups = {}
    for name, field, tmpl, prompts in (("view", "view", ["a chest x-ray, {c} view."], VIEW_PROMPTS),
                                       ("finding", "finding", ["a chest x-ray of {c}."], None),
                                       ("modality", "source_modality", ["a chest {c}."], None)):
        g = label_group(field, (r.meta.get(field, "") for r in rows), o["min_count"], tmpl, prompts)
        if g is not None:
            groups[name] = g
    labels = ({"kind": "multi-label", "class_names": vocab, "templates": FINDING_TEMPLATES,
               "negative_templates": FINDING_NEGATIVE} if vocab else None)
    extra = {"source": {"kind": "covid_chestxray", "path": str(root.resolve()), "metadata": csv_path.name},
             "splits_by": split_record(rows, "patientid"), "label_groups": groups, **counts,
             "notes": ["text = clinical_notes (shared by a patient's images)", "X-ray rows only by default",
                       "per-image license in meta['license']"]}
    return build_image_rows(rows, errors, out_dir, o, extra, labels=labels)
