"""Online streaming of WebDataset shards: split by rank and worker, filter the split, shuffle, decode, augment,
batch; deterministic, resumable at a step, and robust to corrupt samples.

    loader = make_loader(cfg, rank=r, world_size=w, tokenizer=tok, epoch=e, start_step=k)
    for batch in loader: ...            # exactly loader.steps_per_epoch - k batches
    loader.stats, loader.state_dict()  # corrupt counts; {"epoch", "step"}

Slots. Each rank runs ``W = max(cfg.workers, 1)`` worker slots (DataLoader workers, or the main process when
``workers == 0``). Slot ``w`` of rank ``r`` is a `webdataset` pipeline whose every RNG is seeded from
``(cfg.seed, epoch, r, w)`` (webdataset's defaults would mix in time and pid):

  shards -> tar samples -> split filter -> [modulo filter] -> [shuffle] -> position -> skip -> decode+augment
  -> batch -> [quota]

* Resampled (``train and cfg.resampled``): every slot draws shards with replacement (only shards holding samples
  of the split). An epoch is ``samples_per_epoch`` global samples (0 = the split size from index.json), so a
  rank yields ``samples_per_epoch // (batch_size * world_size)`` batches; slot ``w`` yields the batches of the
  steps ``j`` with ``j % W == w``.
* Exactly once (``not resampled`` or ``not train``): the shard list (shuffled per epoch with ``(seed, epoch)``
  when training, index order for eval) is split by rank, then by worker: ``shards[r::world][w::W]``. If there
  are fewer shards than ``world * W`` slots, every slot reads all shards and keeps the samples whose position in
  the split is ``== r * W + w  (mod world * W)``. The last partial batch of every slot is kept, so ranks may yield
  different numbers of batches (``steps_per_epoch`` is this rank's count, from index.json).

Order. The main process merges the slots' batches in a fixed schedule (round robin over the slots that still
have batches, the counts coming from index.json), not in the order the DataLoader happens to deliver them, so
the sequence of batches is a function of the config alone.

Augmentation. The generator of the sample at position ``p`` of slot ``w`` (its index after the shuffle) is
seeded from ``(seed, epoch, rank, w, p)``: skipping samples does not change any later sample.

Resume. ``start_step=k`` makes each slot skip its first batches' worth of *raw* samples (after the shuffle,
before decoding, so skipping is cheap) and starts the merge schedule at step ``k``; the batches are then exactly
those an uninterrupted loader yields from step k. One documented exception: a corrupt sample inside the
skipped prefix was dropped (and replaced by the next sample) in the uninterrupted run, so that slot's later
batches shift by one sample per such corrupt sample.

Persistent workers (``make_loader(..., persistent=True)``; pretraining sets it from ``data.persistent_workers``).
Each slot streams its epoch, then plans and streams the following epochs in the same process (an endless
DataLoader iterator; no worker is respawned per epoch). Batches carry their epoch; the main process sorts them by
(epoch, slot), and ``loader.next_epoch()`` is the next epoch's loader on the same workers. Every seed above holds
the epoch, so each epoch's batches equal those of ``make_loader(..., epoch=e)``.

Corrupt samples (bad json, undecodable member, wrong members for the modality, bad label value, unreadable tar)
are skipped, counted and the first ``cfg.log_corrupt`` per slot logged with their key. Counts travel in-band
with each batch (and a final end marker per slot) and are summed by the main process into ``loader.stats``.
In the modulo split every slot reads every shard, so a bad json counts in the slot owning its raw position and
an unreadable tar only in rank 0's slot 0. Samples skipped on resume are not decoded, hence not counted.

Batch members. ``cfg.members`` (default none) adds ground truth from each sample's json to the batch (boxes, class
index, organ labels / sentences, slide composition, ...; see `medvlp.data_shards.members`). They are decoded after the
transform and draw no random numbers, so every other batch entry is the same with or without them. A requested
member that a sample lacks stops the stream with a `MemberError` naming the member and the sample key.

Guards (medvlp.data_shards.guard). A slot meeting ``data.max_bad_in_row`` unreadable shards or corrupt samples in a row
(no good one between) stops the stream with `DataStreamError` naming the last one, so a data set that cannot be
read fails instead of being drawn from forever; a tar that ends early without an error (cut at a block boundary,
zeroed, empty: fewer samples than index.json lists) and a sample without its ``json`` member count as corrupt.
``data.verify`` checks each shard's sha256 against index.json when a slot first opens it (``data.on_mismatch``:
skip and count, or fail). ``make_loader(..., stop=StopSignal())``: once set (safe from a signal handler), iterating
raises `StreamStopped` within one sample's work, in DataLoader workers too. ``data.allow_pipe=false`` refuses
``pipe:`` specs, which run a shell command.

Shape legend: B batch, K labels, S image side, D/H/W volume, N patches (padded to the bag maximum), d feature
dim, L tokens.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import random
import re
from collections import deque
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Iterator

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from medvlp.data_shards.config import DataConfig
from medvlp.data_shards.guard import (BadRun, DataStreamError, ShardVerifier, StopSignal, StreamStopped, as_stop_check,
                               check_pipe_allowed)
from medvlp.data_shards.members import MemberContext, MemberError, MemberSet
from medvlp.data_shards.reader import ShardSet, resolve_shards, split_member  # noqa: F401 (resolve_shards re-exported)
from medvlp.data_shards.schema import MODALITY_MEMBER, Sample, SampleDecodeError, decode_sample
from medvlp.data_shards.transforms import SampleTransform, collate_bags
from medvlp.data_shards import remote

log = logging.getLogger(__name__)

# RNG purposes: each stream of random numbers gets its own seed sequence.
_SHARD_DRAW, _SHUFFLE, _AUGMENT, _SHARD_ORDER = 1, 2, 3, 4
# The member a sample of each modality must carry.
_END = "__end_of_slot__"


def stream_seed(*parts: int) -> int:
    """A 63-bit seed from integer parts (seed, epoch, rank, ...), independent of time and pid."""
    ss = np.random.SeedSequence([int(p) % (1 << 64) for p in parts])
    return int(ss.generate_state(1, np.uint64)[0] >> np.uint64(1))


# ---------------------------------------------------------------------------------------- slot planning
@dataclass
class SlotPlan:
    """What one worker slot of this rank reads and yields this epoch."""

    urls: list[str]  # shards it reads (drawn with replacement when resampled)
    modulo: tuple[int, int] | None  # (slot, n_slots): keep split positions p with p % n_slots == slot
    n_batches: int  # batches it yields in the whole epoch
    skip_batches: int  # batches before start_step, skipped as raw samples


def _round_robin(counts: list[int]) -> list[int]:
    """Slot id of every step: round robin over the slots that still have batches."""
    return [w for r in range(max(counts, default=0)) for w in range(len(counts)) if counts[w] > r]


def epoch_steps(global_samples: int, batch_size: int, world_size: int) -> int:
    """Steps of a resampled epoch of `global_samples` at `batch_size` per rank; ValueError when that is none."""
    steps = global_samples // (batch_size * world_size)
    if steps == 0:
        raise ValueError(f"samples_per_epoch: {global_samples} global samples give no batch of "
                         f"batch_size {batch_size} x world_size {world_size}")
    return steps


def plan_slots(shards: ShardSet, cfg: DataConfig, *, rank: int, world_size: int, epoch: int, start_step: int,
               resampled: bool, train: bool) -> tuple[list[SlotPlan], list[int]]:
    """Per-slot plans of this rank and the slot schedule of the remaining steps (from start_step)."""
    n_workers, b = max(cfg.workers, 1), cfg.batch_size
    if resampled:
        steps = epoch_steps(cfg.samples_per_epoch or shards.total, b, world_size)
        urls = [u for u, c in zip(shards.urls, shards.counts) if c > 0]
        counts = [len(range(w, steps, n_workers)) for w in range(n_workers)]
        plans = [SlotPlan(urls, None, c, 0) for c in counts]
    else:
        order = list(range(len(shards.urls)))
        if train:  # same permutation on every rank, so the rank split stays a partition
            random.Random(stream_seed(cfg.seed, epoch, _SHARD_ORDER)).shuffle(order)
        n_slots = world_size * n_workers
        plans = []
        for w in range(n_workers):
            if len(order) >= n_slots:
                mine = order[rank::world_size][w::n_workers]
                n = sum(shards.counts[i] for i in mine)
                plans.append(SlotPlan([shards.urls[i] for i in mine], None, math.ceil(n / b), 0))
            else:  # fewer shards than slots: every slot reads all shards, samples split by position
                slot = rank * n_workers + w
                n = len(range(slot, shards.total, n_slots))
                plans.append(SlotPlan([shards.urls[i] for i in order], (slot, n_slots), math.ceil(n / b), 0))
    schedule = _round_robin([p.n_batches for p in plans])
    for w, p in enumerate(plans):
        p.skip_batches = sum(1 for x in schedule[:start_step] if x == w)
    return plans, schedule[start_step:]


# ------------------------------------------------------------------------------------ worker-side stages
def _describe_tar_error(exn: Exception) -> str:
    """'shard-000001.tar: ReadError: invalid header' from webdataset's (message, stream, url) exception args."""
    args = [a for a in exn.args if isinstance(a, str)]
    url = next((a for a in reversed(args[1:]) if "/" in a or a.endswith(".tar")), "")
    msg = args[0] if args else str(exn)
    return f"{url + ': ' if url and url not in msg else ''}{type(exn).__name__}: {msg}"[:400]


