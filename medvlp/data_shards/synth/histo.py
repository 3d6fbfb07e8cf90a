"""Synthetic histology: H&E-like patches whose texture and colour encode the class, and whole-slide feature bags
whose composition the report states.

patho  RGB uint8 (S, S, 3) patches of three classes (labels {"tumor": 1/0}, meta["class"], meta["class_index"] into
       PATHO_CLASSES):
         normal    pink fibrous stroma, sparse small regular nuclei, a few empty (fat/lumen) spaces
         tumor     crowded large irregular dark-purple nuclei on basophilic (purplish) cytoplasm
         inflamed  dense small round very dark lymphocyte nuclei; no tumor
       Stain colours vary per patient (one slide per patient), as between real labs and scanners.
       `domain` (PATHO_DOMAINS) renders the same tissue as another lab would: "he" (default, the corpus the
       other generators and the demo use) or "lab2": a dark-field, fluorescence-like scan (bright nuclei on a
       dark background; the stain colours inverted), slightly out of focus, and harder patches. In lab2 all
       class evidence is local: the tumour's nuclei, basophilic cytoplasm and denser tissue lie in a disc covering
       15-45 % of the patch (lymphocytes likewise for inflamed patches), normal stroma around it; empty spaces
       occur in every class; half of the non-tumour patches carry a small focus of enlarged reactive nuclei; and
       each slide has its own stain colours (sd LAB2_STAIN_SD per channel) and scanner gain / offset, a variation
       larger than the colour gap between the classes, so patch-mean colour no longer tells the class (a 1-shot
       nearest neighbour on it scores about 0.56). A target domain for few-label adaptation (docs/path_clip.md).
slide  bags of patch features (n, d) float16 and grid coords (n, 2) int32 as (x, y), whose reports state the
       composition and facts that need positions and rare patches (foci, region, margins, grade, mitoses): see
       medvlp.data_shards.synth.slide (re-exported here).

Shape legend: S patch side; H, W rows, columns; C = 3 colour channels; N patches in a bag; E feature dim.
"""
from __future__ import annotations

import math

import numpy as np

from medvlp.data_shards.schema import Sample
from medvlp.data_shards.synth.util import (Study, base_meta, grid, join_sentences, patient_rng, pick, sample_key,
                                    smooth_noise, soft_step, study_rng, text_rng)

# ----------------------------------------------------------------------------------------------- patho patches
PATHO_CLASSES = ["normal", "tumor", "inflamed"]
PATHO_CLASS_PROBS = (0.45, 0.4, 0.15)
PATHO_VISITS = (0.4, 0.3, 0.2, 0.1)  # P(1..4 patches per patient)
DEFAULT_SIZE_PATHO = 64
# class -> (nuclei per pixel, radius range at S=64, max elongation, darkness in [0, 1])
_NUCLEI = {"normal": (0.006, (1.1, 1.7), 0.2, 0.7), "tumor": (0.02, (2.3, 3.6), 0.45, 0.92),
           "inflamed": (0.045, (0.9, 1.3), 0.1, 1.0)}

PATHO_PROMPTS = {
    "tumor": (["H&E patch of lymph node tumor tissue.", "This is a photo of lymph node tumor tissue.",
               "Metastatic tumor in a lymph node."],
              ["H&E patch of healthy lymph node tissue.", "This is a photo of healthy lymph node tissue.",
               "Normal lymph node tissue without tumor."]),
}
_CAPTIONS = {
    "tumor": ["H&E patch of lymph node tumor tissue", "this is a photo of lymph node tumor tissue",
              "metastatic tumor in a lymph node with crowded large atypical nuclei",
              "lymph node tumor tissue with large pleomorphic nuclei"],
    "normal": ["H&E patch of healthy lymph node tissue", "this is a photo of healthy lymph node tissue",
               "normal lymph node tissue without tumor", "healthy lymph node stroma with sparse small nuclei"],
    "inflamed": ["H&E patch of lymph node tissue with dense lymphocytic inflammation, no tumor",
                 "reactive lymph node with many small lymphocytes, negative for tumor",
                 "healthy lymph node tissue with inflammation and no tumor cells"],
}


PATHO_DOMAINS = ("he", "lab2")
_PALETTES = {"he": ([75.0, 40.0, 130.0], [235.0, 150.0, 195.0], [250.0, 238.0, 244.0]),  # H, E, background
             "lab2": ([110.0, 70.0, 35.0], [170.0, 190.0, 215.0], [232.0, 236.0, 240.0])}
LAB2_STAIN_SD = 22.0  # per-slide sd of the lab2 stain colours (he: 8)
LAB2_GAIN = (0.7, 1.3)  # per-slide scanner gain of lab2 (brightness / contrast), with an offset of sd 12


