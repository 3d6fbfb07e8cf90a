"""Volumes and label maps from NIfTI files, DICOM series folders and TotalSegmentator-style mask folders.

    vol_DHW, mask_DHW, meta = load_volume("case/ct.nii.gz", "case/segmentations", opts, load_array)

Every volume is brought to one canonical orientation (nibabel's closest canonical, RAS+) and stored as
(D, H, W) = (z, y, x) int16 Hounsfield units: d inferior -> superior, h posterior -> anterior, w the patient's
left -> right. meta["spacing"] = [sd, sh, sw] mm, meta["orientation"] = "RAS", meta["source_orientation"] = the
file's axis codes (e.g. "LPS"). A mask (label map file, or a folder of one binary NIfTI per organ merged in the
order of `opts.organs`, label k+1 = organs[k], the first organ winning where two overlap) must share the volume's
grid (shape and affine, to 0.01 mm), else the row fails naming the mismatch. `opts.spacing` resamples both to a
target spacing: trilinear for the volume, nearest for the mask.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np

from medvlp.data_shards.readers import NIFTI_SUFFIXES, ReadError, ReadOptions, is_dicom_file, is_nifti

GRID_ATOL_MM = 1e-2


def _nib():
    try:
        import nibabel
    except ImportError as e:  # pragma: no cover - a core dependency
        raise ReadError("volume", "reading NIfTI needs nibabel: pip install nibabel") from e
    return nibabel


def canonical(data_xyz: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, str]:
    """(data, affine) -> (data in closest-canonical RAS+ axis order, its affine, the source axis codes)."""
    from nibabel import orientations as no

    ornt = no.io_orientation(affine)
    src = "".join(no.aff2axcodes(affine))
    out = no.apply_orientation(data_xyz, ornt)
    return out, affine @ no.inv_ornt_aff(ornt, data_xyz.shape), src


def organ_name(path: Path) -> str:
    n = path.name
    for sfx in NIFTI_SUFFIXES:
        if n.lower().endswith(sfx):
            return n[: -len(sfx)]
    return n


def organ_files(folder: str | Path) -> dict[str, Path]:
    """Organ name -> file of a segmentations/ folder (or a case folder holding one)."""
    folder = Path(folder)
    if (folder / "segmentations").is_dir():
        folder = folder / "segmentations"
    return {organ_name(p): p for p in sorted(folder.iterdir()) if p.is_file() and is_nifti(p.name)}


def read_nifti(path: str | Path, column: str) -> tuple[np.ndarray, np.ndarray]:
    nib = _nib()
    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj)
    except Exception as e:  # noqa: BLE001 - nibabel raises several types for broken files
        raise ReadError(column, f"{Path(path).name}: not a readable NIfTI file ({type(e).__name__}: {e})") from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ReadError(column, f"{Path(path).name}: expected a 3D image, got shape {data.shape}")
    return data, np.asarray(img.affine, dtype=np.float64)


def _read_any(path: str, column: str, opts: ReadOptions | None = None,
              modality: str = "ct") -> tuple[np.ndarray, np.ndarray, dict]:
    if is_nifti(path):
        data, aff = read_nifti(path, column)
        return data, aff, {}
    if Path(path).is_dir():
        from medvlp.data_shards.readers.dicom import read_series

        return read_series(path, column, opts, modality)
    if is_dicom_file(path):
        raise ReadError(column, f"{Path(path).name}: a single DICOM file is not a volume; give the series folder "
                                "(one file per slice) or a NIfTI file")
    raise ReadError(column, f"{Path(path).name}: not a NIfTI file or a DICOM series folder")


def _labels(data: np.ndarray, what: str) -> np.ndarray:
    if data.size and not np.issubdtype(data.dtype, np.integer):
        if not np.all(np.equal(np.mod(data, 1), 0)):
            raise ReadError("mask", f"{what}: label values must be integers, got {data.dtype} with fractions")
    if data.size and (data.min() < 0 or data.max() > 255):
        raise ReadError("mask", f"{what}: labels {data.min():g}..{data.max():g} are not in 0..255")
    return data.astype(np.uint8)


def merge_organs(folder: str, organs: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """One binary NIfTI per organ -> one uint8 label map on their shared grid (label k+1 = organs[k])."""
    files = organ_files(folder)
    if not files:
        raise ReadError("mask", f"{Path(folder).name}/: no .nii/.nii.gz organ masks")
    order = list(organs) or sorted(files)
    unknown = sorted(set(files) - set(order))
    if unknown:
        raise ReadError("mask", f"{Path(folder).name}/: organ(s) {unknown} are not in the organ list")
    if len(order) > 255:
        raise ReadError("mask", f"{len(order)} organs do not fit uint8 labels")
    label_xyz = aff = None
    present = []
    for k, organ in enumerate(order):
        if organ not in files:
            continue
        m, a = read_nifti(files[organ], "mask")
        if label_xyz is None:
            label_xyz, aff = np.zeros(m.shape, np.uint8), a
        elif m.shape != label_xyz.shape or not np.allclose(a, aff, atol=GRID_ATOL_MM):
            raise ReadError("mask", f"{files[organ].name}: grid {m.shape} differs from the other organ masks "
                                    f"{label_xyz.shape} in {Path(folder).name}/")
        on = (m > 0) & (label_xyz == 0)
        if on.any():
            present.append(organ)
        label_xyz[on] = k + 1
    return label_xyz, aff, present


def _spacing(aff: np.ndarray) -> list[float]:
    return [float(np.linalg.norm(aff[:3, i])) for i in range(3)]


def resample(vol_DHW: np.ndarray, mask_DHW: np.ndarray | None, spacing: list[float],
             target: tuple[float, float, float]):
    """Resample to `target` (D, H, W) mm: trilinear volume, nearest mask. Returns (vol, mask, actual spacing)."""
    import torch
    import torch.nn.functional as F

    shape = vol_DHW.shape
    new = tuple(max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, target))
    if new == tuple(shape):
        return vol_DHW, mask_DHW, spacing
    v = torch.from_numpy(np.ascontiguousarray(vol_DHW, dtype=np.float32))[None, None]
    vol_DHW = F.interpolate(v, size=new, mode="trilinear", align_corners=False)[0, 0].numpy()
    if mask_DHW is not None:
        m = torch.from_numpy(np.ascontiguousarray(mask_DHW, dtype=np.float32))[None, None]
        mask_DHW = F.interpolate(m, size=new, mode="nearest-exact")[0, 0].numpy().astype(np.uint8)
    return vol_DHW, mask_DHW, [s * n / m for s, n, m in zip(spacing, shape, new)]


def _hu_int16(vol: np.ndarray, what: str) -> np.ndarray:
    v = np.rint(np.asarray(vol, dtype=np.float64))
    bad = int(v.size - np.isfinite(v).sum())
    if bad:  # NaN compares false with every bound: it would become 0 HU (water) silently
        raise ReadError("volume", f"{what}: {bad} voxels are NaN or infinite (of {v.size}); fix or mask them "
                                  "before building")
    if v.size and (v.min() < -32768 or v.max() > 32767):
        raise ReadError("volume", f"{what}: values {v.min():g}..{v.max():g} do not fit int16 Hounsfield units")
    return v.astype(np.int16)


def load_volume(vol_path: str, mask_path: str | None, opts: ReadOptions, load_array: Callable[..., np.ndarray],
                modality: str = "ct") -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:
    """Volume (+ mask) files of one row -> (vol_DHW int16, mask_DHW uint8 | None, meta), see the module doc. A DICOM
    series must be of a Modality a `modality` build accepts (CT by default); meta["dicom_modality"] records it."""
    from medvlp.data_shards.readers import is_clinical_volume

    if not is_clinical_volume(vol_path) or (mask_path is not None and not is_clinical_volume(mask_path)):
        col = "volume" if not is_clinical_volume(vol_path) else "mask"
        raise ReadError(col, "a NIfTI/DICOM volume and a .npy/.npz mask (or the reverse) cannot be checked for a "
                             "shared grid (.npy has no orientation); use one family for both")
    data, aff, meta = _read_any(vol_path, "volume", opts, modality)
    dicom_modality = meta.pop("_modality", False)
    burned = str(meta.get("BurnedInAnnotation", "")) == "YES"
    if burned:
        from medvlp.data_shards.readers.dicom import BURNED_IN_HINT

        if not opts.keep_burned_in:
            raise ReadError("volume", f"{Path(vol_path).name}/: {BURNED_IN_HINT}")
    if data.size and np.issubdtype(data.dtype, np.floating) and not np.isfinite(data).all():
        raise ReadError("volume", f"{Path(vol_path).name}: {int(data.size - np.isfinite(data).sum())} voxels are NaN "
                                  f"or infinite (of {data.size}); fix or mask them before building")
    data, aff, src = canonical(data, aff)
    meta = {"dicom": meta} if meta else {}
    if dicom_modality is not False:  # a DICOM series (NIfTI has no modality)
        meta["dicom_modality"] = dicom_modality
    if burned:
        meta["burned_in_annotation"] = True
    mask_xyz = None
    if mask_path is not None:
        if Path(mask_path).is_dir() and not _has_dicom(mask_path):
            raw, maff, present = merge_organs(mask_path, opts.organs)
            meta["organs_present"] = present
        else:
            raw, maff, _ = _read_any(mask_path, "mask", None, "")  # a label map: its modality is not checked
            raw = _labels(raw, Path(mask_path).name)
        mask_xyz, maff, _ = canonical(raw, maff)
        if mask_xyz.shape != data.shape or not np.allclose(maff, aff, atol=GRID_ATOL_MM):
            raise ReadError("mask", f"grid differs from the volume's: shape {mask_xyz.shape} vs {data.shape}, "
                                    f"spacing {_fmt(_spacing(maff))} vs {_fmt(_spacing(aff))} mm, origin "
                                    f"{_fmt(maff[:3, 3])} vs {_fmt(aff[:3, 3])} mm")
    vol_DHW = data.transpose(2, 1, 0)
    mask_DHW = mask_xyz.transpose(2, 1, 0) if mask_xyz is not None else None
    spacing = _spacing(aff)[::-1]
    meta.update(original_shape=list(vol_DHW.shape), original_spacing=spacing)
    if opts.spacing is not None:
        vol_DHW, mask_DHW, spacing = resample(vol_DHW, mask_DHW, spacing, opts.spacing)
    meta.update(spacing=[round(float(s), 6) for s in spacing], orientation="RAS", source_orientation=src)
    vol = _hu_int16(vol_DHW, Path(vol_path).name)
    return np.ascontiguousarray(vol), (np.ascontiguousarray(mask_DHW) if mask_DHW is not None else None), meta


def _has_dicom(folder: str) -> bool:
    return any(is_dicom_file(str(p)) for p in Path(folder).iterdir() if p.is_file())


def _fmt(v) -> str:
    return "(" + ", ".join(f"{float(x):.3g}" for x in v) + ")"


def organ_names_of(mask_paths: list[str]) -> list[str]:
    """Sorted union of organ names over mask folders (file names only: nothing is decoded)."""
    names: set[str] = set()
    for p in mask_paths:
        if Path(p).is_dir() and not _has_dicom(p):
            names.update(organ_files(p))
    return sorted(names)
