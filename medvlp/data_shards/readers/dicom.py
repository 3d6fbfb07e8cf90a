"""DICOM (pydicom): radiographs -> 8/16-bit images, CT series folders -> Hounsfield volumes with their geometry.

Radiograph pixel pipeline (PS3.3 C.11), `load_dicom_image`:
  1. stored values -> modality LUT (RescaleSlope * v + RescaleIntercept, or a Modality LUT Sequence)
  2. VOI: the file's VOI LUT Sequence, else its WindowCenter/WindowWidth (first pair; LINEAR, LINEAR_EXACT or
     SIGMOID per VOILUTFunction), else the `window` option; the result spans the full 16 bits (0..65535).
     `voi="none"` ignores the file's VOI. With no window at all the rescaled values are kept as they are (uint16,
     or uint8 when BitsStored <= 8) and must fit that range.
  3. MONOCHROME1 (white = low values) is inverted, so every stored image is MONOCHROME2 (white = dense).
  4. the longer side is resized to at most `image_size`; meta["spacing"] is the stored image's (row, col) mm.

PHI: only the header keywords in `META_ALLOW` are copied (into meta["dicom"]); names, dates, UIDs, accession
numbers, institutions and free-text comments are never read into a sample. pydicom's own warnings (which may quote
header values) are silenced while reading.
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from medvlp.data_shards.readers import ReadError, ReadOptions, is_dicom_file

# Header values a sample may carry: acquisition geometry and pixel semantics, nothing that identifies anyone.
META_ALLOW = ("Modality", "PhotometricInterpretation", "ViewPosition", "Laterality", "ImageLaterality",
              "BodyPartExamined", "PatientOrientation", "PixelSpacing", "ImagerPixelSpacing", "SliceThickness",
              "SpacingBetweenSlices", "ImageOrientationPatient", "Rows", "Columns", "BitsAllocated", "BitsStored",
              "PixelRepresentation", "SamplesPerPixel", "RescaleSlope", "RescaleIntercept", "RescaleType",
              "WindowCenter", "WindowWidth", "VOILUTFunction", "PresentationIntentType", "KVP", "ConvolutionKernel")
DECODER_HINT = "compressed transfer syntaxes need the optional decoders: pip install 'medvlp[dicom]'"


def _pydicom():
    try:
        import pydicom
    except ImportError as e:  # pragma: no cover - a core dependency
        raise ReadError("image", "reading DICOM needs pydicom: pip install pydicom") from e
    from pydicom import config

    config.settings.reading_validation_mode = config.IGNORE  # warnings would quote (possibly PHI) header values
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    return pydicom


def read_dataset(path: str | Path, column: str):
    """The parsed file (pixel data not decoded yet). Raises ReadError for a non-DICOM file."""
    pydicom = _pydicom()
    from pydicom.errors import InvalidDicomError

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return pydicom.dcmread(str(path))
        except InvalidDicomError:
            raise ReadError(column, f"{Path(path).name}: not a DICOM Part 10 file (no 'DICM' marker)") from None


def _syntax(ds) -> str:
    uid = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if uid is None:
        return "unknown transfer syntax"
    name = uid.name if uid.name != str(uid) else "unrecognised"
    return f"transfer syntax {name} ({uid})"


def stored_pixels(ds, column: str, name: str) -> np.ndarray:
    """Decoded stored values, or a ReadError naming the transfer syntax (missing decoder) / missing pixel data."""
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise ReadError(column, f"{name}: no pixel data (the file has no PixelData element)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return ds.pixel_array
        except Exception as e:  # noqa: BLE001 - pydicom raises several types for undecodable data
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise ReadError(column, f"{name}: {_syntax(ds)} cannot be decoded ({reason}); {DECODER_HINT}") from None


def _jsonable(v: Any) -> Any:
    if isinstance(v, (list, tuple)) or type(v).__name__ == "MultiValue":
        return [_jsonable(x) for x in v]
    if isinstance(v, bool):
        return v
    if isinstance(v, int):
        return int(v)
    if isinstance(v, float):
        return float(v)
    return str(v)[:64]


def allowed_meta(ds) -> dict[str, Any]:
    """The allow-listed header values of a dataset, JSON-ready (keyword -> value)."""
    out = {}
    for kw in META_ALLOW:
        v = ds.get(kw)
        if v is not None and v != "":
            out[kw] = _jsonable(v)
    return out


def _first(v: Any) -> float:
    return float(v[0]) if isinstance(v, (list, tuple)) or type(v).__name__ == "MultiValue" else float(v)


def apply_window(x: np.ndarray, centre: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """PS3.3 C.11.2.1.2 VOI window -> values in [0, 1] (float64)."""
    c, w = float(centre), float(width)
    function = (function or "LINEAR").upper()
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (x - c) / w))
    if function == "LINEAR_EXACT":
        return np.clip((x - c) / w + 0.5, 0.0, 1.0)
    if w <= 1:  # LINEAR needs width >= 1; width 1 is a threshold at c - 0.5
        return (x > c - 0.5).astype(np.float64)
    return np.clip((x - (c - 0.5)) / (w - 1) + 0.5, 0.0, 1.0)


def modality_values(ds, arr: np.ndarray) -> np.ndarray:
    from pydicom.pixels import apply_modality_lut

    return np.asarray(apply_modality_lut(arr, ds), dtype=np.float64)


def _stored_range(ds) -> tuple[float, float]:
    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 16)))
    if int(ds.get("PixelRepresentation", 0)) == 1:
        return -(2.0 ** (bits - 1)), 2.0 ** (bits - 1) - 1
    return 0.0, 2.0**bits - 1


def dicom_image(ds, opts: ReadOptions, column: str = "image", name: str = "") -> tuple[np.ndarray, dict]:
    """One radiograph dataset -> (H, W) uint16 (uint8 for <= 8-bit data without a window) + pixel meta."""
    arr = stored_pixels(ds, column, name)
    pi = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if pi not in ("MONOCHROME1", "MONOCHROME2"):
        raise ReadError(column, f"{name}: photometric interpretation {pi} is not supported (grey radiographs only)")
    if arr.ndim != 2:
        raise ReadError(column, f"{name}: expected one 2D frame, got pixel array shape {arr.shape} "
                                "(multi-frame files are not read as radiographs)")
    x = modality_values(ds, arr)
    meta: dict[str, Any] = {}
    lut = ds.get("VOILUTSequence") if opts.voi == "auto" else None
    if lut:
        from pydicom.pixels import apply_voi

        xi = x.astype(np.int64) if np.array_equal(x, np.rint(x)) else x  # LUTs index integer values
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            y = np.asarray(apply_voi(xi, ds, 0), dtype=np.float64)
        bits = int(lut[0].LUTDescriptor[2]) or 16
        y01 = np.clip(y / (2.0**bits - 1), 0.0, 1.0)
        meta["window_source"] = "voi_lut"
    elif opts.voi == "auto" and ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
        c, w = _first(ds.WindowCenter), _first(ds.WindowWidth)
        y01 = apply_window(x, c, w, str(ds.get("VOILUTFunction", "LINEAR")))
        meta.update(window=[c, w], window_source="file")
    elif opts.window is not None:
        y01 = apply_window(x, *opts.window)
        meta.update(window=[float(opts.window[0]), float(opts.window[1])], window_source="option")
    else:
        y01 = None
        meta["window_source"] = "none"
    if y01 is not None:
        out = np.rint(y01 * 65535.0)
        if pi == "MONOCHROME1":
            out = 65535.0 - out
        img = out.astype(np.uint16)
    else:
        if pi == "MONOCHROME1":  # invert within the range the stored bits can map to
            lo, hi = sorted(modality_values(ds, np.array(_stored_range(ds))).tolist())
            x = lo + hi - x
        x = np.rint(x)
        small = int(ds.get("BitsStored", 16)) <= 8
        top = 255 if small else 65535
        if x.size and (x.min() < 0 or x.max() > top):
            raise ReadError(column, f"{name}: rescaled values {x.min():g}..{x.max():g} do not fit {8 if small else 16} "
                                    "bits and the file has no window; give one (--dicom-window CENTRE,WIDTH)")
        img = x.astype(np.uint8 if small else np.uint16)
    return img, meta


def load_dicom_image(path: str, image_size: int, opts: ReadOptions, resize_u16) -> tuple[np.ndarray, dict]:
    """A DICOM radiograph file -> (stored image, meta) with the longer side <= image_size."""
    name = Path(path).name
    ds = read_dataset(path, "image")
    img, meta = dicom_image(ds, opts, "image", name)
    h, w = img.shape
    img = _resize(img, image_size, resize_u16)
    spacing = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
    if spacing is not None and len(spacing) == 2:
        meta["spacing"] = [round(float(spacing[0]) * h / img.shape[0], 6), round(float(spacing[1]) * w / img.shape[1], 6)]
    meta["original_size"] = [h, w]
    meta["dicom"] = allowed_meta(ds)
    return img, meta


def _resize(img: np.ndarray, image_size: int, resize_u16) -> np.ndarray:
    if img.dtype == np.uint16:
        return resize_u16(img, image_size)
    from PIL import Image

    h, w = img.shape
    if max(h, w) <= image_size:
        return img
    s = image_size / max(h, w)
    return np.asarray(Image.fromarray(img).resize((max(1, round(w * s)), max(1, round(h * s))), Image.LANCZOS))


# ------------------------------------------------------------------------------------------------ series
def read_series(folder: str | Path, column: str = "volume") -> tuple[np.ndarray, np.ndarray, dict]:
    """A folder holding one CT/MR series (one file per slice) -> (data_xyz float64, RAS affine, allowed meta).

    Slices are sorted by their position along the slice normal (ImagePositionPatient . (row x col)); one
    series per folder, one orientation, no duplicate positions, even spacing (a gap means missing slices)."""
    folder = Path(folder)
    name = folder.name
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and is_dicom_file(str(p)))
    if not files:
        raise ReadError(column, f"{name}/: no DICOM files in the series folder")
    dss = [read_dataset(p, column) for p in files]
    if len({str(d.get("SeriesInstanceUID", "")) for d in dss}) > 1:  # the UIDs themselves are never printed
        raise ReadError(column, f"{name}/: holds slices of {len({str(d.get('SeriesInstanceUID', '')) for d in dss})} "
                                "series; put one series per folder")
    for d, p in zip(dss, files):
        for kw in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
            if d.get(kw) is None:
                raise ReadError(column, f"{name}/{p.name}: no {kw}: cannot place the slice in a volume")
    iop = np.array([float(v) for v in dss[0].ImageOrientationPatient])
    for d, p in zip(dss, files):
        if not np.allclose([float(v) for v in d.ImageOrientationPatient], iop, atol=1e-4):
            raise ReadError(column, f"{name}/{p.name}: orientation differs from the other slices")
    row_cos, col_cos = iop[:3], iop[3:]
    normal = np.cross(row_cos, col_cos)
    pos = [np.array([float(v) for v in d.ImagePositionPatient]) for d in dss]
    order = np.argsort([float(p @ normal) for p in pos], kind="stable")
    dss, files, pos = [dss[i] for i in order], [files[i] for i in order], [pos[i] for i in order]
    along = np.array([float(p @ normal) for p in pos])
    steps = np.diff(along)
    if steps.size and steps.min() < 1e-3:
        k = int(np.argmin(steps))
        raise ReadError(column, f"{name}/: slices {files[k].name} and {files[k + 1].name} share one position")
    if steps.size and steps.max() - steps.min() > 0.01 * steps.mean() + 1e-3:
        raise ReadError(column, f"{name}/: uneven slice spacing {steps.min():.3g}..{steps.max():.3g} mm "
                                "(missing slices?)")
    ps = [float(v) for v in dss[0].PixelSpacing]
    slices = []
    for d, p in zip(dss, files):
        if [float(v) for v in d.PixelSpacing] != ps:
            raise ReadError(column, f"{name}/{p.name}: pixel spacing differs from the other slices")
        a = stored_pixels(d, column, f"{name}/{p.name}")
        if a.ndim != 2:
            raise ReadError(column, f"{name}/{p.name}: expected one 2D frame per file, got shape {a.shape}")
        if slices and a.shape != slices[0].shape:
            raise ReadError(column, f"{name}/{p.name}: {a.shape} pixels, other slices {slices[0].shape}")
        slices.append(modality_values(d, a))
    vol_krc = np.stack(slices)
    if len(pos) > 1:
        step = (pos[-1] - pos[0]) / (len(pos) - 1)
    else:
        step = normal * float(dss[0].get("SliceThickness", 1.0) or 1.0)
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3] = row_cos * ps[1], col_cos * ps[0], step, pos[0]
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    meta = allowed_meta(dss[0])
    meta.pop("ImagePositionPatient", None)
    return vol_krc.transpose(2, 1, 0), ras, meta


def is_multiframe(path: str) -> bool:
    ds = read_dataset(path, "volume")
    return int(ds.get("NumberOfFrames", 1) or 1) > 1


__all__ = ["META_ALLOW", "apply_window", "allowed_meta", "dicom_image", "load_dicom_image", "read_series",
           "read_dataset", "stored_pixels"]
