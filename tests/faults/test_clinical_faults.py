"""Hostile clinical inputs: PHI in free-text DICOM keywords never reaches a shard, burned-in annotation is refused
unless kept on purpose (then flagged), damaged pixel semantics (RescaleSlope 0, NaN voxels) are refused, and the
MIMIC-CXR importer refuses reports that are not UTF-8 text, links out of its tree and bad split/label CSVs."""
import gzip
import os

import numpy as np
import pytest

from medvlp.data_shards.readers.fabricate import write_ct_series, write_nifti, write_radiograph
from tests.faults.conftest import build_rows, cli_here as cli, one_line_error, sample_metas, tars
from tests.medvlp.data_shards.test_clinical_importers import mimic_tree

pytestmark = pytest.mark.timeout(180)

PX = np.array([[0, 10, 20], [30, 40, 4095]])


def test_free_text_dicom_keywords_never_reach_the_shards(tmp_path):
    salt = tmp_path / "salt"
    salt.write_bytes(os.urandom(32))
    write_radiograph(tmp_path / "a.dcm", PX, window=(2048, 4096), BodyPartExamined="CHEST JANE DOE",
                     ConvolutionKernel="MRN8675309", ViewPosition="PA JANE", KVP="120")
    write_radiograph(tmp_path / "b.dcm", PX, window=(2048, 4096), BodyPartExamined="chest", uid_root="1.2.3.4.5")
    proc = build_rows(tmp_path, [{"image": "a.dcm", "report": "r", "patient_id": "MRN-1"},
                             {"image": "b.dcm", "report": "r", "patient_id": "MRN-2"}],
                  "--hash-ids", "--salt-file", salt)
    assert proc.returncode == 0, proc.stderr[-2000:]
    raw = b"".join(t.read_bytes() for t in tars(tmp_path / "out"))
    for phi in (b"JANE", b"DOE", b"MRN8675309", b"MRN-1"):
        assert phi not in raw, phi
    metas = {m["dicom"].get("BodyPartExamined"): m["dicom"] for m in sample_metas(tmp_path / "out")}
    assert set(metas) == {None, "CHEST"}  # the coded value is kept, upper-cased; the free text is dropped
    assert metas[None]["dropped"] == ["ViewPosition", "BodyPartExamined"] and metas[None]["KVP"] == 120.0
    assert "ConvolutionKernel" not in metas[None] and "dropped" not in metas["CHEST"]


def test_burned_in_annotation_is_refused_unless_kept_and_then_flagged(tmp_path):
    write_radiograph(tmp_path / "a.dcm", PX, window=(2048, 4096), BurnedInAnnotation="YES")
    rows = [{"image": "a.dcm", "report": "r", "patient_id": "p1"}]
    proc = build_rows(tmp_path, rows)
    assert proc.returncode == 2
    err = one_line_error(proc)
    assert "m.csv line 2: column 'image'" in err and "a.dcm: BurnedInAnnotation is YES" in err
    assert "--keep-burned-in" in proc.stderr
    ok = build_rows(tmp_path, rows, "--keep-burned-in")
    assert ok.returncode == 0, ok.stderr[-2000:]
    (meta,) = sample_metas(tmp_path / "out")
    assert meta["burned_in_annotation"] is True and meta["dicom"]["BurnedInAnnotation"] == "YES"


def test_burned_in_ct_series_is_refused(tmp_path):
    hu = np.zeros((3, 2, 4), np.int16)
    write_ct_series(tmp_path / "ser", hu, BurnedInAnnotation="YES")
    proc = build_rows(tmp_path, [{"volume": "ser/", "report": "r", "patient_id": "p1"}])
    assert proc.returncode == 2 and "BurnedInAnnotation is YES" in one_line_error(proc)


@pytest.mark.parametrize("slope, want", [(0.0, "RescaleSlope is 0"), (float("nan"), "RescaleSlope 'nan'")])
def test_bad_rescale_slope_is_refused(tmp_path, slope, want):
    write_radiograph(tmp_path / "a.dcm", PX, slope=slope, intercept=5.0, window=(2048, 4096))
    proc = build_rows(tmp_path, [{"image": "a.dcm", "report": "r", "patient_id": "p1"}])
    assert proc.returncode == 2 and want in one_line_error(proc)


def test_rescale_slope_zero_in_a_ct_series_is_refused(tmp_path):
    write_ct_series(tmp_path / "ser", np.zeros((3, 2, 4), np.int16), slope=1.0)
    from pydicom import dcmread

    first = sorted((tmp_path / "ser").iterdir())[0]
    ds = dcmread(first)
    ds.RescaleSlope = 0
    ds.save_as(first)
    proc = build_rows(tmp_path, [{"volume": "ser/", "report": "r", "patient_id": "p1"}])
    assert proc.returncode == 2 and "RescaleSlope is 0" in one_line_error(proc)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_voxels_are_refused_not_made_water(tmp_path, bad):
    vol = np.full((4, 3, 2), -500.0, np.float32)
    vol[1, 1, 1] = bad
    write_nifti(tmp_path / "v.nii.gz", vol)
    proc = build_rows(tmp_path, [{"volume": "v.nii.gz", "report": "r", "patient_id": "p1"}])
    assert proc.returncode == 2 and "v.nii.gz: 1 voxels are NaN or infinite (of 24)" in one_line_error(proc)


