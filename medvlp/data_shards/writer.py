"""Atomic, deterministic shard writing on top of `webdataset.TarWriter`, and the shard-set `index.json`.

A shard is written to ``NAME.tar.tmp`` and renamed to ``NAME.tar`` only when complete, so an interrupted
build never leaves a half-written shard under a final name. Tar headers carry a fixed mtime and owner, so
the same samples give byte-identical shards.

index.json (schema version `SCHEMA_VERSION`):
  {"schema_version", "modality", "label_names", "num_samples", "splits": {split: count},
   "shards": [{"name", "count", "bytes", "sha256", "splits": {split: count}, "without_mask"?}], "command",
   "created_by", "labels": {"kind", "class_names", "templates", "negative_templates", "prompts"},
   "samples_without_mask"?}
Organ masks. Every volume sample's meta says `has_mask` (true / false: whether a mask.npy is stored), set here, so
a CT sample without an organ mask is never mistaken for one whose organs are all background. A shard of volumes
counts them (`without_mask`), and the index sums them as `samples_without_mask` (absent when a reused shard was
written before this was counted).
"labels" (a `LabelSpec`) says whether the set is multi-label, single-label multi-class or binary, and how to
prompt for its classes; the evaluation picks its zero-shot protocol from it. Indexes without it read as
multi-label (binary for one finding) with "X." / "No X." prompts (`label_spec`).
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import webdataset as wds

from medvlp.data_shards.paths import plain_name
from medvlp.data_shards.schema import MODALITIES, SCHEMA_VERSION, LabelSpec, Sample, encode_sample

# reproducible tar headers; an int, as a float mtime makes tarfile add a PAX header to every member (twice the
# headers for the stream to parse: ~80 us a sample of a 3-member sample)
FIXED_MTIME = 0
INDEX_NAME = "index.json"


def sha256_file(path: str | os.PathLike, bufsize: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class ShardInfo:
    name: str
    count: int
    bytes: int
    sha256: str
    splits: dict[str, int] = field(default_factory=dict)
    without_mask: int | None = None  # volume samples of the shard without an organ mask (None: no volumes / unknown)

    def to_dict(self) -> dict:
        d = {"name": self.name, "count": self.count, "bytes": self.bytes, "sha256": self.sha256,
             "splits": dict(sorted(self.splits.items()))}
        if self.without_mask is not None:
            d["without_mask"] = self.without_mask
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ShardInfo":
        return cls(d["name"], int(d["count"]), int(d["bytes"]), d["sha256"], dict(d.get("splits", {})),
                   d.get("without_mask"))


def flag_mask(s: Sample) -> bool:
    """Record in a volume sample's meta whether it stores an organ mask; True for a volume without one."""
    if s.volume is None:
        return False
    s.meta["has_mask"] = s.mask is not None
    return s.mask is None


def write_shard(path: str | os.PathLike, samples: Iterable[Sample]) -> ShardInfo:
    """Write one complete shard atomically (tmp file + rename). Returns its ShardInfo."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    splits: Counter[str] = Counter()
    n = 0
    volumes = no_mask = 0
    try:
        with open(tmp, "wb") as f:
            with wds.TarWriter(f, mtime=FIXED_MTIME, user="medvlp", group="medvlp", encoder=False) as tw:
                for s in samples:
                    no_mask += flag_mask(s)
                    volumes += s.volume is not None
                    tw.write(encode_sample(s))
                    splits[s.split] += 1
                    n += 1
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return ShardInfo(path.name, n, path.stat().st_size, sha256_file(path), dict(splits), no_mask if volumes else None)


def shard_name(prefix: str, i: int) -> str:
    return f"{prefix}-{i:06d}.tar"


def write_shards(samples: Iterable[Sample], out_dir: str | os.PathLike, prefix: str = "shard",
                 maxcount: int = 1000, maxsize: int = 1 << 30) -> list[ShardInfo]:
    """Group samples into shards of at most `maxcount` samples / ~`maxsize` bytes (encoded), write each atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    infos: list[ShardInfo] = []
    buf: list[Sample] = []
    size = 0

    def flush() -> None:
        nonlocal buf, size
        if buf:
            infos.append(write_shard(out / shard_name(prefix, len(infos)), buf))
        buf, size = [], 0

    for s in samples:
        est = _approx_size(s)
        if buf and (len(buf) >= maxcount or size + est > maxsize):
            flush()
        buf.append(s)
        size += est
    flush()
    return infos


