"""A non-editable install works: the wheel holds the code and its data (recipes, DeepSpeed templates, model
configs) and no tests; installed on its own it answers `medvlp --help`, `medvlp config show debug` and imports,
from a directory outside the repository."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    src = tmp_path_factory.mktemp("src") / "medvlp-src"  # setuptools writes build/ into the source tree: a copy
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".venv", ".git", "build", "*.egg-info", "__pycache__",
                                                             "demo_out", "runs", "mlruns*", "mlartifacts"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(out), str(src)], capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (whl,) = out.glob("medvlp-*.whl")
    return whl


def test_wheel_holds_package_data_and_no_tests(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"medvlp"}, tops
    for needed in ("medvlp/launch/recipes/debug.yaml", "medvlp/launch/recipes/demo.yaml",
                   "medvlp/launch/deepspeed/zero3.json", "medvlp/pretrain/model_configs/debug.json",
                   "medvlp/pretrain/model_configs/ResNet18-3D.json", "medvlp/pretrain/mlflow_pyfunc.py",
                   "medvlp/kernels/contrastive.py", "medvlp/finetune/report/stage.py"):
        assert needed in names, needed
    assert not [n for n in names if "/tests/" in n or n.startswith("tests/") or "conftest" in n]
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "medvlp = medvlp.launch.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()


def test_installed_wheel_runs_from_another_directory(wheel, tmp_path):
    target = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
                           str(wheel)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    work = tmp_path / "elsewhere"
    work.mkdir()
    # the installed copy comes first on the path, ahead of the editable checkout of this environment
    env = {**os.environ, "PYTHONPATH": str(target)}
    script = target / "bin" / "medvlp"
    assert script.is_file()
    run = lambda *a: subprocess.run([sys.executable, *a], cwd=work, env=env, capture_output=True, text=True,  # noqa: E731
                                    timeout=240)
    p = run("-c", "import medvlp, medvlp.pretrain, medvlp.kernels; print(medvlp.__file__)")
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().startswith(str(target)), p.stdout
    p = run(str(script), "--help")
    assert p.returncode == 0 and "pretrain" in p.stdout, p.stderr
    p = run(str(script), "config", "show", "debug")
    assert p.returncode == 0, p.stderr[-2000:]
    assert "batch_size" in p.stdout