class _Tally:
    """Corrupt samples of one slot: counted, the first few logged; deltas go out with each batch."""

    def __init__(self, slot: int, log_first: int, shared_shards: bool = False, run: BadRun | None = None) -> None:
        self.slot, self.log_first, self.shared_shards = slot, log_first, shared_shards
        self.count, self.keys, self._sent = 0, [], 0
        self.run = run or BadRun(1 << 62)  # consecutive bad shards / samples (see medvlp.data_shards.guard)

    def bad(self, key: str, why: str) -> None:
        self.count += 1
        if len(self.keys) < 20:
            self.keys.append(key)
        if self.count <= self.log_first:
            log.warning("skipping corrupt sample %s (slot %d): %s", key, self.slot, why)

    def on_tar_error(self, exn: Exception) -> bool:  # webdataset handler: True = continue
        what = _describe_tar_error(exn)
        if not (self.shared_shards and self.slot != 0):  # modulo split: global slot 0 counts shard errors
            self.bad(f"<tar {what[:160]}>", what)
        self.run.bad_shard(what)
        return True

    def on_bad_shard(self, url: str, exn: Exception) -> None:  # checksum mismatch / unreadable before the tar reader
        self.on_tar_error(exn if url in str(exn) else type(exn)(f"{exn} ({url})"))

    def take(self) -> tuple[int, list[str]]:
        n, start = self.count - self._sent, self._sent
        self._sent = self.count
        return n, self.keys[start:start + n] if start < len(self.keys) else []


