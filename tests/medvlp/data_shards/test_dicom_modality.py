"""The DICOM Modality tag: checked against the build's modality, kept in the sample's meta, one per series."""
from __future__ import annotations

import numpy as np
import pytest

from medvlp.data_shards.build import _resize_u16
from medvlp.data_shards.readers import ReadError, ReadOptions, accepted_modalities, parse_modalities
from medvlp.data_shards.readers.dicom import load_dicom_image
from medvlp.data_shards.readers.fabricate import write_ct_series, write_radiograph
from medvlp.data_shards.readers.volume import load_volume

pytestmark = pytest.mark.timeout(60)

PX = np.array([[0, 100, 200], [300, 400, 4095]])
HU = np.arange(24).reshape(3, 2, 4) * 25 - 200


def _img(path, opts=ReadOptions(), modality="cxr"):
    return load_dicom_image(str(path), 16, opts, _resize_u16, modality)


@pytest.mark.parametrize("code", ["CR", "DX"])
def test_radiograph_modality_is_kept_in_meta(tmp_path, code):
    _, meta = _img(write_radiograph(tmp_path / "a.dcm", PX, Modality=code))
    assert meta["dicom_modality"] == code


@pytest.mark.parametrize("code, hint", [("CT", "give its series folder in the volume column of a ct build"),
                                        ("MR", "give its series folder"), ("NM", "give its series folder"),
                                        ("US", "leave the file out")])
def test_a_non_radiograph_header_is_refused_in_a_cxr_build(tmp_path, code, hint):
    p = write_radiograph(tmp_path / "slice7.dcm", PX, Modality=code)
    with pytest.raises(ReadError) as e:
        _img(p)
    msg = str(e.value)
    assert e.value.column == "image" and "\n" not in msg
    assert msg.startswith(f"slice7.dcm: the DICOM header says Modality {code} (")
    assert "this cxr build takes CR/DX" in msg and hint in msg and f"--dicom-modality CR,DX,{code}" in msg


def test_the_build_may_widen_the_accepted_modalities(tmp_path):
    p = write_radiograph(tmp_path / "m.dcm", PX, Modality="MG")
    _, meta = _img(p, ReadOptions(dicom_modalities=("CR", "DX", "MG")))
    assert meta["dicom_modality"] == "MG"
    with pytest.raises(ReadError, match="this cxr build takes CR/DX/MG"):
        _img(write_radiograph(tmp_path / "c.dcm", PX, Modality="CT"), ReadOptions(dicom_modalities=("CR", "DX", "MG")))


def test_a_header_without_modality_is_built_and_says_so(tmp_path):
    p = write_radiograph(tmp_path / "n.dcm", PX)
    from pydicom import dcmread

    ds = dcmread(p)
    del ds.Modality
    ds.save_as(p)
    _, meta = _img(p)
    assert meta["dicom_modality"] is None and "Modality" not in meta["dicom"]


def test_free_text_in_modality_is_refused_without_quoting_it(tmp_path):
    p = write_radiograph(tmp_path / "f.dcm", PX, Modality="JANE DOE")
    with pytest.raises(ReadError, match="f.dcm: its Modality element holds no DICOM Modality code") as e:
        _img(p)
    assert "JANE" not in str(e.value)


def test_ct_series_modality_is_kept_and_checked(tmp_path):
    s = write_ct_series(tmp_path / "ct", HU)
    _, _, meta = load_volume(str(s), None, ReadOptions(), None)
    assert meta["dicom_modality"] == "CT"
    mr = write_ct_series(tmp_path / "mr", HU, Modality="MR")
    with pytest.raises(ReadError) as e:
        load_volume(str(mr), None, ReadOptions(), None)
    assert str(e.value).startswith("mr/: the DICOM header says Modality MR (magnetic resonance), but this ct build "
                                   "takes CT; only CT series make ct volumes")


def test_mixed_modalities_in_one_series_are_refused_naming_the_file(tmp_path):
    s = write_ct_series(tmp_path / "s", HU, name=lambda k: f"{k}.dcm")
    from pydicom import dcmread

    ds = dcmread(s / "1.dcm")
    ds.Modality = "PT"
    ds.save_as(s / "1.dcm")
    with pytest.raises(ReadError) as e:
        load_volume(str(s), None, ReadOptions(), None)
    assert str(e.value) == "s/1.dcm: Modality PT differs from 0.dcm's CT; one series (one modality) per folder"


def test_nifti_has_no_modality_to_check(tmp_path):
    from medvlp.data_shards.readers.fabricate import write_nifti

    v = write_nifti(tmp_path / "v.nii.gz", np.zeros((3, 3, 3), np.int16))
    assert "dicom_modality" not in load_volume(str(v), None, ReadOptions(), None)[2]


def test_modality_codes_parse_and_default():
    assert parse_modalities(" cr, DX ,", "--dicom-modality") == ("CR", "DX")
    with pytest.raises(ValueError, match="--dicom-modality: \\['C R'\\] are not DICOM Modality codes"):
        parse_modalities("C R", "--dicom-modality")
    assert accepted_modalities(ReadOptions(), "cxr") == ("CR", "DX")
    assert accepted_modalities(ReadOptions(), "ct") == ("CT",)
    assert accepted_modalities(ReadOptions(dicom_modalities=("MG",)), "cxr") == ("MG",)
    with pytest.raises(ValueError, match="not DICOM Modality codes"):
        ReadOptions(dicom_modalities=("cr",))


def test_importer_option_dicom_modality():
    from medvlp.data_shards.importers.common import CLINICAL_OPTIONS, clinical_read

    o = {k: v[1] for k, v in CLINICAL_OPTIONS.items()}
    assert clinical_read("mimic_cxr", {**o, "dicom_modality": "cr,dx,mg"}, []).dicom_modalities == ("CR", "DX", "MG")
    assert clinical_read("mimic_cxr", o, []).dicom_modalities == ()
    with pytest.raises(ValueError, match="mimic_cxr importer: option dicom_modality: \\['C R'\\] are not DICOM"):
        clinical_read("mimic_cxr", {**o, "dicom_modality": "C R"}, [])
