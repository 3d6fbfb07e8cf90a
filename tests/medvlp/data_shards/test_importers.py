"""Importers, each on a tiny file fabricated in the real format of its public data set."""
from __future__ import annotations

import csv
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from medvlp.data_shards.importers import import_dataset
from medvlp.data_shards.importers.chexpert import FINDINGS, synthesise_report
from medvlp.data_shards.importers.medmnist import flavour_of
from medvlp.data_shards.inspect import iter_samples


def read_samples(out: Path) -> dict:
    return {s.key: s for s in iter_samples(out)}


def test_medmnist_2d_split_sizes_captions_and_pixels(tmp_path):
    rng = np.random.default_rng(0)
    sizes = {"train": 7, "val": 3, "test": 4}
    arrays = {}
    for split, n in sizes.items():
        arrays[f"{split}_images"] = rng.integers(0, 255, (n, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 2).reshape(n, 1).astype(np.uint8)
    np.savez(tmp_path / "pneumoniamnist.npz", **arrays)
    doc = import_dataset("medmnist", tmp_path / "pneumoniamnist.npz", tmp_path / "out",
                         maxcount="5", chunk="2")  # CLI-style string options
    assert doc["splits"] == sizes and doc["num_samples"] == 14 and doc["modality"] == "cxr"
    assert doc["label_names"] == ["normal", "pneumonia"] and len(doc["shards"]) == 3
    got = read_samples(tmp_path / "out")
    s = got["pneumoniamnist/val/0000001"]
    np.testing.assert_array_equal(s.image, arrays["val_images"][1])
    assert s.text == "a chest x-ray: pneumonia." and s.labels == {"normal": 0, "pneumonia": 1}
    assert s.meta["patient_id"] == "pneumoniamnist/val/1" and s.meta["split"] == "val"


def test_medmnist_3d_multilabel_and_unknown_flavour(tmp_path):
    rng = np.random.default_rng(1)
    vols = rng.integers(0, 255, (3, 8, 8, 8), dtype=np.uint8)
    np.savez_compressed(tmp_path / "organmnist3d_64.npz", train_images=vols, train_labels=np.array([[0], [10], [3]]))
    doc = import_dataset("medmnist", tmp_path / "organmnist3d_64.npz", tmp_path / "ct")
    s = read_samples(tmp_path / "ct")["organmnist3d/train/0000001"]
    assert doc["modality"] == "ct" and doc["splits"] == {"train": 3}
    assert s.volume.dtype == np.int16 and s.text == "a CT volume of the pancreas."
    np.testing.assert_array_equal(s.volume, vols[1])
    y = np.zeros((2, 14), np.uint8)
    y[0, [2, 9]] = 1
    np.savez(tmp_path / "chestmnist.npz", test_images=np.zeros((2, 28, 28), np.uint8), test_labels=y)
    import_dataset("medmnist", tmp_path / "chestmnist.npz", tmp_path / "chest")
    got = read_samples(tmp_path / "chest")
    assert got["chestmnist/test/0000000"].text == "a chest x-ray with effusion and edema."
    assert got["chestmnist/test/0000001"].text == "a chest x-ray with no finding."
    assert got["chestmnist/test/0000000"].labels["effusion"] == 1 and len(got["chestmnist/test/0000000"].labels) == 14
    np.savez(tmp_path / "novelmnist_28.npz", train_images=np.zeros((1, 4, 4, 3), np.uint8), train_labels=[[5]])
    doc = import_dataset("medmnist", tmp_path / "novelmnist_28.npz", tmp_path / "novel")
    assert flavour_of(Path("pathmnist_64.npz")) == "pathmnist"
    assert doc["modality"] == "patho" and doc["label_names"] == ["class 5"]
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['shard_size'\]"):
        import_dataset("medmnist", tmp_path / "chestmnist.npz", tmp_path / "x", shard_size=3)


def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def test_chexpert_csv_patients_labels_reports(tmp_path):
    root = tmp_path / "CheXpert-v1.0-small"
    rows = []
    for p in range(6):
        for view in ("frontal", "lateral"):
            rel = f"CheXpert-v1.0-small/train/patient{p:05d}/study1/view1_{view}.jpg"
            (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((40, 32), 100 + p, np.uint8)).save(tmp_path / rel, quality=95)
            labels = ["" for _ in FINDINGS]
            labels[FINDINGS.index("Cardiomegaly")] = "1.0" if p % 2 else "0.0"
            labels[FINDINGS.index("Edema")] = "-1.0"
            rows.append([rel, "Female", "60", view.capitalize(), "PA" if view == "frontal" else "", *labels])
    rows.append(["CheXpert-v1.0-small/train/patient00099/study1/view1_frontal.jpg", "Male", "50", "Frontal", "AP",
                 *["" for _ in FINDINGS]])  # image missing: skipped and reported (line 14)
    _write_csv(root / "train.csv", ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *FINDINGS], rows)
    with pytest.warns(UserWarning, match="skipped 1 bad rows"):
        doc = import_dataset("chexpert", root / "train.csv", tmp_path / "out", workers="1", image_size="16",
                             progress="false", val_frac="0.3", test_frac="0.3")
    assert doc["num_samples"] == 12 and doc["label_names"] == ["Cardiomegaly", "Edema"]
    assert "train.csv line 14: column 'image': file not found" in (tmp_path / "out" / "build_errors.txt").read_text()
    got = read_samples(tmp_path / "out")
    s = got["chexpert/patient00001/study1/view1_frontal"]
    assert s.meta["patient_id"] == "patient00001" and s.labels == {"Cardiomegaly": 1, "Edema": -1}
    assert s.text == "PA frontal chest radiograph. There is cardiomegaly. Possible edema."
    assert max(s.image.shape) == 16 and s.meta["sex"] == "Female"
    splits = {}
    for s in got.values():
        splits.setdefault(s.meta["patient_id"], set()).add(s.meta["split"])
    assert all(len(v) == 1 for v in splits.values())
    assert synthesise_report({"No Finding": 1, "Pneumothorax": 0, "Fracture": 0}) == \
        "Chest radiograph. No acute cardiopulmonary abnormality. No pneumothorax or fracture."


