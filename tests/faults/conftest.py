"""Fault-injection helpers: a fresh small shard set per test (tests damage it) and a CLI runner."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def pristine_shards(tmp_path_factory):
    """40 synthetic radiographs (32x32) in 4 shards of 10, with index.json; copy it before damaging it."""
    from medvlp.data_shards.synth import synth_to_shards

    out = tmp_path_factory.mktemp("pristine")
    synth_to_shards(out, modality="cxr", n=40, seed=0, shard_size=10, size=32)
    return out


@pytest.fixture
def shards(pristine_shards, tmp_path):
    """A private copy of the pristine shard set."""
    d = tmp_path / "shards"
    shutil.copytree(pristine_shards, d)
    return d


def tars(d: Path) -> list[Path]:
    return sorted(Path(d).glob("*.tar"))


def clean_env(**extra) -> dict:
    drop = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(REPO), **extra)
    return env


def cli(*args, timeout=300, **kw) -> subprocess.CompletedProcess:
    """`medvlp ARGS` in a subprocess (the real entry point), output captured as text."""
    return subprocess.run([sys.executable, "-m", "medvlp.launch.cli", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, env=clean_env(), timeout=timeout, **kw)


def cli_here(*args) -> subprocess.CompletedProcess:
    """`medvlp ARGS` through `medvlp.launch.cli.main` in this process (no interpreter start-up); an escaping exception
    shows up as a traceback in stderr, as it would on a terminal."""
    import contextlib
    import io
    import traceback

    from medvlp.launch.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main([str(a) for a in args])
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else (print(e.code, file=sys.stderr) or 2)
        except Exception:  # noqa: BLE001
            traceback.print_exc()
            rc = 1
    return subprocess.CompletedProcess(args, rc, out.getvalue(), err.getvalue())


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    """The error a failed command printed: no Python traceback, and it names the problem on an 'error:' line."""
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errs = [ln for ln in proc.stderr.replace("\r", "\n").splitlines() if ln.startswith(("error:", "config error:"))
            or "] error:" in ln or "s]error:" in ln]
    assert errs, proc.stderr[-3000:]
    return proc.stderr


def build_rows(d: Path, rows: list[dict], *extra) -> subprocess.CompletedProcess:
    """`shards build` (in this checkout) of a manifest written from `rows` into d/m.csv, output d/out, 16 px."""
    from tests.conftest import write_csv

    man = write_csv(d / "m.csv", rows)
    return cli_here("shards", "build", "--manifest", man, "--out", d / "out", "--workers", 1, "--image-size", 16, *extra)


def sample_metas(out: Path) -> list[dict]:
    """The meta of every sample stored under `out`."""
    from medvlp.data_shards.inspect import iter_samples

    return [s.meta for s in iter_samples(out)]
