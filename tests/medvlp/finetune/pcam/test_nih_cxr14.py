"""NIH ChestX-ray14 layout on fabricated files: labels, boxes rescaled to the stored image, patient splits, paths
that leave the source folder rejected, and the boxes reaching the PCAM localisation metrics and `medvlp localize`."""
import json
import os

import numpy as np
import pytest

pytestmark = pytest.mark.timeout(600)

ENTRY_HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
                "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],\n")
SIDE = 128  # fabricated "original" side; imported at image_size=64, so stored boxes are halved


def _png(path, lesion=None, seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    img = 60 + 10 * rng.standard_normal((SIDE, SIDE))
    if lesion is not None:
        x, y, w, h = lesion
        img[y:y + h, x:x + w] += 120
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path)


def fabricate(root, n_patients=24, outside=None):
    """A ChestX-ray14 folder: 2 images per patient; every even patient's first image has a Mass (box) and is
    listed in BBox_List; images split over images_001/images and images_002/images."""
    entry, bbox = [ENTRY_HEADER], ["Image Index,Finding Label,Bbox [x,y,w,h],,,\n"]
    for p in range(1, n_patients + 1):
        for v in range(2):
            name = f"{p:08d}_{v:03d}.png"
            lesion = None
            if p % 2 == 0 and v == 0:
                lesion = (16 + 3 * p, 20 + 2 * p, 24, 20)
                bbox.append(f"{name},Mass,{lesion[0]}.0,{lesion[1]}.0,{lesion[2]}.0,{lesion[3]}.0,,,\n")
            labels = "Mass" if lesion else ("Effusion|Infiltration" if p % 3 == 0 else "No Finding")
            entry.append(f"{name},{labels},{v},{p},{40 + p},M,PA,{SIDE},{SIDE},0.143,0.143,\n")
            _png(root / f"images_00{1 + p % 2}" / "images" / name, lesion, seed=p * 10 + v)
    entry.append("../escape.png,Mass,0,99,50,F,PA,128,128,0.143,0.143,\n")
    bbox.append("00000003_000.png,Infiltrate,10.0,10.0,30.0,30.0,,,\n")  # the box list's alias
    (root / "Data_Entry_2017.csv").write_text("".join(entry))
    (root / "BBox_List_2017.csv").write_text("".join(bbox))
    if outside is not None:  # a symlinked image folder leaving the source folder
        _png(outside / "images" / "00000099_000.png", seed=99)
        os.symlink(outside, root / "images_009")
    return root


@pytest.fixture(scope="module")
def nih(tmp_path_factory):
    from medvlp.data_shards.importers import import_dataset

    base = tmp_path_factory.mktemp("nih")
    src = fabricate(base / "ChestX-ray14", outside=base / "elsewhere")
    doc = import_dataset("nih_cxr14", src, base / "shards", image_size="64", workers="1", progress="false",
                         maxcount="16", command="test")
    return base, src, doc


def test_labels_boxes_and_patient_splits(nih):
    from medvlp.data_shards.inspect import iter_samples
    from medvlp.data_shards.importers.nih_cxr14 import FINDINGS

    base, src, doc = nih
    assert doc["label_names"] == sorted(FINDINGS) and doc["labels"]["kind"] == "multi-label"
    assert doc["labels"]["prompts"]["Pleural_Thickening"]["positive"] == ["There is pleural thickening."]
    samples = {s.key: s for s in iter_samples(base / "shards")}
    assert len(samples) == 48  # the escaping row is not imported
    s = samples["nih-cxr14/00000004_000"]
    assert s.image.shape == (64, 64) and s.labels["Mass"] == 1 and s.labels["Effusion"] == 0
    assert s.text == "Chest radiograph. There is mass."
    x, y = 16 + 12, 20 + 8  # patient 4's box (x, y, w, h) = (28, 28, 24, 20) at 128 px -> halved, xyxy
    assert s.extra["boxes"] == [{"finding": "Mass", "box": [x / 2, y / 2, (x + 24) / 2, (y + 20) / 2]}]
    assert samples["nih-cxr14/00000003_000"].extra["boxes"][0]["finding"] == "Infiltration"  # alias mapped
    assert samples["nih-cxr14/00000003_000"].text == "Chest radiograph. There is effusion and infiltration."
    by_patient = {}
    for s in samples.values():
        by_patient.setdefault(s.meta["patient_id"], set()).add(s.meta["split"])
    assert all(len(v) == 1 for v in by_patient.values())  # no patient in two splits
    for p in range(2, 25, 2):  # every patient with a box is held out in test (box_patients=test)
        assert by_patient[f"nih{p:05d}"] == {"test"}
    assert "nih00099" not in by_patient
    assert samples["nih-cxr14/00000001_000"].extra["boxes"] == []  # the field is there, empty, without a box


