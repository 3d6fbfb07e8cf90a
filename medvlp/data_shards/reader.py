"""The one reader of the shard format: member names, a split's shards, and the samples of a split.

Everything outside the training stream that reads shards goes through here (inspect, the tokenizer, the zero-shot
sample choice and retrieval metadata, Path-CLIP's split reader, the report feature extractor); the stream takes its
member-name rule and its shard listing from here too, so all of them agree on what a sample is.

* **Member names.** A tar member ``<dir/>stem.ext`` belongs to the sample ``<dir/>stem``: the key ends at the first
  dot of the last path component, everything after it is the extension (``ab12.img.png`` -> ``("ab12",
  "img.png")``, ``set.v2/ab12.json`` -> ``("set.v2/ab12", "json")``). A name whose last component holds no dot is
  no sample member and is skipped. This is webdataset's own rule (``base_plus_ext``), which the stream's grouping
  has always used; extensions are lower-cased when grouped, and a repeated extension within one key is an error.
  The shards we write never hold a dot in a key (``schema.validate_key``); imported tars may (in folders).
* **A split's shards.** `resolve_shards(spec, split)` lists the shards of a shard dir, folder URL, brace spec,
  URL list or pipe spec with their per-split counts from ``index.json`` (`find_index` finds that index; shard names
  in it must be plain file names: `writer.check_index`).
* **Samples.** `iter_shard` reads one shard (webdataset's tar iterator underneath) as ``(key, members, None)`` per
  sample and, for a shard that cannot be read to its end, one last ``(key, None, message)``; `iter_raw` chains
  shards and raises `ShardReadError` on an unreadable one; `iter_split` yields the samples of one split (the
  split is ``meta.split`` of the ``json`` member, ``train`` when absent); `iter_samples` decodes them.
  ``members=("json",)`` reads only those extensions' bytes (the rest of the tar is skipped, not copied).
"""
from __future__ import annotations

import json
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

from medvlp.data_shards import remote
from medvlp.data_shards.schema import Sample, SampleDecodeError, decode_sample
from medvlp.data_shards.writer import INDEX_NAME, ShardIndexError, check_index, read_index

# webdataset's `tariterators.base_plus_ext` pattern: key = up to the first dot of the last path component
_MEMBER_RE = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
_META = re.compile(r"__[^/]*__($|/)")  # webdataset's metadata members (skipped, as the stream skips them)


def split_member(name: str) -> tuple[str | None, str | None]:
    """Tar member name -> (sample key, extension), or (None, None) for a name that is no sample member."""
    hit = _MEMBER_RE.match(name)
    return (hit.group(1), hit.group(2)) if hit else (None, None)


class ShardReadError(SampleDecodeError):
    """A shard whose tar cannot be read to its end; the message names the shard."""


# ------------------------------------------------------------------------------------------ shard sets
@dataclass
class ShardSet:
    """The shards of one stream with their per-shard sample counts of the selected split (from index.json)."""

    urls: list[str]
    counts: list[int]
    label_names: list[str]
    modality: str
    split: str
    sha256: list[str] = field(default_factory=list)  # per url, from index.json ("" = unknown)
    sizes: list[int] = field(default_factory=list)  # samples per url, all splits, from index.json (-1 = unknown)
    image_build: dict = field(default_factory=dict)  # index.json build.image: how the builder stored 2D images

    @property
    def total(self) -> int:
        return sum(self.counts)


def _load_index_file(path: Path | str, allow_pipe: bool = True) -> dict:
    if isinstance(path, str) and remote.is_remote(path):  # http(s)://, s3-style URL or pipe:CMD
        return check_index(remote.fetch_json(path, allow_pipe), path)
    path = Path(path)
    if path.is_dir() or path.name == INDEX_NAME:
        return read_index(path if path.is_dir() else path.parent)
    try:
        doc = json.loads(path.read_text())  # e.g. a part index (index.part0of2.json)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ShardIndexError(f"{path}: not valid JSON ({e})") from None
    return check_index(doc, str(path))


def _expand(spec: str) -> list[str]:
    import webdataset as wds

    return wds.shardlists.expand_urls(spec)


