"""A radiograph corpus for the lesion-size sweep: the synthetic chest corpus with the nodule radius drawn from a
chosen range (fractions of the image side), so one training run sees nodules from below one map cell to several.

    write_lesion_corpus("shards/cxr_wide", n=2048, seed=0, nodule_radius=(0.02, 0.12))
    medvlp pcam-corpus --out shards/cxr_wide --n 2048 --nodule-radius 0.02,0.12

Every other random number of a sample is the default corpus's (`synth.cxr.draw_cxr_spec` draws the radius with
one uniform draw either way), so the same seed gives the same patients, splits, labels and other findings.
"""
from __future__ import annotations

import os
from functools import partial

from medvlp.data_shards.synth import label_names, label_spec
from medvlp.data_shards.synth.cxr import CXR_VISITS, check_nodule_radius, cxr_sample
from medvlp.data_shards.synth.util import check_seed, iter_studies
from medvlp.data_shards.writer import write_index, write_shards


def write_lesion_corpus(out_dir: str | os.PathLike, n: int, seed: int = 0,
                        nodule_radius: tuple[float, float] = (0.02, 0.12), size: int | None = None,
                        shard_size: int = 128) -> dict:
    """Write `n` synthetic radiographs with nodule radius ~ U(nodule_radius) as shards + index.json."""
    lo, hi = check_nodule_radius(nodule_radius)
    check_seed(seed)
    if n < 1:
        raise ValueError(f"n: must be >= 1, got {n}")
    gen = partial(cxr_sample, nodule_radius=(lo, hi))
    samples = (gen(seed, study, size) for study in iter_studies(seed, "cxr", n, CXR_VISITS))
    infos = write_shards(samples, out_dir, prefix="synth-cxr", maxcount=shard_size)
    cmd = (f"medvlp pcam-corpus --out {out_dir} --n {n} --seed {seed} --nodule-radius {lo:g},{hi:g}"
           + (f" --size {size}" if size is not None else ""))
    extra = {"dataset": "synth-cxr", "seed": seed, "size": size, "nodule_radius": [lo, hi]}
    return write_index(out_dir, infos, "cxr", label_names("cxr"), command=cmd, extra=extra,
                       labels=label_spec("cxr"))
