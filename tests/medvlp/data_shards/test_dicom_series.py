"""A DICOM series must be a volume: two or more slices whose geometry gives the slice spacing."""
from __future__ import annotations

import numpy as np
import pytest

from medvlp.data_shards.readers import ReadError, ReadOptions
from medvlp.data_shards.readers.fabricate import write_ct_series
from medvlp.data_shards.readers.volume import load_volume

pytestmark = pytest.mark.timeout(60)

HU = np.arange(24).reshape(3, 2, 4) * 25 - 200


def _load(folder):
    return load_volume(str(folder), None, ReadOptions(), None)


def test_one_slice_series_is_refused_naming_it(tmp_path):
    s = write_ct_series(tmp_path / "one", HU[:1], name=lambda k: "only.dcm")
    with pytest.raises(ReadError) as e:
        _load(s)
    assert e.value.column == "volume"
    assert str(e.value).startswith("one/: a series of one slice (only.dcm) is not a volume: the spacing between "
                                   "slices comes from their positions")


def test_two_slices_are_a_volume_with_their_spacing(tmp_path):
    vol, _, meta = _load(write_ct_series(tmp_path / "two", HU[:2], spacing=(4.0, 0.5, 0.6)))
    assert vol.shape == (2, 2, 4) and meta["spacing"] == [4.0, 0.5, 0.6]


@pytest.mark.parametrize("kw, value, want", [
    ("PixelSpacing", [0.0, 0.5], "PixelSpacing is not 2 finite numbers > 0"),
    ("PixelSpacing", [0.5], "PixelSpacing is not 2 finite numbers > 0"),
    ("ImagePositionPatient", [0.0, "nan", 1.0], "ImagePositionPatient is not 3 finite numbers"),
    ("ImageOrientationPatient", [1.0, 0.0, 0.0, 1.0, 0.0, 0.0], "ImageOrientationPatient is not two perpendicular"),
])
def test_slices_without_usable_geometry_are_refused(tmp_path, kw, value, want):
    s = write_ct_series(tmp_path / "g", HU, name=lambda k: f"{k}.dcm")
    from pydicom import dcmread

    for f in sorted(s.iterdir()):
        ds = dcmread(f)
        setattr(ds, kw, value)
        ds.save_as(f)
    with pytest.raises(ReadError, match="^g/0.dcm: " + want):
        _load(s)
