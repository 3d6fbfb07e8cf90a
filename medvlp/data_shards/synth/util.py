"""Shared pieces of the synthetic corpus: per-sample random streams, patient plans and splits, smooth noise.

Determinism contract: every random number of study `i` comes from a generator seeded by
``(seed, modality, STUDY, i)`` and every patient-level number from ``(seed, modality, PATIENT, p)``, so study `i`
is the same whatever `n` is, and two runs with the same seed give the same arrays bit for bit. Only elementwise
numpy arithmetic is used for images (no BLAS), so results do not depend on thread counts.

Shape legend: H, W image rows/columns; D slices; S a square side; C colour channels.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from medvlp.data_shards.schema import MODALITIES

MODALITY_CODES = {"cxr": 1, "patho": 2, "ct": 3, "slide": 4}
# Stream tags: keep the study, patient, split, plan and fixed-world streams independent of each other.
_STUDY, _PATIENT, _SPLIT, _PLAN, _WORLD, _TEXT = 1, 2, 3, 4, 5, 6
SPLIT_BLOCK = ("train",) * 8 + ("val", "test")  # 80/10/10, exact within every block of 10 patients


def check_modality(modality: str) -> str:
    if modality not in MODALITY_CODES:
        raise ValueError(f"modality {modality!r} is not one of {', '.join(MODALITIES)}")
    return modality


def check_seed(seed: int) -> int:
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    return int(seed)


def study_rng(seed: int, modality: str, i: int) -> np.random.Generator:
    return np.random.default_rng([check_seed(seed), MODALITY_CODES[modality], _STUDY, i])


def text_rng(seed: int, modality: str, i: int) -> np.random.Generator:
    """Report wording has its own stream, so changing a template never moves an image."""
    return np.random.default_rng([check_seed(seed), MODALITY_CODES[modality], _TEXT, i])


def patient_rng(seed: int, modality: str, p: int) -> np.random.Generator:
    return np.random.default_rng([check_seed(seed), MODALITY_CODES[modality], _PATIENT, p])


def world_rng(modality: str, *tags: int) -> np.random.Generator:
    """Constants of the synthetic 'world' (e.g. tissue clusters): independent of the seed, so a model trained on
    one seed's corpus is evaluated meaningfully on another's."""
    return np.random.default_rng([MODALITY_CODES[modality], _WORLD, *tags])


def patient_split(seed: int, modality: str, p: int) -> str:
    """train/val/test for patient `p`: each block of 10 consecutive patients is a seeded permutation of 8/1/1."""
    block = np.random.default_rng([check_seed(seed), MODALITY_CODES[modality], _SPLIT, p // 10]).permutation(10)
    return SPLIT_BLOCK[int(np.flatnonzero(block == p % 10)[0])]


@dataclass(frozen=True)
class Study:
    """Where study `index` sits: its patient, its visit number within the patient, and the patient's split."""

    index: int
    patient: int
    visit: int
    split: str


def iter_studies(seed: int, modality: str, n: int, visit_probs: Sequence[float]) -> Iterator[Study]:
    """The first `n` studies; patient p has 1 + k studies with k ~ visit_probs (seeded by p alone)."""
    if not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    code = MODALITY_CODES[check_modality(modality)]
    i, p = 0, 0
    while i < n:
        k = 1 + int(np.random.default_rng([check_seed(seed), code, _PLAN, p]).choice(len(visit_probs), p=visit_probs))
        split = patient_split(seed, modality, p)
        for v in range(k):
            if i >= n:
                return
            yield Study(i, p, v, split)
            i += 1
        p += 1


def base_meta(modality: str, study: Study, seed: int) -> dict:
    return {"dataset": f"synth-{modality}", "modality": modality, "split": study.split,
            "patient_id": f"synth-{modality}-p{study.patient:06d}", "visit": study.visit, "index": study.index,
            "seed": seed}


def sample_key(modality: str, i: int) -> str:
    return f"synth-{modality}/{i:07d}"


# ----------------------------------------------------------------------------------------------- smooth fields
def upsample_linear(x: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Separable linear interpolation of `x` to `shape` (same number of axes), pixel-centre aligned."""
    out = x.astype(np.float64)
    for ax, n_out in enumerate(shape):
        n_in = out.shape[ax]
        pos = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
        i0 = np.floor(pos).astype(np.int64)
        i1 = np.minimum(i0 + 1, n_in - 1)
        w = (pos - i0).reshape([-1 if a == ax else 1 for a in range(out.ndim)])
        out = np.take(out, i0, axis=ax) * (1 - w) + np.take(out, i1, axis=ax) * w
    return out


def smooth_noise(rng: np.random.Generator, shape: Sequence[int], cell: float) -> np.ndarray:
    """Zero-mean, unit-std random field varying over about `cell` pixels (coarse Gaussian grid, upsampled)."""
    coarse = [max(2, int(round(n / cell)) + 1) for n in shape]
    f = upsample_linear(rng.standard_normal(coarse), shape)
    return (f - f.mean()) / (f.std() + 1e-12)


def grid(shape: Sequence[int]) -> list[np.ndarray]:
    """Pixel-centre coordinates in [0, 1] along each axis, broadcastable (open grid)."""
    axes = [(np.arange(n) + 0.5) / n for n in shape]
    return list(np.meshgrid(*axes, indexing="ij", sparse=True))


def soft_step(v: np.ndarray, width: float) -> np.ndarray:
    """0 for v <= -width/2, 1 for v >= width/2, linear in between: anti-aliased region edges."""
    return np.clip(v / max(width, 1e-9) + 0.5, 0.0, 1.0)


def mask_box(mask_HW: np.ndarray) -> list[int] | None:
    """[x0, y0, x1, y1] pixel box of a boolean mask (x1, y1 exclusive), or None if empty."""
    ys, xs = np.nonzero(mask_HW)
    if ys.size == 0:
        return None
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


# ----------------------------------------------------------------------------------------------- text
def pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def capitalise(sentence: str) -> str:
    return sentence[:1].upper() + sentence[1:]


def join_sentences(sentences: Sequence[str]) -> str:
    """Capitalise, end each with a full stop, collapse double spaces."""
    out = []
    for s in sentences:
        s = re.sub(r"\s+", " ", s).strip()
        if s:
            out.append(capitalise(s if s.endswith(".") else s + "."))
    return " ".join(out)
