"""Streaming from shards: exactly-once splitting, determinism, resume, corrupt samples, split filter, batches."""
from __future__ import annotations

import json
import logging
from collections import Counter

import numpy as np
import pytest
import torch
import webdataset as wds

from medvlp.data_shards.config import DataConfig
from medvlp.data_shards.schema import Sample, encode_sample
from medvlp.data_shards.stream import make_loader, resolve_shards
from medvlp.data_shards.writer import FIXED_MTIME, sha256_file, write_index, write_shards, ShardInfo

LABELS = ["effusion", "nodule"]


def _cxr_samples(n: int, test_every: int = 5, seed: int = 0) -> list[Sample]:
    """Grey 20x24 radiograph-like samples; every `test_every`-th is in the test split (0 = none)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        labels = {"effusion": [1, 0, -1][i % 3]} if i % 2 else {"nodule": 1}  # missing labels -> 0
        out.append(Sample(key=f"t/s{i:03d}", text=f"report {i}", image=rng.integers(0, 256, (20, 24), dtype=np.uint8),
                          labels=labels, meta={"split": "test" if test_every and i % test_every == 0 else "train",
                                               "modality": "cxr"}))
    return out


def _build(tmp_path, samples: list[Sample], per_shard: int, modality: str = "cxr", name: str = "sh") -> str:
    d = tmp_path / name
    write_index(d, write_shards(samples, d, maxcount=per_shard), modality, LABELS, command="test")
    return str(d)


@pytest.fixture(scope="module")
def cxr_dir(tmp_path_factory) -> str:
    """60 samples (48 train, 12 test) in 6 shards of 10."""
    return _build(tmp_path_factory.mktemp("cxr"), _cxr_samples(60), per_shard=10)


def _cfg(d: str, **kw) -> DataConfig:
    base = dict(train_shards=d, batch_size=4, image_size=16, workers=0, shuffle_buffer=8, seed=3)
    return DataConfig(**{**base, **kw})


def _keys(batches) -> list[str]:
    return [k for b in batches for k in b["key"]]


# ------------------------------------------------------------------------------------------- exactly once
@pytest.mark.parametrize("per_shard", [10, 25])  # 6 shards >= 4 slots (shard split); 3 shards < 4 (modulo split)
@pytest.mark.parametrize("train", [False, True])
def test_non_resampled_every_sample_once_over_ranks_and_workers(tmp_path, per_shard, train):
    d = _build(tmp_path, _cxr_samples(60), per_shard)
    cfg = _cfg(d, workers=2, resampled=False)
    got = []
    for rank in range(2):
        loader = make_loader(cfg, rank=rank, world_size=2, train=train)
        batches = list(loader)
        assert len(batches) == loader.steps_per_epoch
        got += _keys(batches)
    want = [s.key for s in _cxr_samples(60) if s.split == "train"]
    assert sorted(got) == sorted(want)  # every train sample, none twice
    assert len(got) == len(set(got))


def test_eval_keeps_order_and_last_partial_batch(cxr_dir):
    loader = make_loader(_cfg(cxr_dir), train=False, split="test")
    batches = list(loader)
    assert [len(b["key"]) for b in batches] == [4, 4, 4]
    assert _keys(batches) == [f"t/s{i:03d}" for i in range(0, 60, 5)]  # index order, no shuffle
    loader = make_loader(_cfg(cxr_dir, batch_size=5), train=False, split="test")
    assert [len(b["key"]) for b in loader] == [5, 5, 2]
    assert loader.steps_per_epoch == 3


# ---------------------------------------------------------------------------------------------- resampled
def test_resampled_deterministic_and_epoch_dependent(cxr_dir):
    cfg = _cfg(cxr_dir, samples_per_epoch=40)
    a, b = list(make_loader(cfg, epoch=1)), list(make_loader(cfg, epoch=1))
    assert _keys(a) == _keys(b)
    assert all(torch.equal(x["image"], y["image"]) for x, y in zip(a, b))
    c = list(make_loader(cfg, epoch=2))
    assert _keys(c) != _keys(a)
    r1 = list(make_loader(cfg, epoch=1, rank=1, world_size=2))
    assert _keys(r1) != _keys(a)[: len(_keys(r1))]  # ranks draw different streams


def test_resampled_steps_per_epoch(cxr_dir):
    loader = make_loader(_cfg(cxr_dir, samples_per_epoch=40), rank=1, world_size=2)
    assert loader.steps_per_epoch == 40 // (4 * 2)
    assert len(list(loader)) == 5 and loader.state_dict() == {"epoch": 0, "step": 5}
    loader = make_loader(_cfg(cxr_dir, samples_per_epoch=0, workers=2))  # 0 -> the 48 train samples
    assert loader.steps_per_epoch == 48 // 4
    batches = list(loader)
    assert len(batches) == 12 and loader.stats["samples"] == 48
    with pytest.raises(ValueError, match="samples_per_epoch"):
        make_loader(_cfg(cxr_dir, samples_per_epoch=6), world_size=2)


@pytest.mark.parametrize("workers,resampled", [(0, True), (2, True), (2, False)])
def test_resume_at_step_equals_continuing(cxr_dir, workers, resampled):
    # resampled: 44 samples -> 11 steps, uneven over 2 workers; exactly-once: 48 train samples / 5 -> 2 x 5 batches
    cfg = _cfg(cxr_dir, workers=workers, samples_per_epoch=44, resampled=resampled, batch_size=4 if resampled else 5)
    full = list(make_loader(cfg, epoch=2))
    steps = len(full)
    assert steps == (11 if resampled else 10)
    for k in (3, 6):
        loader = make_loader(cfg, epoch=2, start_step=k)
        rest = list(loader)
        assert _keys(rest) == _keys(full[k:])
        assert all(torch.equal(x["image"], y["image"]) for x, y in zip(rest, full[k:]))  # same augmentation
        assert loader.state_dict() == {"epoch": 2, "step": steps}


def test_state_dict_mid_epoch_resumes(cxr_dir):
    cfg = _cfg(cxr_dir, samples_per_epoch=40)
    it_loader = make_loader(cfg, epoch=0)
    it = iter(it_loader)
    first = [next(it) for _ in range(2)]
    pos = it_loader.state_dict()
    assert pos == {"epoch": 0, "step": 2}
    nxt = next(it)
    resumed = next(iter(make_loader(cfg, epoch=pos["epoch"], start_step=pos["step"])))
    assert resumed["key"] == nxt["key"] and first[0]["key"] != nxt["key"]


def test_loader_does_not_touch_global_torch_rng(cxr_dir):
    torch.manual_seed(0)
    want = torch.rand(3)
    torch.manual_seed(0)
    list(make_loader(_cfg(cxr_dir, workers=1, samples_per_epoch=8)))
    assert torch.equal(torch.rand(3), want)


# ----------------------------------------------------------------------------------------- corrupt samples
def _write_with_corrupt(tmp_path) -> tuple[str, set[str]]:
    samples = _cxr_samples(12, test_every=0)
    d = tmp_path / "bad"
    d.mkdir()
    path = d / "bad-000000.tar"
    with wds.TarWriter(str(path), mtime=FIXED_MTIME, encoder=False) as tw:
        for i, s in enumerate(samples):
            members = encode_sample(s)
            if i == 4:
                members["img.png"] = b"\x89PNG this is not an image"
            if i == 7:
                members["json"] = b'{"meta": {"split": '
            tw.write(members)
    info = ShardInfo(path.name, 12, path.stat().st_size, sha256_file(path), {"train": 12})
    write_index(d, [info], "cxr", LABELS, command="test")
    return str(d), {samples[4].key, samples[7].key}


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_samples_skipped_counted_and_logged(tmp_path, caplog, workers):
    d, bad = _write_with_corrupt(tmp_path)
    loader = make_loader(_cfg(d, workers=workers), train=False)
    with caplog.at_level(logging.WARNING, logger="medvlp.data_shards.stream"):
        got = _keys(loader)
    want = {s.key for s in _cxr_samples(12, test_every=0)} - bad
    assert sorted(got) == sorted(want)
    assert loader.stats["corrupt"] == 2 and sorted(loader.stats["corrupt_keys"]) == sorted(bad)
    assert loader.stats["samples"] == 10
    if workers == 0:  # worker processes log in their own process
        assert "t/s004" in caplog.text and "img.png" in caplog.text


def test_resampled_stream_replaces_corrupt_samples(tmp_path):
    d, bad = _write_with_corrupt(tmp_path)
    loader = make_loader(_cfg(d, samples_per_epoch=40), train=True)
    batches = list(loader)
    assert len(batches) == 10 and all(len(b["key"]) == 4 for b in batches)  # full batches despite corrupt ones
    assert not bad & set(_keys(batches))
    assert loader.stats["corrupt"] >= 1


# ------------------------------------------------------------------------------------------- batch content
def test_split_filter_and_labels(cxr_dir):
    batches = list(make_loader(_cfg(cxr_dir), train=False, split="train"))
    keys = _keys(batches)
    assert len(keys) == 48 and all(int(k[3:]) % 5 for k in keys)
    b = batches[0]
    assert b["label_names"] == LABELS and b["labels"].shape == (4, 2) and b["labels"].dtype == torch.float32
    for key, row in zip(b["key"], b["labels"]):
        i = int(key[3:])
        want = [float([1, 0, -1][i % 3]), 0.0] if i % 2 else [0.0, 1.0]
        assert row.tolist() == want, key
    assert b["image"].shape == (4, 3, 16, 16) and b["image"].dtype == torch.float32
    assert torch.equal(b["image"][:, 0], b["image"][:, 2])  # grey replicated


def test_split_without_samples_is_a_clear_error(cxr_dir):
    with pytest.raises(ValueError, match="split 'val' has no samples"):
        make_loader(_cfg(cxr_dir), split="val")
    with pytest.raises(FileNotFoundError, match="index.json"):
        resolve_shards("/nonexistent/shard-{000000..000001}.tar", "train")


def test_brace_and_pipe_specs_with_index(cxr_dir):
    brace = f"{cxr_dir}/shard-{{000000..000001}}.tar"
    assert resolve_shards(brace, "train").counts == [8, 8]  # a subset of the shards, counts from index.json
    pipe = [f"pipe:cat {cxr_dir}/shard-00000{i}.tar" for i in range(3)]
    loader = make_loader(_cfg(cxr_dir, index=f"{cxr_dir}/index.json"), shards=pipe, train=False)
    assert _keys(loader) == [f"t/s{i:03d}" for i in range(30) if i % 5]
    with pytest.raises(ValueError, match="not listed"):
        resolve_shards([f"{cxr_dir}/other-000000.tar"], "train", f"{cxr_dir}/index.json")


class _Tok:
    """Picklable toy tokenizer: the report's number, padded to 3 tokens."""

    def __call__(self, texts: list[str]) -> torch.Tensor:
        return torch.tensor([[1, int(t.split()[-1]), 2] for t in texts], dtype=torch.long)