def test_mimic_columns(tmp_path):
    rel = "files/p10/p10000032/s50414267/abc.jpg"
    (tmp_path / rel).parent.mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / rel)
    _write_csv(tmp_path / "mimic.csv", ["subject_id", "study_id", "dicom_id", "Pneumonia"],
               [["10000032", "50414267", "abc", "1.0"]])
    doc = import_dataset("chexpert", tmp_path / "mimic.csv", tmp_path / "out", workers=1, progress=False)
    s = next(iter(read_samples(tmp_path / "out").values()))
    assert doc["num_samples"] == 1 and s.meta["patient_id"] == "p10000032" and s.meta["study_id"] == "50414267"
    assert s.meta["dataset"] == "mimic-cxr" and s.labels == {"Pneumonia": 1}


def test_iuxray_reports_projections(tmp_path):
    img_dir = tmp_path / "images" / "images_normalized"
    img_dir.mkdir(parents=True)
    for name in ("1_IM-0001-4001.dcm.png", "1_IM-0001-3001.dcm.png", "2_IM-0652-1001.dcm.png"):
        Image.fromarray(np.zeros((10, 12), np.uint8)).save(img_dir / name)
    _write_csv(tmp_path / "indiana_reports.csv",
               ["uid", "MeSH", "Problems", "image", "indication", "comparison", "findings", "impression"],
               [["1", "normal", "normal", "Xray Chest PA and Lateral", "XXXX-year-old male", "None.",
                 "The cardiac silhouette and mediastinum size are within normal limits.", "Normal chest x-XXXX."],
                ["2", "Cardiomegaly/borderline;Pulmonary Atelectasis/base/left", "Cardiomegaly;Pulmonary Atelectasis",
                 "", "", "", "", "Borderline cardiomegaly. XXXX left basilar atelectasis."]])
    _write_csv(tmp_path / "indiana_projections.csv", ["uid", "filename", "projection"],
               [["1", "1_IM-0001-4001.dcm.png", "Frontal"], ["1", "1_IM-0001-3001.dcm.png", "Lateral"],
                ["2", "2_IM-0652-1001.dcm.png", "Frontal"], ["3", "3_missing.png", "Frontal"]])
    with pytest.warns(UserWarning, match="skipped 1 bad rows"):
        doc = import_dataset("iuxray", tmp_path / "indiana_reports.csv", tmp_path / "out", workers=1,
                             progress=False, split="test")
    assert doc["num_samples"] == 3 and doc["splits"] == {"test": 3}
    assert doc["label_names"] == ["cardiomegaly", "pulmonary atelectasis"]
    got = read_samples(tmp_path / "out")
    normal = got["iuxray/1_IM-0001-4001"]
    assert normal.labels == {"cardiomegaly": 0, "pulmonary atelectasis": 0}
    assert normal.text.endswith("Normal chest x-XXXX.") and normal.meta["patient_id"] == "1"
    sick = got["iuxray/2_IM-0652-1001"]
    assert sick.labels == {"cardiomegaly": 1, "pulmonary atelectasis": 1}
    assert sick.text == "Borderline cardiomegaly. XXXX left basilar atelectasis."
    assert "indiana_projections.csv line 5: column 'uid': '3' has no row" in \
        (tmp_path / "out" / "build_errors.txt").read_text()


def test_pcam_h5_one_split_chunked(tmp_path):
    rng = np.random.default_rng(2)
    x = rng.integers(0, 255, (5, 96, 96, 3), dtype=np.uint8)
    y = np.array([0, 1, 1, 0, 1], np.uint8).reshape(5, 1, 1, 1)
    with h5py.File(tmp_path / "camelyonpatch_level_2_split_valid_x.h5", "w") as f:
        f.create_dataset("x", data=x, chunks=(1, 96, 96, 3), compression="gzip")
    with h5py.File(tmp_path / "camelyonpatch_level_2_split_valid_y.h5", "w") as f:
        f.create_dataset("y", data=y)
    doc = import_dataset("pcam", tmp_path, tmp_path / "out", chunk=2, limit=4)
    assert doc["splits"] == {"val": 4} and doc["modality"] == "patho" and doc["label_names"] == ["tumor"]
    got = read_samples(tmp_path / "out")
    s = got["pcam/val/0000002"]
    np.testing.assert_array_equal(s.image, x[2])
    assert s.labels == {"tumor": 1} and s.text == "this is a photo of lymph node tumor tissue"
    assert got["pcam/val/0000000"].text == "this is a photo of healthy lymph node tissue"
    (tmp_path / "camelyonpatch_level_2_split_valid_y.h5").unlink()
    with pytest.raises(FileNotFoundError, match="needs both"):
        import_dataset("pcam", tmp_path, tmp_path / "out2")


def test_unknown_kind(tmp_path):
    with pytest.raises(ValueError, match="import kind 'nih' is not one of"):
        import_dataset("nih", tmp_path, tmp_path / "out")
