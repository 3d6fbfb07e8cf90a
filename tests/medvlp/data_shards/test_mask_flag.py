"""A CT sample without an organ mask is flagged (meta has_mask, index samples_without_mask), shown by inspect, told
apart in a batch (member has_mask), and refused or skipped by name where a consumer needs masks."""
from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import numpy as np
import pytest

from medvlp.data_shards.build import build_shards, merge_indexes
from medvlp.data_shards.config import DataConfig
from medvlp.data_shards.inspect import inspect_report, iter_samples
from medvlp.data_shards.require import ShardRequirementError, missing_mask_reason, require_shards
from medvlp.data_shards.schema import Sample
from tests.conftest import write_csv

pytestmark = pytest.mark.timeout(120)


def _ct_set(tmp_path, masked: tuple[bool, ...], **kw):
    rows = []
    for i, m in enumerate(masked):
        vol = np.full((3, 4, 4), -100 + i, np.int16)
        np.save(tmp_path / f"v{i}.npy", vol)
        row = {"volume": f"v{i}.npy", "mask": "", "report": f"case {i}", "patient_id": f"p{i}", "split": "train"}
        if m:
            np.save(tmp_path / f"m{i}.npy", (vol > -1000).astype(np.uint8))
            row["mask"] = f"m{i}.npy"
        rows.append(row)
    out = tmp_path / "out"
    build_shards(write_csv(tmp_path / "ct.csv", rows), out, workers=1, progress=False, **kw)
    return out


def test_meta_and_index_say_which_volumes_have_no_mask(tmp_path):
    out = _ct_set(tmp_path, (True, False, True, False), maxcount=2)
    flags = {s.key: (s.meta["has_mask"], s.mask is not None) for s in iter_samples(out)}
    assert sorted(flags.values()) == [(False, False), (False, False), (True, True), (True, True)]
    doc = json.loads((out / "index.json").read_text())
    assert doc["samples_without_mask"] == 2
    assert sum(sh["without_mask"] for sh in doc["shards"]) == 2 and len(doc["shards"]) == 2
    report, problems = inspect_report(out)
    assert "organ masks: 2 of 4 volumes have none (meta has_mask: false" in report and not problems


def test_inspect_flags_a_mask_flag_that_contradicts_the_members(tmp_path):
    out = _ct_set(tmp_path, (True, False))
    doc = json.loads((out / "index.json").read_text())
    doc["samples_without_mask"] = 0
    (out / "index.json").write_text(json.dumps(doc))
    _, problems = inspect_report(out)
    assert problems == ["masks: index.json says 0 samples without mask, the shards hold 1"]


def test_merged_parts_keep_the_count(tmp_path):
    masked = (True, False, False, True, False, True)
    for i in range(2):
        _ct_set(tmp_path, masked, part=(i, 2))
    doc = merge_indexes(tmp_path / "out")
    assert doc["samples_without_mask"] == 3


def test_has_mask_member_tells_a_zero_map_from_a_mask(tmp_path):
    from medvlp.data_shards.stream import make_loader

    out = _ct_set(tmp_path, (True, False, True))
    cfg = DataConfig(train_shards=str(out), modality="ct", batch_size=3, resampled=False, shuffle_buffer=0,
                     augment=False, members=["has_mask"])
    (batch,) = list(make_loader(cfg, train=False, split="train"))
    by_key = dict(zip(batch["key"], batch["has_mask"].tolist()))
    masks = dict(zip(batch["key"], batch["mask"].flatten(1).amax(1).tolist()))
    assert sorted(by_key.values()) == [False, True, True]
    assert all(masks[k] == 0 for k, has in by_key.items() if not has)  # the stream's zero map, now flagged
    assert all(masks[k] == 1 for k, has in by_key.items() if has)


def _cfg(out):
    return SimpleNamespace(train_shards=str(out), val_shards="", index="", allow_pipe=True)


def test_a_stage_needing_masks_refuses_a_set_without_any(tmp_path):
    out = _ct_set(tmp_path, (False, False))
    with pytest.raises(ShardRequirementError) as e:
        require_shards(_cfg(out), stage="anatomy", modalities=("ct",), masks=True)
    assert str(e.value).startswith(f"data.train_shards: {out}: none of its 2 volume samples has an organ mask")


def test_a_stage_needing_masks_warns_about_some_missing(tmp_path, caplog):
    out = _ct_set(tmp_path, (True, False, True))
    with caplog.at_level(logging.WARNING, logger="medvlp.data_shards.require"):
        doc = require_shards(_cfg(out), stage="anatomy", modalities=("ct",), masks=True)
    assert doc["num_samples"] == 3
    assert "1 of 3 volume samples" in caplog.text and "the anatomy stage skips them" in caplog.text


def test_wrong_modality_is_one_line_naming_key_and_need(tmp_path):
    out = _ct_set(tmp_path, (True,))
    cfg = SimpleNamespace(train_shards=str(out), val_shards="", index="", allow_pipe=True)
    require_shards(cfg, stage="anatomy", modalities=("ct",))
    with pytest.raises(ShardRequirementError) as e:
        require_shards(cfg, stage="pcam", modalities=("cxr", "patho"), what="2D images")
    assert str(e.value) == (f"data.train_shards: {out} holds 'ct' samples (index.json modality); the pcam stage "
                            "needs 'cxr' or 'patho' shards (2D images)")
    cfg.val_shards, cfg.train_shards = str(out), ""
    with pytest.raises(ShardRequirementError, match="^data.val_shards: "):
        require_shards(cfg, stage="pcam", modalities=("cxr",))


def test_missing_mask_reason_names_the_sample():
    vol = np.zeros((2, 2, 2), np.int16)
    assert missing_mask_reason(Sample("ct/a", "t", volume=vol, mask=vol.astype(np.uint8)), "anatomy") is None
    assert missing_mask_reason(Sample("ct/b", "t", volume=vol, meta={"has_mask": False}), "anatomy") == (
        "sample 'ct/b' has no organ mask (meta has_mask: false); skipped by the anatomy stage")
    assert "holds no volume (modality cxr)" in missing_mask_reason(
        Sample("c/x", "t", image=np.zeros((2, 2), np.uint8), meta={"modality": "cxr"}), "anatomy")


def test_anatomy_transform_skips_a_maskless_sample_by_name():
    from medvlp.finetune.anatomy.stage import CTTransform

    s = Sample("ct/b", "t", volume=np.zeros((2, 2, 2), np.int16), meta={"has_mask": False})
    with pytest.raises(ValueError, match="^sample 'ct/b' has no organ mask .*skipped by the anatomy stage$"):
        CTTransform((-160.0, 240.0))(s, np.random.default_rng(0))
