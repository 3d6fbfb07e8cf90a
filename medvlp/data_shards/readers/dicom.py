"""DICOM (pydicom): radiographs -> 8/16-bit images, CT series folders -> Hounsfield volumes with their geometry.

Radiograph pixel pipeline (PS3.3 C.11), `load_dicom_image`:
  1. stored values -> modality LUT (RescaleSlope * v + RescaleIntercept, or a Modality LUT Sequence)
  2. VOI: the file's VOI LUT Sequence, else its WindowCenter/WindowWidth (first pair; LINEAR, LINEAR_EXACT or
     SIGMOID per VOILUTFunction), else the `window` option; the result spans the full 16 bits (0..65535).
     `voi="none"` ignores the file's VOI. With no window at all the rescaled values are kept as they are (uint16,
     or uint8 when BitsStored <= 8) and must fit that range.
  3. MONOCHROME1 (white = low values) is inverted, so every stored image is MONOCHROME2 (white = dense).
  4. the longer side is resized to at most `image_size`; meta["spacing"] is the stored image's (row, col) mm.

PHI: only the header keywords in `META_ALLOW` are copied (into meta["dicom"]), and only when the value passes the
keyword's check (a finite number, or one of a closed vocabulary of codes; keywords that failed are named in
meta["dicom"]["dropped"]); names, dates, UIDs, accession numbers, institutions and free text (ConvolutionKernel,
descriptions, comments) are never read into a sample. `BurnedInAnnotation = YES` (text burned into the pixels)
is refused unless `ReadOptions.keep_burned_in`, and then the sample's meta says `burned_in_annotation: true`.
Damaged pixel semantics are refused: RescaleSlope 0 or non-finite, NaN/inf pixel values. pydicom's own warnings (which may quote
header values) are silenced while reading.
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from medvlp.data_shards.readers import ReadError, ReadOptions, accepted_modalities, is_dicom_file

# Header values a sample may carry: acquisition geometry and pixel semantics, nothing that identifies anyone. Each
# keyword has a check on its value: numbers must be finite numbers, coded strings one of a closed vocabulary, so a
# free-text value ("CHEST JANE DOE" in BodyPartExamined) never reaches a sample. Free-text keywords
# (ConvolutionKernel, StudyDescription, ...) are not on the list at all.
_BODY_PARTS = frozenset(
    "ABDOMEN ABDOMENPELVIS ANKLE ARM BREAST CALF CHEST CHESTABDOMEN CHESTABDPELVIS CLAVICLE CSPINE ELBOW EXTREMITY "
    "FACE FINGER FOOT FOREARM HAND HEAD HEADNECK HEART HIP HUMERUS JAW KNEE LEG LSPINE NECK PELVIS RIB SCAPULA "
    "SHOULDER SKULL SPINE SSPINE THORAX THUMB TOE TSPINE WHOLEBODY WRIST".split())
_VIEW_TOKENS = frozenset("AP PA LL RL RLD LLD RLO LLO LAO RAO LPO RPO LATERAL LAT AXIAL XTABLE OBLIQUE LEFT RIGHT "
                         "DECUBITUS ERECT SUPINE PRONE".split())


def _finite(v: Any) -> bool:
    vals = list(v) if isinstance(v, (list, tuple)) or type(v).__name__ == "MultiValue" else [v]
    try:
        return bool(vals) and all(np.isfinite(float(x)) for x in vals)
    except (TypeError, ValueError):
        return False


def _one_of(words: frozenset | set) -> Any:
    return lambda v: isinstance(v, str) and v.strip().upper() in words


def _tokens_of(words: frozenset | set, sep: str = " ") -> Any:
    return lambda v: isinstance(v, str) and bool(v.strip()) and all(t in words for t in v.strip().upper().split(sep))


def _orientation(v: Any) -> bool:  # PatientOrientation: e.g. ["L", "F"], each value letters of A P R L H F
    vals = list(v) if isinstance(v, (list, tuple)) or type(v).__name__ == "MultiValue" else [v]
    return bool(vals) and all(isinstance(x, str) and 0 < len(x) <= 3 and set(x) <= set("APRLHF") for x in vals)


META_ALLOW: dict[str, Any] = {
    "Modality": _one_of({"CR", "DX", "CT", "MR", "PT", "NM", "US", "MG", "XA", "RF", "OT", "SC", "IO", "PX", "OP"}),
    "PhotometricInterpretation": _one_of({"MONOCHROME1", "MONOCHROME2", "RGB", "PALETTE COLOR", "YBR_FULL",
                                          "YBR_FULL_422", "YBR_RCT", "YBR_ICT"}),
    "ViewPosition": _tokens_of(_VIEW_TOKENS),
    "Laterality": _one_of({"R", "L", "U", "B"}),
    "ImageLaterality": _one_of({"R", "L", "U", "B"}),
    "BodyPartExamined": _one_of(_BODY_PARTS),
    "PatientOrientation": _orientation,
    "PixelSpacing": _finite, "ImagerPixelSpacing": _finite, "SliceThickness": _finite,
    "SpacingBetweenSlices": _finite, "ImageOrientationPatient": _finite, "Rows": _finite, "Columns": _finite,
    "BitsAllocated": _finite, "BitsStored": _finite, "PixelRepresentation": _finite, "SamplesPerPixel": _finite,
    "RescaleSlope": _finite, "RescaleIntercept": _finite,
    "RescaleType": _one_of({"US", "HU", "OD", "MGML", "Z_EFF", "ED", "EDW", "HU_MOD", "PCT"}),
    "WindowCenter": _finite, "WindowWidth": _finite,
    "VOILUTFunction": _one_of({"LINEAR", "LINEAR_EXACT", "SIGMOID"}),
    "PresentationIntentType": _one_of({"FOR PRESENTATION", "FOR PROCESSING"}),
    "KVP": _finite,
    "BurnedInAnnotation": _one_of({"YES", "NO"}),
}
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
    """The allow-listed header values of a dataset whose value passes its check, JSON-ready (keyword -> value).
    Keywords whose value failed the check are listed by name (never by value) under "dropped"."""
    out: dict[str, Any] = {}
    dropped = []
    for kw, ok in META_ALLOW.items():
        try:
            v = ds.get(kw)
        except Exception:  # noqa: BLE001 - a value pydicom cannot convert (e.g. text in a DS element)
            dropped.append(kw)
            continue
        if v is None or v == "":
            continue
        if ok(v):
            out[kw] = _jsonable(v.strip().upper() if isinstance(v, str) else v)
        else:
            dropped.append(kw)
    if dropped:
        out["dropped"] = dropped
    return out


def burned_in(ds) -> bool:
    """The header says the pixels carry burned-in annotation (text that may name the patient)."""
    try:
        return str(ds.get("BurnedInAnnotation", "") or "").strip().upper() == "YES"
    except Exception:  # noqa: BLE001 - an unreadable value: not a claim of burned-in text
        return False


BURNED_IN_HINT = ("BurnedInAnnotation is YES: the pixels carry burned-in text that may name the patient; refused "
                  "(keep it with --keep-burned-in, importers: keep_burned_in=true; meta then says so)")


def check_rescale(ds, column: str, name: str) -> None:
    """RescaleSlope must be a finite non-zero number and RescaleIntercept finite: slope 0 maps every pixel to
    one value (a blank image that would build silently)."""
    for kw in ("RescaleSlope", "RescaleIntercept"):
        try:
            v = ds.get(kw)
        except Exception:  # noqa: BLE001
            raise ReadError(column, f"{name}: {kw} is not a number") from None
        if v is None or v == "":
            continue
        if not _finite(v):
            raise ReadError(column, f"{name}: {kw} {str(v)[:20]!r} is not a finite number")
        if kw == "RescaleSlope" and float(_first(v)) == 0.0:
            raise ReadError(column, f"{name}: RescaleSlope is 0: every pixel would become RescaleIntercept (a blank "
                                    "image); the header is damaged")


_MODALITY_NAMES = {"CR": "computed radiography", "DX": "digital radiography", "CT": "computed tomography",
                   "MR": "magnetic resonance", "NM": "nuclear medicine", "PT": "PET", "US": "ultrasound",
                   "MG": "mammography", "XA": "angiography", "RF": "fluoroscopy", "OT": "other", "SC": "secondary capture",
                   "SM": "slide microscopy", "IO": "intra-oral radiography", "PX": "panoramic X-ray"}


def header_modality(ds, column: str, name: str) -> str | None:
    """The header's Modality code (upper case), None when the header has none. A value that is not a code (free
    text) is refused without quoting it (it could name someone)."""
    try:
        v = ds.get("Modality")
    except Exception:  # noqa: BLE001 - a value pydicom cannot convert
        v = "?"
    if v is None or str(v).strip() == "":
        return None
    code = str(v).strip().upper()
    if not code.replace("_", "").isalnum() or len(code) > 16 or not code[0].isalpha():
        raise ReadError(column, f"{name}: its Modality element holds no DICOM Modality code (damaged header)")
    return code


def check_modality(code: str | None, opts: ReadOptions, modality: str, column: str, name: str) -> None:
    """A header Modality outside what a build of `modality` accepts is refused with what to do about it. A header
    without Modality is not checked (the sample's meta then says dicom_modality null)."""
    accepted = accepted_modalities(opts, modality)
    if code is None or not accepted or code in accepted:
        return
    what = f"{code} ({_MODALITY_NAMES[code]})" if code in _MODALITY_NAMES else code
    if column == "image" and code in ("CT", "MR", "PT", "NM"):
        todo = (f"{'an' if code in ('MR', 'NM') else 'a'} {code} slice is not a radiograph: give its series folder in the volume column of a ct build, or "
                "leave the file out")
    elif column != "image":
        todo = f"only {'/'.join(accepted)} series make {modality} volumes; leave this series out of the build"
    else:
        todo = "leave the file out"
    raise ReadError(column, f"{name}: the DICOM header says Modality {what}, but this {modality} build takes "
                            f"{'/'.join(accepted)}; {todo} (if it does belong, accept it with --dicom-modality "
                            f"{','.join((*accepted, code))}; importers: dicom_modality=...)")


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


def window_for_range(lo: float, hi: float) -> tuple[float, float]:
    """The LINEAR window (centre, width) that maps lo to 0 and hi to the top of the output (C.11.2.1.2)."""
    w = max(hi - lo + 1.0, 1.0)
    return lo + 0.5 + (w - 1.0) / 2.0, w


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
    if burned_in(ds) and not opts.keep_burned_in:
        raise ReadError(column, f"{name}: {BURNED_IN_HINT}")
    check_rescale(ds, column, name)
    x = modality_values(ds, arr)
    if x.size and not np.isfinite(x).all():
        raise ReadError(column, f"{name}: {int((~np.isfinite(x)).sum())} pixels are NaN or infinite")
    meta: dict[str, Any] = {"burned_in_annotation": True} if burned_in(ds) else {}
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
            lo, hi = float(x.min()), float(x.max())
            why = (f"include negative values (down to {lo:g}), which unsigned {8 if small else 16}-bit pixels "
                   f"cannot hold" if lo < 0 else f"exceed {top}, the largest unsigned {8 if small else 16}-bit pixel "
                   f"(up to {hi:g})")
            c, w = window_for_range(lo, hi)
            raise ReadError(column, f"{name}: rescaled values {lo:g}..{hi:g} {why}, and the file has no window "
                                    f"(VOI) to map them onto the stored pixels; give one with --dicom-window "
                                    f"CENTRE,WIDTH (importers: window=CENTRE,WIDTH), e.g. --dicom-window {c:g},{w:g} "
                                    "spans this file's whole range")
        img = x.astype(np.uint8 if small else np.uint16)
    return img, meta


def load_dicom_image(path: str, image_size: int, opts: ReadOptions, resize_u16,
                     modality: str = "cxr") -> tuple[np.ndarray, dict]:
    """A DICOM radiograph file -> (stored image, meta) with the longer side <= image_size. Its header's Modality
    must be one a `modality` build accepts (`readers.accepted_modalities`); it is kept as meta["dicom_modality"]."""
    name = Path(path).name
    ds = read_dataset(path, "image")
    code = header_modality(ds, "image", name)
    check_modality(code, opts, modality, "image", name)
    img, meta = dicom_image(ds, opts, "image", name)
    meta["dicom_modality"] = code
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
def read_series(folder: str | Path, column: str = "volume", opts: ReadOptions | None = None,
                modality: str = "ct") -> tuple[np.ndarray, np.ndarray, dict]:
    """A folder holding one series (one file per slice) -> (data_xyz float64, RAS affine, allowed meta).

    Slices are sorted by their position along the slice normal (ImagePositionPatient . (row x col)); one
    series per folder, one Modality (one a `modality` build accepts, kept as meta "dicom_modality"), one
    orientation, no duplicate positions, even spacing (a gap means missing slices)."""
    folder = Path(folder)
    name = folder.name
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and is_dicom_file(str(p)))
    if not files:
        raise ReadError(column, f"{name}/: no DICOM files in the series folder")
    dss = [read_dataset(p, column) for p in files]
    if len({str(d.get("SeriesInstanceUID", "")) for d in dss}) > 1:  # the UIDs themselves are never printed
        raise ReadError(column, f"{name}/: holds slices of {len({str(d.get('SeriesInstanceUID', '')) for d in dss})} "
                                "series; put one series per folder")
    codes = [header_modality(d, column, f"{name}/{p.name}") for d, p in zip(dss, files)]
    for c, p in zip(codes, files):
        if c != codes[0]:
            raise ReadError(column, f"{name}/{p.name}: Modality {c or 'missing'} differs from {files[0].name}'s "
                                    f"{codes[0] or 'missing'}; one series (one modality) per folder")
    check_modality(codes[0], opts or ReadOptions(), modality, column, f"{name}/")
    for d, p in zip(dss, files):
        for kw, n in (("ImagePositionPatient", 3), ("ImageOrientationPatient", 6), ("PixelSpacing", 2)):
            v = d.get(kw)
            if v is None:
                raise ReadError(column, f"{name}/{p.name}: no {kw}: cannot place the slice in a volume")
            vals = list(v) if isinstance(v, (list, tuple)) or type(v).__name__ == "MultiValue" else [v]
            if not _finite(vals) or len(vals) != n or (kw == "PixelSpacing" and min(float(x) for x in vals) <= 0):
                raise ReadError(column, f"{name}/{p.name}: {kw} is not {n} finite numbers"
                                        f"{' > 0' if kw == 'PixelSpacing' else ''}: cannot place the slice in a volume")
    if len(dss) < 2:  # the slice spacing comes from the positions of neighbouring slices: one slice has none
        raise ReadError(column, f"{name}/: a series of one slice ({files[0].name}) is not a volume: the spacing "
                                "between slices comes from their positions; put all of the series' slice files in "
                                "the folder, or leave it out")
    iop = np.array([float(v) for v in dss[0].ImageOrientationPatient])
    for d, p in zip(dss, files):
        if not np.allclose([float(v) for v in d.ImageOrientationPatient], iop, atol=1e-4):
            raise ReadError(column, f"{name}/{p.name}: orientation differs from the other slices")
    row_cos, col_cos = iop[:3], iop[3:]
    normal = np.cross(row_cos, col_cos)
    if not (abs(np.linalg.norm(row_cos) - 1) < 0.01 and abs(np.linalg.norm(col_cos) - 1) < 0.01
            and abs(np.linalg.norm(normal) - 1) < 0.01):
        raise ReadError(column, f"{name}/{files[0].name}: ImageOrientationPatient is not two perpendicular unit "
                                "vectors: cannot place the slices in a volume")
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
        check_rescale(d, column, f"{name}/{p.name}")
        slices.append(modality_values(d, a))
    vol_krc = np.stack(slices)
    step = (pos[-1] - pos[0]) / (len(pos) - 1)
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3] = row_cos * ps[1], col_cos * ps[0], step, pos[0]
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    meta = allowed_meta(dss[0])
    meta.pop("ImagePositionPatient", None)
    meta["_modality"] = codes[0]  # popped by load_volume into the sample's meta["dicom_modality"]
    if any(burned_in(d) for d in dss):
        meta["BurnedInAnnotation"] = "YES"
    return vol_krc.transpose(2, 1, 0), ras, meta


__all__ = ["META_ALLOW", "apply_window", "allowed_meta", "burned_in", "check_rescale", "dicom_image", "load_dicom_image", "read_series",
           "read_dataset", "stored_pixels"]
