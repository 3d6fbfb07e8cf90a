"""Shard sets and their index.json on a web server or an object store.

    data.train_shards: https://data.example.org/cxr-v1/                       # a folder URL: index.json + shards
    data.train_shards: https://host/cxr-v1/shard-{000000..000041}.tar       # index.json beside the first shard
    data.train_shards: "pipe:aws s3 cp s3://bucket/cxr-v1/shard-{000000..000041}.tar -"
    data.index:        "pipe:aws s3 cp s3://bucket/cxr-v1/index.json -"      # pipe: specs name their index

http(s) shards are read through `curl` (no shell) by `open_http_shard`, under a `RemotePolicy`:
* every transfer has limits: connect (`connect_timeout_s`), overall (`data.remote_timeout_s`) and low speed (below
  `data.remote_low_speed` bytes/s for `data.remote_low_speed_s` s): a server that stalls mid-transfer ends that
  shard (counted as unreadable, the samples before the stall are used) instead of blocking training for ever;
* a shard that cannot be opened because the server is unreachable (refused, DNS, connect timeout, HTTP 5xx/408/429)
  is retried with exponential backoff (0.5 s doubling to `backoff_max_s`), and the stream fails with
  `RemoteOutage` (a `DataStreamError`: one line, exit 2) only when the server stayed unreachable for
  `data.remote_outage_s` seconds in a row; any shard that opens ends the outage. HTTP 4xx other than 408/429
  is not an outage: that shard is unreadable (counted), the stream goes on.
index.json over http(s) is fetched with urllib (timeouts and retries here, HTTP errors named). A `pipe:CMD` index
runs CMD in a shell and reads its stdout, so it obeys `data.allow_pipe` like pipe: shard specs. Other schemes go
through webdataset's gopen.
"""
from __future__ import annotations

import io
import json
import re
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any, Callable

from medvlp.data_shards.guard import DataStreamError

URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
INDEX_NAME = "index.json"
TIMEOUT_S = 60
RETRIES = 3


def is_url(spec: str) -> bool:
    return bool(URL_RE.match(spec)) and not spec.startswith("file://")


def is_remote(spec: str) -> bool:
    return is_url(spec) or spec.startswith("pipe:")


def is_folder_url(spec: str) -> bool:
    """A URL naming a folder of shards (no brace range, not a .tar): its index is <spec>/index.json."""
    return is_url(spec) and "{" not in spec and not spec.rstrip("/").endswith((".tar", ".json"))


def join(base: str, name: str) -> str:
    return base.rstrip("/") + "/" + name


def index_beside(url: str) -> str:
    """The index.json URL beside a shard URL (same folder)."""
    return url.rsplit("/", 1)[0] + "/" + INDEX_NAME


def fetch_bytes(spec: str, allow_pipe: bool = True) -> bytes:
    """The bytes at an http(s) URL, of a `pipe:CMD`'s stdout, or of another gopen URL; errors name the spec."""
    if spec.startswith("pipe:"):
        if not allow_pipe:
            raise ValueError(f"{spec[:200]!r}: a pipe: spec runs a shell command; refused because data.allow_pipe "
                             "is false")
        import subprocess

        done = subprocess.run(spec[len("pipe:"):], shell=True, capture_output=True, timeout=600)  # noqa: S602
        if done.returncode != 0:
            err = done.stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or [""]
            raise OSError(f"{spec[:200]!r}: exit status {done.returncode} {err[0][:200]}")
        return done.stdout
    if spec.lower().startswith(("http://", "https://")):
        last: Exception | None = None
        for attempt in range(RETRIES):
            try:
                with urllib.request.urlopen(spec, timeout=TIMEOUT_S) as r:  # noqa: S310 - http(s) only
                    return r.read()
            except urllib.error.HTTPError as e:
                if e.code < 500:  # 4xx will not get better by asking again
                    raise OSError(f"{spec}: HTTP {e.code} {e.reason}") from None
                last = e
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                last = e
            time.sleep(min(2.0 * (attempt + 1), 5.0))
        raise OSError(f"{spec}: cannot fetch after {RETRIES} tries ({last})")
    from webdataset.gopen import gopen

    with gopen(spec, "rb") as f:
        return f.read()


def fetch_json(spec: str, allow_pipe: bool = True) -> dict:
    raw = fetch_bytes(spec, allow_pipe)
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{spec[:200]}: not valid JSON ({e})") from None


# ----------------------------------------------------------------------------------------------- http(s) shards
class RemoteOutage(DataStreamError):
    """The shard server stayed unreachable for longer than the outage window."""


@dataclass(frozen=True)
class RemotePolicy:
    """Limits and retries of http(s) shard transfers (see the module doc)."""

    connect_timeout_s: float = 30.0  # TCP/TLS connect, per attempt
    max_time_s: float = 3600.0  # one shard's whole transfer (0 = no limit)
    low_speed_bytes: int = 1024  # a transfer slower than this ...
    low_speed_s: int = 60  # ... for this many seconds is abandoned (0 = no low-speed limit)
    outage_s: float = 300.0  # unreachable this long in a row: the stream fails (RemoteOutage)
    backoff_max_s: float = 30.0  # longest wait between two attempts

    @classmethod
    def from_config(cls, cfg: Any) -> "RemotePolicy":
        return cls(max_time_s=float(cfg.remote_timeout_s), low_speed_bytes=int(cfg.remote_low_speed),
                   low_speed_s=int(cfg.remote_low_speed_s), outage_s=float(cfg.remote_outage_s))


