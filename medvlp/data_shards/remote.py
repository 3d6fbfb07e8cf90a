"""Shard sets and their index.json on a web server or an object store.

    data.train_shards: https://data.example.org/cxr-v1/                       # a folder URL: index.json + shards
    data.train_shards: https://host/cxr-v1/shard-{000000..000041}.tar       # index.json beside the first shard
    data.train_shards: "pipe:aws s3 cp s3://bucket/cxr-v1/shard-{000000..000041}.tar -"
    data.index:        "pipe:aws s3 cp s3://bucket/cxr-v1/index.json -"      # pipe: specs name their index

http(s) shards are read by webdataset through `curl` (no shell; retried); index.json over http(s) is fetched
with urllib (timeouts and retries here, HTTP errors named). A `pipe:CMD` index runs CMD in a shell and reads its
stdout, so it obeys `data.allow_pipe` like pipe: shard specs. Other schemes go through webdataset's gopen.
"""
from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request

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