def test_tokens_from_tokenizer_in_workers(cxr_dir):
    b = next(iter(make_loader(_cfg(cxr_dir, workers=1), tokenizer=_Tok(), train=False)))
    assert b["tokens"].dtype == torch.long and b["tokens"].shape == (4, 3)
    assert b["tokens"][:, 1].tolist() == [int(k[3:]) for k in b["key"]]


def test_pair_views_differ(cxr_dir):
    b = next(iter(make_loader(_cfg(cxr_dir, modality="cxr", pair_views=True, samples_per_epoch=8))))
    assert b["image_weak"].shape == b["image_strong"].shape == (4, 3, 16, 16)
    assert not torch.equal(b["image_weak"], b["image_strong"])


def test_ct_volumes_and_masks(tmp_path):
    rng = np.random.default_rng(1)
    samples = [Sample(key=f"ct/v{i}", text=f"ct {i}", volume=rng.integers(-1500, 1500, (6 + i % 2, 10, 10)).astype(np.int16),
                      mask=rng.integers(0, 4, (6 + i % 2, 10, 10)).astype(np.uint8),
                      meta={"split": "train", "modality": "ct"}) for i in range(6)]
    d = _build(tmp_path, samples, 3, modality="ct")
    cfg = _cfg(d, modality="ct", batch_size=3, volume_size=[4, 8, 8], samples_per_epoch=6)
    b = next(iter(make_loader(cfg)))
    assert b["volume"].shape == (3, 1, 4, 8, 8) and b["volume"].dtype == torch.float32
    assert b["mask"].shape == (3, 4, 8, 8) and b["mask"].dtype == torch.long
    assert b["volume"].abs().max() <= 1.0 and set(b["mask"].unique().tolist()) <= {0, 1, 2, 3}
    with pytest.raises(Exception, match="volume_size"):  # different stored depths cannot stack
        list(make_loader(_cfg(d, modality="ct", batch_size=6, volume_size=None), train=False))