# curl exit codes that mean "the server cannot be reached now" (worth waiting for), not "this file is bad"
_UNREACHABLE = {5: "cannot resolve proxy", 6: "cannot resolve host", 7: "cannot connect", 28: "timed out",
                35: "TLS connect failed", 52: "empty reply", 55: "send failed", 56: "receive failed"}
_HTTP_RETRY = {408, 429, 500, 502, 503, 504}


def curl_args(url: str, policy: RemotePolicy) -> list[str]:
    args = ["curl", "--silent", "--show-error", "--fail", "--location", "--connect-timeout",
            f"{policy.connect_timeout_s:g}", "--write-out", "%{stderr}medvlp-http-code:%{http_code}\\n"]
    if policy.max_time_s > 0:
        args += ["--max-time", f"{policy.max_time_s:g}"]
    if policy.low_speed_s > 0 and policy.low_speed_bytes > 0:
        args += ["--speed-limit", str(policy.low_speed_bytes), "--speed-time", str(policy.low_speed_s)]
    return args + ["--", url]


class Outage:
    """Consecutive failed opens of one stream slot; sleeps the backoff, raises RemoteOutage past the window."""

    def __init__(self, policy: RemotePolicy, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.policy, self.clock, self.sleep = policy, clock, sleep
        self.since: float | None = None
        self.tries = 0

    def ok(self) -> None:
        self.since, self.tries = None, 0

    def failed(self, url: str, why: str, check_stop: Callable[[], None] | None = None) -> None:
        now = self.clock()
        if self.since is None:
            self.since = now
        self.tries += 1
        down = now - self.since
        if down >= self.policy.outage_s:
            raise RemoteOutage(f"shard server unreachable for {down:.0f} s ({self.tries} tries; "
                               f"data.remote_outage_s={self.policy.outage_s:g}); last: {url}: {why}")
        wait = min(self.policy.backoff_max_s, 0.5 * 2 ** (self.tries - 1), self.policy.outage_s - down)
        end = now + max(wait, 0.0)
        while (left := end - self.clock()) > 0:  # in short naps, so a stop request is seen
            if check_stop is not None:
                check_stop()
            self.sleep(min(left, 0.25))


class CurlStream:
    """A shard's bytes from a running curl; a failed transfer raises OSError naming the URL and why."""

    def __init__(self, url: str, proc: subprocess.Popen, first: bytes) -> None:
        self.url, self.proc, self._first, self.nbytes = url, proc, first, 0

    def read(self, n: int = -1) -> bytes:
        if self._first:
            if n is None or n < 0:
                data, self._first = self._first + self.proc.stdout.read(), b""
            else:
                data, self._first = self._first[:n], self._first[n:]
        else:
            data = self.proc.stdout.read(n) if n is not None and n >= 0 else self.proc.stdout.read()
        self.nbytes += len(data)
        if not data and n != 0:
            self._check()
        return data

    def _check(self) -> None:
        rc = self.proc.wait()
        if rc != 0:
            raise OSError(f"{self.url}: transfer failed after {self.nbytes} bytes ({_why(rc, self._stderr())})")

    def _stderr(self) -> str:
        try:
            return self.proc.stderr.read().decode("utf-8", "replace") if self.proc.stderr else ""
        except (OSError, ValueError):
            return ""

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        for f in (self.proc.stdout, self.proc.stderr):
            if f is not None:
                f.close()
        self.proc.wait()

    def __enter__(self) -> "CurlStream":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - never raise from a finaliser
            pass


def _http_code(err: str) -> int:
    m = re.search(r"medvlp-http-code:(\d+)", err)
    return int(m.group(1)) if m else 0


def _why(rc: int, err: str) -> str:
    code = _http_code(err)
    lines = [ln.strip() for ln in err.splitlines() if ln.strip() and "medvlp-http-code" not in ln]
    text = re.sub(r"^(curl: )?\(\d+\) ", "", lines[-1]) if lines else ""
    if rc == 28 and "too slow" in text.lower():
        return f"stalled: {text}"
    if code >= 400:
        return f"HTTP {code}"
    return f"curl exit {rc}: {text or _UNREACHABLE.get(rc, 'error')}"


def open_http_shard(url: str, policy: RemotePolicy, outage: Outage,
                    check_stop: Callable[[], None] | None = None) -> CurlStream:
    """The bytes of an http(s) shard through curl (no shell), retried across an outage (see the module doc).
    Raises OSError for a shard that is bad by itself (HTTP 404, ...), RemoteOutage past the outage window."""
    while True:
        proc = subprocess.Popen(curl_args(url, policy), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        first = proc.stdout.read(1)
        if first:
            outage.ok()
            return CurlStream(url, proc, first)
        rc = proc.wait()
        err = proc.stderr.read().decode("utf-8", "replace") if proc.stderr else ""
        proc.stdout.close(), proc.stderr.close()
        code = _http_code(err)
        if rc == 0:  # an empty file: the tar reader reports it (no samples)
            outage.ok()
            return io.BytesIO(b"")  # type: ignore[return-value]
        if rc in _UNREACHABLE or code in _HTTP_RETRY:
            outage.failed(url, _why(rc, err), check_stop)
            continue
        outage.ok()  # the server answered: this shard is bad, the server is not down
        raise OSError(f"{url}: {_why(rc, err)}")
