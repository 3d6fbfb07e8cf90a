"""The image-caption importers (covid_chestxray, medpix, roco) on folders fabricated in each public layout, and
covid_chestxray on the real radiographs when that folder is present."""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medvlp.data_shards.importers import import_dataset
from medvlp.data_shards.importers.covid_chestxray import finding_terms
from medvlp.data_shards.importers.layout import LayoutError, resolve_within
from medvlp.data_shards.inspect import iter_samples
from tests.conftest import realdata

pytestmark = pytest.mark.timeout(120)
# real radiographs under $MEDVLP_REALDATA/covid_cxr_notes when set (the test skips otherwise)
REAL = realdata("covid_cxr_notes")


def samples(out: Path) -> dict:
    return {s.key: s for s in iter_samples(out)}


def _png(path: Path, value: int, size=(24, 20)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full(size[::-1], value, np.uint8)).save(path)


# ----------------------------------------------------------------------------------------------- covid
COVID_HEADER = ["patientid", "offset", "sex", "age", "finding", "survival", "view", "modality", "date", "location",
                "folder", "filename", "doi", "url", "license", "clinical_notes", "other_notes", ""]


def _covid_folder(tmp_path: Path, n_patients: int = 12) -> tuple[Path, list[list]]:
    root = tmp_path / "covid-chestxray-dataset"
    rows = []
    for p in range(n_patients):
        finding = ["COVID-19", "Pneumonia/Viral/SARS", "COVID-19, ARDS", "No Finding"][p % 4]
        for i, view in enumerate(("PA", "L")):
            name = f"p{p}-{i}.png"
            _png(root / "images" / name, 10 * p + i)
            rows.append([str(p), str(i), "M", "50", finding, "Y", view, "X-ray", "2020", "here", "images", name,
                         "", "", ["CC BY", "CC BY-NC-SA", ""][p % 3], f"Patient {p} note, day {i}.", "", ""])
    rows.append(["99", "0", "F", "40", "COVID-19", "", "Axial", "CT", "", "", "volumes", "ct.nii.gz", "", "", "",
                 "A CT row.", "", ""])
    return root, rows


def _write(root: Path, rows: list[list], header=COVID_HEADER) -> None:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "metadata.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def test_covid_chestxray_text_labels_groups_license_and_patient_splits(tmp_path):
    root, rows = _covid_folder(tmp_path)
    outside = tmp_path / "secret.png"
    _png(outside, 200)
    os.symlink(outside, root / "images" / "link.png")
    bad = [["50", "0", "M", "1", "COVID-19", "", "PA", "X-ray", "", "", "images", "nope.png", "", "", "", "x", "", ""],
           ["51", "0", "M", "1", "COVID-19", "", "PA", "X-ray", "", "", "images", "p0-0.png", "", "", "", "", "", ""],
           ["52", "0", "M", "1", "COVID-19", "", "PA", "X-ray", "", "", "images", "../../secret.png", "", "", "", "y",
            "", ""],
           ["53", "0", "M", "1", "COVID-19", "", "PA", "X-ray", "", "", "images", "link.png", "", "", "", "z", "", ""],
           ["54", "0", "M", "1", "COVID-19", "", "PA", "X-ray", "", "", "images", "p1-0.png", "", "", "", "dup", "",
            ""]]
    _write(root, rows + bad)
    doc = import_dataset("covid_chestxray", root, tmp_path / "out", min_count="2", val_frac="0.25",
                         test_frac="0.25", progress="false", workers="1")
    got = samples(tmp_path / "out")
    assert doc["num_samples"] == 24 and len(got) == 24  # the CT row is not imported; the 5 bad rows are skipped
    assert doc["build"]["rows_other_modality"] == 1
    errors = (tmp_path / "out" / "build_errors.txt").read_text().splitlines()
    assert len(errors) == 5
    for line, what in ((27, "file not found"), (28, "'clinical_notes': empty"), (29, "leaves the source folder"),
                       (30, "symlink that leaves the source folder"), (31, "duplicate key")):
        assert any(e.startswith(f"metadata.csv line {line}:") and what in e for e in errors), (line, errors)
    s = got["covid_chestxray/p5-1"]
    assert s.text == "Patient 5 note, day 1." and s.meta["view"] == "L" and s.meta["license"] == ""
    assert got["covid_chestxray/p4-0"].meta["license"] == "CC BY-NC-SA" and s.meta["patient_id"] == "5"
    assert s.meta["source_modality"] == "X-ray" and s.meta["modality"] == "cxr"
    assert s.labels == {"ARDS": 0, "COVID-19": 0, "Pneumonia": 1, "SARS": 1, "Viral": 1}
    assert got["covid_chestxray/p3-0"].labels == {"ARDS": 0, "COVID-19": 0, "Pneumonia": 0, "SARS": 0, "Viral": 0}
    assert doc["labels"]["kind"] == "multi-label" and doc["label_names"] == ["ARDS", "COVID-19", "Pneumonia", "SARS",
                                                                             "Viral"]
    assert doc["label_groups"]["view"]["spec"]["class_names"] == ["L", "PA"]
    assert doc["label_groups"]["view"]["field"] == "view" and "modality" not in doc["label_groups"]
    split_of: dict[str, str] = {}
    for x in got.values():
        assert split_of.setdefault(x.meta["patient_id"], x.meta["split"]) == x.meta["split"]
    rec = doc["build"]["splits_by"]
    assert rec["group_by"] == "patientid" and rec["group_disjoint"] and sum(rec["groups"].values()) == 12
    assert set(split_of.values()) == {"train", "val", "test"}


