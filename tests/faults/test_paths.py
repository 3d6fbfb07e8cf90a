"""The one path policy: manifest paths and importer files resolve under a data root (the manifest's folder, or
`--root`), symlinks out of it and FIFOs are refused; index.json names plain shard file names only (reads and
writes), so neither a manifest nor an index can read or write outside its folder."""
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from tests.faults.conftest import cli_here as cli, one_line_error, tars

pytestmark = pytest.mark.timeout(180)

HEADER = "image,report_file,patient_id\n"


@pytest.fixture
def tree(tmp_path):
    """tmp/data/{a.png,b.png,r.txt,man.csv?}, tmp/outside/{secret.txt, c.png}."""
    data, out = tmp_path / "data", tmp_path / "outside"
    data.mkdir(), out.mkdir()
    rng = np.random.default_rng(0)
    for d, name in ((data, "a.png"), (data, "b.png"), (out, "c.png")):
        Image.fromarray(rng.integers(0, 255, (12, 12), dtype=np.uint8), mode="L").save(d / name)
    (data / "r.txt").write_text("No effusion.")
    (out / "secret.txt").write_text("root:x:0:0:secret")
    return tmp_path


def _build(tree, rows, *extra):
    man = tree / "data" / "man.csv"
    man.write_text(HEADER + "".join(rows))
    return cli("shards", "build", "--manifest", man, "--out", tree / "shards", "--workers", 1, "--image-size", 16,
               *extra)


def _texts(shard_dir):
    from medvlp.data_shards.inspect import iter_samples
    return [s.text for s in iter_samples(shard_dir)]


@pytest.mark.parametrize("given, why", [
    ("../outside/secret.txt", "lies outside the data root"),
    ("{abs}", "lies outside the data root"),
    ("sub/../../outside/secret.txt", "lies outside the data root"),
])
def test_manifest_path_outside_the_root_is_refused(tree, given, why):
    given = given.format(abs=tree / "outside" / "secret.txt")
    proc = _build(tree, ["a.png,r.txt,p0\n", f"b.png,{given},p1\n"])
    assert proc.returncode == 2
    err = one_line_error(proc)
    assert "man.csv line 3: column 'report_file'" in err and why in err and "--root" in err
    assert not (tree / "shards" / "index.json").exists()


def test_image_outside_the_root_is_refused_and_root_widens_it(tree):
    rows = ["a.png,r.txt,p0\n", "../outside/c.png,r.txt,p1\n"]
    proc = _build(tree, rows)
    assert proc.returncode == 2 and "line 3: column 'image'" in one_line_error(proc)
    ok = _build(tree, rows, "--root", tree)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert len(_texts(tree / "shards")) == 2


def test_symlink_out_of_the_root_is_refused_unless_allowed(tree):
    (tree / "data" / "link.txt").symlink_to(tree / "outside" / "secret.txt")
    (tree / "data" / "imgs").symlink_to(tree / "outside", target_is_directory=True)
    rows = ["a.png,link.txt,p0\n", "imgs/c.png,r.txt,p1\n"]
    proc = _build(tree, rows)
    assert proc.returncode == 2
    err = one_line_error(proc)
    assert "line 2: column 'report_file': 'link.txt' is a symlink to" in err and "--follow-symlinks" in err
    assert "line 3: column 'image': 'imgs/c.png' is a symlink" in err
    ok = _build(tree, rows, "--follow-symlinks")
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "root:x:0:0:secret" in _texts(tree / "shards")  # the user allowed it


def test_symlink_inside_the_root_is_fine(tree):
    (tree / "data" / "same.txt").symlink_to(tree / "data" / "r.txt")
    proc = _build(tree, ["a.png,same.txt,p0\n"])
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_fifo_in_a_manifest_is_refused_without_blocking(tree):
    os.mkfifo(tree / "data" / "pipe.txt")
    proc = _build(tree, ["a.png,r.txt,p0\n", "b.png,pipe.txt,p1\n"])
    assert proc.returncode == 2 and "line 3: column 'report_file': 'pipe.txt' is a FIFO" in one_line_error(proc)


