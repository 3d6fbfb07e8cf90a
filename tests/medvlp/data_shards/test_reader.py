"""The one shard reader: member names, a split's shards, samples; and every caller reads what was written."""
from __future__ import annotations

import io
import json
import tarfile
from types import SimpleNamespace

import numpy as np
import pytest
from webdataset.tariterators import base_plus_ext

from medvlp.data_shards import reader
from medvlp.data_shards.schema import Sample, SampleDecodeError
from medvlp.data_shards.writer import ShardInfo, sha256_file, write_index, write_shards

pytestmark = pytest.mark.timeout(60)

LABELS = ["tumor"]


def _samples(n: int = 18) -> list[Sample]:
    """Tiny RGB patches, one label; every third in test, every ninth in val, keys under a folder."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        split = "val" if i % 9 == 4 else "test" if i % 3 == 0 else "train"
        out.append(Sample(key=f"set_v2/p{i:02d}", text=f"patch {i} of slide {i // 4}", image=rng.integers(
            0, 256, (8, 8, 3), dtype=np.uint8), labels={"tumor": i % 2}, meta={"split": split, "modality": "patho",
                                                                             "slide_id": f"s{i // 4}"}))
    return out


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory):
    d = tmp_path_factory.mktemp("reader") / "sh"
    samples = _samples()
    write_index(d, write_shards(samples, d, maxcount=5), "patho", LABELS, command="test")
    return d, samples


def _of(samples, split):
    return [s for s in samples if s.split == split]


# ------------------------------------------------------------------------------------------- member names
ODD_NAMES = ["a.txt", "a.img.png", "dir/b.json", "set.v2/c.json", "x.y/z", "noext", ".hidden", "d/.hidden",
             "d/e.", "UP.TXT", "a/b/c.d.e", "dir.tar/x.json", "k..json"]


@pytest.mark.parametrize("name", ODD_NAMES)
def test_member_rule_is_webdatasets(name):
    assert reader.split_member(name) == base_plus_ext(name)  # the stream has always grouped by this rule


def test_member_rule_values():
    assert reader.split_member("ab12.img.png") == ("ab12", "img.png")
    assert reader.split_member("set.v2/ab12.json") == ("set.v2/ab12", "json")
    assert reader.split_member("noext") == (None, None)
    assert reader.split_member("set.v2/noext") == (None, None)


# ------------------------------------------------------------------------------------------------ odd tars
def _tar(path, members: list[tuple[str, bytes]], truncate: int = 0) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
        ti = tarfile.TarInfo("adir")
        ti.type = tarfile.DIRTYPE
        tf.addfile(ti)
    raw = buf.getvalue()
    path.write_bytes(raw[:truncate] if truncate else raw)


def _doc(split: str) -> bytes:
    return json.dumps({"meta": {"split": split}, "labels": {}}).encode()


def test_odd_member_names_group_by_key(tmp_path):
    p = tmp_path / "odd.tar"
    _tar(p, [("a.txt", b"A"), ("a.json", _doc("train")), ("set.v2/b.TXT", b"B"), ("set.v2/b.json", _doc("test")),
             ("stray", b"no dot: no member"), ("c.img.png", b"png"), ("c.txt", b"C")])
    got = list(reader.iter_shard(p))
    assert [(k, err) for k, _, err in got] == [("a", None), ("set.v2/b", None), ("c", None)]
    assert got[1][1]["txt"] == b"B"  # extensions lower-cased
    assert set(got[2][1]) == {"__key__", "__url__", "img.png", "txt"}
    only_json = list(reader.iter_raw([p], members=("json",)))
    assert [r["__key__"] for r in only_json] == ["a", "set.v2/b"]  # c has no json: not yielded
    assert all(set(r) == {"__key__", "__url__", "json"} for r in only_json)


def test_repeated_member_and_truncated_tar_name_the_shard(tmp_path):
    p = tmp_path / "dup.tar"
    _tar(p, [("a.txt", b"A"), ("b.txt", b"1"), ("b.txt", b"2")])
    got = list(reader.iter_shard(p))
    assert got[0][0] == "a" and got[0][2] is None
    assert got[-1][1] is None and "dup.tar: unreadable tar" in got[-1][2] and "appears twice" in got[-1][2]
    big = tmp_path / "cut.tar"
    _tar(big, [("a.txt", b"A" * 3000), ("b.txt", b"B" * 3000)], truncate=4600)
    got = list(reader.iter_shard(big))
    assert got[0][:2] == ("a", {"__key__": "a", "__url__": str(big), "txt": b"A" * 3000})
    assert got[1:] == [("b", None, got[1][2])] and got[1][2].startswith("cut.tar: unreadable tar")  # partial dropped
    with pytest.raises(reader.ShardReadError, match="cut.tar: unreadable tar"):
        list(reader.iter_raw([big]))


def test_missing_json_goes_to_on_bad_or_raises(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    _tar(d / "m-000000.tar", [("a.txt", b"A"), ("a.json", _doc("train")), ("b.txt", b"B"), ("c.txt", b"C"),
                              ("c.json", b"{not json")])
    info = ShardInfo("m-000000.tar", 3, 0, sha256_file(d / "m-000000.tar"), {"train": 3})
    write_index(d, [info], "cxr", [], command="test")
    with pytest.raises(SampleDecodeError, match="sample 'b': no 'json' member"):
        list(reader.iter_split(str(d), "train"))
    bad = []
    got = [raw["__key__"] for raw, _ in reader.iter_split(str(d), "train", on_bad=lambda r, e: bad.append(str(e)))]
    assert got == ["a"] and len(bad) == 2 and "json member unreadable" in bad[1]


def test_split_reads_only_shards_holding_it(shard_set, tmp_path):
    import shutil

    d, samples = shard_set
    copy = tmp_path / "c"
    shutil.copytree(d, copy)
    index = json.loads((copy / "index.json").read_text())
    no_val = [sh["name"] for sh in index["shards"] if not sh["splits"].get("val")]
    assert no_val
    for name in no_val:
        (copy / name).unlink()  # never opened for the val split
    assert [s.key for s in reader.iter_samples(str(copy), "val")] == [s.key for s in _of(samples, "val")]


# ------------------------------------------------------------------------------- every caller, same samples
def test_every_reader_reads_the_written_samples(shard_set):
    from medvlp.data_shards import build, inspect
    from medvlp.finetune.path_clip.data import TaskSpec, read_split
    from medvlp.pretrain import retrieval, tokenizer, zeroshot

    d, samples = shard_set
    keys = {sp: [s.key for s in _of(samples, sp)] for sp in ("train", "val", "test")}
    assert [s.key for s in inspect.iter_samples(d)] == [s.key for s in samples]
    assert [s.key for s in reader.iter_samples(str(d))] == [s.key for s in samples]
    urls = reader.resolve_shards(str(d), "train").urls
    assert [k for u in urls for k in build.shard_keys(u)] == [s.key for s in samples]
    task = TaskSpec.build(LABELS, label="tumor")
    cfg = SimpleNamespace(val_shards=str(d), train_shards="", index="")
    for sp, want in keys.items():
        got = [s for s in reader.iter_samples(str(d), sp)]
        assert [s.key for s in got] == want
        assert all(np.array_equal(g.image, s.image) for g, s in zip(got, _of(samples, sp)))
        assert list(tokenizer.iter_shard_texts(d, sp)) == [s.text for s in _of(samples, sp)]
        k, Y = zeroshot.scan_labels(urls, sp, LABELS)
        assert k == want and Y[:, 0].tolist() == [s.labels["tumor"] for s in _of(samples, sp)]
        metas = retrieval.sample_metas(cfg, sp, want[::-1] + ["absent"])
        assert metas == [s.meta for s in _of(samples, sp)][::-1] + [{}]
        split = read_split(str(d), sp, task)
        assert split.keys == want and split.y_N.tolist() == [s.labels["tumor"] for s in _of(samples, sp)]
        ims = split.images([len(want) - 1, 0])
        assert np.array_equal(ims[0], _of(samples, sp)[-1].image) and np.array_equal(ims[1], _of(samples, sp)[0].image)


def test_stream_and_feature_extractor_read_the_same_keys(shard_set):
    import torch

    from medvlp.data_shards.config import DataConfig
    from medvlp.data_shards.stream import make_loader
    from medvlp.finetune.report.features import _embed_shard

    d, samples = shard_set
    cfg = DataConfig(train_shards=str(d), batch_size=4, image_size=8, workers=0, seed=1, resampled=False)
    for sp in ("train", "test"):
        got = [k for b in make_loader(cfg, train=False, split=sp) for k in b["key"]]
        assert got == [s.key for s in _of(samples, sp)]

    class Tower:
        def encode_image(self, x, normalize=False):
            return x.float().flatten(1)[:, :3]

    url = reader.resolve_shards(str(d), "train").urls[1]
    part = _embed_shard(url, Tower(), lambda im: torch.tensor(np.array(im)).reshape(-1)[:6], 2, "slide_id",
                        SimpleNamespace(update=lambda n: None))
    assert [r["key"] for r in part["rows"]] == [s.key for s in samples[5:10]]
    assert [r["slide"] for r in part["rows"]] == [s.meta["slide_id"] for s in samples[5:10]]
