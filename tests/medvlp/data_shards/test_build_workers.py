"""Build workers: forks of one fork server that imported the builder once (not N interpreters each importing
torch), and they never outlive a killed builder."""
from __future__ import annotations

import concurrent.futures as cf
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from medvlp.data_shards.build import _die_with_parent, pool_context

REPO = Path(__file__).resolve().parents[3]
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and forkserver")


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


@linux_only
def test_workers_are_forks_of_a_preloaded_server() -> None:
    ctx = pool_context()
    assert ctx.get_start_method() == "forkserver"
    with cf.ProcessPoolExecutor(2, mp_context=ctx, initializer=_die_with_parent, initargs=(os.getpid(),)) as ex:
        parents = {ex.submit(os.getppid).result() for _ in range(4)}
        # CPU seconds the worker has used so far (a fork starts from zero): the builder's imports (numpy, PIL,
        # webdataset and the torch it pulls in: seconds of CPU) came with the fork, not run in the worker.
        cpu_s = max(ex.submit(time.process_time).result() for _ in range(4))
    assert len(parents) == 1 and os.getpid() not in parents
    (server,) = parents
    assert b"forkserver" in Path(f"/proc/{server}/cmdline").read_bytes()
    assert cpu_s < 0.5, f"a worker spent {cpu_s:.2f} CPU s before its first task (imports not inherited?)"


BUILDER = r"""
import concurrent.futures as cf, os, sys, time
from medvlp.data_shards.build import _die_with_parent, pool_context
ex = cf.ProcessPoolExecutor(1, mp_context=pool_context(), initializer=_die_with_parent, initargs=(os.getpid(),))
print(ex.submit(os.getpid).result(), flush=True)
ex.submit(time.sleep, 600)
time.sleep(600)
"""


@linux_only
def test_killed_builder_takes_forked_workers_along() -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-c", BUILDER], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        worker = int(proc.stdout.readline())
        assert _alive(worker)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and _alive(worker):
            time.sleep(0.1)
        assert not _alive(worker), "a build worker outlived its killed builder"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
