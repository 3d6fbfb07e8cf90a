"""A manifest of real-style CT volumes + organ masks + reports builds into the shards the anatomy stage streams."""
import json

import numpy as np
import pytest

from medvlp.data_shards.build import build_shards
from medvlp.data_shards.config import DataConfig
from medvlp.data_shards.manifest import ManifestError
from medvlp.data_shards.organ_report import organs_from_report
from medvlp.data_shards.stream import make_loader


def test_rules_split_a_report_into_organ_sentences():
    rep = "Liver: 2 cm hypodense lesion in segment 7. The spleen is normal. No renal calculi in the left kidney."
    o = organs_from_report(rep, ["liver", "spleen", "left_kidney", "lung"])
    assert o["liver"] == {"id": 1, "abnormal": 1, "sentence": "Liver: 2 cm hypodense lesion in segment 7."}
    assert o["spleen"] == {"id": 2, "abnormal": 0, "sentence": "The spleen is normal."}
    assert o["left_kidney"]["abnormal"] == 0 and o["left_kidney"]["sentence"].startswith("No renal calculi")
    assert o["lung"] == {"id": 4, "abnormal": 0, "sentence": "The lung is unremarkable."}  # not mentioned


def _case(tmp_path, i, rng):
    vol = rng.integers(-1000, 1000, (8, 16, 16)).astype(np.int16)
    mask = np.zeros((8, 16, 16), np.uint8)
    mask[1:5, 2:8, 2:8] = 1
    mask[4:7, 9:14, 9:14] = 2
    np.save(tmp_path / f"v{i}.npy", vol)
    np.savez(tmp_path / f"m{i}.npz", mask=mask)
    return vol, mask


def test_volumes_masks_reports_build_and_stream_with_organ_members(tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    for i in range(4):
        _case(tmp_path, i, rng)
        row = {"volume": f"v{i}.npy", "mask": f"m{i}.npz", "patient_id": f"p{i}", "split": "train",
               "report": "The liver shows a 9 mm lesion. Spleen unremarkable." if i % 2 else "Normal study.",
               "organ_names": ["liver", "spleen"], "spacing_mm": [5, 0.8, 0.8]}
        if i == 3:  # explicit organs win over the rules
            row["organs"] = {"liver": {"abnormal": 0, "sentence": "Liver normal."},
                             "spleen": {"abnormal": 1, "sentence": "Splenic cyst."}}
        rows.append(json.dumps(row))
    (tmp_path / "m.jsonl").write_text("\n".join(rows) + "\n")
    build_shards(tmp_path / "m.jsonl", tmp_path / "out", workers=1, progress=False)
    dc = DataConfig(train_shards=str(tmp_path / "out"), modality="ct", batch_size=4, resampled=False,
                    shuffle_buffer=0, augment=False, members=["organ_labels", "organ_sentences", "spacing"])
    (b,) = list(make_loader(dc, train=False, split="train"))
    by_key = {k: i for i, k in enumerate(b["key"])}
    assert b["organ_names"] == ["liver", "spleen"] and b["volume"].shape == (4, 1, 8, 16, 16)
    assert b["mask"].shape == (4, 8, 16, 16) and int(b["mask"].max()) == 2
    i1, i3, i0 = by_key["v1"], by_key["v3"], by_key["v0"]
    assert b["organ_labels"][i1].tolist() == [1.0, 0.0]
    assert b["organ_sentences"][i1] == ["The liver shows a 9 mm lesion.", "Spleen unremarkable."]
    assert b["organ_labels"][i0].tolist() == [0.0, 0.0]
    assert b["organ_labels"][i3].tolist() == [0.0, 1.0] and b["organ_sentences"][i3] == ["Liver normal.",
                                                                                          "Splenic cyst."]
    assert np.allclose(b["spacing"][i0].numpy(), [5.0, 0.8, 0.8])


def test_bad_organ_columns_are_named_with_their_line(tmp_path):
    rng = np.random.default_rng(0)
    _case(tmp_path, 0, rng)
    rows = [{"volume": "v0.npy", "mask": "m0.npz", "report": "x", "organ_names": "liver"},
            {"volume": "v0.npy", "mask": "m0.npz", "report": "x", "key": "b", "organ_names": ["liver"],
             "organs": {"liver": {"abnormal": 2, "sentence": "?"}}},
            {"volume": "v0.npy", "mask": "m0.npz", "report": "x", "key": "c", "organs": {}}]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(ManifestError) as e:
        build_shards(tmp_path / "m.jsonl", tmp_path / "out", workers=1, progress=False)
    msg = str(e.value)
    assert "line 1: column 'organ_names': not valid JSON" in msg
    assert "line 2: column 'organs': organ 'liver'" in msg
    assert "line 3: column 'organ_names': 'organs' needs 'organ_names'" in msg
