"""DICOM files and series that do not fit the build: a header of another modality, mixed modalities in one series,
a one-slice "series", a CT sample without an organ mask. One line naming the file, exit 2, or an explicit flag."""
import numpy as np
import pytest

from medvlp.data_shards.readers.fabricate import write_ct_series, write_radiograph
from tests.faults.conftest import build_rows, one_line_error, sample_metas

pytestmark = pytest.mark.timeout(120)

PX = np.array([[0, 10, 20], [30, 40, 4095]])
HU = np.arange(24).reshape(3, 2, 4) * 25 - 200


def test_ct_slice_in_a_radiograph_build_is_one_line(tmp_path):
    write_radiograph(tmp_path / "a.dcm", PX, window=(2048, 4096))
    write_radiograph(tmp_path / "ct7.dcm", PX, window=(2048, 4096), Modality="CT", uid_root="1.2.3.4.5")
    rows = [{"image": "a.dcm", "report": "r", "patient_id": "p1"}, {"image": "ct7.dcm", "report": "r", "patient_id": "p2"}]
    proc = build_rows(tmp_path, rows)
    assert proc.returncode == 2
    err = one_line_error(proc)
    assert "m.csv line 3: column 'image'" in err and "ct7.dcm: the DICOM header says Modality CT" in err
    assert "this cxr build takes CR/DX" in err and "a ct build" in err
    ok = build_rows(tmp_path, rows, "--dicom-modality", "CR,DX,CT")  # the user's explicit choice
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert sorted(m["dicom_modality"] for m in sample_metas(tmp_path / "out")) == ["CT", "DX"]


def test_bad_dicom_modality_flag_is_one_line(tmp_path):
    write_radiograph(tmp_path / "a.dcm", PX, window=(2048, 4096))
    proc = build_rows(tmp_path, [{"image": "a.dcm", "report": "r", "patient_id": "p1"}], "--dicom-modality", "C R")
    assert proc.returncode == 2 and "--dicom-modality: ['C R'] are not DICOM Modality codes" in one_line_error(proc)


def test_mixed_modality_series_is_one_line(tmp_path):
    s = write_ct_series(tmp_path / "ser", HU, name=lambda k: f"{k}.dcm")
    from pydicom import dcmread

    ds = dcmread(s / "2.dcm")
    ds.Modality = "MR"
    ds.save_as(s / "2.dcm")
    proc = build_rows(tmp_path, [{"volume": "ser/", "report": "r", "patient_id": "p1"}])
    assert proc.returncode == 2
    assert "ser/2.dcm: Modality MR differs from 0.dcm's CT; one series (one modality) per folder" in one_line_error(proc)


def test_one_slice_series_is_one_line(tmp_path):
    write_ct_series(tmp_path / "ser", HU[:1], name=lambda k: "s1.dcm")
    proc = build_rows(tmp_path, [{"volume": "ser/", "report": "r", "patient_id": "p1"}])
    assert proc.returncode == 2
    err = one_line_error(proc)
    assert "m.csv line 2: column 'volume'" in err and "ser/: a series of one slice (s1.dcm) is not a volume" in err


def test_signed_values_name_the_file_the_sign_and_a_window(tmp_path):
    write_radiograph(tmp_path / "neg.dcm", np.array([[0, 100], [200, 275]]), slope=1.0, intercept=-30.0)
    proc = build_rows(tmp_path, [{"image": "neg.dcm", "report": "r", "patient_id": "p1"}])
    assert proc.returncode == 2
    err = one_line_error(proc)
    assert "m.csv line 2: column 'image'" in err and "neg.dcm: rescaled values -30..245 include negative values" in err
    assert "--dicom-window 108,276" in err
    ok = build_rows(tmp_path, [{"image": "neg.dcm", "report": "r", "patient_id": "p1"}], "--dicom-window", "108,276")
    assert ok.returncode == 0, ok.stderr[-2000:]


def test_signed_32bit_grey_image_names_the_sign(tmp_path):
    from PIL import Image

    Image.fromarray(np.array([[-30, 0], [100, 245]], np.int32), mode="I").save(tmp_path / "s.tif")
    proc = build_rows(tmp_path, [{"image": "s.tif", "report": "r", "patient_id": "p1"}])
    assert proc.returncode == 2
    err = one_line_error(proc)
    assert "column 'image'" in err and "s.tif" in err and "32-bit grey values -30..245: negative values do not fit" in err
