"""http(s) shards under a hostile network: a server that stalls mid-transfer (the shard ends after the low-speed
limit instead of blocking for ever), a server down for a while (retried with backoff, the stream goes on once it
is back; past the outage window one DataStreamError), a 404 shard (counted unreadable, not an outage)."""
import functools
import http.server
import socket
import threading
import time

import pytest

from medvlp.data_shards.config import DataConfig
from medvlp.data_shards.guard import DataStreamError
from medvlp.data_shards.remote import Outage, RemoteOutage, RemotePolicy, open_http_shard
from medvlp.data_shards.stream import make_loader

pytestmark = pytest.mark.timeout(120)


class _Handler(http.server.SimpleHTTPRequestHandler):
    stall: set = set()  # file names served half, then the connection hangs
    missing: set = set()
    hits: list = []

    def log_message(self, *args):
        pass

    def do_GET(self):  # noqa: N802
        name = self.path.rsplit("/", 1)[-1]
        type(self).hits.append(name)
        if name in self.missing:
            self.send_error(404)
            return
        if name in self.stall:
            data = (self.directory_path / name).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[:len(data) // 2])
            self.wfile.flush()
            time.sleep(30)  # hang mid-transfer
            return
        super().do_GET()


def _serve(directory, port=0, **sets):
    from pathlib import Path

    cls = type("H", (_Handler,), {"stall": set(sets.get("stall", ())), "missing": set(sets.get("missing", ())),
                                  "hits": [], "directory_path": Path(directory)})
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", port), functools.partial(cls, directory=str(directory)))
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, cls


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cfg(**kw):
    return DataConfig(modality="cxr", batch_size=5, workers=0, resampled=False, shuffle_buffer=0, augment=False,
                      image_size=32, **kw)


def test_stalled_transfer_ends_after_the_low_speed_limit(shards):
    names = sorted(p.name for p in shards.glob("*.tar"))
    srv, h = _serve(shards, stall={names[1]})
    try:
        t0 = time.monotonic()
        cfg = _cfg(remote_low_speed=1000, remote_low_speed_s=2)
        loader = make_loader(cfg, train=False, shards=f"http://127.0.0.1:{srv.server_address[1]}/", split="train")
        keys = [k for b in loader for k in b["key"]]
        took = time.monotonic() - t0
    finally:
        srv.shutdown(), srv.server_close()
    assert took < 25, f"the stalled shard blocked for {took:.0f} s"
    assert loader.stats["corrupt"] >= 1  # the stalled shard counted as unreadable, the others streamed
    assert 0 < len(keys) < 40


def test_open_http_shard_names_a_stall_and_a_404(shards, tmp_path):
    names = sorted(p.name for p in shards.glob("*.tar"))
    srv, _ = _serve(shards, stall={names[0]}, missing={"gone.tar"})
    base = f"http://127.0.0.1:{srv.server_address[1]}"
    pol = RemotePolicy(low_speed_bytes=1000, low_speed_s=1, outage_s=5)
    try:
        s = open_http_shard(f"{base}/{names[0]}", pol, Outage(pol))
        with pytest.raises(OSError, match=r"transfer failed after \d+ bytes \(stalled"):
            while s.read(65536):
                pass
        s.close()
        out = Outage(pol)
        with pytest.raises(OSError, match="gone.tar: HTTP 404"):
            open_http_shard(f"{base}/gone.tar", pol, out)
        assert out.tries == 0  # a 404 is the shard's problem, not an outage
        good = open_http_shard(f"{base}/{names[1]}", pol, Outage(pol))
        assert good.read() == (shards / names[1]).read_bytes()
        good.close()
    finally:
        srv.shutdown(), srv.server_close()


def test_server_down_for_a_while_is_waited_for_with_backoff(shards):
    port = _free_port()
    index_srv, _ = _serve(shards)  # the index is fetched at loader creation from a server that is up
    holder = {}

    def later():
        time.sleep(3)
        holder["srv"], holder["h"] = _serve(shards, port=port)

    threading.Thread(target=later, daemon=True).start()
    t0 = time.monotonic()
    try:
        cfg = _cfg(remote_outage_s=60, index=f"http://127.0.0.1:{index_srv.server_address[1]}/index.json")
        spec = f"http://127.0.0.1:{port}/synth-cxr-{{000000..000003}}.tar"
        loader = make_loader(cfg, train=False, shards=spec, split="train")
        keys = [k for b in loader for k in b["key"]]
    finally:
        index_srv.shutdown(), index_srv.server_close()
        if "srv" in holder:
            holder["srv"].shutdown(), holder["srv"].server_close()
    assert time.monotonic() - t0 >= 2.5
    import json
    want = json.loads((shards / "index.json").read_text())["splits"]["train"]
    assert len(keys) == want and loader.stats["corrupt"] == 0  # nothing lost to the outage


def test_outage_longer_than_the_window_fails_in_one_line(shards):
    port = _free_port()  # nobody listens
    index_srv, _ = _serve(shards)
    launches = []
    import medvlp.data_shards.remote as remote

    real = remote.subprocess.Popen

    def counting(*a, **k):
        launches.append(a[0])
        return real(*a, **k)

    remote.subprocess.Popen = counting
    t0 = time.monotonic()
    try:
        cfg = _cfg(remote_outage_s=3, index=f"http://127.0.0.1:{index_srv.server_address[1]}/index.json")
        loader = make_loader(cfg, train=False, shards=f"http://127.0.0.1:{port}/synth-cxr-{{000000..000003}}.tar",
                             split="train")
        # the type survives the stream (the training loops checkpoint on it): RemoteOutage, a DataStreamError
        with pytest.raises(RemoteOutage, match=r"shard server unreachable for \d+ s .*data.remote_outage_s=3"):
            list(loader)
    finally:
        remote.subprocess.Popen = real
        index_srv.shutdown(), index_srv.server_close()
    took = time.monotonic() - t0
    assert 2.5 <= took < 20
    assert len(launches) <= 8, f"{len(launches)} curl launches in {took:.1f} s: no backoff"
    assert issubclass(RemoteOutage, DataStreamError)


def test_outage_backoff_schedule():
    now = [0.0]
    slept = []
    out = Outage(RemotePolicy(outage_s=20, backoff_max_s=4), clock=lambda: now[0],
                 sleep=lambda s: (slept.append(s), now.__setitem__(0, now[0] + s)))
    waits = []
    with pytest.raises(RemoteOutage, match="unreachable for 20 s"):
        for _ in range(100):
            t = now[0]
            out.failed("http://h/x.tar", "cannot connect")
            waits.append(now[0] - t)
    assert waits[:5] == [0.5, 1.0, 2.0, 4.0, 4.0] and len(waits) < 10
    out.ok()
    assert out.since is None and out.tries == 0


def test_remote_knobs_are_checked():
    for key, bad in (("remote_outage_s", -1), ("remote_timeout_s", float("nan")), ("remote_low_speed_s", -5)):
        with pytest.raises(ValueError, match=key):
            _cfg(**{key: bad}).validate()