def _select_split(src: Iterator[dict], split: str, tally: _Tally, owner: tuple[int, int] | None) -> Iterator[dict]:
    """Samples of `split`. With `owner` = (slot, n_slots) every slot reads the same shards (modulo split), so a
    bad json is counted only by the slot that owns its raw position: each corrupt sample counts once per rank set."""
    for i, raw in enumerate(src):
        key = raw.get("__key__", "?")
        tally.run.shard_ok()  # a sample came out of a readable tar
        try:
            if "json" not in raw:  # every sample has one: a tar cut between members loses it (split unknown)
                raise ValueError(f"no 'json' member (members: {sorted(k for k in raw if not k.startswith('__'))})")
            doc = json.loads(raw["json"])
            sample_split = (doc.get("meta") or {}).get("split", "train")
        except Exception as e:  # noqa: BLE001 - bad json is a corrupt sample, not a crash
            if owner is None or i % owner[1] == owner[0]:
                tally.bad(key, f"member 'json': {type(e).__name__}: {e}")
            tally.run.bad_sample(f"sample {key!r}: member 'json': {type(e).__name__}")
            continue
        tally.run.check_stop()
        if sample_split == split:
            yield raw


def _open_urls(src: Iterator[dict], tally: _Tally, policy: remote.RemotePolicy) -> Iterator[dict]:
    """webdataset's url_opener, with http(s) shards opened by `remote.open_http_shard` (transfer limits, retries
    with backoff across an outage); an outage past `data.remote_outage_s` ends the stream (RemoteOutage)."""
    from webdataset.gopen import gopen

    outage = remote.Outage(policy)
    for sample in src:
        url = sample["url"]
        try:
            if url.lower().startswith(("http://", "https://")):
                stream = remote.open_http_shard(url, policy, outage, tally.run.check_stop)
            else:
                stream = gopen(url)
        except (DataStreamError, StreamStopped):
            raise
        except Exception as exn:  # noqa: BLE001 - an unreadable shard: counted by the handler
            exn.args = exn.args + (url,)
            if tally.on_tar_error(exn):
                continue
            break
        yield {**sample, "stream": stream}


def _read_tars(src: Iterator[dict], tally: _Tally, verifier: ShardVerifier | None,
               sizes: dict[str, int], policy: remote.RemotePolicy | None = None) -> Iterator[dict]:
    """webdataset's tarfile_to_samples with more checks: the shard's sha256 (data.verify), and a tar that ends
    early without an error (zeroed, empty, or cut at a block boundary: tarfile reads that as a clean end of the
    archive) holding fewer samples than index.json lists is counted as unreadable, naming the shard."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    streams = _open_urls(src, tally, policy or remote.RemotePolicy())
    if verifier is not None:
        streams = verifier(streams, tally.on_bad_shard)
    current: dict[str, Any] = {"url": "?", "keys": 0, "last": None}

    def watch(opened: Iterator[dict]) -> Iterator[dict]:
        for sample in opened:
            current.update(url=sample["url"], keys=0, last=None)
            yield sample

    def count(files: Iterator[dict]) -> Iterator[dict]:
        for f in files:
            if f == {}:  # end of one shard, reached without a read error
                want, got = sizes.get(current["url"], -1), current["keys"]
                if got == 0 or 0 <= got < want:
                    tally.on_tar_error(ValueError(f"{current['url']}: {got} of {want if want >= 0 else '?'} "
                                                  "samples, then the tar ends (truncated, zeroed or empty)"))
                current.update(keys=0, last=None)
            else:
                key = split_member(f.get("fname", ""))[0]
                if key != current["last"]:
                    current.update(keys=current["keys"] + 1, last=key)
            yield f

    files = count(tar_file_expander(watch(streams), handler=tally.on_tar_error))
    yield from group_by_keys(files, keys=split_member, handler=tally.on_tar_error)


def _keep_modulo(src: Iterator[dict], slot: int, n_slots: int) -> Iterator[dict]:
    for p, raw in enumerate(src):
        if p % n_slots == slot:
            yield raw


def _numbered(src: Iterator[dict]) -> Iterator[tuple[int, dict]]:
    yield from enumerate(src)


def _label_vector(s: Sample, label_names: list[str]) -> torch.Tensor:
    out = []  # a list, then one tensor: item assignment into a tensor costs ~2 us a label
    for name in label_names:
        v = s.labels.get(name)
        if v is None:
            out.append(0.0)  # missing -> 0
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v not in (1, 0, -1):
            raise ValueError(f"label {name!r} = {v!r} is not one of 1, 0, -1")
        out.append(float(v))
    return torch.tensor(out, dtype=torch.float32)


FOREIGN_IN_ROW = 8  # this many samples in a row holding another modality's member: the index is wrong


def _foreign_members(s: Sample, need: str) -> list[str]:
    """The other modalities' members a sample holds instead of its own (`need`)."""
    return sorted({m for m in MODALITY_MEMBER.values() if m != need and getattr(s, m, None) is not None})


