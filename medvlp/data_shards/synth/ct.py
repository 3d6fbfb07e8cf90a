"""Synthetic abdominal CT: int16 HU volumes with uint8 organ masks, per-organ lesions and per-organ report sentences.

Geometry in normalised coordinates (z, y, x) in [0, 1]: z runs cranial -> caudal (lung bases at the top slices),
y anterior -> posterior, x image left -> right = patient right -> left (radiological convention). Slices are twice
as thick as the in-plane pixels (D = S // 2 over the same 350 mm), so normalised units are isotropic in mm.
Organs are ellipsoids at jittered positions (per patient), painted in priority order so they never overlap:
  1 liver, 2 spleen, 3 left_kidney, 4 right_kidney, 5 lung (both bases)
HU: air -1000, lung -850, fat about -100, muscle 50, liver 60, spleen 48, enhancing kidney 150, bone 400-800.
Each organ independently carries a lesion with p = 0.3: a hypo- or hyperdense ellipsoid (a solid nodule in the
lung), clipped to the organ mask, so lesion voxels always lie inside their organ. Lesions are small relative to
their organ (a local signal in a large normal structure): each radius is at most LESION_MAX_FRAC of the organ's
half-extent along that axis (never under one voxel), so a lesion fills a few per cent of its organ's volume.
Difficulty knobs (defaults reproduce the original corpus byte for byte): `lesion_contrast` scales each lesion's
HU offset from its organ's HU (1.0 = 35-60 HU hypodense, 40-70 HU hyperdense, lung nodules at 30-60 HU against
-850; 0.5 halves every offset), `noise_hu` is the sd of the independent per-voxel noise (default 8 HU).

Shape legend: D slices, H rows, W columns (H = W = S).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from medvlp.data_shards.schema import Sample
from medvlp.data_shards.synth.util import (Study, base_meta, grid, join_sentences, patient_rng, pick, sample_key,
                                    smooth_noise, study_rng, text_rng)

CT_ORGANS = ["liver", "spleen", "left_kidney", "right_kidney", "lung"]  # mask id = index + 1
ORGAN_TEXT = {"liver": "liver", "spleen": "spleen", "left_kidney": "left kidney", "right_kidney": "right kidney",
              "lung": "lung bases"}
DEFAULT_SIZE_CT = 64  # in-plane side; D = size // 2
CT_VISITS = (0.6, 0.4)  # P(1, 2 scans per patient)
P_LESION = 0.3
LESION_MAX_FRAC = 0.3  # lesion radius <= this fraction of the organ's half-extent on each axis
FOV_MM = 350.0
DEFAULT_LESION_CONTRAST = 1.0  # scale on the lesion's HU offset from its organ
DEFAULT_NOISE_HU = 8.0  # sd of the per-voxel noise
_HU = {"liver": 60.0, "spleen": 48.0, "left_kidney": 150.0, "right_kidney": 150.0, "lung": -850.0}
# organ -> list of ellipsoids (centre z, y, x; radii z, y, x), normalised units
_ORGAN_SHAPES = {
    "liver": [((0.42, 0.45, 0.32), (0.32, 0.22, 0.19))],
    "spleen": [((0.35, 0.62, 0.74), (0.22, 0.13, 0.08))],
    "left_kidney": [((0.65, 0.7, 0.67), (0.22, 0.08, 0.055))],
    "right_kidney": [((0.68, 0.7, 0.33), (0.22, 0.08, 0.055))],
    "lung": [((-0.05, 0.52, 0.3), (0.35, 0.25, 0.15)), ((-0.05, 0.52, 0.7), (0.35, 0.25, 0.15))],
}
_PAINT_ORDER = ["right_kidney", "left_kidney", "spleen", "lung", "liver"]  # first painted wins a shared voxel

CT_PROMPTS: dict[str, tuple[list[str], list[str]]] = {
    f"{o}_lesion": ([f"{ORGAN_TEXT[o].capitalize()} lesion.", f"The {ORGAN_TEXT[o]} shows a lesion.",
                     f"A focal lesion in the {ORGAN_TEXT[o]}."],
                    [f"No {ORGAN_TEXT[o]} lesion.", f"The {ORGAN_TEXT[o]} is unremarkable.",
                     f"No focal lesion in the {ORGAN_TEXT[o]}."]) for o in CT_ORGANS if o != "lung"}
CT_PROMPTS["lung_lesion"] = (["Lung nodule.", "A nodule is seen in the lung base.", "Pulmonary nodule."],
                             ["No lung nodule.", "The lung bases are clear.", "No pulmonary nodule."])


# ----------------------------------------------------------------------------------------------- parameters
def _ellipsoid(zz, yy, xx, c, r) -> np.ndarray:
    return ((zz - c[0]) / r[0]) ** 2 + ((yy - c[1]) / r[1]) ** 2 + ((xx - c[2]) / r[2]) ** 2 <= 1.0


def patient_anatomy(seed: int, patient: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """((D, H, W) uint8 organ label map, body shift (z, y, x)) of one patient, the same for all their scans."""
    prng = patient_rng(seed, "ct", patient)
    D, S = size // 2, size
    zz, yy, xx = grid((D, S, S))
    shift = prng.normal(0, 0.02, 3)  # whole-body position
    mask = np.zeros((D, S, S), dtype=np.uint8)
    body = ((yy - 0.5 - shift[1]) / 0.36) ** 2 + ((xx - 0.5 - shift[2]) / 0.45) ** 2 <= 0.8 ** 2  # inside the wall
    jitter = {o: (prng.normal(0, 0.015, 3), prng.uniform(0.9, 1.1, 3)) for o in CT_ORGANS}
    for organ in _PAINT_ORDER:
        dc, sr = jitter[organ]
        inside = np.zeros((D, S, S), dtype=bool)
        for c, r in _ORGAN_SHAPES[organ]:
            inside |= _ellipsoid(zz, yy, xx, np.add(c, dc + shift), np.multiply(r, sr))
        mask[inside & body & (mask == 0)] = CT_ORGANS.index(organ) + 1
    return mask, shift


def _fits(organ_DHW: np.ndarray, rz: int, rxy: int) -> np.ndarray:
    """Voxels whose 6 neighbours at the lesion radii are in the organ too (a cheap erosion)."""
    ok = organ_DHW.copy()
    for ax, r in ((0, rz), (1, rxy), (2, rxy)):
        for sgn in (-1, 1):
            shifted = np.zeros_like(organ_DHW)
            src = [slice(None)] * 3
            dst = [slice(None)] * 3
            if r >= organ_DHW.shape[ax]:
                return np.zeros_like(organ_DHW)
            src[ax] = slice(max(0, sgn * r), organ_DHW.shape[ax] + min(0, sgn * r))
            dst[ax] = slice(max(0, -sgn * r), organ_DHW.shape[ax] + min(0, -sgn * r))
            shifted[tuple(dst)] = organ_DHW[tuple(src)]
            ok &= shifted
    return ok


def check_difficulty(lesion_contrast: float, noise_hu: float) -> tuple[float, float]:
    """The CT difficulty knobs as floats; ValueError naming the knob when one is out of range."""
    out = []
    for name, v, lo in (("lesion_contrast", lesion_contrast, "> 0"), ("noise_hu", noise_hu, ">= 0")):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v) or (
                v <= 0 if lo == "> 0" else v < 0):
            raise ValueError(f"ct {name} must be a finite number {lo}, got {v!r}")
        out.append(float(v))
    return out[0], out[1]


def draw_ct_spec(seed: int, study: Study, size: int, lesion_contrast: float = DEFAULT_LESION_CONTRAST,
                 noise_hu: float = DEFAULT_NOISE_HU) -> dict[str, Any]:
    """Organ masks, lesion geometry for every organ (used or not), background fields and noise. `lesion_contrast`
    scales each lesion's HU offset from its organ, `noise_hu` is the per-voxel noise sd (module docstring)."""
    D, S = size // 2, size
    mask, shift = patient_anatomy(seed, study.patient, size)
    rng = study_rng(seed, "ct", study.index)
    lesions = {}
    for k, organ in enumerate(CT_ORGANS):
        present = bool(rng.random() < P_LESION)
        r_n, u_pos, u_kind, u_hu = rng.uniform(0.03, 0.055), rng.random(), rng.random(), rng.random()
        organ_DHW = mask == k + 1
        rz, rxy = max(1, int(round(r_n * D))), max(1, int(round(r_n * S)))
        if organ_DHW.any():  # small relative to the organ: cap each radius by a fraction of its half-extent
            half = [(ix.max() - ix.min() + 1) / 2 for ix in np.nonzero(organ_DHW)]
            rz = min(rz, max(1, int(LESION_MAX_FRAC * half[0])))
            rxy = min(rxy, max(1, int(LESION_MAX_FRAC * min(half[1], half[2]))))
        cand = np.flatnonzero(_fits(organ_DHW, rz, rxy))
        while cand.size == 0 and (rz > 0 or rxy > 0):  # small organs at small sizes: shrink the lesion
            rz, rxy = max(0, rz - 1), max(0, rxy - 1)
            cand = np.flatnonzero(_fits(organ_DHW, rz, rxy)) if (rz or rxy) else np.flatnonzero(organ_DHW)
        if cand.size == 0:
            raise RuntimeError(f"ct size {size}: organ {organ!r} has no voxels; use a larger size")
        centre = np.unravel_index(cand[int(u_pos * cand.size)], organ_DHW.shape)
        if organ == "lung":
            kind, hu = "solid", 30.0 + 30.0 * u_hu
        elif u_kind < 0.7:
            kind, hu = "hypodense", _HU[organ] - 35.0 - 25.0 * u_hu
        else:
            kind, hu = "hyperdense", _HU[organ] + 40.0 + 30.0 * u_hu
        if lesion_contrast != DEFAULT_LESION_CONTRAST:  # skipped at the default: bytes as before
            hu = _HU[organ] + lesion_contrast * (hu - _HU[organ])
        # Radii get +0.5 voxel so that a radius-r lesion covers the voxels at integer distance r.
        lesions[organ] = {"present": present, "centre_zyx": [int(c) for c in centre],
                          "radius_zyx": [max(rz, 0.5) + 0.5, max(rxy, 0.5) + 0.5, max(rxy, 0.5) + 0.5],
                          "kind": kind, "hu": round(hu, 1), "diameter_mm": int(round((2 * rxy + 1) * FOV_MM / S))}
    return {"size": size, "mask": mask, "lesions": lesions, "body": shift[1:],
            "fat_field": smooth_noise(rng, (D, S, S), S / 8), "organ_tex": smooth_noise(rng, (D, S, S), S / 16),
            "noise": rng.standard_normal((D, S, S)), "noise_hu": noise_hu}


