"""Shards at training resolution: shorter side resized, JPEG at a chosen quality, grey kept grey, 16-bit windowed
(or kept as PNG), recorded in index.json; the default build is unchanged."""
from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medvlp.data_shards.build import ImageEncoding, build_shards, resize_shortest, window_u16
from medvlp.data_shards.inspect import iter_samples
from tests.conftest import write_csv

pytestmark = pytest.mark.timeout(60)


def _smooth(rng, h, w, c=None):
    low = rng.random((max(h // 8, 2), max(w // 8, 2)) + ((c,) if c else ()))
    img = Image.fromarray((low * 255).astype(np.uint8)).resize((w, h), Image.BICUBIC)
    return np.asarray(img)


def _corpus(tmp: Path) -> Path:
    rng = np.random.default_rng(0)
    d = tmp / "img"
    d.mkdir()
    grey16 = (_smooth(rng, 120, 80).astype(np.uint16) * 257)
    specs = {"grey8": _smooth(rng, 100, 140), "rgb8": _smooth(rng, 90, 60, 3), "grey16": grey16,
             "small": _smooth(rng, 20, 30)}
    rows = []
    for i, (name, arr) in enumerate(specs.items()):
        Image.fromarray(arr).save(d / f"{name}.png")
        rows.append({"image": f"img/{name}.png", "report": f"report {i}", "patient_id": f"p{i}",
                     "label:effusion": str(i % 2)})
    return write_csv(tmp / "manifest.csv", rows)


def _members(out: Path) -> dict[str, str]:
    names = {}
    for p in sorted(out.glob("*.tar")):
        with tarfile.open(p) as tf:
            for m in tf:
                key, ext = m.name.split(".", 1)
                if ext.startswith("img."):
                    names[key] = ext
    return names


def _jpeg_bytes(out: Path) -> int:
    total = 0
    for p in sorted(out.glob("*.tar")):
        with tarfile.open(p) as tf:
            total += sum(m.size for m in tf if m.name.endswith(".img.jpg"))
    return total


def test_jpeg_shorter_side_grey_stays_grey_and_index_records_it(tmp_path):
    man = _corpus(tmp_path)
    enc = ImageEncoding(resize="shortest", format="jpeg", jpeg_quality=90)
    doc = build_shards(man, tmp_path / "out", workers=1, image_size=48, progress=False, val_frac=0, test_frac=0,
                       encoding=enc)
    assert doc["build"]["image"] == {"size": 48, "resize": "shortest", "format": "jpeg", "jpeg_quality": 90,
                                     "jpeg_subsampling": "4:2:0 (RGB)", "uint16": "window", "window": [0, 65535]}
    assert set(_members(tmp_path / "out").values()) == {"img.jpg"}
    got = {s.key: s.image for s in iter_samples(tmp_path / "out")}
    assert got["img/grey8"].shape == (48, 67) and got["img/grey8"].dtype == np.uint8  # 100x140 -> shorter 48
    assert got["img/rgb8"].shape == (72, 48, 3)
    assert got["img/grey16"].shape == (72, 48) and got["img/grey16"].dtype == np.uint8  # windowed to 8 bits
    assert got["img/small"].shape == (20, 30)  # never upscaled
    # the 16-bit image: x / 65535 at 8-bit precision, then JPEG (quality 90 on a smooth image: a few levels)
    src = np.asarray(Image.open(tmp_path / "img" / "grey16.png"))
    ref = window_u16(resize_shortest(src, 48))
    assert np.abs(got["img/grey16"].astype(int) - ref.astype(int)).mean() < 1.5
    # JPEG quality is a real knob: a lower quality gives smaller shards
    low = build_shards(man, tmp_path / "low", workers=1, image_size=48, progress=False, val_frac=0, test_frac=0,
                       encoding=ImageEncoding(resize="shortest", format="jpeg", jpeg_quality=20))
    assert low["build"]["image"]["jpeg_quality"] == 20
    assert _jpeg_bytes(tmp_path / "low") < 0.8 * _jpeg_bytes(tmp_path / "out")


def test_16bit_kept_as_png_when_asked_and_window_option(tmp_path):
    man = _corpus(tmp_path)
    build_shards(man, tmp_path / "out", workers=1, image_size=48, progress=False, val_frac=0, test_frac=0,
                 encoding=ImageEncoding(resize="shortest", format="jpeg", uint16="png"))
    kinds = _members(tmp_path / "out")
    assert kinds["img/grey16"] == "img.png" and kinds["img/grey8"] == "img.jpg"
    got = {s.key: s.image for s in iter_samples(tmp_path / "out")}
    assert got["img/grey16"].dtype == np.uint16 and got["img/grey16"].shape == (72, 48)
    x = np.array([[0, 1000, 2000, 3000, 65535]], dtype=np.uint16)
    assert window_u16(x, (1000, 3000)).tolist() == [[0, 0, 128, 255, 255]]
    assert window_u16(x).tolist() == [[0, 4, 8, 12, 255]]


def test_default_build_unchanged_by_the_option(tmp_path):
    man = _corpus(tmp_path)
    a = build_shards(man, tmp_path / "a", workers=1, image_size=48, progress=False, val_frac=0, test_frac=0)
    b = build_shards(man, tmp_path / "b", workers=1, image_size=48, progress=False, val_frac=0, test_frac=0,
                     encoding=ImageEncoding())
    assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]
    assert "image" not in a["build"] and set(_members(tmp_path / "a").values()) == {"img.png"}
    side = json.loads((tmp_path / "a" / ".build" / (a["shards"][0]["name"] + ".json")).read_text())
    # switching the encoding changes the plan digest, so a rerun into the same folder re-encodes
    c = build_shards(man, tmp_path / "a", workers=1, image_size=48, progress=False, val_frac=0, test_frac=0,
                     encoding=ImageEncoding(format="jpeg"))
    assert c["build"]["reused_shards"] == 0 and side["plan"] != json.loads(
        (tmp_path / "a" / ".build" / (c["shards"][0]["name"] + ".json")).read_text())["plan"]


def test_bad_encoding_values_fail_with_the_name():
    with pytest.raises(ValueError, match="jpeg quality"):
        ImageEncoding(format="jpeg", jpeg_quality=0)
    with pytest.raises(ValueError, match="resize"):
        ImageEncoding(resize="middle")
    with pytest.raises(ValueError, match="window"):
        ImageEncoding(window=(5.0, 5.0))