def _wrong_index(modality: str, need: str, key: str, has: list[str]) -> MemberError:
    """`FOREIGN_IN_ROW` samples in a row hold another modality's member instead of their own: the index names the
    wrong modality (one such sample is a stray, skipped as corrupt; all of them would be skipped until
    `data.max_bad_in_row`)."""
    return MemberError(f"index.json says modality {modality!r} (samples need a {need!r} member), but sample {key!r} "
                       f"holds {'/'.join(has)}: the index names the wrong modality for these shards; rebuild them, "
                       "or check them with `medvlp shards inspect --strict`")


class _DecodeTransform:
    """(position, raw member dict) -> per-sample dict; corrupt samples are counted and dropped."""

    def __init__(self, ctx: "SlotStream", slot: int, tally: _Tally, epoch: int) -> None:
        self.ctx, self.slot, self.tally, self.epoch = ctx, slot, tally, epoch

    def __call__(self, src: Iterator[tuple[int, dict]]) -> Iterator[dict]:
        c = self.ctx
        foreign = 0  # samples in a row that hold another modality's member instead of this one's
        for pos, raw in src:
            key = raw.get("__key__", "?")
            try:
                s = decode_sample(raw, lazy_image=getattr(c.transform, "lazy_image", False))
                need = MODALITY_MEMBER.get(c.modality)
                if need and getattr(s, need) is None:
                    has = _foreign_members(s, need)
                    foreign = foreign + 1 if has else 0
                    if foreign >= FOREIGN_IN_ROW:
                        raise _wrong_index(c.modality, need, key, has)
                    raise SampleDecodeError(f"sample {key!r}: no {need} member for modality {c.modality!r}")
                foreign = 0
                labels = _label_vector(s, c.label_names)
                rng = np.random.default_rng(np.random.SeedSequence(
                    [c.seed % (1 << 64), self.epoch, c.rank, self.slot, pos, _AUGMENT]))
                out = c.transform(s, rng)
            except MemberError:  # the shards do not fit their index: a data set error, not one bad sample
                raise
            except Exception as e:  # noqa: BLE001 - any member/transform failure skips only this sample
                self.tally.bad(key, f"{type(e).__name__}: {e}")
                self.tally.run.bad_sample(f"sample {key!r}: {type(e).__name__}: {str(e)[:200]}")
                continue
            if c.members:  # a requested field the sample lacks is a config / data set mismatch: MemberError stops
                out["_members"] = c.members.decode(s, out)
            self.tally.run.sample_ok()
            yield {"key": key, "text": s.text, "labels": labels, **out}


def _stack(name: str, items: list[torch.Tensor], keys: list[str]) -> torch.Tensor:
    shapes = {tuple(t.shape) for t in items}
    if len(shapes) > 1:
        raise ValueError(f"cannot batch {name!r} of shapes {sorted(shapes)} (keys {keys[:4]}...); "
                         "set data.volume_size / data.image_size so samples share a shape")
    if get_worker_info() is None:
        return torch.stack(items)
    # in a DataLoader worker, stack straight into shared memory: the batch then crosses to the main process
    # without the extra copy torch would make when pickling a private tensor (as torch's default_collate does)
    ref = items[0]
    storage = ref._typed_storage()._new_shared(len(items) * ref.numel(), device=ref.device)
    out = ref.new(storage).resize_(len(items), *ref.shape)
    return torch.stack(items, out=out)


def _collate_fast(samples: list[dict], keys: list[str]) -> dict[str, Any]:
    """The fast path's image members: the uint8 batch (or, with GPU decode, per sample its JPEG bytes or the
    image its worker made, and the drawn views) and the per-sample jitter vectors."""
    from medvlp.data_shards.fastpath import N_VIEW, harmonize

    out = {"image_aug": torch.stack([s["image_aug"] for s in samples])}
    if any("image_src" in s for s in samples):
        out["image_src"] = [(s.get("image_src"), s.get("image")) for s in samples]
        out["image_view"] = torch.stack([s.get("image_view", torch.zeros(N_VIEW, dtype=torch.int64))
                                         for s in samples])
    else:
        out["image"] = _stack("image", harmonize([s["image"] for s in samples]), keys)
    return out


