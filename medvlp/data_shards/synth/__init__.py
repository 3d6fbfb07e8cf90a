"""The embedded synthetic corpus: small, seeded corpora with known ground truth for the four modalities.

    for s in synth_samples("cxr", n=64, seed=0, size=64): ...        # medvlp.data_shards.schema.Sample objects
    synth_to_shards("out/cxr", modality="cxr", n=512)                 # shards + index.json, returns the index
    synth_to_shards("out", modality="all", n=256)                     # out/{cxr,patho,ct,slide}, returns {mod: index}
    prompts("cxr", "nodule")  ->  (["Nodule.", ...], ["No nodule.", ...])   # zero-shot prompt pairs

Modalities (details and ground-truth fields in each generator's module):
  cxr    greyscale radiographs (S, S) uint8, default 128; 5 findings at known boxes; templated reports   synth.cxr
  patho  H&E-like RGB patches (S, S, 3) uint8, default 64; normal / tumor / inflamed                      synth.histo
  ct     int16 HU volumes (S/2, S, S), default 64, organ masks, per-organ lesions and sentences            synth.ct
  slide  patch-feature bags (n, E) float16, E = size (default 64), coords, composition in the report      synth.histo
Every sample's meta has dataset = "synth-<modality>", modality, split, patient_id (plus visit, index, seed).
A patient has one or more studies; patients (never studies) are split train/val/test 80/10/10.

Determinism: sample i depends only on (seed, modality, i, size), never on n, and shards are byte-identical for
the same arguments (see medvlp.data_shards.synth.util).
"""
from __future__ import annotations

import numbers
import os
from functools import partial
from pathlib import Path
from typing import Callable, Iterator

from medvlp.data_shards.schema import LabelSpec, Sample
from medvlp.data_shards.synth.ct import (CT_ORGANS, CT_PROMPTS, CT_VISITS, DEFAULT_LESION_CONTRAST, DEFAULT_NOISE_HU,
                                         check_difficulty, ct_sample)
from medvlp.data_shards.synth.cxr import CXR_PROMPTS, CXR_VISITS, FINDINGS_CXR, cxr_sample
from medvlp.data_shards.synth.histo import (PATHO_PROMPTS, PATHO_VISITS, SLIDE_DIAGNOSES, SLIDE_PROMPTS, SLIDE_VISITS,
                                     patho_sample, slide_sample)
from medvlp.data_shards.synth.util import Study, check_modality, check_seed, iter_studies
from medvlp.data_shards.writer import write_index, write_shards

__all__ = ["FINDINGS_CXR", "SYNTH_MODALITIES", "label_names", "label_spec", "prompts", "synth_samples",
           "synth_to_shards"]

SYNTH_MODALITIES = ("cxr", "patho", "ct", "slide")
_GENERATORS: dict[str, tuple[Callable[[int, Study, int | None], Sample], tuple[float, ...]]] = {
    "cxr": (cxr_sample, CXR_VISITS),
    "patho": (patho_sample, PATHO_VISITS),
    "ct": (ct_sample, CT_VISITS),
    "slide": (slide_sample, SLIDE_VISITS),
}
_PROMPTS = {"cxr": CXR_PROMPTS, "patho": PATHO_PROMPTS, "ct": CT_PROMPTS, "slide": SLIDE_PROMPTS}


def label_names(modality: str) -> list[str]:
    """The label keys of a modality's samples, in a fixed order."""
    check_modality(modality)
    return {"cxr": list(FINDINGS_CXR), "patho": ["tumor"], "ct": [f"{o}_lesion" for o in CT_ORGANS],
            "slide": list(SLIDE_DIAGNOSES)}[modality]


def prompts(modality: str, finding: str) -> tuple[list[str], list[str]]:
    """(positive prompts, negative prompts) for zero-shot scoring of one label; the first of each is canonical,
    the rest are ensemble variants worded like the corpus's reports."""
    table = _PROMPTS[check_modality(modality)]
    if finding not in table:
        raise KeyError(f"{modality}: no prompts for label {finding!r}; labels are {label_names(modality)}")
    pos, neg = table[finding]
    return list(pos), list(neg)


_KINDS = {"cxr": "multi-label", "patho": "binary", "ct": "multi-label", "slide": "single-label"}


def label_spec(modality: str) -> LabelSpec:
    """The corpus's label kind and prompts, as written into index.json (the evaluation reads them from there).
    Slides carry one diagnosis each (single-label: the class prompt is the positive one); the others are
    multi-label findings (patho: one binary finding) prompted with their positive / negative sets."""
    names = label_names(modality)
    table = _PROMPTS[modality]
    if _KINDS[modality] == "single-label":
        return LabelSpec("single-label", names, templates=["{c}."], negative_templates=[],
                         prompts={c: {"positive": list(table[c][0])} for c in names})
    return LabelSpec(_KINDS[modality], names,
                     prompts={c: {"positive": list(table[c][0]), "negative": list(table[c][1])} for c in names})


