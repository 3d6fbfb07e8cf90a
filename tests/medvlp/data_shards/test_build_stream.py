"""Build -> stream: a manifest of real PNG files (mixed sizes and bit depths) built into shards streams back
over 2 ranks x 2 workers, every manifest sample exactly once, as model-ready tensors."""
from __future__ import annotations

import numpy as np
from PIL import Image

from medvlp.data_shards.build import build_shards
from medvlp.data_shards.config import DataConfig
from medvlp.data_shards.stream import make_loader
from tests.medvlp.data_shards.test_build import write_csv


def test_manifest_builds_and_streams_back_exactly_once(tmp_path):
    rng = np.random.default_rng(1)
    (tmp_path / "img").mkdir()
    rows = []
    for i in range(24):
        h, w = int(rng.integers(20, 90)), int(rng.integers(20, 90))
        if i % 3 == 0:
            im = Image.fromarray(rng.integers(0, 65535, (h, w), dtype=np.uint16))  # 16-bit grey
        elif i % 3 == 1:
            im = Image.fromarray(rng.integers(0, 255, (h, w), dtype=np.uint8), mode="L")
        else:
            im = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8), mode="RGB")
        im.save(tmp_path / "img" / f"x{i}.png")
        rows.append({"image": f"img/x{i}.png", "key": f"mine/x{i}", "report": f"Study {i}: no effusion.",
                     "patient_id": f"p{i // 2}", "split": "train", "label:effusion": str(i % 2)})
    man = write_csv(tmp_path / "manifest.csv", rows)
    out = tmp_path / "shards"
    doc = build_shards(man, out, workers=1, maxcount=4, image_size=64, progress=False)
    assert doc["num_samples"] == 24 and len(doc["shards"]) == 6

    cfg = DataConfig(train_shards=str(out), modality="cxr", image_size=32, batch_size=5, workers=2,
                     resampled=False, augment=False)
    seen, labels = [], {}
    for rank in range(2):
        for batch in make_loader(cfg, rank=rank, world_size=2, train=False, split="train"):
            assert batch["image"].shape[1:] == (3, 32, 32) and batch["image"].dtype.is_floating_point
            assert batch["label_names"] == ["effusion"]
            seen += batch["key"]
            labels.update(zip(batch["key"], batch["labels"][:, 0].tolist()))
    assert sorted(seen) == sorted(r["key"] for r in rows)  # every sample exactly once across ranks x workers
    assert all(labels[f"mine/x{i}"] == float(i % 2) for i in range(24))