def collate(samples: list[dict], label_names: list[str], tokenizer: Callable | None = None,
            members: MemberSet | None = None) -> dict[str, Any]:
    """Per-sample dicts -> one batch dict of tensors (slide bags zero-padded; requested members collated)."""
    keys = [s["key"] for s in samples]
    batch: dict[str, Any] = {"key": keys, "text": [s["text"] for s in samples],
                             "labels": torch.stack([s["labels"] for s in samples]), "label_names": list(label_names)}
    fast = "image_aug" in samples[0]  # data.pipeline=fast: uint8 images + per-sample jitter (fastpath)
    if fast:
        batch.update(_collate_fast(samples, keys))
    for name in ("image", "image_weak", "image_strong", "volume", "mask"):
        if name in samples[0] and not (fast and name == "image"):
            batch[name] = _stack(name, [s[name] for s in samples], keys)
    if "feats" in samples[0]:
        batch["feats"], batch["feats_mask"], batch["coords"] = collate_bags(
            [s["feats"] for s in samples], [s["coords"] for s in samples])
    if "_members" in samples[0] and members is not None:
        batch.update(members.collate([s["_members"] for s in samples], keys))
    if tokenizer is not None:
        tok_BL = tokenizer(batch["text"])
        if not torch.is_tensor(tok_BL) or tok_BL.dtype != torch.long or tok_BL.shape[0] != len(keys):
            raise TypeError(f"tokenizer must return a LongTensor (B={len(keys)}, L); got "
                            f"{getattr(tok_BL, 'dtype', type(tok_BL))} {tuple(getattr(tok_BL, 'shape', ()))}")
        batch["tokens"] = tok_BL
    return batch


def _zero_worker_seed() -> int:
    return 0  # the slot seed already holds rank and worker


class SlotStream(IterableDataset):
    """The per-slot webdataset pipeline; built inside the worker, where the slot (worker id) is known."""

    def __init__(self, plans: list[SlotPlan], cfg: DataConfig, *, rank: int, epoch: int, split: str,
                 modality: str, label_names: list[str], resampled: bool, train: bool,
                 transform: Callable, tokenizer: Callable | None, sha256: dict[str, str] | None = None,
                 sizes: dict[str, int] | None = None, replan: Callable[[int], list[SlotPlan]] | None = None) -> None:
        super().__init__()
        self.replan = replan  # epoch -> plans: the slot goes on to the next epochs (endless; None = one epoch)
        sha256, self.sizes = sha256 or {}, sizes or {}
        self.plans, self.rank, self.epoch, self.split = plans, rank, epoch, split
        self.seed, self.batch_size, self.shuffle_buffer = cfg.seed, cfg.batch_size, cfg.shuffle_buffer
        self.log_corrupt, self.modality, self.label_names = cfg.log_corrupt, modality, label_names
        self.resampled, self.train, self.transform, self.tokenizer = resampled, train, transform, tokenizer
        self.members = MemberSet(cfg.members, MemberContext(tuple(label_names), modality)) if cfg.members else None
        self.max_bad_in_row, self.stop = cfg.max_bad_in_row, None  # stop: a StopSignal, set by the loader
        self.verifier = ShardVerifier(sha256, cfg.on_mismatch) if cfg.verify else None
        self.remote_policy = remote.RemotePolicy.from_config(cfg)

    def pipeline(self, slot: int, tally: _Tally, plans: list[SlotPlan] | None = None,
                 epoch: int | None = None) -> wds.DataPipeline:
        plans = self.plans if plans is None else plans
        epoch = self.epoch if epoch is None else epoch
        p, b = plans[slot], self.batch_size
        if self.resampled:
            source = wds.ResampledShards(p.urls, seed=stream_seed(self.seed, epoch, self.rank, slot, _SHARD_DRAW),
                                         worker_seed=_zero_worker_seed, deterministic=True)
        else:
            source = wds.SimpleShardList(p.urls)  # already this slot's shards, in order (no seed: no reshuffle)
        shuffle = None
        if self.train and self.shuffle_buffer > 0:
            rng = random.Random(stream_seed(self.seed, epoch, self.rank, slot, _SHUFFLE))
            shuffle = wds.shuffle(self.shuffle_buffer, self.shuffle_buffer, rng=rng)
        return wds.DataPipeline(
            source,
            partial(_read_tars, tally=tally, verifier=self.verifier, sizes=self.sizes, policy=self.remote_policy),
            partial(_select_split, split=self.split, tally=tally, owner=p.modulo),
            partial(_keep_modulo, slot=p.modulo[0], n_slots=p.modulo[1]) if p.modulo else None,
            shuffle,
            _numbered,
            wds.slice(p.skip_batches * b, None),
            _DecodeTransform(self, slot, tally, epoch),
            wds.batched(b, collation_fn=partial(self._collate, tally=tally, slot=slot, epoch=epoch), partial=True),
            wds.slice(p.n_batches - p.skip_batches) if self.resampled else None,
        )

    def _collate(self, samples: list[dict], tally: _Tally, slot: int, epoch: int) -> dict[str, Any]:
        batch = collate(samples, self.label_names, self.tokenizer, self.members)
        batch["n_corrupt"], batch["corrupt_keys"] = tally.take()
        batch["_slot"], batch["_epoch"] = slot, epoch
        return batch

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        slot = info.id if info is not None else 0
        epoch, plans = self.epoch, self.plans
        while True:  # one epoch, or (replan) every epoch from this one on, in the same worker process
            faulted = yield from self._one_epoch(slot, plans, epoch)
            if self.replan is None or faulted:
                return
            epoch += 1
            plans = self.replan(epoch)

    def _one_epoch(self, slot: int, plans: list[SlotPlan], epoch: int) -> Iterator[dict]:
        p = plans[slot]
        # in the modulo split the owner of a shard-level error is global slot 0 (rank 0, worker 0)
        run = BadRun(self.max_bad_in_row, as_stop_check(self.stop))
        tally = _Tally(p.modulo[0] if p.modulo else slot, self.log_corrupt, shared_shards=p.modulo is not None,
                       run=run)
        fault: dict[str, Any] = {}
        try:
            if p.urls and p.skip_batches < p.n_batches:
                yield from self.pipeline(slot, tally, plans, epoch)
        except (DataStreamError, StreamStopped) as e:  # travels in-band: the main process raises it, one line
            fault = {"_fault": type(e).__name__, "_message": str(e)}
        n, keys = tally.take()
        yield {_END: True, "_slot": slot, "_epoch": epoch, "n_corrupt": n, "corrupt_keys": keys, **fault}
        return bool(fault)


