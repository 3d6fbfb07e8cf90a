"""medvlp features extract: patch shards -> slide-bag shards with the frozen tower's embeddings; resumable."""
from __future__ import annotations

import numpy as np
import torch



def _saved_model(tmp_path):
    from tests.conftest import saved_pretrained_run

    run = tmp_path / "pre"
    return saved_pretrained_run(run, "debug", "patho", seed=0), run


def _read(shard_dir):
    from medvlp.data_shards.reader import iter_samples

    return list(iter_samples(str(shard_dir)))


def test_extract_writes_one_bag_per_slide_with_the_tower_embeddings(tmp_path, monkeypatch):
    from medvlp.data_shards.synth import synth_to_shards
    from medvlp.finetune.report import features
    from medvlp.pretrain import load_pretrained

    patches = tmp_path / "patho"
    synth_to_shards(str(patches), modality="patho", n=24, seed=0, shard_size=10, size=32)
    src = _read(patches)
    model, run = _saved_model(tmp_path)
    out = tmp_path / "bags"
    doc = features.extract_features(str(run), str(patches), str(out), batch_size=7, progress=False)
    by_patient: dict[str, list] = {}
    for s in src:
        by_patient.setdefault(str(s.meta["patient_id"]), []).append(s)
    assert doc["modality"] == "slide" and doc["num_samples"] == len(by_patient)
    bags = _read(out)
    view = load_pretrained(str(run)).transform("patho")
    for bag in bags:
        members = by_patient[bag.meta["slide_id"]]
        assert bag.feats.shape == (len(members), model.embed_dim) and bag.coords.shape == (len(members), 2)
        assert bag.split == members[0].split
        with torch.no_grad():
            ref = model.encode_image(torch.stack([view(m.image) for m in members]), normalize=False).numpy()
        np.testing.assert_allclose(bag.feats.astype(np.float32), ref, rtol=1e-2, atol=2e-3)

    # a rerun skips every finished input shard and writes the same slide shards
    before = {p.name: p.read_bytes() for p in out.glob("*.tar")}
    monkeypatch.setattr(features, "_embed_shard", lambda *a, **k: (_ for _ in ()).throw(AssertionError("re-embedded")))
    features.extract_features(str(run), str(patches), str(out), batch_size=7, progress=False)
    assert {p.name: p.read_bytes() for p in out.glob("*.tar")} == before


def test_extract_refuses_slide_shards(tmp_path):
    import pytest

    from medvlp.data_shards.synth import synth_to_shards
    from medvlp.finetune.report.features import extract_features

    synth_to_shards(str(tmp_path / "s"), modality="slide", n=4, seed=0)
    with pytest.raises(ValueError, match="has no 2D patches to embed"):
        extract_features("unused", str(tmp_path / "s"), str(tmp_path / "o"), progress=False)