# ----------------------------------------------------------------------------------------------- MIMIC-CXR
def _import(src, out, *opts):
    return cli("shards", "import", "mimic_cxr", src, "--out", out, "--opt", "workers=1", "--opt", "progress=false",
               *[x for o in opts for x in ("--opt", o)])


@pytest.mark.parametrize("content, want", [
    ("FINDINGS: épanchement.".encode("latin-1"), "not UTF-8 text (byte 0xe9 on line 1)"),
    (b"FINDINGS: clear\0\0\x01\x02", "holds NUL bytes"),
])
def test_mimic_report_not_utf8_is_refused_naming_it(tmp_path, content, want):
    src = mimic_tree(tmp_path / "mimic")
    (src / "files/p10/p10000764/s57375967.txt").write_bytes(content)
    proc = _import(src, tmp_path / "out", "on_error=fail")
    assert proc.returncode == 2
    err = one_line_error(proc)
    assert "files/p10/p10000764/s57375967/b1.dcm: files/p10/p10000764/s57375967.txt" in err and want in err
    ok = _import(src, tmp_path / "out")  # skip mode (the importer's default): the other studies build
    assert ok.returncode == 0, ok.stderr[-2000:]
    from medvlp.data_shards.inspect import iter_samples
    texts = [s.text for s in iter_samples(tmp_path / "out")]
    assert len(texts) == 3 and not any("\ufffd" in t or "\0" in t for t in texts)


def test_mimic_report_symlinked_out_of_the_tree_is_refused(tmp_path):
    src = mimic_tree(tmp_path / "mimic")
    secret = tmp_path / "secret.txt"
    secret.write_text("FINDINGS: root:x:0:0")
    rep = src / "files/p10/p10000764/s57375967.txt"
    rep.unlink()
    rep.symlink_to(secret)
    proc = _import(src, tmp_path / "out", "on_error=fail")
    assert proc.returncode == 2 and "is a symlink to" in one_line_error(proc)
    ok = _import(src, tmp_path / "out2", "follow_symlinks=true")
    assert ok.returncode == 0, ok.stderr[-2000:]


def test_mimic_dicom_symlinked_out_of_the_tree_is_refused(tmp_path):
    src = mimic_tree(tmp_path / "mimic")
    dcm = src / "files/p11/p11000011/s51234567/c1.dcm"
    outside = tmp_path / "elsewhere.dcm"
    dcm.rename(outside)
    dcm.symlink_to(outside)
    proc = _import(src, tmp_path / "out", "on_error=fail")
    assert proc.returncode == 2 and "c1.dcm' is a symlink to" in one_line_error(proc)


@pytest.mark.parametrize("csv_text, want", [
    ("dicom,study_id,subject_id,split\na1,5,1,train\n", "missing column(s) ['dicom_id']"),
    ("dicom_id,study_id,subject_id,split\na1,5,1,training\n", "line 2: column 'split': 'training' is not one of"),
    ("dicom_id,study_id,subject_id,split\na1,5,1,train\na1,5,1,test\n", "dicom_id 'a1' listed twice"),
])
def test_mimic_bad_split_csv_is_one_line(tmp_path, csv_text, want):
    src = mimic_tree(tmp_path / "mimic")
    (src / "mimic-cxr-2.0.0-split.csv.gz").write_bytes(gzip.compress(csv_text.encode()))
    proc = _import(src, tmp_path / "out")
    assert proc.returncode == 2 and want in one_line_error(proc)


def test_mimic_latin1_split_csv_and_missing_label_column_are_one_line(tmp_path):
    src = mimic_tree(tmp_path / "mimic")
    (src / "mimic-cxr-2.0.0-split.csv.gz").write_bytes(gzip.compress(
        "dicom_id,study_id,subject_id,split\na1,5,1,tr\xe9in\n".encode("latin-1")))
    proc = _import(src, tmp_path / "out")
    assert proc.returncode == 2 and "not UTF-8 text (byte 0xe9 on line 2)" in one_line_error(proc)
    src2 = mimic_tree(tmp_path / "mimic2")
    (src2 / "mimic-cxr-2.0.0-chexpert.csv").write_text("subject,study_id,Atelectasis\n1,2,1\n")
    proc = _import(src2, tmp_path / "out2")
    assert proc.returncode == 2 and "missing column(s) ['subject_id']" in one_line_error(proc)
    (src2 / "mimic-cxr-2.0.0-chexpert.csv").write_text("subject_id,study_id,Atelectasis\n1,2,1\n1,2,0\n")
    proc = _import(src2, tmp_path / "out3")
    assert proc.returncode == 2 and "line 3: subject 1 study 2 is listed twice" in one_line_error(proc)