# ----------------------------------------------------------------------------------------------- rendering
def lesion_voxels(spec: dict[str, Any], organ: str) -> np.ndarray:
    """(D, H, W) bool: the organ's lesion ellipsoid clipped to the organ mask."""
    les = spec["lesions"][organ]
    D, S = spec["mask"].shape[0], spec["mask"].shape[1]
    z, y, x = np.meshgrid(np.arange(D), np.arange(S), np.arange(S), indexing="ij", sparse=True)
    c, r = les["centre_zyx"], les["radius_zyx"]
    ell = ((z - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((x - c[2]) / r[2]) ** 2 <= 1.0
    return ell & (spec["mask"] == CT_ORGANS.index(organ) + 1)


def render_ct(spec: dict[str, Any], lesions_on: dict[str, bool] | None = None) -> np.ndarray:
    """(D, H, W) int16 HU volume; `lesions_on` overrides which lesions are drawn (default: the spec's)."""
    mask = spec["mask"]
    D, S = mask.shape[0], mask.shape[1]
    zz, yy, xx = grid((D, S, S))
    by, bx = spec["body"]
    rho = np.sqrt(((yy - 0.5 - by) / 0.36) ** 2 + ((xx - 0.5 - bx) / 0.45) ** 2)  # (1, H, W)
    hu = np.where(rho <= 1.0, -100.0, -1000.0)  # subcutaneous fat inside the skin line
    hu = np.where(rho <= 0.9, 50.0, hu)  # abdominal wall muscle
    inner = np.broadcast_to(rho <= 0.84, (D, S, S))
    hu = np.where(inner, np.clip(-40.0 + 70.0 * spec["fat_field"], -120, 60), hu)  # fat and bowel
    d_spine = np.hypot(yy - 0.73 - by, xx - 0.5 - bx)
    hu = np.where(inner & (d_spine < 0.075), 800.0, hu)  # cortical bone
    hu = np.where(inner & (d_spine < 0.06), 350.0, hu)  # cancellous bone
    hu = np.where(inner & (np.hypot(yy - 0.6 - by, xx - 0.54 - bx) < 0.035), 160.0, hu)  # contrast-filled aorta
    hu = np.broadcast_to(hu, (D, S, S)).copy()
    for k, organ in enumerate(CT_ORGANS):
        sel = mask == k + 1
        hu[sel] = _HU[organ] + 5.0 * spec["organ_tex"][sel]
    for organ, les in spec["lesions"].items():
        on = les["present"] if lesions_on is None else lesions_on.get(organ, False)
        if on:
            hu[lesion_voxels(spec, organ)] = les["hu"]
    hu = hu + spec.get("noise_hu", DEFAULT_NOISE_HU) * spec["noise"]
    return np.clip(np.rint(hu), -1024, 3071).astype(np.int16)


# ----------------------------------------------------------------------------------------------- reports
def _sentence(rng: np.random.Generator, organ: str, les: dict[str, Any], size: int) -> str:
    name = ORGAN_TEXT[organ]
    if organ == "lung":
        side = "right" if les["centre_zyx"][2] < size / 2 else "left"  # image left = patient right
        if les["present"]:
            return pick(rng, [f"a {les['diameter_mm']} mm nodule is seen in the {side} lung base",
                              f"there is a solid nodule in the {side} lower lobe"])
        return pick(rng, ["the lung bases are clear", "no pulmonary nodule at the lung bases"])
    if les["present"]:
        mm, kind = les["diameter_mm"], les["kind"]
        return pick(rng, [f"the {name} shows a {mm} mm {kind} lesion", f"a {kind} lesion measuring {mm} mm is seen "
                          f"in the {name}", f"there is a {kind} focal lesion in the {name}"])
    return pick(rng, [f"the {name} is unremarkable", f"no focal lesion in the {name}", f"the {name} appears normal"])


def ct_sample(seed: int, study: Study, size: int | None = None, lesion_contrast: float = DEFAULT_LESION_CONTRAST,
              noise_hu: float = DEFAULT_NOISE_HU) -> Sample:
    size = DEFAULT_SIZE_CT if size is None else size
    if size < 16:
        raise ValueError(f"ct size must be >= 16 pixels (D = size // 2), got {size}")
    lesion_contrast, noise_hu = check_difficulty(lesion_contrast, noise_hu)
    spec = draw_ct_spec(seed, study, size, lesion_contrast, noise_hu)
    vol_DHW = render_ct(spec)
    trng = text_rng(seed, "ct", study.index)
    organs = {}
    for k, organ in enumerate(CT_ORGANS):
        les = spec["lesions"][organ]
        sentence = join_sentences([_sentence(trng, organ, les, size)])
        organs[organ] = {"id": k + 1, "abnormal": int(les["present"]), "sentence": sentence}
        if les["present"]:
            organs[organ]["lesion"] = {key: les[key] for key in ("centre_zyx", "radius_zyx", "kind", "hu",
                                                                 "diameter_mm")}
    order = trng.permutation(len(CT_ORGANS))
    text = " ".join(organs[CT_ORGANS[j]]["sentence"] for j in order)
    extra = {"organs": organs, "organ_names": list(CT_ORGANS),
             "spacing_mm": [FOV_MM / (size // 2), FOV_MM / size, FOV_MM / size]}
    return Sample(key=sample_key("ct", study.index), text=text, volume=vol_DHW, mask=spec["mask"],
                  labels={f"{o}_lesion": organs[o]["abnormal"] for o in CT_ORGANS},
                  meta={**base_meta("ct", study, seed), "has_mask": True}, extra=extra)