def _stain(prng: np.random.Generator, domain: str = "he") -> dict[str, np.ndarray]:
    h, e, bg = _PALETTES[domain]
    if domain == "lab2":  # per-slide stain and scanner variation larger than the colour gap between classes
        return {"H": np.array(h) + prng.normal(0, LAB2_STAIN_SD, 3),
                "E": np.array(e) + prng.normal(0, LAB2_STAIN_SD, 3),
                "bg": np.array(bg), "gain": float(prng.uniform(*LAB2_GAIN)), "offset": float(prng.normal(0, 12))}
    return {"H": np.array(h) + prng.normal(0, 8, 3),  # nuclear stain (haematoxylin / DAB-like)
            "E": np.array(e) + prng.normal(0, 8, 3),  # counterstain: stroma, cytoplasm
            "bg": np.array(bg)}


def _defocus(img_HWC: np.ndarray) -> np.ndarray:
    """Binomial [1, 2, 1] / 4 blur applied twice along each axis (an out-of-focus scanner)."""
    for _ in range(2):
        for ax in (0, 1):
            p = np.pad(img_HWC, [(1, 1) if a == ax else (0, 0) for a in range(3)], mode="edge")
            lo, mid, hi = (np.take(p, range(k, k + img_HWC.shape[ax]), axis=ax) for k in range(3))
            img_HWC = 0.25 * lo + 0.5 * mid + 0.25 * hi
    return img_HWC


def _paint_nuclei(img_HWC, rng, cls: str, stain, S: int, keep=None) -> None:
    """Alpha-blend haematoxylin ellipses into the patch, in place (only centres where `keep(cy, cx)` holds)."""
    density, (r0, r1), elong, dark = _NUCLEI[cls]
    k = S / 64.0
    count = int(rng.poisson(density * S * S))
    cy, cx = rng.uniform(0, S, count), rng.uniform(0, S, count)
    if keep is not None:
        inside = keep(cy, cx)
        cy, cx, count = cy[inside], cx[inside], int(inside.sum())
    r = rng.uniform(r0, r1, count) * k
    e = 1 + rng.uniform(0, elong, count)
    ang = rng.uniform(0, np.pi, count)
    shade = dark * rng.uniform(0.85, 1.0, count)
    for j in range(count):
        ry, rx = r[j] * e[j], r[j] / e[j]
        R = int(math.ceil(max(ry, rx))) + 1
        y0, y1 = max(0, int(cy[j]) - R), min(S, int(cy[j]) + R + 1)
        x0, x1 = max(0, int(cx[j]) - R), min(S, int(cx[j]) + R + 1)
        if y0 >= y1 or x0 >= x1:
            continue
        yy = np.arange(y0, y1)[:, None] + 0.5 - cy[j]
        xx = np.arange(x0, x1)[None, :] + 0.5 - cx[j]
        ca, sa = np.cos(ang[j]), np.sin(ang[j])
        rho = np.sqrt(((ca * yy + sa * xx) / ry) ** 2 + ((-sa * yy + ca * xx) / rx) ** 2)
        alpha = (soft_step(1 - rho, 0.6 / r[j]) * shade[j])[..., None]
        col = stain["H"] * (1.15 - 0.35 * shade[j])
        img_HWC[y0:y1, x0:x1] = img_HWC[y0:y1, x0:x1] * (1 - alpha) + col * alpha


def _paint_lab2(img_HWC, rng, cls: str, stain, S: int, disc) -> None:
    """lab2 nuclei: a tumour patch has tumour cells in `disc` (normal stroma around), an inflamed patch lymphocytes
    in it; about half of all non-tumour patches carry a small focus of enlarged reactive nuclei (a look-alike of
    tumour cells)."""
    _paint_nuclei(img_HWC, rng, "normal", stain, S, keep=lambda y, x: ~disc(y, x) if cls != "normal" else y >= 0)
    if cls != "normal":
        _paint_nuclei(img_HWC, rng, cls, stain, S, keep=disc)
    if cls != "tumor" and rng.random() < 0.5:
        ry, rx = rng.uniform(0.2 * S, 0.8 * S, 2)
        _paint_nuclei(img_HWC, rng, "tumor", stain, S, keep=lambda y, x: np.hypot(y - ry, x - rx) < 0.12 * S)


