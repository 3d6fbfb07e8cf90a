"""Damaged shards at stream and inspect time: truncated, bit-flipped, zeroed, all unreadable, changed since the
index was written, a corrupt index.json, pipe: specs. Each ends in the right batches (damage skipped, counted)
or one clear error; a stop request ends even a stream that can read nothing."""
import threading
import time

import pytest

from medvlp.data_shards.config import DataConfig
from medvlp.data_shards.guard import DataStreamError, StopSignal, StreamStopped
from medvlp.data_shards.stream import make_loader
from tests.faults.conftest import cli_here as cli, one_line_error, tars


def _cfg(d, **kw):
    return DataConfig(**{"train_shards": str(d), "batch_size": 4, "image_size": 32, "workers": 0,
                         "shuffle_buffer": 0, "seed": 1, **kw})


def _epoch(cfg, **kw):
    loader = make_loader(cfg, **kw)
    keys = [k for b in loader for k in b["key"]]
    return keys, loader.stats


def _flip(path, offset, n=64):
    data = bytearray(path.read_bytes())
    for i in range(offset, offset + n):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_truncated_shard_keeps_its_readable_samples_and_counts_the_rest(shards):
    clean, _ = _epoch(_cfg(shards, resampled=False))
    t = tars(shards)[1]
    t.write_bytes(t.read_bytes()[: t.stat().st_size // 2])
    keys, stats = _epoch(_cfg(shards, resampled=False))
    assert stats["corrupt"] >= 1 and any("<tar" in k for k in stats["corrupt_keys"])
    assert set(keys) < set(clean) and len(keys) >= len(clean) - 10  # only that shard's tail is lost


def test_bit_flipped_member_skips_that_sample_only(shards):
    clean, _ = _epoch(_cfg(shards, resampled=False))
    t = tars(shards)[2]
    _flip(t, t.stat().st_size // 2)  # inside a member's data (or header): that sample or the shard tail fails
    keys, stats = _epoch(_cfg(shards, resampled=False))
    assert stats["corrupt"] >= 1
    assert set(keys) <= set(clean) and len(keys) < len(clean)


@pytest.mark.parametrize("workers", [0, 2])
def test_every_shard_unreadable_fails_fast_instead_of_spinning(shards, workers):
    for t in tars(shards)[:2]:
        t.write_bytes(b"not a tar" * 100)
    for t in tars(shards)[2:]:
        t.write_bytes(bytes(t.stat().st_size))  # zeroed: tarfile reads it as an empty archive, no error at all
    t0 = time.monotonic()
    with pytest.raises(DataStreamError, match=r"max_bad_in_row=20.*shards inspect"):
        next(iter(make_loader(_cfg(shards, workers=workers, max_bad_in_row=20))))
    assert time.monotonic() - t0 < 60


def test_corrupt_samples_in_a_row_fail_with_the_last_key(shards, monkeypatch):
    from medvlp.data_shards import stream

    def broken(*a, **k):
        raise ValueError("undecodable image")

    monkeypatch.setattr(stream, "decode_sample", broken)
    with pytest.raises(DataStreamError, match=r"5 corrupt samples in a row.*sample .synth-cxr/"):
        next(iter(make_loader(_cfg(shards, max_bad_in_row=5))))


@pytest.mark.parametrize("workers", [0, 2])
def test_stop_request_ends_a_stream_that_reads_nothing(shards, workers):
    for t in tars(shards):
        t.write_bytes(b"x" * 100)
    stop = StopSignal()
    threading.Timer(1.0, stop.set).start()
    t0 = time.monotonic()
    with pytest.raises(StreamStopped):
        next(iter(make_loader(_cfg(shards, workers=workers, max_bad_in_row=10**9), stop=stop)))
    assert time.monotonic() - t0 < 30


def test_stop_request_between_batches(shards):
    stop = StopSignal()
    it = iter(make_loader(_cfg(shards), stop=stop))
    next(it)
    stop.set()
    with pytest.raises(StreamStopped):
        next(it)


def test_verify_skips_or_fails_a_shard_changed_since_indexing(shards):
    clean, _ = _epoch(_cfg(shards, resampled=False))
    t = tars(shards)[0]
    _flip(t, 700, n=4)  # the bytes change; the tar may still read fine: only the checksum can tell
    keys, stats = _epoch(_cfg(shards, resampled=False, verify=True))
    assert stats["corrupt"] == 1 and "sha256" in stats["corrupt_keys"][0] and t.name in stats["corrupt_keys"][0]
    assert sorted(keys) == sorted(k for k in clean if int(k[-7:]) >= 10)  # the other three shards, whole
    with pytest.raises(DataStreamError, match=rf"{t.name}: sha256 .*data.on_mismatch=fail"):
        _epoch(_cfg(shards, resampled=False, verify=True, on_mismatch="fail"))


def test_verify_passes_intact_shards_and_pipe_streams(shards):
    clean, _ = _epoch(_cfg(shards, resampled=False))
    keys, stats = _epoch(_cfg(shards, resampled=False, verify=True))
    assert stats["corrupt"] == 0 and keys == clean
    spec = "pipe:cat " + str(shards) + "/synth-cxr-{000000..000003}.tar"
    keys, stats = _epoch(_cfg(spec, resampled=False, verify=True, index=str(shards / "index.json")))
    assert stats["corrupt"] == 0 and sorted(keys) == sorted(clean)


def test_pipe_specs_refused_when_not_allowed(shards):
    spec = "pipe:cat " + str(shards) + "/synth-cxr-{000000..000003}.tar"
    with pytest.raises(ValueError, match=r"allow_pipe: false refuses the shard spec 'pipe:cat .*runs a shell command"):
        make_loader(_cfg(shards, index=str(shards / "index.json"), allow_pipe=False), shards=spec)
    with pytest.raises(ValueError, match=r"train_shards: 'pipe:cat .*allow_pipe is false"):
        make_loader(_cfg(spec, index=str(shards / "index.json"), allow_pipe=False))


def test_inspect_strict_fails_on_mismatch_and_missing_shard(shards):
    ok = cli("shards", "inspect", shards, "--strict", "--sheet", shards / "s.png")
    assert ok.returncode == 0, ok.stderr
    a, b = tars(shards)[:2]
    _flip(a, 700, n=4)
    b.unlink()
    plain = cli("shards", "inspect", shards, "--sheet", shards / "s.png")
    assert plain.returncode == 0 and "sha256 mismatches 1" in plain.stdout
    bad = cli("shards", "inspect", shards, "--strict", "--sheet", shards / "s.png")
    assert bad.returncode == 1
    err = one_line_error(bad)
    assert f"sha256 mismatch: {a.name}" in err and f"missing shard: {b.name}" in err


def test_corrupt_index_json_is_one_line_error(shards):
    (shards / "index.json").write_text('{"schema_version": 1, "shards": [')
    proc = cli("shards", "inspect", shards)
    assert proc.returncode == 2
    assert "index.json: not valid JSON" in one_line_error(proc)