def test_policy_api(tmp_path):
    from medvlp.data_shards.paths import PathError, PathPolicy, decode_text, plain_name

    (tmp_path / "d" / "s").mkdir(parents=True)
    (tmp_path / "d" / "s" / "x.dcm").write_bytes(b"x")
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "y.dcm").write_bytes(b"y")
    pol = PathPolicy.for_source(tmp_path / "d")
    assert pol.resolve("s/x.dcm") == tmp_path / "d" / "s" / "x.dcm"
    assert pol.resolve("s") == tmp_path / "d" / "s"  # a series folder
    (tmp_path / "d" / "s" / "z.dcm").symlink_to(tmp_path / "e" / "y.dcm")  # a file in the folder links out
    with pytest.raises(PathError, match=r"s/z.dcm' is a symlink"):
        pol.resolve("s", what="line 2")
    assert PathPolicy.for_source(tmp_path / "d", [tmp_path / "e"]).resolve("s")  # widened
    with pytest.raises(PathError, match="outside the data root"):
        pol.resolve("../e/y.dcm")
    for bad in ("../x.tar", "/etc/passwd", "a/b.tar", "..", "", "a\\b.tar", "x\n.tar", None, 3):
        with pytest.raises(PathError):
            plain_name(bad, "index.json")
    assert plain_name("shard-000000.tar") == "shard-000000.tar"
    assert decode_text("\ufeffok".encode(), "r") == "ok"
    with pytest.raises(PathError, match=r"r.txt: not UTF-8 text \(byte 0xe9 on line 2\)"):
        decode_text("a\nd\xe9j\xe0".encode("latin-1"), "r.txt")
    with pytest.raises(PathError, match="NUL"):
        decode_text(b"ab\0c", "r.txt")


# ----------------------------------------------------------------------------------------------- index.json names
@pytest.mark.parametrize("name", ["../../../x", "/etc/passwd", "sub/shard.tar", ".."])
def test_index_shard_name_that_is_a_path_is_refused(shards, name):
    from medvlp.data_shards.stream import resolve_shards
    from medvlp.data_shards.writer import read_index

    doc = json.loads((shards / "index.json").read_text())
    doc["shards"][1]["name"] = name
    (shards / "index.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=r"shards\[1\]: shard name .* is not a plain file name|not a file name"):
        read_index(shards)
    with pytest.raises(ValueError, match="not a plain file name"):
        resolve_shards(str(shards), "train")
    proc = cli("shards", "inspect", shards, "--strict")
    assert proc.returncode == 2 and "not a plain file name" in one_line_error(proc)


def test_part_index_and_merge_refuse_path_names(shards):
    from medvlp.data_shards.inspect import iter_samples

    doc = json.loads((shards / "index.json").read_text())
    doc["shards"][0]["name"] = "../" + doc["shards"][0]["name"]
    (shards / "index.part0of1.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="not a plain file name"):
        list(iter_samples(shards, "index.part0of1.json"))
    from medvlp.data_shards.stream import resolve_shards
    with pytest.raises(ValueError, match="not a plain file name"):
        resolve_shards(str(shards), "train", index_path=str(shards / "index.part0of1.json"))


def test_features_extract_reads_and_writes_nothing_outside(shards, tmp_path):
    """`features extract` on an index naming ../../x: refused before any shard is read or part written."""
    from medvlp.finetune.report.features import extract_features

    victim = tmp_path / "x"
    shutil.copy(tars(shards)[0], victim)
    doc = json.loads((shards / "index.json").read_text())
    doc["shards"][0]["name"] = os.path.relpath(victim, shards)
    (shards / "index.json").write_text(json.dumps(doc))
    out = tmp_path / "feats"
    with pytest.raises(ValueError, match="not a plain file name"):
        extract_features(str(tmp_path / "no-model"), str(shards), str(out))
    assert not list(tmp_path.rglob("x.npz"))


def test_writing_an_index_with_a_path_name_is_refused(tmp_path):
    from medvlp.data_shards.writer import ShardInfo, write_index

    with pytest.raises(ValueError, match="not a plain file name"):
        write_index(tmp_path, [ShardInfo("../evil.tar", 1, 10, "0" * 64, {"train": 1})], "cxr", [])
    assert not (tmp_path / "index.json").exists()
