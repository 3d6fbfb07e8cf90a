"""Pathology tile importers: class-folder sets (NCT-CRC-HE-100K / Kather-2016 layout) and Camelyon17-WILDS, on
fabricated folders; labels, splits, paths that leave the source folder, bad rows, the CLI's one-line errors."""
import csv
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medvlp.data_shards.importers import import_dataset
from medvlp.data_shards.schema import decode_sample
from tests.conftest import realdata

pytestmark = pytest.mark.timeout(300)
REAL_KATHER = realdata("kather_tiles")  # $MEDVLP_REALDATA/kather_tiles when set (the test skips otherwise)


def _tile(path: Path, value: int, fmt: str | None = None, size: int = 20) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = np.full((size, size, 3), value, np.uint8)
    img[..., 0] = np.arange(size, dtype=np.uint8)[:, None] * 3
    Image.fromarray(img).save(path, format=fmt)


def _samples(out: Path) -> list:
    import webdataset as wds

    urls = sorted(str(p) for p in out.glob("*.tar"))
    return [decode_sample(r) for r in wds.WebDataset(urls, shardshuffle=False)]


def _kather(root: Path) -> Path:
    """Kather-2016 zip layout: Images/Samples/<NN_CLASS>/<tile> in mixed formats."""
    base = root / "Images" / "Samples"
    for k, (cls, fmt, ext) in enumerate([("01_TUMOR", "TIFF", "tif"), ("02_STROMA", "PNG", "png"),
                                         ("08_EMPTY", "JPEG", "jpg")]):
        for i in range(4):
            _tile(base / cls / f"t{i}.{ext}", 40 * k + i, fmt)
    (base / "02_STROMA" / "notes.txt").write_text("not a tile")
    return root


def test_class_folders_labels_from_folder_names(tmp_path):
    src = _kather(tmp_path / "kather")
    doc = import_dataset("class_folders", src, tmp_path / "out", split="train")
    names = ["background", "simple stroma", "tumor epithelium"]
    assert doc["label_names"] == names and doc["num_samples"] == 12 and doc["modality"] == "patho"
    assert doc["labels"]["kind"] == "single-label"
    got = _samples(tmp_path / "out")
    by_file = {s.meta["file"]: s for s in got}
    s = by_file["01_TUMOR/t2.tif"]
    assert s.labels == {"background": 0, "simple stroma": 0, "tumor epithelium": 1}
    assert s.meta["class_index"] == 2 and s.text == "a histopathology image of tumor epithelium."
    assert s.image.shape == (20, 20, 3) and int(s.image[0, 0, 1]) == 2  # the TIFF's pixels, lossless
    assert by_file["08_EMPTY/t0.jpg"].labels["background"] == 1
    assert {x.meta["split"] for x in got} == {"train"}
    assert [x.meta["class"] for x in got] != sorted(x.meta["class"] for x in got)  # classes mixed in shard order


def test_class_folders_hash_split_and_test_dir(tmp_path):
    src = tmp_path / "nct"
    for cls in ("ADI", "TUM"):
        for i in range(30):
            _tile(src / cls / f"{cls}-{i}.png", i)
    val7k = tmp_path / "val7k"
    for cls in ("ADI", "TUM"):
        for i in range(3):
            _tile(val7k / cls / f"{cls}-v{i}.png", i)
    doc = import_dataset("class_folders", src, tmp_path / "a", val_frac=0.2, test_frac=0.2, seed=1)
    assert doc["label_names"] == ["adipose tissue", "colorectal adenocarcinoma epithelium"]
    assert set(doc["splits"]) == {"train", "val", "test"} and sum(doc["splits"].values()) == 60
    again = import_dataset("class_folders", src, tmp_path / "b", val_frac=0.2, test_frac=0.2, seed=1)
    assert again["splits"] == doc["splits"]
    doc = import_dataset("class_folders", src, tmp_path / "c", test_dir=str(val7k))
    assert doc["splits"]["test"] == 6 and doc["splits"]["train"] + doc["splits"].get("val", 0) == 60
    tests = [s for s in _samples(tmp_path / "c") if s.meta["split"] == "test"]
    assert all("-v" in s.meta["file"] for s in tests)


def test_class_folders_refuse_paths_leaving_the_source(tmp_path):
    src = _kather(tmp_path / "kather")
    outside = tmp_path / "secret"
    _tile(outside / "x.png", 1)
    cls = src / "Images" / "Samples" / "01_TUMOR"
    os.symlink(outside / "x.png", cls / "link.png")
    with pytest.raises(ValueError, match=r"tile .*link\.png: resolves to .*outside the source folder"):
        import_dataset("class_folders", src, tmp_path / "out")
    (cls / "link.png").unlink()
    os.symlink(outside, src / "Images" / "Samples" / "09_LEAK")
    with pytest.raises(ValueError, match=r"folder .*09_LEAK: resolves to .*outside the source folder"):
        import_dataset("class_folders", src, tmp_path / "out")
    (src / "Images" / "Samples" / "09_LEAK").unlink()
    os.symlink(cls / "t0.tif", cls / "inside.tif")  # a link that stays inside is fine
    assert import_dataset("class_folders", src, tmp_path / "ok")["num_samples"] == 13


