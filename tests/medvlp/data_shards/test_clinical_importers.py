"""Clinical layouts as importers, each on tiny fabricated files in its layout: a MIMIC-CXR-style DICOM tree and a
CT-report set (NIfTI + reports CSV) with TotalSegmentator-style organ folders."""
from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from medvlp.data_shards.importers import import_dataset
from medvlp.data_shards.inspect import iter_samples
from medvlp.data_shards.importers.mimic_cxr import report_text
from medvlp.data_shards.readers.fabricate import write_nifti, write_radiograph

REPORT = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___F with cough

 FINDINGS:  Lungs are clear.  No effusion.

 IMPRESSION:  No acute cardiopulmonary process.
"""


def mimic_tree(root):
    px = np.array([[0, 100], [200, 300]])
    studies = [("10", "10000032", "50414267", ["a1", "a2"]), ("10", "10000764", "57375967", ["b1"]),
               ("11", "11000011", "51234567", ["c1"])]
    for grp, subj, study, dicoms in studies:
        d = root / "files" / f"p{grp}" / f"p{subj}" / f"s{study}"
        for k, dcm in enumerate(dicoms):
            write_radiograph(d / f"{dcm}.dcm", px + k, photometric="MONOCHROME1" if k else "MONOCHROME2")
        (d.parent / f"s{study}.txt").write_text(REPORT)
    split = "dicom_id,study_id,subject_id,split\na1,50414267,10000032,train\na2,50414267,10000032,train\n" \
            "b1,57375967,10000764,validate\nc1,51234567,11000011,test\n"
    (root / "mimic-cxr-2.0.0-split.csv.gz").write_bytes(gzip.compress(split.encode()))
    (root / "mimic-cxr-2.0.0-chexpert.csv").write_text(
        "subject_id,study_id,Atelectasis,Pleural Effusion\n10000032,50414267,1.0,\n10000764,57375967,-1.0,0.0\n")
    return root


def test_report_sections():
    assert report_text(REPORT) == "Lungs are clear. No effusion. No acute cardiopulmonary process."
    assert report_text("just text\n  here") == "just text here"


def test_mimic_cxr_tree(tmp_path):
    src = mimic_tree(tmp_path / "mimic")
    doc = import_dataset("mimic_cxr", src, tmp_path / "out", workers=1, progress=False)
    assert doc["num_samples"] == 4 and doc["splits"] == {"train": 2, "val": 1, "test": 1}
    assert doc["label_names"] == ["atelectasis", "pleural effusion"]
    got = {s.key: s for s in iter_samples(tmp_path / "out", "index.json")}
    a2 = got["mimic_cxr/p10000032/s50414267/a2"]
    np.testing.assert_array_equal(a2.image, 4095 - (np.array([[0, 100], [200, 300]]) + 1))  # MONOCHROME1
    assert a2.patient_id == "10000032" and a2.labels == {"atelectasis": 1}
    assert a2.text == "Lungs are clear. No effusion. No acute cardiopulmonary process."
    assert got["mimic_cxr/p10000764/s57375967/b1"].labels == {"atelectasis": -1, "pleural effusion": 0}


def test_mimic_cxr_hashed_ids(tmp_path):
    src = mimic_tree(tmp_path / "mimic")
    (tmp_path / "salt").write_text("a-site-secret-of-enough-bytes")
    import_dataset("mimic_cxr", src, tmp_path / "out", workers="1", progress="false", hash_ids="true",
                   salt_file=str(tmp_path / "salt"))
    blob = b"".join(p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file())
    for ident in (b"10000032", b"50414267", b"57375967", b"p10000764", b'"a1"'):
        assert ident not in blob, ident
    keys = [s.key for s in iter_samples(tmp_path / "out", "index.json")]
    assert all(k.startswith("mimic_cxr/") and len(k) == len("mimic_cxr/") + 16 for k in keys)
    with pytest.raises(ValueError, match="hash_ids and salt_file"):
        import_dataset("mimic_cxr", src, tmp_path / "o2", hash_ids="true")


def ct_set(root):
    aff = np.diag([-1.0, -1.0, 2.0, 1.0])
    vol = (np.arange(3 * 2 * 2).reshape(3, 2, 2) * 10).astype(np.int16)
    for i, name in enumerate(["train_1_a_1", "train_1_a_2", "train_2_a_1"]):
        case = root / "volumes" / name.rsplit("_", 2)[0] / name
        write_nifti(case / f"{name}.nii.gz", vol + i, aff)
        seg = case / "segmentations"
        write_nifti(seg / "liver.nii.gz", (vol > 50).astype(np.uint8), aff)
        if i != 1:
            write_nifti(seg / "aorta.nii.gz", (vol < 20).astype(np.uint8), aff)
    (root / "ct_reports.csv").write_text(
        "VolumeName,ClinicalInformation_EN,Findings_EN,Impressions_EN\n"
        "train_1_a_1.nii.gz,cough,Liver normal.,No acute findings.\n"
        "train_1_a_2.nii.gz,cough,Liver normal.,Same study.\n"
        "train_2_a_1.nii.gz,,Aorta calcified.,Atherosclerosis.\n"
        "missing_9_a_1.nii.gz,,x,y\n")
    (root / "labels.csv").write_text("VolumeName,Arterial wall calcification,Lymphadenopathy\n"
                                     "train_1_a_1.nii.gz,0,0\ntrain_1_a_2.nii.gz,0,1\ntrain_2_a_1.nii.gz,1,0\n")
    return root


def test_ct_reports_with_organ_folders(tmp_path):
    src = ct_set(tmp_path / "ct")
    with pytest.warns(UserWarning, match="missing_9_a_1.nii.gz"):
        doc = import_dataset("ct_reports", src, tmp_path / "out", workers=1, progress=False,
                             labels=str(src / "labels.csv"), spacing="1,1,1")
    assert doc["num_samples"] == 3 and doc["organ_names"] == ["aorta", "liver"]
    assert doc["label_names"] == ["Arterial wall calcification", "Lymphadenopathy"]
    got = {s.key: s for s in iter_samples(tmp_path / "out", "index.json")}
    a = got["ct_reports/train_1_a_1"]
    assert a.patient_id == "train_1" and got["ct_reports/train_1_a_2"].patient_id == "train_1"
    assert a.text == "Liver normal. No acute findings." and a.labels["Arterial wall calcification"] == 0
    assert a.volume.shape == (4, 2, 3) and a.meta["spacing"] == [1.0, 1.0, 1.0]  # resampled from (2, 1, 1)
    vol = (np.arange(3 * 2 * 2).reshape(3, 2, 2) * 10)
    want = np.where(vol < 20, 1, np.where(vol > 50, 2, 0))[::-1, ::-1, :].transpose(2, 1, 0)  # 1 aorta, 2 liver
    np.testing.assert_array_equal(a.mask, np.repeat(want, 2, axis=0))  # nearest along d
    assert got["ct_reports/train_1_a_2"].meta["organs_present"] == ["liver"]
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert index["organ_names"] == ["aorta", "liver"]
