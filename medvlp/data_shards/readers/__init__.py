"""Readers of clinical file formats for the shard builder: DICOM (pydicom) and NIfTI (nibabel).

    opts = ReadOptions(window=(40.0, 400.0), spacing=(2.0, 1.0, 1.0))
    img_HW, meta = load_image_file("cxr.dcm", 512, opts, resize_u16)     # radiograph, 16-bit kept
    vol_DHW, mask_DHW, meta = load_volume_files("series/", "seg.nii.gz", opts, load_array)

Every reader returns pixel data plus a `meta` dict built from an allow-list (`dicom.META_ALLOW`): modality,
spacing, orientation, photometric interpretation, view position, ... Patient, study and device identifiers
are never read into a sample. Failures raise `ReadError` naming the manifest column ("image", "volume", "mask").

Volumes (DICOM series, NIfTI) are reoriented to one canonical orientation: nibabel's closest-canonical RAS+, stored
as (D, H, W) = (z, y, x), i.e. d runs inferior -> superior, h posterior -> anterior, w patient's left -> right
(`meta["orientation"] = "RAS"`, `meta["spacing"] = [sd, sh, sw]` in mm).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path


class ReadError(ValueError):
    """A file of one manifest column could not be read; `column` names it."""

    def __init__(self, column: str, message: str):
        self.column = column
        super().__init__(message)

    def __reduce__(self):
        return (ReadError, (self.column, str(self)))


@dataclass(frozen=True)
class ReadOptions:
    """How clinical files are turned into sample arrays (chosen at build time)."""

    window: tuple[float, float] | None = None  # DICOM radiographs without VOI: (centre, width) to apply; None = keep values
    voi: str = "auto"  # auto: the file's VOI LUT / window when present | none: ignore it (window knob or raw values)
    spacing: tuple[float, float, float] | None = None  # volumes resampled to this (D, H, W) spacing in mm; None = keep
    organs: tuple[str, ...] = ()  # mask folders (segmentations/*.nii.gz): label k+1 = organs[k]; () = sorted file names
    hash_ids: bool = False  # the sample's source path is left out of its meta (keys and patient ids hashed upstream)
    keep_burned_in: bool = False  # DICOM with BurnedInAnnotation = YES: kept (meta burned_in_annotation) or refused
    dicom_modalities: tuple[str, ...] = ()  # DICOM Modality codes a build accepts; () = the build's default (DICOM_MODALITIES)

    def __post_init__(self) -> None:
        if self.voi not in ("auto", "none"):
            raise ValueError(f"voi: {self.voi!r} is not 'auto' or 'none'")
        if self.window is not None and (len(self.window) != 2 or self.window[1] < 1):
            raise ValueError(f"window: need (centre, width >= 1), got {self.window}")
        if self.spacing is not None and (len(self.spacing) != 3 or min(self.spacing) <= 0):
            raise ValueError(f"spacing: need 3 positive mm values (D, H, W), got {self.spacing}")
        bad = [m for m in self.dicom_modalities if not _MODALITY_CODE.match(str(m))]
        if bad:
            raise ValueError(f"dicom modality: {bad} are not DICOM Modality codes (upper-case letters, e.g. CR,DX)")


# DICOM Modality codes (PS3.3 C.7.3.1.1.1) a build of each medvlp modality accepts by default: a header naming
# another modality (a CT slice given as a radiograph, an MR series in a CT build) is refused, naming the file.
DICOM_MODALITIES: dict[str, tuple[str, ...]] = {"cxr": ("CR", "DX"), "ct": ("CT",), "patho": ("SM", "XC", "GM")}
_MODALITY_CODE = re.compile(r"^[A-Z][A-Z0-9]{0,15}$")


def parse_modalities(text: str, where: str) -> tuple[str, ...]:
    """'CR, dx' -> ('CR', 'DX'); a value that is not a DICOM Modality code is a ValueError naming `where`."""
    codes = tuple(t.strip().upper() for t in str(text or "").split(",") if t.strip())
    bad = [c for c in codes if not _MODALITY_CODE.match(c)]
    if bad:
        raise ValueError(f"{where}: {bad} are not DICOM Modality codes (e.g. CR,DX or CT)")
    return codes


def accepted_modalities(opts: "ReadOptions", modality: str) -> tuple[str, ...]:
    """The DICOM Modality codes a row of this medvlp modality accepts: the build's choice, else the default."""
    return tuple(opts.dicom_modalities) or DICOM_MODALITIES.get(modality, ())


NIFTI_SUFFIXES = (".nii", ".nii.gz")
DICOM_SUFFIXES = (".dcm", ".dicom")


def is_nifti(path: str) -> bool:
    return path.lower().endswith(NIFTI_SUFFIXES)


def is_dicom_file(path: str) -> bool:
    """A .dcm/.dicom name, or any file with the DICM marker at byte 128 (Part 10 files without a suffix)."""
    if path.lower().endswith(DICOM_SUFFIXES):
        return True
    p = Path(path)
    if not p.is_file() or p.suffix.lower() in (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".npy", ".npz", ".pt"):
        return False
    try:
        with open(p, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return head[128:132] == b"DICM"


def is_clinical_volume(path: str) -> bool:
    """NIfTI file, DICOM file or a folder (a DICOM series or a segmentations/ folder)."""
    return is_nifti(path) or Path(path).is_dir() or is_dicom_file(path)


def load_image_file(path: str, image_size: int, opts: ReadOptions, resize_u16, modality: str = "cxr"):
    """A DICOM image of a row of `modality` (its header's Modality must be one `accepted_modalities` allows)."""
    from medvlp.data_shards.readers.dicom import load_dicom_image

    return load_dicom_image(path, image_size, opts, resize_u16, modality)


def load_volume_files(vol_path: str, mask_path: str | None, opts: ReadOptions, load_array, modality: str = "ct"):
    from medvlp.data_shards.readers.volume import load_volume

    return load_volume(vol_path, mask_path, opts, load_array, modality)


def replace_options(opts: ReadOptions | None, **changes) -> ReadOptions:
    return replace(opts or ReadOptions(), **changes)


def prepare(rows: list, read: ReadOptions | None) -> tuple[ReadOptions, dict]:
    """Options for a build of `rows` and index fields: the organ list of mask folders (sorted union of their file
    names unless `read.organs` is given) becomes `organ_names` in index.json. Nothing is decoded."""
    read = read or ReadOptions()
    masks = [r.paths["mask"] for r in rows if "mask" in r.paths and Path(r.paths["mask"]).is_dir()]
    if not masks:
        return read, {}
    from medvlp.data_shards.readers.volume import organ_names_of

    organs = tuple(read.organs) or tuple(organ_names_of(masks))
    return replace(read, organs=organs), {"organ_names": list(organs)}


from medvlp.data_shards.readers import phi  # noqa: E402 - submodule, after the names it may import

__all__ = ["DICOM_MODALITIES", "accepted_modalities", "parse_modalities", "phi", "prepare", "replace_options", "ReadError", "ReadOptions", "is_nifti", "is_dicom_file", "is_clinical_volume", "load_image_file",
           "load_volume_files"]
