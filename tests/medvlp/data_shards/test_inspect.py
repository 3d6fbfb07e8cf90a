"""Inspector: prevalence numbers, corrupt-sample and checksum detection, contact sheet for each modality."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from medvlp.data_shards.inspect import inspect_shards
from medvlp.data_shards.schema import Sample
from medvlp.data_shards.writer import write_index, write_shards


def _cxr(i: int, split: str = "train") -> Sample:
    img = (np.arange(24 * 20).reshape(24, 20) * (i + 1) % 256).astype(np.uint8)
    labels = {"effusion": [1, 0, -1, 1][i % 4], "edema": 1 if i == 0 else 0}
    return Sample(key=f"cxr/{i:03d}", text="word " * (i + 1), image=img, labels=labels,
                  meta={"modality": "cxr", "split": split, "patient_id": f"p{i}"})


def _build(out, samples, modality="cxr"):
    infos = write_shards(samples, out, maxcount=3)
    labels = sorted({k for s in samples for k in s.labels})
    return write_index(out, infos, modality, labels, command="test")


def test_report_counts_prevalence_and_sheet(tmp_path):
    samples = [_cxr(i, "train" if i < 6 else "test") for i in range(8)]
    _build(tmp_path, samples)
    sheet = tmp_path / "sheet.png"
    rep = inspect_shards(tmp_path, n_examples=2, sheet_path=str(sheet))
    assert "3 shards, 8 samples (index)" in rep
    assert "streamed 8 samples; corrupt 0; sha256 mismatches 0" in rep
    assert "splits: test 2, train 6" in rep
    # effusion over 8 samples: 1,0,-1,1,1,0,-1,1 -> 4 pos / 2 neg / 2 unc, 4/8 stated positive = 50.0%
    line = next(ln for ln in rep.splitlines() if ln.strip().startswith("effusion"))
    assert line.split()[1:9] == ["4", "/", "2", "/", "2", "/", "0", "50.0%"]
    line = next(ln for ln in rep.splitlines() if ln.strip().startswith("edema"))
    assert line.split()[1:9] == ["1", "/", "7", "/", "0", "/", "0", "12.5%"]
    assert "text words: min 1, mean 4.5" in rep
    assert "cxr/000 [train] positives=['edema', 'effusion']: word" in rep and "cxr/002" not in rep
    assert "image uint8 grey (H, W): 8 samples, shape (24, 20) .. (24, 20)" in rep
    im = Image.open(sheet)
    assert im.format == "PNG" and im.size[0] > 100


def test_corrupt_member_and_checksum_mismatch_are_reported(tmp_path):
    samples = [_cxr(i) for i in range(3)]
    doc = _build(tmp_path, samples)
    path = tmp_path / doc["shards"][0]["name"]
    raw = bytearray(path.read_bytes())
    pos = raw.find(b"\x89PNG")  # first sample's PNG: break its header in place (tar stays readable)
    raw[pos + 1:pos + 4] = b"XXX"
    path.write_bytes(bytes(raw))
    rep = inspect_shards(tmp_path)
    assert "streamed 2 samples; corrupt 1; sha256 mismatches 1" in rep
    assert "corrupt: sample 'cxr/000': cannot decode member 'img.png'" in rep


def test_ct_and_slide_sheets(tmp_path):
    rng = np.random.default_rng(0)
    vol = rng.integers(-100, 100, (5, 16, 16)).astype(np.int16)
    mask = np.zeros((5, 16, 16), np.uint8)
    mask[:, 4:10, 4:10] = 1
    ct = [Sample(key=f"ct/{i}", text="liver", volume=vol, mask=mask, labels={"liver lesion": i % 2},
                 meta={"modality": "ct", "split": "train"}) for i in range(2)]
    _build(tmp_path / "ct", ct, "ct")
    rep = inspect_shards(tmp_path / "ct", sheet_path=str(tmp_path / "ct.png"))
    assert "volume int16 + mask (D, H, W): 2 samples" in rep and (tmp_path / "ct.png").stat().st_size > 0
    sl = [Sample(key=f"slide/{i}", text="tumour", feats=rng.normal(size=(30, 8)).astype(np.float16),
                 coords=rng.integers(0, 50, (30, 2)).astype(np.int32), meta={"modality": "slide", "split": "val"})
          for i in range(2)]
    _build(tmp_path / "sl", sl, "slide")
    rep = inspect_shards(tmp_path / "sl", sheet_path=str(tmp_path / "sl.png"))
    assert "labels: none" in rep and "splits: val 2" in rep and (tmp_path / "sl.png").exists()


def test_missing_index_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no index.json"):
        inspect_shards(tmp_path)