def _render_lab2(rng, cls: str, stain, S: int, tissue) -> np.ndarray:
    """lab2: every class evidence is local. The lesion disc (~15-45 % of the patch) carries the tumour's
    basophilic cytoplasm, denser tissue and tumour nuclei (or lymphocytes); the rest is normal stroma with empty
    spaces in every class. Then defocus, dark-field inversion and the slide's scanner gain and offset."""
    yy, xx = grid((S, S))
    for _ in range(int(rng.integers(0, 4))):  # empty spaces (fat, lumina) in every class: not a class cue
        vy, vx, vr = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.11)
        tissue = tissue * (1 - 0.85 * soft_step(vr - np.hypot(yy - vy, xx - vx), 0.03))
    cy0, cx0 = rng.uniform(0.25 * S, 0.75 * S, 2)
    rad = S * np.sqrt(rng.uniform(0.15, 0.45) / np.pi)
    disc = lambda y, x: np.hypot(y - cy0, x - cx0) < rad  # noqa: E731
    cyto_HWC = np.broadcast_to(stain["E"], (S, S, 3)).copy()
    if cls == "tumor":  # basophilic cytoplasm and denser tissue inside the tumour only
        inside_HW = soft_step(rad - np.hypot(yy * S - cy0, xx * S - cx0), 2.0)
        tissue = np.clip(tissue + 0.15 * inside_HW, 0, 1)
        cyto_HWC = cyto_HWC + inside_HW[..., None] * 0.2 * (stain["H"] - stain["E"])
    img_HWC = stain["bg"] + tissue[..., None] * (cyto_HWC - stain["bg"])
    _paint_lab2(img_HWC, rng, cls, stain, S, disc)
    img_HWC = 255.0 - _defocus(img_HWC)  # dark field: bright nuclei on a dark background
    return stain["gain"] * img_HWC + stain["offset"]


def render_patho(rng: np.random.Generator, cls: str, stain, S: int, domain: str = "he") -> np.ndarray:
    yy, xx = grid((S, S))
    theta, phase = rng.uniform(0, np.pi), rng.uniform(0, 2 * np.pi)
    warp = smooth_noise(rng, (S, S), S / 4)
    fibres = np.sin(2 * np.pi * 6 * (xx * np.cos(theta) + yy * np.sin(theta)) + phase + 1.5 * warp)
    tissue = np.clip(0.72 + 0.18 * fibres + 0.08 * smooth_noise(rng, (S, S), S / 16), 0, 1)
    if domain == "lab2":  # the class is in part of the patch only, under a per-slide colour / gain shift
        img_HWC = _render_lab2(rng, cls, stain, S, tissue)
    else:
        if cls == "normal":  # a few empty spaces (fat, lumina)
            for _ in range(int(rng.integers(0, 4))):
                vy, vx, vr = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.11)
                tissue = tissue * (1 - 0.85 * soft_step(vr - np.hypot(yy - vy, xx - vx), 0.03))
        elif cls == "tumor":
            tissue = np.clip(tissue + 0.15, 0, 1)
        cyto = stain["E"] * 0.8 + stain["H"] * 0.2 if cls == "tumor" else stain["E"]  # basophilic tumor cytoplasm
        img_HWC = stain["bg"] + tissue[..., None] * (cyto - stain["bg"])
        _paint_nuclei(img_HWC, rng, cls, stain, S)
    img_HWC = img_HWC + rng.normal(0, 3, img_HWC.shape)
    return np.clip(np.rint(img_HWC), 0, 255).astype(np.uint8)


def patho_sample(seed: int, study: Study, size: int | None = None, domain: str = "he") -> Sample:
    S = DEFAULT_SIZE_PATHO if size is None else size
    if S < 16:
        raise ValueError(f"patho size must be >= 16 pixels, got {S}")
    if domain not in PATHO_DOMAINS:
        raise ValueError(f"patho domain {domain!r} is not one of {', '.join(PATHO_DOMAINS)}")
    stain = _stain(patient_rng(seed, "patho", study.patient), domain)
    rng = study_rng(seed, "patho", study.index)
    cls = PATHO_CLASSES[int(rng.choice(len(PATHO_CLASSES), p=PATHO_CLASS_PROBS))]
    img_HWC = render_patho(rng, cls, stain, S, domain)
    caption = join_sentences([pick(text_rng(seed, "patho", study.index), _CAPTIONS[cls])])
    meta = {**base_meta("patho", study, seed), "class": cls, "class_index": PATHO_CLASSES.index(cls),
            **({"domain": domain} if domain != "he" else {})}
    return Sample(key=sample_key("patho", study.index), text=caption, image=img_HWC,
                  labels={"tumor": int(cls == "tumor")}, meta=meta)


# ----------------------------------------------------------------------------------------------- slide bags
# The slide corpus lives in medvlp.data_shards.synth.slide; its names stay importable from here.
from medvlp.data_shards.synth.slide import (BAG_SIZE, CLUSTER_STD, DEFAULT_DIM_SLIDE, DIAGNOSIS_TEXT,  # noqa: E402,F401
                                           SLIDE_DIAG_PROBS, SLIDE_DIAGNOSES, SLIDE_PROMPTS, SLIDE_TISSUES,
                                           SLIDE_VISITS, slide_centres, slide_report, slide_sample)
