"""Damaged samples that used to pass as good ones: a `txt` member stored as a tar hardlink (the tar reader skips
it, the sample trained with an empty report) and a sample without any image/volume/feature member (passed
`shards inspect --strict`); and a valid long quoted CSV cell that the manifest reader called a stray quote."""
import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from medvlp.data_shards.schema import SampleDecodeError, decode_sample, encode_sample, Sample
from tests.faults.conftest import cli_here as cli, tars

pytestmark = pytest.mark.timeout(120)


def _add(tf, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def _rewrite_first_sample(shard, mode):
    """Rewrite a shard with its first sample damaged: 'hardlink' (txt a hardlink member) or 'no-media'."""
    with tarfile.open(shard) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf.getmembers() if m.isfile()]
    first = members[0][0].name.split(".", 1)[0]
    with tarfile.open(shard, "w") as out:
        for m, data in members:
            if m.name.startswith(first + "."):
                ext = m.name.split(".", 1)[1]
                if mode == "hardlink" and ext == "txt":
                    link = tarfile.TarInfo(m.name)
                    link.type, link.linkname = tarfile.LNKTYPE, members[-1][0].name
                    out.addfile(link)
                    continue
                if mode == "no-media" and ext.startswith("img"):
                    continue
            _add(out, m.name, data)
    return first


def test_decode_refuses_samples_without_txt_or_media():
    s = encode_sample(Sample(key="a/1", text="ok", image=np.zeros((4, 4), np.uint8), labels={}, meta={}))
    assert decode_sample(s).text == "ok"
    with pytest.raises(SampleDecodeError, match="no 'txt' member"):
        decode_sample({k: v for k, v in s.items() if k != "txt"})
    with pytest.raises(SampleDecodeError, match="no image, volume or feature member"):
        decode_sample({k: v for k, v in s.items() if k != "img.png"})
    assert decode_sample({**s, "txt": b""}).text == ""  # an empty report written as such is still a sample


@pytest.mark.parametrize("mode, want", [("hardlink", "no 'txt' member"), ("no-media", "no image, volume")])
def test_damaged_sample_is_corrupt_in_the_stream_and_fails_strict_inspect(shards, mode, want):
    from medvlp.data_shards.config import DataConfig
    from medvlp.data_shards.stream import make_loader

    key = _rewrite_first_sample(tars(shards)[0], mode)
    cfg = DataConfig(modality="cxr", batch_size=10, workers=0, resampled=False, shuffle_buffer=0, augment=False,
                     image_size=32)
    split = json.loads(decode_sample_json(tars(shards)[0], key))["meta"]["split"]
    loader = make_loader(cfg, train=False, shards=str(shards), split=split)
    keys = [k for b in loader for k in b["key"]]
    assert key not in keys and loader.stats["corrupt"] == 1
    proc = cli("shards", "inspect", shards, "--strict", "--n", 0)
    assert proc.returncode == 1 and want in proc.stdout + proc.stderr


def decode_sample_json(shard, key):
    with tarfile.open(shard) as tf:
        return tf.extractfile(f"{key}.json").read()


def test_long_quoted_csv_cell_is_read(tmp_path):
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "a.png")
    report = "Findings, in detail: " + "x" * 1_300_000 + ' and a "quoted" word.'
    cell = '"' + report.replace('"', '""') + '"'
    (tmp_path / "m.csv").write_text(f"image,report,patient_id\na.png,{cell},p1\n")
    proc = cli("shards", "build", "--manifest", tmp_path / "m.csv", "--out", tmp_path / "out", "--workers", 1,
               "--image-size", 8)
    assert proc.returncode == 0, proc.stderr[-2000:]
    from medvlp.data_shards.inspect import iter_samples
    (s,) = list(iter_samples(tmp_path / "out"))
    assert s.text == report