def test_slide_bags_padded(tmp_path):
    rng = np.random.default_rng(2)
    samples = [Sample(key=f"wsi/b{i}", text=f"slide {i}", feats=rng.standard_normal((3 + 4 * i, 5)).astype(np.float16),
                      coords=np.arange(2 * (3 + 4 * i), dtype=np.int32).reshape(-1, 2),
                      meta={"split": "train", "modality": "slide"}) for i in range(4)]
    d = _build(tmp_path, samples, 4, modality="slide")
    b = next(iter(make_loader(_cfg(d, modality="slide", max_patches=10), train=False)))
    n = [3, 7, 10, 10]  # bags of 11 and 15 patches are subsampled to 10
    assert b["feats"].shape == (4, 10, 5) and b["coords"].shape == (4, 10, 2)
    assert b["feats_mask"].sum(1).tolist() == n
    assert torch.equal(b["feats"][0, :3], torch.from_numpy(samples[0].feats.astype(np.float32)))
    assert not b["feats"][0, 3:].any() and not b["coords"][0, 3:].any()


def test_modality_mismatch_sample_is_corrupt(tmp_path):
    samples = _cxr_samples(4, test_every=0)
    d = _build(tmp_path, samples, 4, modality="cxr")
    idx = json.loads((tmp_path / "sh" / "index.json").read_text())
    assert idx["modality"] == "cxr" and len(idx["shards"]) == 1
    ct = Sample(key="ct/x", text="x", volume=np.zeros((2, 2, 2), np.int16), meta={"split": "train"})
    with wds.TarWriter(str(tmp_path / "sh" / idx["shards"][0]["name"]), encoder=False) as tw:
        for s in [*samples, ct]:
            tw.write(encode_sample(s))
    loader = make_loader(_cfg(d), train=False)
    assert Counter(_keys(loader)) == Counter(s.key for s in samples)  # index counts 4; the extra one is skipped
    assert loader.stats["corrupt"] == 1 and loader.stats["corrupt_keys"] == ["ct/x"]