def synth_samples(modality: str, n: int, seed: int = 0, size: int | None = None,
                  domain: str | None = None, difficulty: dict | None = None) -> Iterator[Sample]:
    """The first `n` samples of the corpus `(modality, seed, size)`. `size`: image side for cxr/patho, in-plane
    side for ct (depth = size // 2), feature dim for slide; None = the modality's default. `domain` (patho only):
    the lab look of the patches (synth.histo.PATHO_DOMAINS); None = the default H&E. `difficulty` (ct only):
    {"lesion_contrast": scale on each lesion's HU offset from its organ, "noise_hu": per-voxel noise sd}
    (synth.ct; None or {} = the default corpus)."""
    gen, visits = _GENERATORS[check_modality(modality)]
    if difficulty:
        if modality != "ct":
            raise ValueError(f"lesion_contrast / noise_hu apply to ct only, not {modality}")
        unknown = sorted(set(difficulty) - {"lesion_contrast", "noise_hu"})
        if unknown:
            raise ValueError(f"ct difficulty: unknown knob {unknown[0]!r} (lesion_contrast, noise_hu)")
        check_difficulty(difficulty.get("lesion_contrast", DEFAULT_LESION_CONTRAST),
                         difficulty.get("noise_hu", DEFAULT_NOISE_HU))
        gen = partial(ct_sample, **difficulty)
    if domain is not None and modality != "patho":
        raise ValueError(f"domain applies to patho only, not {modality}")
    if domain is not None and domain != "he":
        gen = partial(patho_sample, domain=domain)
    check_seed(seed)
    if size is not None and (not isinstance(size, numbers.Integral) or isinstance(size, bool)):
        raise ValueError(f"size must be an int or None, got {size!r}")
    size = None if size is None else int(size)
    for study in iter_studies(seed, modality, n, visits):
        yield gen(seed, study, size)


def _default_command(modality: str, n: int, seed: int, shard_size: int, size: int | None,
                     domain: str | None = None, difficulty: dict | None = None) -> str:
    # Deterministic (unlike sys.argv), so two builds with the same arguments give byte-identical index.json.
    return f"medvlp shards synth --modality {modality} --n {n} --seed {seed} --shard-size {shard_size}" + (
        f" --size {size}" if size is not None else "") + (f" --domain {domain}" if domain else "") + "".join(
        f" --{k.replace('_', '-')} {v:g}" for k, v in sorted((difficulty or {}).items()))


def synth_to_shards(out_dir: str | os.PathLike, modality: str = "cxr", n: int = 512, seed: int = 0,
                    shard_size: int = 128, size: int | None = None, command: str | None = None,
                    progress: bool = False, domain: str | None = None, difficulty: dict | None = None) -> dict:
    """Write `n` samples as shards of `shard_size` plus index.json under `out_dir`; return the index document.
    modality "all" writes out_dir/<modality>/ for each modality and returns {modality: index}. `difficulty` (ct
    only, see synth_samples) is recorded in index.json as "difficulty" when given (the default corpus's index is
    unchanged)."""
    if modality == "all":
        return {m: synth_to_shards(Path(out_dir) / m, m, n, seed, shard_size, size, command, progress)
                for m in SYNTH_MODALITIES}
    check_modality(modality)
    if not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size must be a positive int, got {shard_size!r}")
    if difficulty:  # checked before anything is written
        next(iter(synth_samples(modality, 0, seed, size, domain, difficulty)), None)
        difficulty = dict(zip(("lesion_contrast", "noise_hu"), check_difficulty(
            difficulty.get("lesion_contrast", DEFAULT_LESION_CONTRAST), difficulty.get("noise_hu", DEFAULT_NOISE_HU))))
    samples: Iterator[Sample] = synth_samples(modality, n, seed, size, domain, difficulty)
    if progress:
        from tqdm import tqdm

        samples = tqdm(samples, total=n, desc=f"synth {modality}", unit="sample")
    infos = write_shards(samples, out_dir, prefix=f"synth-{modality}", maxcount=shard_size)
    cmd = command if command is not None else _default_command(modality, n, seed, shard_size, size, domain,
                                                               difficulty)
    extra = {"dataset": f"synth-{modality}", "seed": seed, "size": size, **({"domain": domain} if domain else {}),
             **({"difficulty": difficulty} if difficulty else {})}
    return write_index(out_dir, infos, modality, label_names(modality), command=cmd, extra=extra,
                       labels=label_spec(modality))
