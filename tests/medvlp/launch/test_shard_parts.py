"""Shard building as a parallel job, through the CLI: three concurrent `medvlp shards build --part i/3` processes
then `shards merge-index` cover every manifest sample exactly once; the SLURM array script that
`medvlp launch --slurm --array 3` writes runs the same three parts (executed here with `srun` as a pass-through)
and gives byte-identical shards."""
import csv
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[3]
N_ROWS = 18


def _env(**extra):
    drop = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"}
    return {**{k: v for k, v in os.environ.items() if k not in drop}, "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(REPO), **extra}


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    """N_ROWS real PNG files (grey and RGB, odd sizes) of 9 patients, with reports and labels, in a CSV."""
    root = tmp_path_factory.mktemp("raw")
    (root / "img").mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(N_ROWS):
        h, w = 24 + i, 40 - i
        arr = rng.integers(0, 255, (h, w) if i % 2 else (h, w, 3), dtype=np.uint8)
        Image.fromarray(arr).save(root / "img" / f"x{i:02d}.png")
        rows.append({"image": f"img/x{i:02d}.png", "report": f"Study {i}: {'small effusion' if i % 3 else 'normal'}.",
                     "patient_id": f"p{i // 2}", "label:effusion": str(int(i % 3 > 0))})
    path = root / "manifest.csv"
    with open(path, "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=list(rows[0]))
        wr.writeheader()
        wr.writerows(rows)
    return path


def _cli(*args):
    return [sys.executable, "-m", "medvlp.launch.cli", *args]


def _keys_in_shards(out: Path) -> list[str]:
    """Every sample key found in the shards the merged index lists (read from the tar members themselves)."""
    doc = json.loads((out / "index.json").read_text())
    keys = []
    for sh in doc["shards"]:
        with tarfile.open(out / sh["name"]) as tf:
            keys += sorted({m.name.split(".", 1)[0] for m in tf.getmembers() if m.isfile()})
    return keys


def _expected_keys(manifest: Path) -> list[str]:
    from medvlp.data_shards.manifest import read_manifest

    rows, errors, n = read_manifest(manifest)
    assert not errors and n == N_ROWS
    return sorted(r.key for r in rows)


def _build_parts_concurrently(cmds, cwd):
    procs = [subprocess.Popen(c, cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for c in cmds]
    outs = [p.communicate(timeout=180)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    return outs


def test_three_parallel_parts_merge_to_every_sample_once(manifest, tmp_path):
    out = tmp_path / "shards"
    cmds = [_cli("shards", "build", "--manifest", str(manifest), "--out", str(out), "--part", f"{i}/3",
                 "--workers", "1", "--maxcount", "4", "--image-size", "32") for i in range(3)]
    _build_parts_concurrently(cmds, REPO)
    assert sorted(p.name for p in out.glob("index.part*.json")) == [f"index.part{i}of3.json" for i in range(3)]
    assert not (out / "index.json").exists()
    merged = subprocess.run(_cli("shards", "merge-index", str(out)), cwd=REPO, env=_env(), capture_output=True,
                            text=True, timeout=120)
    assert merged.returncode == 0, merged.stderr[-3000:]
    assert f"merged: {N_ROWS} samples" in merged.stdout
    doc = json.loads((out / "index.json").read_text())
    assert doc["num_samples"] == N_ROWS == sum(s["count"] for s in doc["shards"])
    keys = _keys_in_shards(out)
    assert sorted(keys) == _expected_keys(manifest) and len(set(keys)) == len(keys)
    assert {s["name"][:len("part000of003")] for s in doc["shards"]} == {f"part{i:03d}of003" for i in range(3)}

    again = subprocess.run(cmds[0], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert again.returncode == 0  # a rerun of one part is idempotent: the merged set stays the same
    assert json.loads((out / "index.json").read_text())["num_samples"] == N_ROWS


def test_merge_names_the_missing_part(manifest, tmp_path):
    out = tmp_path / "shards"
    cmd = _cli("shards", "build", "--manifest", str(manifest), "--out", str(out), "--part", "1/3", "--workers", "1")
    assert subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, timeout=120).returncode == 0
    from medvlp.data_shards.build import merge_indexes
    with pytest.raises(ValueError, match=r"missing part indexes \['index.part0of3.json', 'index.part2of3.json'\]"):
        merge_indexes(out)


def test_slurm_array_script_builds_the_same_parts(manifest, tmp_path):
    out, script = tmp_path / "shards", tmp_path / "build.sbatch"
    launch = _cli("launch", "--slurm", "--array", "3", "--job-name", "build", "--script", str(script), "--",
                  "shards", "build", "--manifest", str(manifest), "--out", str(out), "--workers", "1",
                  "--maxcount", "4", "--image-size", "32")
    dry = subprocess.run(launch[:4] + ["--dry-run"] + launch[4:], cwd=REPO, env=_env(), capture_output=True,
                         text=True, timeout=120)
    assert dry.returncode == 0 and "#SBATCH --array=0-2" in dry.stdout and not script.exists()  # printed only
    made = subprocess.run(launch, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert made.returncode == 0 and f"wrote {script}" in made.stdout
    assert "submit with: sbatch" in made.stdout  # written, not submitted
    text = script.read_text()
    assert "--part $SLURM_ARRAY_TASK_ID/3" in text and text.startswith("#!/bin/bash")

    shims = tmp_path / "bin"  # what SLURM would provide: srun runs its command; medvlp is the console script
    shims.mkdir()
    (shims / "srun").write_text('#!/bin/sh\nexec "$@"\n')
    (shims / "medvlp").write_text(f'#!/bin/sh\nexec {sys.executable} -m medvlp.launch.cli "$@"\n')
    for f in shims.iterdir():
        f.chmod(0o755)
    path = f"{shims}:{os.environ.get('PATH', '')}"
    procs = [subprocess.Popen(["bash", str(script)], cwd=REPO, env=_env(PATH=path, SLURM_ARRAY_TASK_ID=str(i)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(3)]
    for p in procs:
        log = p.communicate(timeout=180)[0]
        assert p.returncode == 0, log[-3000:]
    merged = subprocess.run(_cli("shards", "merge-index", str(out)), cwd=REPO, env=_env(), capture_output=True,
                            text=True, timeout=120)
    assert merged.returncode == 0, merged.stderr[-3000:]
    keys = _keys_in_shards(out)
    assert sorted(keys) == _expected_keys(manifest) and len(set(keys)) == len(keys)

    ref = tmp_path / "ref"  # the same three parts built directly: deterministic, so byte-identical shards
    _build_parts_concurrently([_cli("shards", "build", "--manifest", str(manifest), "--out", str(ref), "--part",
                                    f"{i}/3", "--workers", "1", "--maxcount", "4", "--image-size", "32")
                               for i in range(3)], REPO)
    assert sorted(p.name for p in ref.glob("*.tar")) == sorted(p.name for p in out.glob("*.tar"))
    for tar in ref.glob("*.tar"):
        assert tar.read_bytes() == (out / tar.name).read_bytes(), tar.name