def _approx_size(s: Sample) -> int:
    n = len(s.text) + 512
    for a in (s.image, s.volume, s.mask, s.feats, s.coords):
        if a is not None:
            n += a.nbytes
    return n


def write_index(out_dir: str | os.PathLike, shards: list[ShardInfo], modality: str, label_names: list[str],
                command: str | None = None, extra: dict | None = None, name: str = INDEX_NAME,
                labels: LabelSpec | dict | None = None) -> dict:
    """Write index.json (or `name`, e.g. a part index) atomically beside the shards and return it.

    `labels`: the label spec (kind, class names, prompt templates); None = inferred (`LabelSpec.infer`). Its
    class names must be the label names (a class no sample carries may be listed: it is added to label_names)."""
    if labels is None:
        labels = LabelSpec.infer(list(label_names)) if label_names else None
    elif isinstance(labels, dict):
        labels = LabelSpec.from_dict(labels)
    if labels is not None:
        extra_names = sorted(set(label_names) - set(labels.class_names))
        if extra_names:
            raise ValueError(f"{name}: samples carry labels {extra_names} that the label spec's class_names "
                             f"{labels.class_names} do not list")
        label_names = list(label_names) + [c for c in labels.class_names if c not in set(label_names)]
    for sh in shards:  # an index names files beside itself only
        plain_name(sh.name, f"{name}: shard")
    splits: Counter[str] = Counter()
    for sh in shards:
        splits.update(sh.splits)
    doc = {
        "schema_version": SCHEMA_VERSION,
        "modality": modality,
        "label_names": list(label_names),
        "num_samples": sum(sh.count for sh in shards),
        "splits": dict(sorted(splits.items())),
        "shards": [sh.to_dict() for sh in sorted(shards, key=lambda s: s.name)],
        "command": command if command is not None else " ".join(sys.argv),
        **(extra or {}),
    }
    if labels is not None:
        doc["labels"] = labels.to_dict()
    counted = [sh.without_mask for sh in shards]
    if modality == "ct" and shards and None not in counted:
        doc["samples_without_mask"] = sum(counted)
    path = Path(out_dir) / name
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return doc


class ShardIndexError(ValueError):
    """An unreadable index.json."""

    user_facing = True


def check_index(doc: object, where: str) -> dict:
    """A shard index document: a dict with a 'shards' list of entries whose names are plain file names (an index
    names files beside itself, never a path: `medvlp.data_shards.paths.plain_name`) and of the supported schema."""
    if not isinstance(doc, dict) or not isinstance(doc.get("shards"), list):
        raise ShardIndexError(f"{where}: not a shard index (no 'shards' list)")
    if doc.get("schema_version") != SCHEMA_VERSION:
        raise ShardIndexError(f"{where}: schema_version {doc.get('schema_version')} != supported {SCHEMA_VERSION}")
    # every consumer dispatches on the modality (a stage's shard check, the decoder): a missing or unknown one would
    # pass the check and fail deep in the first batch, or train on samples decoded as something else
    if "modality" not in doc:
        raise ShardIndexError(f"{where}: no 'modality' field (one of {', '.join(MODALITIES)}); the index is damaged "
                              "or hand-written: rebuild it (`medvlp shards build|import|synth`)")
    if doc["modality"] not in MODALITIES:
        raise ShardIndexError(f"{where}: modality {doc['modality']!r} is not one of {', '.join(MODALITIES)}")
    seen: set[str] = set()
    for i, sh in enumerate(doc["shards"]):
        if not isinstance(sh, dict):
            raise ShardIndexError(f"{where}: shards[{i}] is not an object")
        name = plain_name(sh.get("name"), f"{where}: shards[{i}]")
        if name in seen:
            raise ShardIndexError(f"{where}: shards[{i}]: shard {name!r} is listed twice")
        seen.add(name)
    return doc


def read_index(shard_dir: str | os.PathLike) -> dict:
    path = Path(shard_dir) / INDEX_NAME
    if not path.exists():
        raise FileNotFoundError(f"{path}: no index.json; build shards with `medvlp shards build|synth|import`")
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ShardIndexError(f"{path}: not valid JSON ({e}); rebuild it (`medvlp shards build` reuses finished "
                              "shards)") from None
    return check_index(doc, str(path))


def label_spec(index: dict) -> LabelSpec | None:
    """The index's label spec (inferred for indexes written without one); None when it has no labels."""
    if "labels" in index:
        return LabelSpec.from_dict(index["labels"], "index.json labels")
    names = list(index.get("label_names") or [])
    return LabelSpec.infer(names) if names else None