# ------------------------------------------------------------------------------------- persistent workers
def _same_batches(a: list[dict], b: list[dict]) -> bool:
    return _keys(a) == _keys(b) and all(torch.equal(x["image"], y["image"]) for x, y in zip(a, b))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("resampled", [True, False])
def test_persistent_workers_live_across_epochs_with_per_epoch_batches(cxr_dir, resampled):
    """Two DataLoader workers stream three epochs without being respawned; every epoch's batches (keys and
    crops) equal a loader made for that epoch alone, so they are reproducible from the seed, and epoch 2's differ
    from epoch 1's."""
    cfg = _cfg(cxr_dir, workers=2, samples_per_epoch=40, resampled=resampled, batch_size=5)
    loader = make_loader(cfg, epoch=0, persistent=True)
    epochs, pids = [], []
    for e in range(3):
        if e:
            loader = loader.next_epoch()
        assert loader.epoch == e
        epochs.append(list(loader))
        pids.append(loader.worker_pids())
        assert loader.state_dict() == {"epoch": e, "step": loader.steps_per_epoch}
    assert len(pids[0]) == 2 and pids[0] == pids[1] == pids[2]  # the same two processes, none respawned
    with pytest.raises(RuntimeError, match="iterated once"):
        list(loader)
    loader.close()
    for e in range(3):
        assert _same_batches(epochs[e], list(make_loader(cfg, epoch=e)))
    assert _keys(epochs[1]) != _keys(epochs[2])
    if not resampled:  # each epoch is a permutation of the same 48 train samples
        assert sorted(_keys(epochs[1])) == sorted(_keys(epochs[2])) and len(_keys(epochs[1])) == 48
    # a persistent loader resumed mid-epoch gives the rest of that epoch, then the next epochs, as before
    resumed = make_loader(cfg, epoch=1, start_step=3, persistent=True)
    rest, nxt = list(resumed), list(resumed.next_epoch())
    assert _same_batches(rest, epochs[1][3:]) and _same_batches(nxt, epochs[2])


@pytest.mark.timeout(60)
def test_persistent_in_process_and_next_epoch_without_persistence(cxr_dir):
    cfg = _cfg(cxr_dir, samples_per_epoch=24)
    p = make_loader(cfg, epoch=4, persistent=True)
    a0, a1 = list(p), list(p.next_epoch())
    q = make_loader(cfg, epoch=4)
    b0, b1 = list(q), list(q.next_epoch())
    assert _same_batches(a0, b0) and _same_batches(a1, b1) and _keys(a0) != _keys(a1)
    assert p.worker_pids() == []
