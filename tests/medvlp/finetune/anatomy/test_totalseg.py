"""A TotalSegmentator multi-label mask through the manifest: labels merged to the stage's organs by name, resized to
the stage grid, organ tokens and zero-shot scores extracted, organs smaller than one token reported."""
import csv
import json

import numpy as np
import pytest

from medvlp.data_shards.readers.totalseg import TOTALSEG_TOTAL, manifest_organs, merge_table, relabel

pytestmark = pytest.mark.timeout(600)

ORGANS = ["liver", "spleen", "left_kidney", "right_kidney", "lung"]


def ts(name: str) -> int:
    return TOTALSEG_TOTAL.index(name) + 1


def test_totalseg_names_and_merge_by_name():
    assert len(TOTALSEG_TOTAL) == 117 and len(set(TOTALSEG_TOTAL)) == 117
    assert (ts("spleen"), ts("liver"), ts("vertebrae_S1"), ts("heart"), ts("costal_cartilages")) == (1, 5, 26, 51, 117)
    targets, lut = merge_table(TOTALSEG_TOTAL, ORGANS)
    assert targets == ORGANS and len(lut) == 118
    assert lut[ts("liver")] == 1 and lut[ts("spleen")] == 2
    assert lut[ts("kidney_left")] == lut[ts("kidney_cyst_left")] == 3 and lut[ts("kidney_right")] == 4
    assert {lut[ts(n)] for n in TOTALSEG_TOTAL if n.startswith("lung_")} == {5}
    assert lut[ts("aorta")] == 0 and lut[0] == 0 and sum(v > 0 for v in lut) == 11
    m = np.array([[0, ts("kidney_cyst_left"), ts("aorta")], [ts("lung_middle_lobe_right"), ts("liver"), 0]])
    np.testing.assert_array_equal(relabel(m, lut), [[0, 3, 0], [5, 1, 0]])
    with pytest.raises(ValueError, match="beyond the 117 named labels"):
        relabel(np.array([118]), lut)
    _, lut2 = merge_table(TOTALSEG_TOTAL, {"kidneys": ["kidney_left", "kidney_right"]})
    assert lut2[ts("kidney_left")] == lut2[ts("kidney_right")] == 1 and lut2[ts("kidney_cyst_left")] == 0
    with pytest.raises(ValueError, match="'livr' matches none"):
        merge_table(TOTALSEG_TOTAL, ["livr"])


def test_manifest_hook_errors_are_named():
    raw, errs, extra = manifest_organs({"organ_names": "totalseg", "organ_merge": json.dumps(ORGANS)})
    assert errs == [] and raw["organ_names"] == ORGANS and extra["source_organ_names"] == TOTALSEG_TOTAL
    _, errs, _ = manifest_organs({"organ_names": "totalseg", "organ_merge": '["liver", "pancreaas"]'})
    assert errs and errs[0][0] == "organ_merge" and "pancreaas" in errs[0][1]
    _, errs, _ = manifest_organs({"organ_merge": '["liver"]'})
    assert errs == [("organ_merge", 'needs organ_names (the mask\'s label names, or "totalseg")')]
    _, errs, _ = manifest_organs({"organ_names": "totalseg", "organ_merge": "[liver"})
    assert errs[0][0] == "organ_merge" and "not valid JSON" in errs[0][1]


