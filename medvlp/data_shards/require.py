"""What a consumer needs of a shard set, checked from its index.json before any sample is read.

    require_shards(cfg.data, stage="pcam", modalities=("cxr", "patho"))            # 2D findings
    require_shards(cfg.data, stage="anatomy", modalities=("ct",), masks=True)      # CT with organ masks
    ShardNeed(("ct",), masks=True).check(cfg, "anatomy")                           # the same, from a root config

A fine-tune stage declares its `ShardNeed` in the stage registry; the runner checks it before the stage builds.

A stage given shards of another modality would otherwise fail deep in its first batch (`KeyError: 'image'` when a
2D stage meets volumes), or skip every sample as corrupt. Here it is one line naming the config key, the shards'
modality and what the stage needs (a `ShardRequirementError`, a ValueError: the CLI prints it and exits 2).

Organ masks (`masks=True`): the index counts the volume samples built without one (`samples_without_mask`, see
`medvlp.data_shards.writer`). None of them having a mask is refused; some lacking one is logged as a warning, and the
stage's transform skips those samples by name.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


class ShardRequirementError(ValueError):
    """Shards that do not fit what a consumer needs (wrong modality, no organ masks)."""

    user_facing = True


def _index(spec: str, cfg: Any) -> dict:
    from medvlp.data_shards.reader import find_index

    return find_index(spec, getattr(cfg, "index", ""), getattr(cfg, "allow_pipe", False))[0]


def require_shards(cfg: Any, *, stage: str, modalities: tuple[str, ...], masks: bool = False, what: str = "",
                   keys: tuple[str, ...] = ("train_shards", "val_shards"), section: str = "data") -> dict:
    """Check the shard sets `keys` of the config section `cfg` (a `DataConfig` by default: `train_shards`, and
    `val_shards` when set) against what `stage` needs (`what`: those shards in words, for the message; `section`:
    the section's name, for the message). Returns the first key's index document."""
    docs = {}
    for key in keys:
        spec = getattr(cfg, key)
        if not spec:
            continue
        doc = docs[key] = _index(spec, cfg)
        mod = doc.get("modality", "")
        if mod and mod not in modalities:
            raise ShardRequirementError(
                f"{section}.{key}: {spec} holds {mod!r} samples (index.json modality); the {stage} stage needs "
                f"{' or '.join(repr(m) for m in modalities)} shards{f' ({what})' if what else ''}")
        n, without = int(doc.get("num_samples", 0)), doc.get("samples_without_mask")
        if masks and without is not None and n and int(without) >= n:
            raise ShardRequirementError(
                f"{section}.{key}: {spec}: none of its {n} volume samples has an organ mask (index.json "
                f"samples_without_mask); the {stage} stage pools organ tokens by mask: build the shards with a mask "
                "column (a label map or a segmentations/ folder per volume)")
        if masks and without:
            log.warning("%s.%s: %d of %d volume samples of %s have no organ mask (meta has_mask: false); the %s "
                        "stage skips them", section, key, int(without), n, spec, stage)
    return docs.get(keys[0], {})


@dataclass(frozen=True)
class ShardNeed:
    """The shards a stage takes: their modalities (index.json `modality`), whether it needs organ masks, and
    where its root config names them (`section.key` for each of `keys`)."""

    modalities: tuple[str, ...]  # e.g. ("cxr", "patho")
    masks: bool = False  # volumes with organ masks
    what: str = ""  # those shards in words, for the message
    section: str = "data"  # the root config's section holding the shard sets
    keys: tuple[str, ...] = ("train_shards", "val_shards")  # its shard-set fields (empty ones are not checked)

    def check(self, root: Any, stage: str) -> dict:
        """`require_shards` on the section of `root` (a stage's root config); ShardRequirementError otherwise."""
        return require_shards(getattr(root, self.section), stage=stage, modalities=self.modalities, masks=self.masks,
                              what=self.what, keys=self.keys, section=self.section)


def missing_mask_reason(s: Any, stage: str) -> str | None:
    """Why a decoded sample cannot serve a stage that needs an organ mask, or None when it can."""
    if s.volume is None:
        return f"sample {s.key!r} holds no volume (modality {s.modality or '?'}); the {stage} stage needs CT volumes"
    if s.mask is None:
        flag = (s.meta or {}).get("has_mask")
        said = " (meta has_mask: false)" if flag is False else ""
        return f"sample {s.key!r} has no organ mask{said}; skipped by the {stage} stage"
    return None


__all__ = ["ShardNeed", "ShardRequirementError", "missing_mask_reason", "require_shards"]