def test_covid_chestxray_bad_layouts_are_one_line_errors(tmp_path, capsys):
    from medvlp.launch.cli import main

    root, rows = _covid_folder(tmp_path, 2)
    _write(root, [r[:15] + r[16:] for r in rows], COVID_HEADER[:15] + COVID_HEADER[16:])
    with pytest.raises(LayoutError, match=r"metadata.csv line 1: missing column\(s\) \['clinical_notes'\]"):
        import_dataset("covid_chestxray", root, tmp_path / "out")
    assert main(["shards", "import", "covid_chestxray", str(root), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "clinical_notes" in err and "Traceback" not in err and "\n" not in err
    with pytest.raises(LayoutError, match="not a folder"):
        import_dataset("covid_chestxray", root / "metadata.csv", tmp_path / "out")
    with pytest.raises(LayoutError, match="metadata.csv not found"):
        import_dataset("covid_chestxray", tmp_path / "out" if (tmp_path / "out").is_dir() else tmp_path,
                       tmp_path / "o2", metadata="metadata.csv")
    with pytest.raises(LayoutError, match=r"option split='dev'"):
        import_dataset("covid_chestxray", root, tmp_path / "out", split="dev")
    assert finding_terms("Pneumonia/Viral/COVID-19") == ["COVID-19", "Pneumonia", "Viral"]
    assert finding_terms("todo") == [] and finding_terms("No Finding") == []


def test_resolve_within_refuses_absolute_dotdot_and_escaping_symlinks(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "ok.png").write_bytes(b"x")
    os.symlink(tmp_path, tmp_path / "a" / "up")
    os.symlink(tmp_path / "a" / "ok.png", tmp_path / "a" / "inner.png")
    assert resolve_within(tmp_path / "a", "ok.png") == (str(tmp_path / "a" / "ok.png"), None)
    assert resolve_within(tmp_path / "a", "inner.png")[1] is None  # a symlink inside the folder is fine
    assert "absolute" in resolve_within(tmp_path / "a", str(tmp_path / "a" / "ok.png"))[1]
    assert "'..'" in resolve_within(tmp_path / "a", "x/../../ok.png")[1]
    (tmp_path / "out.png").write_bytes(b"y")
    assert "symlink" in resolve_within(tmp_path / "a", "up/out.png")[1]
    assert resolve_within(tmp_path / "a", "up/a/ok.png")[1] is None  # a detour that lands inside is inside


@pytest.mark.skipif(REAL is None, reason="set MEDVLP_REALDATA to a folder holding covid_cxr_notes/")
def test_covid_chestxray_on_real_radiographs(tmp_path):
    doc = import_dataset("covid_chestxray", REAL, tmp_path / "out", limit="12", image_size="64", progress="false",
                         workers="1", test_frac="0.2")
    got = samples(tmp_path / "out")
    assert doc["num_samples"] == len(got) == sum(doc["splits"].values()) and len(got) >= 30
    assert all(s.text and s.image is not None and max(s.image.shape[:2]) <= 64 for s in got.values())
    assert all("license" in s.meta and s.meta["modality"] == "cxr" for s in got.values())
    assert "COVID-19" in doc["label_names"] and "view" in doc["label_groups"]
    split_of: dict[str, str] = {}
    for s in got.values():
        assert split_of.setdefault(s.meta["patient_id"], s.meta["split"]) == s.meta["split"]


# ----------------------------------------------------------------------------------------------- medpix
def _medpix_folder(tmp_path: Path, splits: bool) -> Path:
    root = tmp_path / "MedPix-2-0"
    recs, cases = [], []
    for c in range(8):
        uid = f"MPX{1000 + c}"
        typ = "CT" if c % 2 == 0 else "MR"
        cases.append({"U_id": uid, "Case": {"Title": f"Diagnosis {c}", "Findings": f"Findings {c}."}, "Topic": {}})
        for i in range(2):
            stem = f"{uid}_synpic{c}{i}"
            _png(root / "images" / f"{stem}.png", 20 * c + i)
            recs.append({"Type": typ, "U_id": uid, "image": stem,
                         "Description": {"Caption": f"Case {c} image {i}.", "Modality": f"{typ} w/contrast",
                                         "Plane": ["Axial", "Coronal"][i], "Age": "40", "Sex": "male",
                                         "ACR Codes": "1.2"},
                         "Location": "Brain", "Location Category": ["Head", "Thorax"][c % 2 == 0 and i]})
    recs.append({"Type": "CT", "U_id": "MPX9", "image": "MPX9_x", "Description": {"Caption": "Replace this - "
                 "DESCRIPTION OF THE IMAGE OR FINDINGS."}})
    recs.append({"Type": "CT", "U_id": "MPX9", "image": "../../evil", "Description": {"Caption": "bad path"}})
    (root / "Descriptions.json").write_text(json.dumps(recs))
    (root / "Case_topic.json").write_text(json.dumps(cases))
    if splits:
        sd = root / "splitted_dataset"
        sd.mkdir()
        by = {"train": [0, 1, 2, 3, 4], "dev": [5], "test": [6, 7]}
        for name, cs in by.items():
            lines = [json.dumps(r) for r in recs[:16] if int(r["U_id"][3:]) - 1000 in cs]
            (sd / f"descriptions_{name}.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_medpix_official_splits_caption_labels_and_groups(tmp_path):
    root = _medpix_folder(tmp_path, splits=True)
    doc = import_dataset("medpix", root, tmp_path / "out", min_count="2", progress="false", workers="1",
                         text="caption_case")
    got = samples(tmp_path / "out")
    assert doc["num_samples"] == 16 and doc["splits"] == {"test": 4, "train": 10, "val": 2}
    errors = (tmp_path / "out" / "build_errors.txt").read_text()
    assert "Descriptions.json record 17: 'Description.Caption' is a placeholder" in errors
    assert "Descriptions.json record 18: key 'image':" in errors and "leaves the source folder" in errors
    s = got["medpix/MPX1003_synpic31"]
    assert s.text == "Case 3 image 1. Diagnosis 3 Findings 3." and s.meta["split"] == "train"
    assert s.labels == {"CT": 0, "MR": 1} and s.meta["source_modality"] == "MR" and s.meta["plane"] == "Coronal"
    assert got["medpix/MPX1006_synpic60"].meta["split"] == "test"
    assert doc["labels"]["kind"] == "single-label" and doc["labels"]["class_names"] == ["CT", "MR"]
    assert set(doc["label_groups"]) == {"modality", "plane", "region"}
    assert doc["label_groups"]["plane"]["spec"]["class_names"] == ["Axial", "Coronal"]
    assert doc["build"]["splits_by"]["official"] is True and doc["build"]["splits_by"]["groups"]["test"] == 2


def test_medpix_without_splits_is_split_by_case_and_bad_layouts_are_one_line(tmp_path):
    root = _medpix_folder(tmp_path, splits=False)
    doc = import_dataset("medpix", root, tmp_path / "out", val_frac="0.3", test_frac="0.3", progress="false",
                         workers="1")
    split_of: dict[str, str] = {}
    for s in samples(tmp_path / "out").values():
        assert split_of.setdefault(s.meta["u_id"], s.meta["split"]) == s.meta["split"]
        assert s.text.startswith("Case ")
    assert doc["build"]["splits_by"]["official"] is False and len(set(split_of.values())) >= 2
    (root / "Descriptions.json").write_text(json.dumps([{"Type": "CT", "image": "x"}]))
    with pytest.raises(LayoutError, match=r"record 1: missing column\(s\) \['U_id', 'Description'\]"):
        import_dataset("medpix", root, tmp_path / "o2")
    (root / "Descriptions.json").write_text("{not json")
    with pytest.raises(LayoutError, match="Descriptions.json: not valid JSON"):
        import_dataset("medpix", root, tmp_path / "o2")
    (root / "Descriptions.json").unlink()
    with pytest.raises(LayoutError, match="Descriptions.json not found"):
        import_dataset("medpix", root, tmp_path / "o2")


# ----------------------------------------------------------------------------------------------- roco
def test_roco_split_folders_captions_txt_and_csv(tmp_path):
    root = tmp_path / "roco"
    for folder, n in (("train", 6), ("validation", 2), ("test", 3)):
        rad = root / folder / "radiology"
        lines = []
        for i in range(n):
            ident = f"ROCO_{folder[:2]}{i:03d}"
            _png(rad / "images" / f"{ident}.jpg", 30 + i)
            lines.append(f"{ident}\t Axial CT {folder} figure {i}. ")
        if folder == "train":
            lines += ["ROCO_tr999 missing tab", "ROCO_tr998\t", "ROCO_tr997\tno image file"]
            (rad / "captions.txt").write_text("\n".join(lines) + "\n")
        else:
            with open(rad / f"radiology{folder}data.csv", "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["id", "name", "caption"])
                for ln in lines:
                    ident, cap = ln.split("\t")
                    w.writerow([ident, f"{ident}.jpg", cap])
    (root / "train" / "non-radiology").mkdir()
    doc = import_dataset("roco", root, tmp_path / "out", progress="false", workers="1")
    got = samples(tmp_path / "out")
    assert doc["splits"] == {"test": 3, "train": 6, "val": 2} and doc["label_names"] == []
    assert got["roco/ROCO_tr001"].text == "Axial CT train figure 1." and got["roco/ROCO_va000"].meta["split"] == "val"
    errors = (tmp_path / "out" / "build_errors.txt").read_text()
    for line, what in ((7, "no tab"), (8, "empty caption"), (9, "file not found")):
        assert f"train/radiology/captions.txt line {line}" in errors and what in errors
    assert doc["build"]["splits_by"]["group_by"] == "image id"
    with open(root / "test" / "radiology" / "radiologytestdata.csv", "w") as f:
        f.write("id,text\nROCO_te000,x\n")
    with pytest.raises(LayoutError, match=r"missing column\(s\) \['caption'\]"):
        import_dataset("roco", root, tmp_path / "o2")
    with pytest.raises(LayoutError, match="no train/radiology"):
        import_dataset("roco", tmp_path / "out", tmp_path / "o3")


def test_generic_caption_table_is_the_manifest_builder(tmp_path):
    """CSV/JSONL of image path + caption + optional group id: `shards build` reads it as a manifest, with the
    group as patient_id (splits by group) and any other column kept in meta."""
    from medvlp.data_shards.build import build_shards

    rows = []
    for g in range(6):
        for i in range(2):
            _png(tmp_path / "img" / f"{g}_{i}.png", 10 * g + i)
            rows.append({"image": f"img/{g}_{i}.png", "report": f"caption {g} {i}", "patient_id": f"pmc{g}",
                         "source_url": f"u{g}"})
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    doc = build_shards(tmp_path / "pairs.jsonl", tmp_path / "out", val_frac=0.3, test_frac=0.3, workers=1,
                       progress=False)
    got = samples(tmp_path / "out")
    assert doc["num_samples"] == 12 and got["img/3_1"].text == "caption 3 1"
    assert got["img/3_1"].meta["source_url"] == "u3"
    split_of: dict[str, str] = {}
    for s in got.values():
        assert split_of.setdefault(s.meta["patient_id"], s.meta["split"]) == s.meta["split"]
