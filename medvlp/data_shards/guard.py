"""Guards of the training stream: a bound on unreadable data, a stop request, shard checksums, pipe refusal.

    stop = StopSignal()                       # shared with DataLoader workers (a byte of shared memory)
    loader = make_loader(cfg, stop=stop)      # stop.set() (safe inside a signal handler) -> StreamStopped soon
    for batch in loader: ...                  # DataStreamError after cfg.max_bad_in_row bad items in a row

* **Bad in a row.** Each worker slot counts unreadable shards (open/read errors, a tar holding no sample) and
  corrupt samples since the last good one. When either run reaches ``data.max_bad_in_row`` the stream stops with
  `DataStreamError` naming the last bad item, instead of drawing shards forever (resampled streams never end on
  their own, so a data set whose every shard is unreadable would otherwise spin until walltime).
* **Stop request.** `StopSignal` is a flag in shared memory, set from a signal handler or another thread; slots
  check it at every raw sample and every shard error, and the main process before every batch. The loader then
  raises `StreamStopped` within one sample's work, also while no shard can be read.
* **Checksums** (``data.verify``). Each shard is hashed the first time a slot opens it and compared with its
  sha256 in index.json: local files are hashed in place, remote/pipe streams are spooled (memory up to 64 MiB,
  then a temporary file) and hashed before any sample is used. A mismatch is an unreadable shard (skipped, counted,
  logged) with ``data.on_mismatch=skip``, or stops the stream with `DataStreamError` with ``fail``.
* **Pipe specs** (``pipe:CMD``) make webdataset run CMD through the shell. ``data.allow_pipe=false`` refuses them
  (use it for recipes shared with others); http(s)/s3-style URLs are opened without a shell.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import multiprocessing as mp
import os
import tempfile
from typing import Any, Callable, Iterable, Iterator

log = logging.getLogger(__name__)

SPOOL_BYTES = 64 << 20  # remote shards up to this size are verified in memory, larger ones in a temp file


class DataStreamError(RuntimeError):
    """The stream cannot go on: too many unreadable shards/corrupt samples in a row, or a checksum mismatch."""

    user_facing = True


class StreamStopped(RuntimeError):
    """The stream was asked to stop (StopSignal set / stop callable true) before its epoch ended."""

    user_facing = True


class StopSignal:
    """A stop flag shared with DataLoader worker processes; `set()` is one store, safe in a signal handler."""

    def __init__(self) -> None:
        self._flag = mp.RawValue(ctypes.c_bool, False)

    def set(self) -> None:
        self._flag.value = True

    def clear(self) -> None:
        self._flag.value = False

    def is_set(self) -> bool:
        return bool(self._flag.value)

    def __call__(self) -> bool:
        return bool(self._flag.value)


def as_stop_check(stop: Any) -> Callable[[], bool] | None:
    """StopSignal / threading.Event / mp.Event / zero-arg callable -> a zero-arg callable (None stays None)."""
    if stop is None:
        return None
    if hasattr(stop, "is_set"):
        return stop.is_set
    if callable(stop):
        return stop
    raise TypeError(f"stop: expected a StopSignal, an Event or a callable, got {type(stop).__name__}")


def check_pipe_allowed(urls: Iterable[str], allow_pipe: bool) -> None:
    """Refuse `pipe:` shard specs when data.allow_pipe is false (they run a shell command)."""
    if allow_pipe:
        return
    for u in urls:
        if str(u).startswith("pipe:"):
            raise ValueError(f"allow_pipe: false refuses the shard spec {str(u)[:200]!r}: a pipe: spec runs a "
                             "shell command; set data.allow_pipe=true only for specs you trust")


class BadRun:
    """Consecutive unreadable shards and consecutive corrupt samples of one slot, each bounded by `limit`."""

    def __init__(self, limit: int, stop: Callable[[], bool] | None = None) -> None:
        self.limit, self.stop = limit, stop
        self.shards = self.samples = 0

    def check_stop(self) -> None:
        if self.stop is not None and self.stop():
            raise StreamStopped("data stream: stop requested")

    def bad_shard(self, what: str) -> None:
        self.shards += 1
        self.check_stop()
        if self.shards >= self.limit:
            raise DataStreamError(f"data stream: {self.shards} unreadable shards in a row and no readable one "
                                  f"(data.max_bad_in_row={self.limit}); last: {what}. Check the shards with "
                                  "`medvlp shards inspect DIR --strict`")

    def bad_sample(self, what: str) -> None:
        self.samples += 1
        self.check_stop()
        if self.samples >= self.limit:
            raise DataStreamError(f"data stream: {self.samples} corrupt samples in a row and no good one "
                                  f"(data.max_bad_in_row={self.limit}); last: {what}. Check the shards with "
                                  "`medvlp shards inspect DIR --strict`")

    def shard_ok(self) -> None:
        self.shards = 0

    def sample_ok(self) -> None:
        self.samples = 0


# ------------------------------------------------------------------------------------------ checksums
def _local_path(url: str) -> str | None:
    if url.startswith("file:"):
        return url[len("file:"):]
    if "://" in url or url.startswith("pipe:") or url == "-":
        return None
    return url


class ShardVerifier:
    """Hashes each shard on first open (per slot) against index.json; caches local results by (size, mtime)."""

    def __init__(self, sha256: dict[str, str], on_mismatch: str) -> None:
        self.sha256, self.on_mismatch = sha256, on_mismatch
        self._ok: dict[str, tuple] = {}

    def __call__(self, src: Iterator[dict], on_bad: Callable[[str, Exception], None]) -> Iterator[dict]:
        for sample in src:  # {"url", "stream"} from webdataset's url_opener
            url = sample["url"]
            want = self.sha256.get(url)
            if not want:
                yield sample
                continue
            try:
                got = self._check(sample, want)
            except Exception as e:  # noqa: BLE001 - a read failure is an unreadable shard
                _close(sample.get("stream"))
                on_bad(url, e)
                continue
            if got != want:
                _close(sample.get("stream"))
                msg = f"shard {url}: sha256 {got[:12]}... != {want[:12]}... in index.json (changed since it was built)"
                if self.on_mismatch == "fail":
                    raise DataStreamError(f"data stream: {msg} (data.on_mismatch=fail)")
                on_bad(url, ValueError(msg))
                continue
            yield sample

    def _check(self, sample: dict, want: str) -> str:
        url, path = sample["url"], _local_path(sample["url"])
        if path is not None:
            st = os.stat(path)
            stamp = (st.st_size, st.st_mtime_ns)
            if self._ok.get(url) == stamp:
                return want
            h = hashlib.sha256()
            with open(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
            got = h.hexdigest()
            if got == want:
                self._ok[url] = stamp
            return got
        # remote / pipe: read the whole stream once, hash it, hand the spooled copy to the tar reader
        stream = sample["stream"]
        spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES)
        h = hashlib.sha256()
        while chunk := stream.read(1 << 20):
            h.update(chunk)
            spool.write(chunk)
        _close(stream)
        spool.seek(0)
        sample["stream"] = spool
        return h.hexdigest()


def _close(stream: Any) -> None:
    try:
        if stream is not None:
            stream.close()
    except Exception:  # noqa: BLE001 - a failing pipe reports its status on close; the shard is skipped anyway
        pass


__all__ = ["DataStreamError", "StreamStopped", "StopSignal", "as_stop_check", "check_pipe_allowed", "BadRun",
           "ShardVerifier"]
