"""`shards merge-index` joins parallel part builds only when they fit together: every part present, built from
the same manifest, no sample key in two shards, no sample missing. Each violation is one error naming it."""
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from medvlp.data_shards.build import build_shards, merge_indexes
from tests.faults.conftest import cli_here, one_line_error

N = 12


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """A manifest of N rows built as 2 parts (not merged)."""
    src = tmp_path_factory.mktemp("merge_src")
    rng = np.random.default_rng(0)
    rows = ["image,report,patient_id"]
    for i in range(N):
        Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8), mode="L").save(src / f"i{i}.png")
        rows.append(f"i{i}.png,report {i},p{i}")
    (src / "m.csv").write_text("\n".join(rows) + "\n")
    out = src / "out"
    for i in range(2):
        build_shards(src / "m.csv", out, workers=1, maxcount=3, image_size=8, part=(i, 2), progress=False)
    return src


@pytest.fixture
def out(parts, tmp_path):
    d = tmp_path / "out"
    shutil.copytree(parts / "out", d)
    return d


def _merge_error(out):
    proc = cli_here("shards", "merge-index", out)
    assert proc.returncode == 2, proc.stdout
    return one_line_error(proc)


def _index(out, i):
    return json.loads((out / f"index.part{i}of2.json").read_text())


def _write(out, i, doc):
    (out / f"index.part{i}of2.json").write_text(json.dumps(doc))


def test_parts_merge(out):
    doc = merge_indexes(out)
    assert doc["num_samples"] == N


def test_missing_part(out):
    (out / "index.part1of2.json").unlink()
    assert "missing part indexes ['index.part1of2.json']" in _merge_error(out)


def test_parts_disagree_on_their_number(out):
    shutil.copy(out / "index.part0of2.json", out / "index.part0of3.json")
    assert "disagree on the number of parts: [2, 3]" in _merge_error(out)


def test_duplicate_sample_in_two_shards(out):
    a, b = _index(out, 0), _index(out, 1)
    dup = dict(a["shards"][0], name="part001of002-000099.tar")
    shutil.copy(out / a["shards"][0]["name"], out / dup["name"])
    b["shards"].append(dup)
    _write(out, 1, b)
    err = _merge_error(out)
    assert "is in both" in err and a["shards"][0]["name"] in err and dup["name"] in err


def test_missing_sample(out):
    b = _index(out, 1)
    gone = b["shards"].pop()
    (out / gone["name"]).unlink()
    _write(out, 1, b)
    assert "some sample is missing" in _merge_error(out)


def test_parts_from_different_manifests(parts, out):
    changed = parts / "m2.csv"
    changed.write_text((parts / "m.csv").read_text().replace("report 3", "report three"))
    build_shards(changed, out, workers=1, maxcount=3, image_size=8, part=(1, 2), progress=False)
    assert "built from different manifests" in _merge_error(out)