# ------------------------------------------------------------------------------------------ main side
class _Source:
    """The batches coming out of the slots, sorted by (epoch, slot); shared by the epochs of a persistent loader,
    whose one DataLoader iterator (and so its worker processes) lives across epochs."""

    def __init__(self) -> None:
        self.it: Iterator[dict] | None = None
        self.loader: DataLoader | None = None
        self.bufs: dict[tuple[int, int], deque] = {}
        self.ended: set[tuple[int, int]] = set()
        self.exhausted = False
        self.stats: dict[int, dict[str, Any]] = {}

    def stats_for(self, epoch: int) -> dict[str, Any]:
        return self.stats.setdefault(epoch, {"samples": 0, "corrupt": 0, "corrupt_keys": []})

    def buf(self, epoch: int, slot: int) -> deque:
        return self.bufs.setdefault((epoch, slot), deque())

    def done(self, epoch: int, slot: int) -> bool:
        return self.exhausted or (epoch, slot) in self.ended

    def forget(self, epoch: int) -> None:
        self.bufs = {k: q for k, q in self.bufs.items() if k[0] != epoch}
        self.ended = {k for k in self.ended if k[0] != epoch}
        self.stats.pop(epoch - 1, None)  # keep this epoch's (the loader reports it), drop older ones

    def close(self) -> None:
        it, self.it, self.loader = self.it, None, None
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


