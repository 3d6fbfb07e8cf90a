"""Tiny fabricated clinical files (DICOM radiographs, CT series, NIfTI volumes and masks) with known values.

Used by the tests and the walkthrough in docs/clinical.md; the headers carry made-up identifiers (names, birth
dates, UIDs) on purpose, so a build can be checked to leave them out of the shards.

    write_radiograph("a.dcm", pixels_HW, photometric="MONOCHROME1", slope=2.0, intercept=-100.0)
    write_ct_series("series/", vol_KRC, spacing=(2.5, 0.7, 0.7))    # one file per slice, shuffled names
    write_nifti("ct.nii.gz", data_xyz, affine)
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

PHI = {"PatientName": "Doe^Jane^Q", "PatientID": "MRN-8675309", "PatientBirthDate": "19470312",
       "AccessionNumber": "ACC-55501234", "InstitutionName": "Saint Example Hospital",
       "ReferringPhysicianName": "House^Gregory", "StudyDate": "20240229"}


def _dataset(path: Path, uid_root: str, extra: dict[str, Any], syntax=None):
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = extra.get("SOPInstanceUID", uid_root + ".9")
    meta.TransferSyntaxUID = syntax or ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = uid_root + ".1", uid_root + ".2"
    for k, v in {**PHI, **extra}.items():
        setattr(ds, k, v)
    return ds


def _pixels(ds, pixels: np.ndarray, bits: int, signed: bool) -> None:
    ds.SamplesPerPixel = 1
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = 16 if bits > 8 else 8
    ds.BitsStored, ds.HighBit = bits, bits - 1
    ds.PixelRepresentation = int(signed)
    dtype = (np.int16 if signed else np.uint16) if bits > 8 else np.uint8
    ds.PixelData = np.ascontiguousarray(pixels.astype(dtype)).tobytes()


def write_radiograph(path, pixels_HW: np.ndarray, *, photometric: str = "MONOCHROME2", bits: int = 12,
                     slope: float | None = None, intercept: float | None = None, window: tuple | None = None,
                     spacing=(0.2, 0.2), view: str = "PA", uid_root: str = "1.2.826.0.1.3680043.10.543.7",
                     syntax=None, pixel_data: bool = True, **extra: Any) -> Path:
    """A CR/DX radiograph file with the given stored values (and made-up PHI in the header)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds = _dataset(path, uid_root, {"Modality": "DX", "ViewPosition": view, **extra}, syntax)
    ds.PhotometricInterpretation = photometric
    ds.ImagerPixelSpacing = [float(s) for s in spacing]
    if slope is not None or intercept is not None:
        ds.RescaleSlope, ds.RescaleIntercept = slope if slope is not None else 1.0, intercept or 0.0
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if pixel_data:
        _pixels(ds, pixels_HW, bits, signed=False)
    else:
        ds.SamplesPerPixel, (ds.Rows, ds.Columns), ds.BitsAllocated, ds.BitsStored = 1, pixels_HW.shape, 16, bits
    if syntax is not None and pixel_data:  # fake compressed data: an encapsulated fragment no decoder can read
        from pydicom.encaps import encapsulate

        ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + b"\0" * 64])
        ds["PixelData"].VR = "OB"
    ds.save_as(str(path), enforce_file_format=True)
    return path


def write_ct_series(folder, hu_KRC: np.ndarray, *, spacing=(2.5, 0.7, 0.7), origin=(-100.0, -120.0, 40.0),
                    slope: float = 1.0, intercept: float = -1024.0, uid_root: str = "1.2.826.0.1.3680043.10.543.8",
                    orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0), name=lambda k: f"{(k * 7919) % 1000:04d}.dcm",
                    **extra: Any) -> Path:
    """An axial CT series: slice k at origin + k * spacing[0] along the normal; stored = (HU - intercept) / slope.

    File names are scrambled (default) so a reader must sort by position, not by name."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    row, col = np.array(orientation[:3], float), np.array(orientation[3:], float)
    normal = np.cross(row, col)
    for k in range(hu_KRC.shape[0]):
        ds = _dataset(folder / name(k), uid_root, {"Modality": "CT", "SOPInstanceUID": f"{uid_root}.3.{k + 1}",
                                                   **extra})
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.ImageOrientationPatient = [float(v) for v in orientation]
        ds.ImagePositionPatient = [float(v) for v in np.array(origin) + k * spacing[0] * normal]
        ds.PixelSpacing = [float(spacing[1]), float(spacing[2])]
        ds.SliceThickness = float(spacing[0])
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = slope, intercept, "HU"
        stored = np.rint((hu_KRC[k].astype(np.float64) - intercept) / slope)
        _pixels(ds, stored, 12, signed=False)
        ds.save_as(str(folder / name(k)), enforce_file_format=True)
    return folder


def write_nifti(path, data_xyz: np.ndarray, affine: np.ndarray | None = None) -> Path:
    import nibabel as nib

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data_xyz, np.eye(4) if affine is None else affine), str(path))
    return path
