"""DICOM and NIfTI readers on tiny fabricated files: hand-computed pixel values, geometry, clear errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from medvlp.data_shards.build import _resize_u16
from medvlp.data_shards.config import AugmentConfig, DataConfig
from medvlp.data_shards.readers import ReadError, ReadOptions
from medvlp.data_shards.readers.dicom import apply_window, load_dicom_image
from medvlp.data_shards.readers.fabricate import write_ct_series, write_nifti, write_radiograph
from medvlp.data_shards.readers.volume import load_volume
from medvlp.data_shards.schema import Sample
from medvlp.data_shards.transforms import SampleTransform, hu_windows

PX = np.array([[0, 100, 200, 4095], [1000, 2000, 3000, 50]])


def _img(path, opts=ReadOptions(), size=512):
    return load_dicom_image(str(path), size, opts, _resize_u16)


def test_monochrome2_rescale_keeps_16_bits(tmp_path):
    img, meta = _img(write_radiograph(tmp_path / "a.dcm", PX, slope=2.0, intercept=10.0, spacing=(0.15, 0.2)))
    assert img.dtype == np.uint16
    np.testing.assert_array_equal(img, PX * 2 + 10)  # modality LUT, no window: values kept
    assert meta["spacing"] == [0.15, 0.2] and meta["window_source"] == "none"
    assert meta["dicom"]["PhotometricInterpretation"] == "MONOCHROME2" and meta["dicom"]["ViewPosition"] == "PA"


def test_monochrome1_inverted_within_stored_range(tmp_path):
    img, _ = _img(write_radiograph(tmp_path / "a.dcm", PX, photometric="MONOCHROME1", slope=2.0, intercept=10.0))
    # 12 stored bits -> modality range [10, 4095 * 2 + 10]; inversion maps x to lo + hi - x
    np.testing.assert_array_equal(img, 10 + 8200 - (PX * 2 + 10))


def test_window_from_file_then_option_then_voi_none(tmp_path):
    p = write_radiograph(tmp_path / "w.dcm", PX, window=(1000.0, 2001.0))
    img, meta = _img(p)
    x = PX.astype(float)
    want = np.rint(np.clip((x - 999.5) / 2000.0 + 0.5, 0, 1) * 65535)  # PS3.3 C.11.2.1.2.1 LINEAR
    np.testing.assert_array_equal(img, want)
    assert meta["window"] == [1000.0, 2001.0] and meta["window_source"] == "file"
    img2, meta2 = _img(p, ReadOptions(voi="none", window=(2000.0, 4001.0)))
    np.testing.assert_array_equal(img2, np.rint(np.clip((x - 1999.5) / 4000.0 + 0.5, 0, 1) * 65535))
    assert meta2["window_source"] == "option"
    inv, _ = _img(write_radiograph(tmp_path / "w1.dcm", PX, window=(1000.0, 2001.0), photometric="MONOCHROME1"))
    np.testing.assert_array_equal(inv, 65535 - want)


def test_voi_lut_sequence(tmp_path):
    from pydicom.dataset import Dataset
    from pydicom.filereader import dcmread

    p = write_radiograph(tmp_path / "l.dcm", np.array([[0, 1, 2, 3]]), bits=8)
    ds = dcmread(str(p))
    item = Dataset()
    item.LUTDescriptor = [4, 0, 8]
    item.add_new(0x00283006, "US", [0, 50, 200, 255])  # LUTData
    item.LUTExplanation = "test"
    ds.VOILUTSequence = [item]
    ds.save_as(str(p))
    img, meta = _img(p)
    np.testing.assert_array_equal(img, np.rint(np.array([[0, 50, 200, 255]]) / 255 * 65535))
    assert meta["window_source"] == "voi_lut"


def test_values_that_do_not_fit_need_a_window(tmp_path):
    with pytest.raises(ReadError, match="include negative values .* unsigned 16-bit pixels cannot hold.*--dicom-window"):
        _img(write_radiograph(tmp_path / "n.dcm", PX, slope=1.0, intercept=-1024.0))


def test_sign_message_names_the_file_and_a_window_that_works(tmp_path):
    """The values of the report (-30..245): the message says the sign is the problem and gives a window that maps
    the file's whole range onto 0..65535."""
    px = np.array([[0, 100], [200, 275]])
    p = write_radiograph(tmp_path / "neg.dcm", px, slope=1.0, intercept=-30.0)
    with pytest.raises(ReadError) as e:
        _img(p)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("neg.dcm: rescaled values -30..245 include negative values (down to "
                                              "-30), which unsigned 16-bit pixels cannot hold")
    assert "do not fit 16 bits" not in msg and "e.g. --dicom-window 108,276 spans this file's whole range" in msg
    img, meta = _img(p, ReadOptions(window=(108.0, 276.0)))
    assert img.min() == 0 and img.max() == 65535 and meta["window_source"] == "option"
    big = write_radiograph(tmp_path / "big.dcm", np.array([[0, 4095]]), slope=20.0, intercept=0.0)
    with pytest.raises(ReadError, match="^big.dcm: rescaled values 0..81900 exceed 65535, the largest unsigned "
                                        "16-bit pixel .*--dicom-window 40950.5,81901"):
        _img(big)