class StreamLoader:
    """Iterable of batches in a fixed order; `stats` (corrupt counts over all workers) and `state_dict()`.

    Persistent (``make_loader(..., persistent=True)``): the slots stream every epoch from this one on, and
    `next_epoch()` gives the next epoch's loader on the same DataLoader workers (never respawned); each epoch's
    batches are exactly those of a fresh ``make_loader(..., epoch=e)``. A persistent loader's epoch is iterated
    once."""

    def __init__(self, dataset: SlotStream, schedule: list[int], *, workers: int, epoch: int, start_step: int,
                 steps_per_epoch: int, seed: int, stop: Any = None, finish: Callable | None = None,
                 replan: Callable[[int], tuple[list[SlotPlan], list[int]]] | None = None,
                 source: _Source | None = None) -> None:
        self.dataset, self.schedule, self.workers = dataset, schedule, workers
        self.finish = finish  # batch -> batch in this process (the fast path's float / jitter / normalisation)
        self.epoch, self.start_step, self.step = epoch, start_step, start_step
        self.steps_per_epoch, self.seed = steps_per_epoch, seed
        self.label_names = dataset.label_names
        self.stats: dict[str, Any] = {"samples": 0, "corrupt": 0, "corrupt_keys": []}
        self._stop_arg, self._stop = stop, as_stop_check(stop)
        self._replan = replan  # epoch -> (plans, schedule from step 0)
        self.persistent = dataset.replan is not None
        self._shared = source if source is not None else (_Source() if self.persistent else None)
        self._iterated = False

    def _check_stop(self) -> None:
        if self._stop is not None and self._stop():
            raise StreamStopped("data stream: stop requested")

    def state_dict(self) -> dict[str, int]:
        """Data position: `make_loader(..., epoch=d["epoch"], start_step=d["step"])` continues from here."""
        return {"epoch": self.epoch, "step": self.step}

    def __len__(self) -> int:
        return len(self.schedule)

    def next_epoch(self) -> StreamLoader:
        """The loader of the next epoch from its step 0 (persistent: on the same worker processes)."""
        if self._replan is None:
            raise RuntimeError("this loader was not made by make_loader; make the next epoch's loader with it")
        plans, schedule = self._replan(self.epoch + 1)
        if self.persistent:
            dataset = self.dataset
        else:
            dataset = copy.copy(self.dataset)
            dataset.plans, dataset.epoch = plans, self.epoch + 1
        return StreamLoader(dataset, schedule, workers=self.workers, epoch=self.epoch + 1, start_step=0,
                            steps_per_epoch=sum(p.n_batches for p in plans), seed=self.seed, stop=self._stop_arg,
                            finish=self.finish, replan=self._replan, source=self._shared)

    def worker_pids(self) -> list[int]:
        """Process ids of the live DataLoader workers ([] with workers=0 or before iterating)."""
        src = self._shared
        return [w.pid for w in getattr(src.it, "_workers", [])] if src is not None else []

    def close(self) -> None:
        """Stop a persistent loader's workers now (they also stop when the loader is garbage collected)."""
        if self._shared is not None:
            self._shared.close()

    def _source(self) -> Iterator[dict]:
        if self.workers == 0:
            return iter(self.dataset)
        # our own generator: DataLoader would otherwise draw its base seed from (and advance) the global torch RNG
        g = torch.Generator().manual_seed(stream_seed(self.seed, self.epoch, 0))
        return iter(DataLoader(self.dataset, batch_size=None, num_workers=self.workers, generator=g,
                               pin_memory=torch.cuda.is_available(), persistent_workers=False))

    def _account(self, item: dict, stats: dict[str, Any]) -> None:
        n, keys = item.pop("n_corrupt"), item.pop("corrupt_keys")
        stats["corrupt"] += int(n)
        room = 20 - len(stats["corrupt_keys"])
        stats["corrupt_keys"].extend(list(keys)[:max(room, 0)])

    def __iter__(self) -> Iterator[dict]:
        if self.persistent:
            if self._iterated:
                raise RuntimeError(f"a persistent loader's epoch {self.epoch} is iterated once; "
                                   "next_epoch() gives the next one")
            src = self._shared
        else:
            src = _Source()
        self._iterated = True
        if src.it is None:
            src.it = self._source()
        ep = self.epoch
        self.step = self.start_step
        self.stats = src.stats_for(ep)
        n_slots = max(self.workers, 1)

        def pull() -> None:
            self._check_stop()
            try:
                item = next(src.it, None)
            except MemberError as e:  # from a DataLoader worker: its message carries the worker's traceback
                raise MemberError(_last_line(str(e))) from None
            if item is None:
                src.exhausted = True
                return
            epoch = item.pop("_epoch", ep)
            self._account(item, src.stats_for(epoch))
            slot = item.pop("_slot")
            if "_fault" in item:
                kind = {"StreamStopped": StreamStopped, "RemoteOutage": remote.RemoteOutage}.get(item["_fault"],
                                                                                                  DataStreamError)
                raise kind(item["_message"])  # the same type the worker saw (a remote outage stays one)
            if item.pop(_END, False):
                src.ended.add((epoch, slot))
            else:
                src.buf(epoch, slot).append(item)

        def emit(batch: dict) -> dict:
            self.step += 1
            self.stats["samples"] += len(batch["key"])
            return self.finish(batch) if self.finish is not None else batch

        for slot in self.schedule:
            q = src.buf(ep, slot)
            while not q and not src.done(ep, slot):
                pull()
            if q:
                yield emit(q.popleft())
        while not all(src.done(ep, w) for w in range(n_slots)):  # this epoch's end markers (and any extra batch)
            pull()
        while not self.persistent and not src.exhausted:  # one epoch: let the workers finish
            pull()
        queues = [src.buf(ep, w) for w in range(n_slots)]
        if any(queues):  # only when index.json undercounts the shards: say so, yield them in round robin
            log.warning("shards held more samples than index.json lists; yielding %d extra batches",
                        sum(len(q) for q in queues))
        while any(queues):
            for q in queues:
                if q:
                    yield emit(q.popleft())
        src.forget(ep)


def resolve_pipeline(pipeline: str, image_build: dict, image_size: int) -> str:
    """data.pipeline -> "fast" | "reference". auto: fast where the shards hold JPEGs the builder wrote with their
    shorter side resized to at least the training size (`shards build --resize shortest --image-size S
    --image-format jpeg`, recorded as index.json build.image), so no published number on today's PNG shards
    changes; the reference path otherwise."""
    if pipeline != "auto":
        return pipeline
    ok = (image_build.get("format") == "jpeg" and image_build.get("resize") == "shortest"
          and int(image_build.get("size") or 0) >= image_size)
    return "fast" if ok else "reference"


def _epoch_plan(shards: ShardSet, cfg: DataConfig, rank: int, world_size: int, resampled: bool, train: bool,
                epoch: int) -> tuple[list[SlotPlan], list[int]]:
    return plan_slots(shards, cfg, rank=rank, world_size=world_size, epoch=epoch, start_step=0, resampled=resampled,
                      train=train)


def _epoch_slot_plans(shards: ShardSet, cfg: DataConfig, rank: int, world_size: int, resampled: bool, train: bool,
                      epoch: int) -> list[SlotPlan]:
    return _epoch_plan(shards, cfg, rank, world_size, resampled, train, epoch)[0]