def find_index(spec: str | list[str], index_path: str = "", allow_pipe: bool = True) -> tuple[dict, str]:
    """(index document, where it was read) of a shard spec: `index_path` when given, else the index.json of a
    shard dir or folder URL, or the one beside the first shard of a brace spec / URL list."""
    if index_path:
        return _load_index_file(index_path if remote.is_remote(index_path) else Path(index_path), allow_pipe), index_path
    if isinstance(spec, str) and Path(spec).is_dir():
        return read_index(spec), str(Path(spec) / INDEX_NAME)
    if isinstance(spec, str) and remote.is_folder_url(spec):
        where = remote.join(spec, INDEX_NAME)
        return _load_index_file(where, allow_pipe), where
    first = spec[0] if isinstance(spec, list) else _expand(spec)[0]
    if remote.is_url(first):
        where = remote.index_beside(first)
        return _load_index_file(where, allow_pipe), where
    d = Path(first).parent
    if not (d / INDEX_NAME).exists():
        raise FileNotFoundError(f"shards {spec!r}: no {INDEX_NAME} in {d}; set data.index to the index of "
                                "remote or pipe: shards")
    return read_index(d), str(d / INDEX_NAME)


def _listed(spec: str | list[str], index_path: str, allow_pipe: bool) -> tuple[dict, str, list[str], list[dict]]:
    """(index, where, shard urls, the index entry of each url)."""
    if not spec:
        raise ValueError("data shards: empty shard spec (set data.train_shards / data.val_shards)")
    index, where = find_index(spec, index_path, allow_pipe)
    if not isinstance(index.get("shards"), list):
        raise ValueError(f"{where}: no 'shards' list")
    entries = {sh["name"]: sh for sh in index["shards"]}
    if isinstance(spec, str) and Path(spec).is_dir():
        urls = [str(Path(spec) / name) for name in entries]
    elif isinstance(spec, str) and remote.is_folder_url(spec):
        urls = [remote.join(spec, name) for name in entries]
    else:
        urls = list(spec) if isinstance(spec, list) else _expand(spec)
    listed = []
    for url in urls:
        # match the index entry by file name (URLs and pipe commands carry it as a path component)
        hit = sorted({t for t in re.findall(r"[^/\s:]+", url) if t in entries})
        if len(hit) != 1:
            raise ValueError(f"shard {url!r}: {'not listed' if not hit else 'ambiguous'} in {where}")
        listed.append(entries[hit[0]])
    return index, where, urls, listed


def resolve_shards(spec: str | list[str], split: str, index_path: str = "", allow_pipe: bool = True) -> ShardSet:
    """A shard dir (with index.json), a folder URL (with index.json), a brace spec / URL / pipe spec, or a list of
    URLs -> ShardSet. The index of a URL spec is fetched from beside it (see medvlp.data_shards.remote)."""
    index, where, urls, listed = _listed(spec, index_path, allow_pipe)
    counts = [int(e.get("splits", {}).get(split, 0)) for e in listed]
    if sum(counts) == 0:
        raise ValueError(f"shards {spec!r}: split {split!r} has no samples (index {where}: {index.get('splits')})")
    return ShardSet(urls, counts, list(index.get("label_names", [])), index.get("modality", ""), split,
                    [str(e.get("sha256", "")) for e in listed], [int(e.get("count", -1)) for e in listed],
                    dict((index.get("build") or {}).get("image") or {}))


# ------------------------------------------------------------------------------------------------ samples
def _tar_message(url: str, exn: BaseException) -> str:
    msg = str(exn.args[0]) if exn.args else str(exn)
    return f"{Path(url).name if not remote.is_remote(url) else url}: unreadable tar: {type(exn).__name__}: {msg}"