def _fabricated_case(d):
    """A 40x40x20 (x, y, z) abdominal CT at 1.5 x 1.5 x 3 mm with a TotalSegmentator label map: a large liver with
    a lesion, spleen, both kidneys (the left with a cyst label), two lung lobes, vertebra, aorta, and a right kidney
    of 4 voxels (smaller than one last-scale token)."""
    from medvlp.data_shards.readers.fabricate import write_nifti

    rng = np.random.default_rng(0)
    hu = (rng.normal(0, 8, (40, 40, 20)) - 100).astype(np.int16)
    lab = np.zeros((40, 40, 20), np.uint8)
    x, y, z = np.meshgrid(np.arange(40), np.arange(40), np.arange(20), indexing="ij")
    lab[(x - 12) ** 2 + (y - 20) ** 2 < 90] = ts("liver")
    lab[(x - 30) ** 2 + (y - 24) ** 2 < 20] = ts("spleen")
    lab[(x - 28) ** 2 + (y - 10) ** 2 < 12] = ts("kidney_left")
    lab[(x == 28) & (y == 10)] = ts("kidney_cyst_left")
    lab[10:12, 8:10, 8:9] = ts("kidney_right")
    lab[:, 30:, 16:] = ts("lung_lower_lobe_left")
    lab[:20, 30:, 16:] = ts("lung_lower_lobe_right")
    lab[18:22, 2:6, :] = ts("vertebrae_L1")
    lab[20:22, 14:16, :] = ts("aorta")
    hu[lab == ts("liver")] = 60
    hu[(x - 12) ** 2 + (y - 20) ** 2 + (z - 10) ** 2 < 6] = 10  # a hypodense liver lesion
    hu[np.isin(lab, [ts("lung_lower_lobe_left"), ts("lung_lower_lobe_right")])] = -850
    aff = np.diag([-1.5, -1.5, 3.0, 1.0])
    write_nifti(d / "ct.nii.gz", hu, aff)
    write_nifti(d / "seg.nii.gz", lab, aff)
    rows = [{"volume": "ct.nii.gz", "mask": "seg.nii.gz", "patient_id": f"p{i}", "split": "test",
             "key": f"case{i}", "report": "Liver: 2 cm hypodense lesion. The spleen is normal. Lungs are clear.",
             "organ_names": "totalseg", "organ_merge": json.dumps(ORGANS)} for i in range(2)]
    (d / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d / "m.jsonl", lab


def test_totalseg_case_builds_and_runs_through_organ_tokens(tmp_path, capsys):
    from medvlp.data_shards.build import build_shards
    from medvlp.data_shards.inspect import iter_samples
    from medvlp.finetune.anatomy.extract import main

    manifest, lab = _fabricated_case(tmp_path)
    build_shards(manifest, tmp_path / "shards", workers=1, progress=False)
    s = next(iter(iter_samples(tmp_path / "shards", "index.json")))
    assert s.extra["organ_names"] == ORGANS and len(s.extra["organ_label_map"]) == 118
    assert s.extra["organs"]["liver"]["abnormal"] == 1 and s.extra["organs"]["spleen"]["abnormal"] == 0
    # the source labels are stored (nothing lost); merged at read time
    assert ts("aorta") in np.unique(s.mask) and ts("kidney_cyst_left") in np.unique(s.mask)
    merged = relabel(s.mask, s.extra["organ_label_map"])
    assert set(np.unique(merged)) == {0, 1, 2, 3, 4, 5}
    assert (merged == 3).sum() == ((lab == ts("kidney_left")) | (lab == ts("kidney_cyst_left"))).sum()

    out = tmp_path / "extract"
    rc = main(["anatomy-synth", "--shards", str(tmp_path / "shards"), "--out", str(out), "--split", "test",
               "--set", "model.name=debug-3d-organs", "--set", "data.volume_size=[16,32,32]", "--set", "data.workers=0"])
    assert rc == 0
    rows = list(csv.DictReader((out / "organs.csv").open()))
    assert len(rows) == 2 * 5 and [r["organ"] for r in rows[:5]] == ORGANS
    by = {r["organ"]: r for r in rows[:5]}
    assert by["right_kidney"]["present"] == "True" and by["right_kidney"]["smaller_than_token"] == "True"
    assert int(by["right_kidney"]["tokens_last"]) >= 1  # kept: it gets the cell it touches
    assert by["liver"]["smaller_than_token"] == "False" and int(by["liver"]["tokens_last"]) > 1
    assert by["liver"]["label"] == "1" and by["spleen"]["label"] == "0"
    assert all(0.0 <= float(r["p_abnormal"]) <= 1.0 for r in rows)
    z = np.load(out / "organ_tokens.npz")
    assert z["pooled"].shape[:2] == (2, 5) and z["embedding"].shape == (2, 5, 64) and z["present"].all()
    assert "right_kidney is smaller than one last-scale token" in capsys.readouterr().out


def test_extract_bad_input_is_one_line(tmp_path, capsys):
    from medvlp.finetune.anatomy.extract import main

    assert main(["anatomy-synth", "--shards", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--shards" in err