def test_unsupported_syntax_and_missing_pixels_are_named(tmp_path):
    from pydicom.uid import JPEG2000Lossless

    with pytest.raises(ReadError, match=r"JPEG 2000.*1\.2\.840\.10008\.1\.2\.4\.90.*medvlp\[dicom\]"):
        _img(write_radiograph(tmp_path / "j.dcm", PX, syntax=JPEG2000Lossless))
    with pytest.raises(ReadError, match="no pixel data"):
        _img(write_radiograph(tmp_path / "e.dcm", PX, pixel_data=False))
    (tmp_path / "x.dcm").write_bytes(b"not dicom" * 40)
    with pytest.raises(ReadError, match="not a DICOM"):
        _img(tmp_path / "x.dcm")


def test_ct_series_sorted_by_position_with_geometry(tmp_path):
    hu = (np.arange(4 * 3 * 5).reshape(4, 3, 5) * 10 - 300).astype(np.int16)  # (slice, row, col)
    write_ct_series(tmp_path / "s", hu, spacing=(2.5, 0.7, 0.8), intercept=-1024.0)
    vol, mask, meta = load_volume(str(tmp_path / "s"), None, ReadOptions(), None)
    # axial LPS series -> RAS: d = slice (inferior -> superior), h = rows reversed (P->A), w = cols reversed (L->R)
    np.testing.assert_array_equal(vol, hu[:, ::-1, ::-1])
    assert vol.dtype == np.int16 and mask is None
    assert meta["spacing"] == [2.5, 0.7, 0.8] and meta["orientation"] == "RAS"
    assert meta["source_orientation"] == "LPS" and meta["dicom"]["Modality"] == "CT"
    # file names in reverse slice order give the same volume: slices are placed by position, never by name
    rev = write_ct_series(tmp_path / "r", hu, spacing=(2.5, 0.7, 0.8), name=lambda k: f"{99 - k}.dcm")
    np.testing.assert_array_equal(load_volume(str(rev), None, ReadOptions(), None)[0], vol)


def test_series_gap_and_mixed_series_are_errors(tmp_path):
    hu = np.zeros((4, 2, 2), np.int16)
    s = write_ct_series(tmp_path / "g", hu, name=lambda k: f"{k}.dcm")
    (s / "1.dcm").unlink()  # a missing slice
    with pytest.raises(ReadError, match="uneven slice spacing"):
        load_volume(str(s), None, ReadOptions(), None)
    m = write_ct_series(tmp_path / "m", hu[:2], uid_root="1.2.3.4")
    write_ct_series(m, hu[:2], uid_root="1.2.3.5", origin=(0.0, 0.0, 100.0), name=lambda k: f"b{k}.dcm")
    with pytest.raises(ReadError, match="2 series") as e:
        load_volume(str(m), None, ReadOptions(), None)
    assert "1.2.3.4" not in str(e.value)  # UIDs are never printed


def test_nifti_reoriented_to_canonical(tmp_path):
    data = np.arange(2 * 3 * 4, dtype=np.int16).reshape(2, 3, 4)  # (x, y, z) in file order
    aff = np.diag([-1.5, -1.0, 2.0, 1.0])  # LPS axes, spacing (1.5, 1, 2)
    vol, _, meta = load_volume(str(write_nifti(tmp_path / "v.nii.gz", data, aff)), None, ReadOptions(), None)
    np.testing.assert_array_equal(vol, data[::-1, ::-1, :].transpose(2, 1, 0))
    assert meta["spacing"] == [2.0, 1.0, 1.5] and meta["source_orientation"] == "LPS"
    # axes permuted in the file (z, x, y) -> the same canonical volume
    perm = np.zeros((4, 4))
    perm[0, 1], perm[1, 2], perm[2, 0], perm[3, 3] = -1.5, -1.0, 2.0, 1.0
    vol2, _, _ = load_volume(str(write_nifti(tmp_path / "p.nii.gz", data.transpose(2, 0, 1), perm)), None,
                             ReadOptions(), None)
    np.testing.assert_array_equal(vol2, vol)