def iter_shard(url: str | Path, members: Iterable[str] | None = None
               ) -> Iterator[tuple[str, dict | None, str | None]]:
    """(key, member dict, None) per sample of one shard in tar order; for a shard that cannot be read to its end,
    one last (key of the sample being read, None, message naming the shard): that partial sample is dropped.
    `members`: only these extensions are read (a sample missing all of them is not yielded). The shard is opened
    with webdataset's `gopen` (local path, URL or pipe: spec) and read as a stream, members as the stream skips
    them (webdataset's ``__meta__`` names, non-regular members, names without an extension)."""
    from webdataset.gopen import gopen

    url = str(url)
    keep = None if members is None else {m.lower() for m in members}
    cur: dict | None = None
    try:
        with gopen(url) as stream, tarfile.open(fileobj=stream, mode="r|*") as tf:
            for m in tf:
                key, ext = split_member(m.name)
                if not m.isreg() or key is None or _META.match(m.name):
                    continue
                ext = ext.lower()
                if keep is not None and ext not in keep:
                    continue
                if cur is not None and cur["__key__"] != key:
                    yield cur["__key__"], cur, None
                    cur = None
                cur = cur or {"__key__": key, "__url__": url}
                if ext in cur:
                    raise tarfile.TarError(f"{m.name}: member {ext!r} of sample {key!r} appears twice")
                cur[ext] = tf.extractfile(m).read()
    except (tarfile.TarError, OSError, EOFError) as e:
        yield (cur or {}).get("__key__", Path(url).name), None, _tar_message(url, e)
        return
    if cur is not None:
        yield cur["__key__"], cur, None


def iter_raw(urls: Iterable[str | Path], members: Iterable[str] | None = None) -> Iterator[dict]:
    """Member dicts (``__key__``, ``__url__``, one entry per extension) of the shards in order; raises
    ShardReadError naming the shard when one cannot be read to its end."""
    members = None if members is None else tuple(members)
    for url in urls:
        for key, raw, err in iter_shard(url, members):
            if err is not None:
                raise ShardReadError(err)
            yield raw


def sample_doc(raw: dict) -> dict:
    """The parsed ``json`` member of a sample; SampleDecodeError naming the key when it is missing or unreadable."""
    if "json" not in raw:
        raise SampleDecodeError(f"sample {raw.get('__key__', '?')!r}: no 'json' member")
    try:
        doc = json.loads(raw["json"])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SampleDecodeError(f"sample {raw.get('__key__', '?')!r}: json member unreadable ({e})") from None
    if not isinstance(doc, dict):
        raise SampleDecodeError(f"sample {raw.get('__key__', '?')!r}: json member is not an object")
    return doc


def sample_split(doc: dict) -> str:
    """The split a sample's json document places it in (``train`` when it names none)."""
    return str((doc.get("meta") or {}).get("split", "train"))


OnBad = Callable[[dict, SampleDecodeError], None]


def iter_split(spec: str | list[str], split: str, *, index_path: str = "", members: Iterable[str] | None = None,
               on_bad: OnBad | None = None, allow_pipe: bool = True) -> Iterator[tuple[dict, dict]]:
    """(member dict, parsed json) of every sample of `split`, in shard and tar order; shards the index gives no
    sample of the split are not opened. A sample whose json is missing or unreadable goes to `on_bad(raw, err)`
    (default: raise). `members`: extensions to read besides ``json`` (None: all)."""
    ss = resolve_shards(spec, split, index_path, allow_pipe)
    want = None if members is None else {"json", *members}
    for raw in iter_raw([u for u, c in zip(ss.urls, ss.counts) if c > 0], want):
        try:
            doc = sample_doc(raw)
        except SampleDecodeError as e:
            if on_bad is None:
                raise
            on_bad(raw, e)
            continue
        if sample_split(doc) == split:
            yield raw, doc


def iter_samples(spec: str | list[str], split: str | None = None, *, index_path: str = "") -> Iterator[Sample]:
    """Every sample of `split` (None: of every split) decoded, in order; raises SampleDecodeError on a corrupt one
    (ShardReadError on an unreadable shard)."""
    if split is not None:
        for raw, _ in iter_split(spec, split, index_path=index_path):
            yield decode_sample(raw)
        return
    _, _, urls, _ = _listed(spec, index_path, True)
    for raw in iter_raw(urls):
        yield decode_sample(raw)


def shard_keys(url: str | Path) -> list[str]:
    """Sample keys of one shard in tar order, from its member names (no member data is read)."""
    keys: list[str] = []
    with tarfile.open(url, "r:") as tf:
        for m in tf:
            key = split_member(m.name)[0]
            if m.isfile() and key is not None and (not keys or keys[-1] != key):
                keys.append(key)
    return keys


__all__ = ["ShardReadError", "ShardSet", "find_index", "iter_raw", "iter_samples", "iter_shard", "iter_split",
           "resolve_shards", "sample_doc", "sample_split", "shard_keys", "split_member"]