def test_class_folders_bad_input_is_one_line_exit_2(tmp_path, capsys):
    (tmp_path / "empty" / "a" / "b").mkdir(parents=True)
    (tmp_path / "empty" / "c").mkdir()
    with pytest.raises(ValueError, match="no class folders with"):
        import_dataset("class_folders", tmp_path / "empty", tmp_path / "out")
    with pytest.raises(ValueError, match="option split='dev'"):
        import_dataset("class_folders", _kather(tmp_path / "k"), tmp_path / "out", split="dev")
    bad = tmp_path / "bad"
    (bad / "TUM").mkdir(parents=True)
    (bad / "TUM" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="one class folder only"):
        import_dataset("class_folders", bad, tmp_path / "o1")
    _tile(bad / "ADI" / "fine.png", 3)
    from medvlp.launch.cli import main

    rc = main(["shards", "import", "class_folders", str(bad), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "broken.png: not a readable image" in err and len(err.strip().splitlines()) == 1


def _camelyon(root: Path, per_center: int = 6) -> Path:
    rows = []
    for center in range(5):
        for j in range(per_center):
            patient, node = 10 * center + j % 3, j % 2
            x, y = 100 + j, 200 + j
            r = {"": len(rows), "patient": patient, "node": node, "x_coord": x, "y_coord": y, "tumor": j % 2,
                 "slide": 2 * patient + node, "center": center, "split": 0}
            rows.append(r)
            _tile(root / "patches" / f"patient_{patient:03d}_node_{node}" /
                  f"patch_patient_{patient:03d}_node_{node}_x_{x}_y_{y}.png", 30 * center + j)
    with open(root / "metadata.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return root


def test_camelyon17_hospital_split_and_slide_split(tmp_path):
    src = _camelyon(tmp_path / "camelyon17_v1.0")
    doc = import_dataset("camelyon17", src, tmp_path / "wilds")
    assert doc["splits"] == {"train": 18, "val": 6, "test": 6} and doc["label_names"] == ["tumor"]
    got = _samples(tmp_path / "wilds")
    assert {s.meta["center"] for s in got if s.meta["split"] == "train"} == {0, 1, 2}
    assert {s.meta["center"] for s in got if s.meta["split"] == "test"} == {4}
    s = next(x for x in got if x.meta["file"].endswith("patch_patient_041_node_1_x_101_y_201.png"))
    assert s.labels == {"tumor": 1} and s.meta["patient_id"] == "camelyon17/patient_041"
    assert s.text == "this is a photo of lymph node tumor tissue" and int(s.image[0, 0, 1]) == 30 * 4 + 1
    doc = import_dataset("camelyon17", src, tmp_path / "target", centers="4", split_by="slide", test_frac=0.4,
                         val_frac=0.2, seed=3)
    assert sum(doc["splits"].values()) == 6
    got = _samples(tmp_path / "target")
    assert {s.meta["center"] for s in got} == {4}
    by_patient = {}
    for s in got:
        by_patient.setdefault(s.meta["patient_id"], set()).add(s.meta["split"])
    assert all(len(v) == 1 for v in by_patient.values())  # a patient never on two sides


def test_camelyon17_bad_rows_and_escaping_paths(tmp_path):
    src = _camelyon(tmp_path / "c17", per_center=2)
    with open(src / "metadata.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    rows[2]["tumor"] = "7"  # the third data row: line 4 of the file (the header is line 1)
    with open(src / "metadata.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    with pytest.raises(ValueError, match=r"metadata.csv line 4: tumor 7 is not 0 or 1"):
        import_dataset("camelyon17", src, tmp_path / "o")
    src = _camelyon(tmp_path / "c17b", per_center=2)
    outside = tmp_path / "elsewhere.png"
    _tile(outside, 5)
    p = next((src / "patches").rglob("*.png"))
    p.unlink()
    os.symlink(outside, p)
    with pytest.raises(ValueError, match="outside the source folder"):
        import_dataset("camelyon17", src, tmp_path / "o2")
    with pytest.raises(ValueError, match="must not overlap"):
        import_dataset("camelyon17", src, tmp_path / "o3", train_centers="0,1", val_centers="1")
    with pytest.raises(FileNotFoundError, match="no metadata.csv"):
        import_dataset("camelyon17", tmp_path, tmp_path / "o4")


@pytest.mark.skipif(REAL_KATHER is None, reason="set MEDVLP_REALDATA to a folder holding kather_tiles/")
def test_real_kather_tiles_import(tmp_path):
    doc = import_dataset("class_folders", REAL_KATHER, tmp_path / "k", split="test")
    assert doc["num_samples"] == 24 and len(doc["label_names"]) == 8
    assert "tumor epithelium" in doc["label_names"] and "adipose tissue" in doc["label_names"]
    got = _samples(tmp_path / "k")
    assert all(s.image.shape == (150, 150, 3) for s in got)
    assert sorted(np.bincount([s.meta["class_index"] for s in got]).tolist()) == [3] * 8