def _last_line(msg: str) -> str:
    line = msg.strip().splitlines()[-1] if msg.strip() else msg
    return re.sub(r"^(?:[\w.]+\.)?MemberError: ", "", line)


def make_loader(cfg: DataConfig, *, rank: int = 0, world_size: int = 1, tokenizer: Callable | None = None,
                epoch: int = 0, start_step: int = 0, train: bool = True, shards: str | list[str] | None = None,
                split: str | None = None, transform: Callable | None = None, stop: Any = None,
                device: torch.device | str | None = None, persistent: bool = False) -> StreamLoader:
    """The loader of one epoch of this rank (see the module doc for the semantics).

    shards: overrides cfg.train_shards (train) / cfg.val_shards or else cfg.train_shards (eval). A local dir, a
    folder URL (``https://host/set/``: index.json and shards fetched from it), a brace spec / URL (index.json beside
    the first shard, or cfg.index) or a ``pipe:`` spec (cfg.index names its index; see medvlp.data_shards.remote).
    split: overrides cfg.split. transform: ``(Sample, np.random.Generator) -> dict of tensors`` replacing the
    default `SampleTransform`. tokenizer: picklable ``list[str] -> LongTensor (B, L)``, applied in the workers.
    stop: a `medvlp.data_shards.guard.StopSignal` (checked in the workers too), an Event or a zero-arg callable (checked
    in this process); once set, iterating raises `StreamStopped` (see medvlp.data_shards.guard).
    device: where the fast path (data.pipeline=fast) turns its uint8 batches into normalised float (the training
    device; None = CPU) and, with data.decode_device auto/cuda on a GPU, decodes JPEGs (medvlp.data_shards.gpu_decode).
    The fast path serves single-view 2D streams with the default transform; others keep the reference path.
    persistent: the workers stream this epoch and every later one; `loader.next_epoch()` gives the next epoch's
    loader on the same processes (the batches are those of ``make_loader(..., epoch=epoch + 1)``).
    """
    cfg.validate()
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    if start_step < 0 or epoch < 0:
        raise ValueError(f"epoch {epoch} / start_step {start_step} must be >= 0")
    spec = shards if shards is not None else (cfg.train_shards if train else (cfg.val_shards or cfg.train_shards))
    split = split or cfg.split
    shard_set = resolve_shards(spec, split, cfg.index, cfg.allow_pipe)
    check_pipe_allowed(shard_set.urls, cfg.allow_pipe)
    modality = shard_set.modality or cfg.modality
    if shard_set.modality and shard_set.modality != cfg.modality:
        log.warning("data.modality is %r but the shards' index.json says %r; using %r",
                    cfg.modality, shard_set.modality, modality)
    resampled = train and cfg.resampled
    plans, schedule = plan_slots(shard_set, cfg, rank=rank, world_size=world_size, epoch=epoch,
                                 start_step=start_step, resampled=resampled, train=train)
    finish = None
    if transform is None and resolve_pipeline(cfg.pipeline, shard_set.image_build, cfg.image_size) == "fast" \
            and modality in ("cxr", "patho") and not cfg.pair_views:
        from medvlp.data_shards.fastpath import FastImageTransform, finish_batch
        from medvlp.data_shards.gpu_decode import use_gpu_decode

        transform = FastImageTransform(modality, cfg.image_size, train=train and cfg.augment, flip=cfg.flip,
                                       aug=cfg.aug, ship_jpeg=use_gpu_decode(cfg.decode_device, device))
        finish = partial(finish_batch, modality=modality, device=device)
    if transform is None:
        transform = SampleTransform(modality, cfg.image_size, train=train and cfg.augment, flip=cfg.flip,
                                    pair_views=cfg.pair_views, volume_size=cfg.volume_size,
                                    max_patches=cfg.max_patches, hu_windows=cfg.hu_windows, aug=cfg.aug)
    replan_args = (shard_set, cfg, rank, world_size, resampled, train)
    dataset = SlotStream(plans, cfg, rank=rank, epoch=epoch, split=split, modality=modality,
                         label_names=shard_set.label_names, resampled=resampled, train=train,
                         transform=transform, tokenizer=tokenizer,
                         sha256={u: h for u, h in zip(shard_set.urls, shard_set.sha256) if h},
                         sizes=dict(zip(shard_set.urls, shard_set.sizes)),
                         replan=partial(_epoch_slot_plans, *replan_args) if persistent else None)
    as_stop_check(stop)  # type check, here rather than in a worker
    # slots check it too: in this process (workers=0) any callable, across processes only a StopSignal
    dataset.stop = stop if cfg.workers == 0 or isinstance(stop, StopSignal) else None
    steps = sum(p.n_batches for p in plans)
    return StreamLoader(dataset, schedule, workers=cfg.workers, epoch=epoch, start_step=start_step,
                        steps_per_epoch=steps, seed=cfg.seed, stop=stop, finish=finish,
                        replan=partial(_epoch_plan, *replan_args))