def test_resample_to_target_spacing_nearest_mask(tmp_path):
    data = np.arange(2 * 2 * 3, dtype=np.int16).reshape(2, 2, 3) * 10
    lab = np.array([[[0, 1, 2], [3, 4, 5]], [[6, 7, 0], [1, 2, 3]]], dtype=np.uint8)
    aff = np.diag([1.0, 1.0, 2.0, 1.0])
    v, m = write_nifti(tmp_path / "v.nii", data, aff), write_nifti(tmp_path / "m.nii.gz", lab, aff)
    vol, mask, meta = load_volume(str(v), str(m), ReadOptions(spacing=(1.0, 1.0, 1.0)), None)
    assert vol.shape == (6, 2, 2) and meta["spacing"] == [1.0, 1.0, 1.0]
    assert meta["original_spacing"] == [2.0, 1.0, 1.0]
    np.testing.assert_array_equal(mask, np.repeat(lab.transpose(2, 1, 0), 2, axis=0))  # nearest: each slice twice
    assert set(np.unique(mask)) <= set(np.unique(lab))
    base = data.transpose(2, 1, 0).astype(float)  # linear along d, align_corners=False: weights 1/4, 3/4
    np.testing.assert_array_equal(vol[1], np.rint(0.75 * base[0] + 0.25 * base[1]))


def test_mask_grid_mismatch_is_a_clear_error(tmp_path):
    data = np.zeros((3, 3, 3), np.int16)
    v = write_nifti(tmp_path / "v.nii.gz", data, np.eye(4))
    shifted = np.eye(4)
    shifted[0, 3] = 5.0
    with pytest.raises(ReadError, match="grid differs from the volume's.*origin") as e:
        load_volume(str(v), str(write_nifti(tmp_path / "m.nii.gz", data.astype(np.uint8), shifted)),
                    ReadOptions(), None)
    assert e.value.column == "mask"
    with pytest.raises(ReadError, match=r"shape \(3, 3, 2\) vs \(3, 3, 3\)"):
        load_volume(str(v), str(write_nifti(tmp_path / "s.nii.gz", np.zeros((3, 3, 2), np.uint8))), ReadOptions(),
                    None)


def test_organ_folder_merged_into_one_label_map(tmp_path):
    aff = np.eye(4)
    v = write_nifti(tmp_path / "case" / "ct.nii.gz", np.zeros((2, 2, 1), np.int16), aff)
    seg = tmp_path / "case" / "segmentations"
    write_nifti(seg / "liver.nii.gz", np.array([[[1], [1]], [[0], [0]]], np.uint8), aff)
    write_nifti(seg / "kidney_left.nii.gz", np.array([[[0], [1]], [[0], [1]]], np.uint8), aff)
    _, mask, meta = load_volume(str(v), str(seg), ReadOptions(organs=("kidney_left", "liver", "spleen")), None)
    # label 1 = kidney_left (wins the overlap at x=0,y=1), 2 = liver; (D, H, W) = (z, y, x)
    np.testing.assert_array_equal(mask[0], np.array([[2, 0], [1, 1]]))
    assert meta["organs_present"] == ["kidney_left", "liver"]
    with pytest.raises(ReadError, match="not in the organ list"):
        load_volume(str(v), str(seg), ReadOptions(organs=("liver",)), None)


def test_hu_windows_stack_as_channels_and_aug_knobs():
    vol = np.array([[[-1200, -600, 0, 40, 200, 2000]]], dtype=np.int16)
    out = hu_windows(vol, [[-1000, 1000], [-160, 240]])
    assert out.shape == (2, 1, 1, 6)
    torch.testing.assert_close(out[1, 0, 0], torch.tensor([-1, -1, -0.2, 0.0, 0.8, 1.0]))
    t = SampleTransform("ct", 16, train=True, hu_windows=[[-1000, 1000], [-160, 240]],
                        aug=AugmentConfig(ct_noise_std=0.05, ct_crop_scale=0.5))
    s = Sample(key="k", text="t", volume=np.zeros((4, 4, 4), np.int16), mask=np.ones((4, 4, 4), np.uint8))
    a = t(s, np.random.default_rng(1))
    assert a["volume"].shape == (2, 4, 4, 4) and a["mask"].shape == (4, 4, 4)
    torch.testing.assert_close(a["volume"], t(s, np.random.default_rng(1))["volume"])  # deterministic per rng
    with pytest.raises(ValueError, match="hu_windows"):
        DataConfig(hu_windows=[[100, -100]]).validate()
    with pytest.raises(ValueError, match="aug.crop_scale"):
        DataConfig(aug=AugmentConfig(crop_scale=[0.5, 1.5])).validate()


def test_apply_window_functions():
    x = np.array([-1.0, 0.0, 1.0])
    np.testing.assert_allclose(apply_window(x, 0, 2, "LINEAR_EXACT"), [0.0, 0.5, 1.0])
    np.testing.assert_allclose(apply_window(x, 0, 4, "SIGMOID"), 1 / (1 + np.exp(-x)))
