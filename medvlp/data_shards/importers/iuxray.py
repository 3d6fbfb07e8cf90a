"""IU X-ray (Open-i, Indiana University) importer: a reports CSV plus a projections CSV.

reports CSV:      uid, MeSH, Problems, image, indication, comparison, findings, impression
projections CSV:  uid, filename, projection   (one row per image; Frontal / Lateral)
One sample per image. Report = findings + impression, verbatim: the data set's "XXXX" anonymisation tokens are
kept as they are. Labels come from the Problems terms (';'-separated; MeSH main terms when Problems is empty):
every term of the vocabulary (all terms seen in the CSV) is 1 if listed, else 0; "normal" sets all to 0.
IU X-ray has no patient ids beyond the study, so patient_id = uid (each study is its own patient).
Images are looked up under `images` (default: images/images_normalized, images, or beside the CSVs).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from medvlp.data_shards.importers.common import IMAGE_FILE_OPTIONS, build_image_rows, coerce_options
from medvlp.data_shards.manifest import Row, iter_csv_rows, sanitise_key

OPTIONS = {**IMAGE_FILE_OPTIONS,
           "projections": (str, "", "projections CSV (default: indiana_projections.csv beside the reports CSV)"),
           "images": (str, "", "image folder (default: images/images_normalized, images, or the CSV folder)"),
           "views": (str, "all", "all | frontal | lateral: which projections to import")}
REPORT_COLUMNS = ["uid", "MeSH", "Problems", "findings", "impression"]
NORMAL = "normal"


def problem_terms(problems: str, mesh: str) -> list[str]:
    """Lower-cased finding terms of a study: Problems terms, or MeSH main terms (before '/') as a fallback."""
    text = problems.strip() or ";".join(t.split("/")[0] for t in mesh.split(";"))
    return sorted({t.strip().lower() for t in text.split(";") if t.strip()})


def _read_reports(path: Path) -> tuple[dict[str, tuple[int, dict]], list[str]]:
    reports, errors = {}, []
    for line, raw, err in iter_csv_rows(path):
        if raw is not None and "__header__" in raw:
            missing = [c for c in REPORT_COLUMNS if c not in raw["__header__"]]
            if missing:
                raise ValueError(f"{path.name} line 1: missing column(s) {missing}")
            continue
        if err is not None:
            errors.append(f"{path.name} line {line}: {err}")
        elif raw["uid"].strip() in reports:
            errors.append(f"{path.name} line {line}: column 'uid': duplicate uid {raw['uid'].strip()!r} "
                          f"(first at line {reports[raw['uid'].strip()][0]})")
        else:
            reports[raw["uid"].strip()] = (line, raw)
    return reports, errors


def _image_dir(reports_csv: Path, given: str) -> Path:
    if given:
        return Path(given)
    for cand in ("images/images_normalized", "images"):
        if (reports_csv.parent / cand).is_dir():
            return reports_csv.parent / cand
    return reports_csv.parent


def import_iuxray(src: str | Path, out_dir: str | Path, **opts: Any) -> dict:
    """IU X-ray reports + projections CSVs (+ images) -> shards + index.json. Returns the index document."""
    o = coerce_options("iuxray", opts, OPTIONS)
    src = Path(src)
    reports_csv = src / "indiana_reports.csv" if src.is_dir() else src
    proj_csv = Path(o["projections"]) if o["projections"] else reports_csv.parent / "indiana_projections.csv"
    for p in (reports_csv, proj_csv):
        if not p.is_file():
            raise FileNotFoundError(f"{p}: not found (IU X-ray needs the reports and the projections CSV)")
    reports, errors = _read_reports(reports_csv)
    vocab = sorted({t for _, raw in reports.values() for t in problem_terms(raw["Problems"], raw["MeSH"])} - {NORMAL})
    image_dir = _image_dir(reports_csv, o["images"])
    rows: list[Row] = []
    for line, raw, err in iter_csv_rows(proj_csv):
        if raw is not None and "__header__" in raw:
            missing = [c for c in ("uid", "filename", "projection") if c not in raw["__header__"]]
            if missing:
                raise ValueError(f"{proj_csv.name} line 1: missing column(s) {missing}")
            continue
        where = f"{proj_csv.name} line {line}"
        if err is not None:
            errors.append(f"{where}: {err}")
            continue
        uid, fname, view = raw["uid"].strip(), raw["filename"].strip(), raw["projection"].strip()
        if o["views"] != "all" and view.lower() != o["views"]:
            continue
        if uid not in reports:
            errors.append(f"{where}: column 'uid': {uid!r} has no row in {reports_csv.name}")
            continue
        rline, rep = reports[uid]
        text = " ".join(t for t in (rep["findings"].strip(), rep["impression"].strip()) if t)
        if not text:
            errors.append(f"{reports_csv.name} line {rline}: columns 'findings', 'impression': both empty "
                          f"(image {fname})")
            continue
        terms = set(problem_terms(rep["Problems"], rep["MeSH"]))
        labels = {t: int(t in terms) for t in vocab}
        key = sanitise_key("iuxray/" + fname.split(".")[0])
        meta = {"uid": uid, "view": view, "mesh": rep["MeSH"].strip(), "problems": rep["Problems"].strip()}
        rows.append(Row(source=proj_csv.name, line=line, key=key, kind="image",
                        paths={"image": str(image_dir / fname)}, given={"image": fname}, text=text, labels=labels,
                        patient_id=uid, split=None, modality="cxr", dataset="iuxray", meta=meta))
        if o["limit"] and len(rows) >= o["limit"]:
            break
    extra = {"source": {"kind": "iuxray", "reports": str(reports_csv.resolve()),
                        "projections": str(proj_csv.resolve())},
             "notes": ["IU X-ray has no patient ids: patient_id = study uid", "reports keep 'XXXX' anonymisation"]}
    return build_image_rows(rows, errors, out_dir, o, extra, root=[reports_csv.parent, image_dir])