def test_paths_leaving_the_source_folder_are_rejected(nih, tmp_path):
    from medvlp.data_shards.importers.nih_cxr14 import import_nih_cxr14

    base, src, doc = nih
    errs = (base / "shards" / "build_errors.txt").read_text()
    assert doc["build"]["num_errors"] == 2
    assert "'../escape.png' is not a bare .png file name" in errs
    assert "images_009: image folder leaves the source folder" in errs
    evil = tmp_path / "src"
    evil.mkdir()
    os.symlink(src / "Data_Entry_2017.csv", evil / "Data_Entry_2017.csv")
    with pytest.raises(ValueError, match="Data_Entry_2017.csv: leaves the source folder"):
        import_nih_cxr14(evil, tmp_path / "out", workers=1, progress=False)
    with pytest.raises(FileNotFoundError, match="Data_Entry_2017.csv not found"):
        import_nih_cxr14(tmp_path, tmp_path / "out2", workers=1, progress=False)
    with pytest.raises(ValueError, match="box_patients='train' is not test or auto"):
        import_nih_cxr14(src, tmp_path / "out3", box_patients="train")


def test_boxes_reach_pcam_metrics_and_localize(nih, tmp_path):
    """A 2-step PCAM run on the imported shards scores Mass boxes (pointing, IoU) on the test split, and
    `medvlp localize` reads its checkpoint; a bad importer option is a one-line error (exit 2)."""
    from medvlp.data_shards.config import DataConfig
    from medvlp.finetune.pcam.config import PcamConfig, PcamEvalConfig, PcamHeadConfig
    from medvlp.finetune.pcam.stage import ITEMS_FILE, PcamStage
    from medvlp.finetune.runner import RunnerConfig, run_stage
    from medvlp.launch.cli import main
    from medvlp.pretrain.config import TrackingConfig

    base, src, _ = nih
    cfg = PcamConfig(
        data=DataConfig(train_shards=str(base / "shards"), modality="cxr", image_size=64, shuffle_buffer=8,
                        augment=False),
        head=PcamHeadConfig(model="debug-rn", pooling="pcam", feature_level=-4, findings=["Mass", "Infiltration"]),
        eval=PcamEvalConfig(overlays=1),
        finetune=RunnerConfig(out_dir=str(tmp_path / "run"), steps=2, batch_size=8, lr=1e-3, warmup_steps=1,
                              progress=False, seed=0),
        tracking=TrackingConfig(enabled=False))
    m = run_stage(PcamStage(), cfg).metrics
    assert m["n_loc/Mass"] == 12 and m["n_loc/Infiltration"] == 1  # every box patient is in test
    assert 0.0 <= m["pointing/Mass"] <= 1.0 and 0.0 <= m["iou/Mass"] <= 1.0
    z = np.load(tmp_path / "run" / ITEMS_FILE)
    assert sorted(set(z["case_gt_w"].tolist())) == [12.0, 15.0] and str(z["split"]) == "test"  # Mass, Infiltrate
    img = next((src / "images_001" / "images").glob("*.png"))
    assert main(["localize", "--checkpoint", str(tmp_path / "run"), str(img), "--out", str(tmp_path / "loc")]) == 0
    doc = json.loads((tmp_path / "loc" / "boxes.json").read_text())
    assert set(doc[0]["findings"]) == {"Mass", "Infiltration"} and doc[0]["size"] == [SIDE, SIDE]
