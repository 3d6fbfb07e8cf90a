"""The synthetic CT difficulty knobs (lesion contrast, voxel noise): the default corpus is unchanged byte for byte,
the knobs do what they say, bad values fail clearly."""
import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest

from medvlp.data_shards.schema import encode_sample
from medvlp.data_shards.synth import synth_samples, synth_to_shards
from medvlp.data_shards.synth.ct import _HU, CT_ORGANS, draw_ct_spec, lesion_voxels, render_ct
from medvlp.data_shards.synth.util import iter_studies

# sha256 of sample 0's volume (seed 0, size 32), generated before the knobs existed
REF_VOLUME_0 = "38bae803f62aa8ff37544a9b4c7bdce8faa8dccf0518e4e2f8e3f6bb5ad511ca"


def test_default_volume_is_byte_identical_to_the_original():
    s = next(synth_samples("ct", 1, seed=0, size=32))
    assert hashlib.sha256(s.volume.tobytes()).hexdigest() == REF_VOLUME_0
    a = [encode_sample(x) for x in synth_samples("ct", 3, seed=0, size=32)]
    b = [encode_sample(x) for x in synth_samples("ct", 3, seed=0, size=32,
                                                 difficulty={"lesion_contrast": 1.0, "noise_hu": 8.0})]
    assert a == b


def test_lesion_contrast_scales_the_lesion_offset_from_its_organ():
    study = next(iter(iter_studies(0, "ct", 1, (0.6, 0.4))))
    base = draw_ct_spec(0, study, 32)
    half = draw_ct_spec(0, study, 32, lesion_contrast=0.5)
    for o in CT_ORGANS:
        off, off_half = base["lesions"][o]["hu"] - _HU[o], half["lesions"][o]["hu"] - _HU[o]
        assert off_half == pytest.approx(0.5 * off, abs=0.06)  # HU stored to 0.1
        assert base["lesions"][o]["centre_zyx"] == half["lesions"][o]["centre_zyx"]
    # rendered without noise: the lesion voxels sit at the organ HU + the scaled offset (+ the 5 HU texture)
    half["noise_hu"] = 0.0
    organ = "liver"
    on = {o: o == organ for o in CT_ORGANS}
    les = lesion_voxels(half, organ)
    vol_on, vol_off = render_ct(half, on).astype(float), render_ct(half, {}).astype(float)
    want = half["lesions"][organ]["hu"]
    assert np.abs(vol_on[les] - want).max() <= 0.5
    assert np.abs((vol_on - vol_off)[les].mean() - (want - _HU[organ])) < 6.0  # texture sd 5 HU averages out
    assert np.array_equal(vol_on[~les], vol_off[~les])


def test_noise_hu_sets_the_voxel_noise_and_is_recorded(tmp_path):
    study = next(iter(iter_studies(0, "ct", 1, (0.6, 0.4))))
    spec = draw_ct_spec(0, study, 32)
    quiet = render_ct({**spec, "noise_hu": 0.0}).astype(float)
    loud = render_ct({**spec, "noise_hu": 24.0}).astype(float)
    liver = spec["mask"] == CT_ORGANS.index("liver") + 1
    assert np.std((loud - quiet)[liver]) == pytest.approx(24.0, rel=0.1)
    doc = synth_to_shards(tmp_path, "ct", n=2, seed=0, size=32, difficulty={"noise_hu": 24})
    idx = json.loads((tmp_path / "index.json").read_text())
    assert doc["difficulty"] == idx["difficulty"] == {"lesion_contrast": 1.0, "noise_hu": 24.0}
    assert "--noise-hu 24" in idx["command"]
    plain = synth_to_shards(tmp_path / "plain", "ct", n=2, seed=0, size=32)
    assert "difficulty" not in plain


@pytest.mark.timeout(60)
@pytest.mark.parametrize("args,msg", [(["--lesion-contrast", "0"], "lesion_contrast must be a finite number > 0"),
                                      (["--noise-hu", "-1"], "noise_hu must be a finite number >= 0"),
                                      (["--lesion-contrast", "nan"], "lesion_contrast"),
                                      (["--modality", "cxr", "--noise-hu", "3"], "apply to --modality ct only")])
def test_bad_knob_values_exit_2_with_one_line(tmp_path, args, msg):
    cmd = [sys.executable, "-m", "medvlp.launch.cli", "shards", "synth", "--modality", "ct", "--n", "2", "--size",
           "32", "--out", str(tmp_path / "o"), *args]
    r = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and msg in lines[0] and "Traceback" not in r.stderr
    assert not (tmp_path / "o" / "index.json").exists()
    with pytest.raises(ValueError, match="unknown knob 'contrast'"):
        list(synth_samples("ct", 1, size=32, difficulty={"contrast": 0.5}))
