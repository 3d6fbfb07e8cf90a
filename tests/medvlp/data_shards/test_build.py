"""Shard builder: manifests of real files -> shards whose decoded samples match; errors named by line."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medvlp.data_shards.build import build_shards, load_image, merge_indexes
from medvlp.data_shards.inspect import iter_samples
from medvlp.data_shards.manifest import ManifestError, read_manifest
from medvlp.data_shards.writer import read_index, sha256_file
from tests.conftest import write_csv


def read_samples(out: Path, index: str = "index.json") -> dict:
    """All samples of the shards listed in an index, decoded, by key (a key seen twice fails)."""
    samples = {}
    for s in iter_samples(out, index):
        assert s.key not in samples
        samples[s.key] = s
    return samples


def make_images(d: Path) -> list[dict]:
    """Four PNGs of mixed size and bit depth, each a manifest row with labels and a report."""
    rng = np.random.default_rng(0)
    d.mkdir(parents=True, exist_ok=True)
    specs = [
        ("grey8.png", Image.fromarray(rng.integers(0, 255, (40, 30), dtype=np.uint8), mode="L")),
        ("rgb8.png", Image.fromarray(rng.integers(0, 255, (20, 50, 3), dtype=np.uint8), mode="RGB")),
        ("grey16.png", Image.fromarray(rng.integers(0, 65535, (64, 48), dtype=np.uint16))),
        ("rgba.png", Image.fromarray(rng.integers(0, 255, (16, 16, 4), dtype=np.uint8), mode="RGBA")),
    ]
    rows = []
    for i, (name, im) in enumerate(specs):
        im.save(d / name)
        rows.append({"image": f"img/{name}", "report": f"Report {i}: small effusion.", "patient_id": f"p{i}",
                     "label:effusion": "1" if i % 2 else "0", "label:edema": "" if i == 0 else "-1"})
    return rows


def test_png_mix_builds_with_right_dtypes_sizes_labels(tmp_path):
    rows = make_images(tmp_path / "img")
    man = write_csv(tmp_path / "manifest.csv", rows)
    doc = build_shards(man, tmp_path / "out", workers=2, maxcount=2, image_size=32, progress=False,
                       val_frac=0.0, test_frac=0.0)
    assert doc["num_samples"] == 4 and len(doc["shards"]) == 2 and doc["modality"] == "cxr"
    assert doc["label_names"] == ["edema", "effusion"] and doc["splits"] == {"train": 4}
    for sh in doc["shards"]:
        assert sha256_file(tmp_path / "out" / sh["name"]) == sh["sha256"]
    got = read_samples(tmp_path / "out")
    assert set(got) == {"img/grey8", "img/rgb8", "img/grey16", "img/rgba"}
    expect = {"img/grey8": (np.uint8, (32, 24)), "img/rgb8": (np.uint8, (13, 32, 3)),
              "img/grey16": (np.uint16, (32, 24)), "img/rgba": (np.uint8, (16, 16, 3))}
    for key, (dtype, shape) in expect.items():
        assert got[key].image.dtype == dtype and got[key].image.shape == shape, key
    assert got["img/grey8"].labels == {"effusion": 0}
    assert got["img/rgb8"].labels == {"edema": -1, "effusion": 1}
    assert got["img/rgb8"].text == "Report 1: small effusion."
    assert got["img/grey16"].meta["patient_id"] == "p2" and got["img/grey16"].meta["split"] == "train"
    # 16-bit content survives: the resized image tracks a float reference within rounding.
    src = np.asarray(Image.open(tmp_path / "img" / "grey16.png")).astype(np.float32)
    ref = np.asarray(Image.fromarray(src, mode="F").resize((24, 32), Image.LANCZOS))
    assert np.abs(got["img/grey16"].image.astype(np.float32) - np.clip(ref, 0, 65535)).max() <= 0.5


def test_same_inputs_give_byte_identical_shards(tmp_path):
    man = write_csv(tmp_path / "m.csv", make_images(tmp_path / "img"))
    a = build_shards(man, tmp_path / "a", workers=1, progress=False)
    b = build_shards(man, tmp_path / "b", workers=1, progress=False)
    assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]


def test_jsonl_manifest_volumes_and_features(tmp_path):
    rng = np.random.default_rng(1)
    np.save(tmp_path / "v.npy", rng.integers(-1000, 1000, (4, 8, 8)).astype(np.int32))
    np.savez(tmp_path / "m.npz", mask=rng.integers(0, 3, (4, 8, 8)).astype(np.int64))
    (tmp_path / "r.txt").write_text("Liver lesion.\n")
    lines = [json.dumps({"volume": "v.npy", "mask": "m.npz", "report_file": "r.txt", "patient_id": "a",
                         "labels": {"liver lesion": 1}, "key": "ct/case 1.v2"})]
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")
    doc = build_shards(tmp_path / "m.jsonl", tmp_path / "out", workers=1, progress=False)
    assert doc["modality"] == "ct"
    s = read_samples(tmp_path / "out")["ct/case_1_v2"]
    assert s.volume.dtype == np.int16 and s.volume.shape == (4, 8, 8) and s.mask.dtype == np.uint8
    np.testing.assert_array_equal(s.volume, np.load(tmp_path / "v.npy"))
    assert s.text == "Liver lesion." and s.labels == {"liver lesion": 1}
    # features (+coords) -> slide
    np.save(tmp_path / "f.npy", rng.normal(size=(5, 6)).astype(np.float32))
    np.save(tmp_path / "c.npy", rng.integers(0, 100, (5, 2)))
    (tmp_path / "s.jsonl").write_text(json.dumps({"features": "f.npy", "coords": "c.npy", "report": "Tumour.",
                                                  "patient_id": "b"}) + "\n")
    doc = build_shards(tmp_path / "s.jsonl", tmp_path / "out2", workers=1, progress=False)
    s = next(iter(read_samples(tmp_path / "out2").values()))
    assert doc["modality"] == "slide" and s.feats.dtype == np.float16 and s.coords.shape == (5, 2)


def bad_manifest(tmp_path: Path) -> Path:
    rows = make_images(tmp_path / "img")
    rows[1]["image"] = "img/missing.png"  # line 3
    rows[2]["labels"] = "{not json"  # line 4
    rows.append(dict(rows[0]))  # line 6 duplicates line 2's key
    return write_csv(tmp_path / "manifest.csv", rows)


def test_malformed_manifest_lists_all_bad_lines_and_writes_nothing(tmp_path):
    man = bad_manifest(tmp_path)
    with pytest.raises(ManifestError) as ei:
        build_shards(man, tmp_path / "out", progress=False)
    msg = str(ei.value)
    assert "manifest.csv line 3: column 'image': file not found: img/missing.png" in msg
    assert "manifest.csv line 4: column 'labels': not valid JSON" in msg
    assert "manifest.csv line 6: column 'key': duplicate key 'img/grey8' (first at line 2)" in msg
    assert len(ei.value.errors) == 3
    assert not (tmp_path / "out").exists()


def test_missing_column_and_bad_label_value(tmp_path):
    man = write_csv(tmp_path / "m.csv", [{"image": "a.png", "patient_id": "p"}])
    with pytest.raises(ManifestError, match=r"m.csv line 1: missing column 'report' or 'report_file'"):
        build_shards(man, tmp_path / "out", progress=False)
    man = write_csv(tmp_path / "m.csv", [{"image": "a.png", "report": "x", "label:edema": "2"}])
    rows, errors, n = read_manifest(man)
    assert rows == [] and n == 1
    assert errors == ["m.csv line 2: column 'label:edema': label value '2' is not 1, 0, -1 or blank"]


def test_skip_mode_builds_good_rows_and_reports_bad(tmp_path):
    man = bad_manifest(tmp_path)
    with pytest.warns(UserWarning, match="skipped 3 bad rows"):
        doc = build_shards(man, tmp_path / "out", workers=1, progress=False, on_error="skip")
    assert doc["num_samples"] == 2
    assert set(read_samples(tmp_path / "out")) == {"img/grey8", "img/rgba"}
    report = (tmp_path / "out" / "build_errors.txt").read_text().splitlines()
    assert [r.split(":")[0] for r in report] == ["manifest.csv line 3", "manifest.csv line 4", "manifest.csv line 6"]


def test_corrupt_png_reported_with_line(tmp_path):
    rows = make_images(tmp_path / "img")
    (tmp_path / "img" / "rgb8.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    man = write_csv(tmp_path / "m.csv", rows)
    with pytest.raises(ManifestError, match=r"m.csv line 3: column 'image': cannot decode img/rgb8.png"):
        build_shards(man, tmp_path / "out", workers=1, maxcount=1, progress=False)
    out = tmp_path / "out"
    assert not list(out.glob("*.tmp")) and not (out / "index.json").exists()
    with pytest.warns(UserWarning, match="skipped 1 bad rows"):
        doc = build_shards(man, out, workers=1, maxcount=1, progress=False, on_error="skip")
    assert doc["num_samples"] == 3 and doc["build"]["num_dropped"] == 1
    assert "line 3" in (out / "build_errors.txt").read_text()


def test_interrupted_build_leaves_no_partial_shard(tmp_path, monkeypatch):
    import medvlp.data_shards.build as b

    man = write_csv(tmp_path / "m.csv", make_images(tmp_path / "img"))
    real, calls = b.load_row, []

    def crash_on_third(row, image_size):
        calls.append(row.key)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the process dies mid-shard
        return real(row, image_size)

    monkeypatch.setattr(b, "load_row", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        build_shards(man, tmp_path / "out", workers=1, maxcount=2, progress=False)
    out = tmp_path / "out"
    finals = sorted(p.name for p in out.glob("*.tar"))
    assert finals == ["shard-000000.tar"]  # the first, complete shard only; no tmp left behind
    assert not list(out.glob("*.tmp"))
    monkeypatch.setattr(b, "load_row", real)
    doc = build_shards(man, out, workers=1, maxcount=2, progress=False)
    assert doc["num_samples"] == 4 and doc["build"]["reused_shards"] == 1


def test_rerun_is_idempotent_and_cleans_tmp(tmp_path):
    man = write_csv(tmp_path / "m.csv", make_images(tmp_path / "img"))
    out = tmp_path / "out"
    first = build_shards(man, out, workers=1, maxcount=2, progress=False)
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    (out / "shard-000001.tar.tmp").write_bytes(b"half a shard")
    again = build_shards(man, out, workers=1, maxcount=2, progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")} == mtimes
    assert again["shards"] == first["shards"] and again["build"]["reused_shards"] == 2
    assert not list(out.glob("*.tmp"))
    # a damaged shard (sha256 mismatch) is rebuilt, the other is kept
    (out / "shard-000000.tar").write_bytes(b"garbage")
    third = build_shards(man, out, workers=1, maxcount=2, progress=False)
    assert third["build"]["reused_shards"] == 1 and third["shards"] == first["shards"]


def many_rows(tmp_path: Path, n_patients: int = 12, per_patient: int = 2) -> list[dict]:
    d = tmp_path / "img"
    d.mkdir()
    rows = []
    for p in range(n_patients):
        for j in range(per_patient):
            name = f"p{p}_{j}.png"
            Image.fromarray(np.full((4, 4), (p * 10 + j) % 256, np.uint8)).save(d / name)
            rows.append({"image": f"img/{name}", "report": f"patient {p} image {j}", "patient_id": f"P{p}"})
    return rows


def test_auto_splits_keep_patients_whole(tmp_path):
    man = write_csv(tmp_path / "m.csv", many_rows(tmp_path, n_patients=30))
    doc = build_shards(man, tmp_path / "out", workers=1, progress=False, val_frac=0.3, test_frac=0.3)
    by_patient: dict[str, set] = {}
    for s in read_samples(tmp_path / "out").values():
        by_patient.setdefault(s.meta["patient_id"], set()).add(s.meta["split"])
    assert all(len(v) == 1 for v in by_patient.values())
    assert set(doc["splits"]) == {"train", "val", "test"} and sum(doc["splits"].values()) == 60


def test_explicit_split_respected_and_conflict_named(tmp_path):
    rows = many_rows(tmp_path, n_patients=2)
    rows[0]["split"], rows[1]["split"] = "test", ""  # P0: test, second row of P0 inherits it
    man = write_csv(tmp_path / "m.csv", rows)
    build_shards(man, tmp_path / "out", workers=1, progress=False, test_frac=0.0, val_frac=0.0)
    splits = {k: s.meta["split"] for k, s in read_samples(tmp_path / "out").items()}
    assert splits["img/p0_0"] == splits["img/p0_1"] == "test" and splits["img/p1_0"] == "train"
    rows[1]["split"] = "train"
    man = write_csv(tmp_path / "m.csv", rows)
    with pytest.raises(ManifestError, match=r"line 3: column 'split': patient 'P0' is in 'train' here but in "
                                            r"'test' at line 2"):
        build_shards(man, tmp_path / "out2", progress=False)


def test_parts_are_disjoint_and_merge_covers_every_sample(tmp_path):
    rows = many_rows(tmp_path, n_patients=15)
    man = write_csv(tmp_path / "m.csv", rows)
    out = tmp_path / "out"
    keys = []
    for i in range(3):
        doc = build_shards(man, out, workers=1, maxcount=4, part=(i, 3), progress=False)
        assert all(sh["name"].startswith(f"part{i:03d}of003-") for sh in doc["shards"])
        part_keys = set(read_samples(out, f"index.part{i}of3.json"))
        keys.append(part_keys)
    assert sum(map(len, keys)) == len(rows) and len(set().union(*keys)) == len(rows)
    assert all(k for k in keys)  # 15 patients over 3 parts: none empty
    merged = merge_indexes(out)
    assert merged["num_samples"] == len(rows) and read_index(out)["num_samples"] == len(rows)
    assert set(read_samples(out)) == {f"img/p{p}_{j}" for p in range(15) for j in range(2)}
    os.remove(out / "index.part1of3.json")
    with pytest.raises(ValueError, match=r"missing part indexes \['index.part1of3.json'\]"):
        merge_indexes(out)


def test_load_image_palette_and_bounds(tmp_path):
    """A palette PNG is expanded through its palette (not read as indices) and the longer side is bounded."""
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[:, :4] = (200, 30, 40)  # left half red-ish, right half blue-ish: 2 palette entries
    rgb[:, 4:] = (10, 60, 220)
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=2).save(tmp_path / "p.png")
    assert Image.open(tmp_path / "p.png").mode == "P"
    arr = load_image(str(tmp_path / "p.png"), 4)
    assert arr.shape == (4, 4, 3) and arr.dtype == np.uint8
    np.testing.assert_allclose(arr[:, :2].reshape(-1, 3).mean(0), (200, 30, 40), atol=3)
    np.testing.assert_allclose(arr[:, 2:].reshape(-1, 3).mean(0), (10, 60, 220), atol=3)
    big = load_image(str(tmp_path / "p.png"), 16)  # never upscaled past the stored size
    assert big.shape[:2] == (8, 8)
    Image.fromarray(np.zeros((6, 12), np.uint8)).save(tmp_path / "wide.png")
    assert load_image(str(tmp_path / "wide.png"), 4).shape[:2] == (2, 4)  # the longer side bounds, aspect kept


def test_cli_build_label_spec_and_seeded_order_within_split(tmp_path, capsys):
    """`shards build --label-kind single-label --template ...` writes the spec; a class-sorted manifest comes out
    in a seeded random order within the split (the same for the same seed)."""
    import json

    from medvlp.launch.cli import main as cli_main

    d = tmp_path / "img"
    d.mkdir()
    rows = []
    for i in range(40):  # sorted by class: 20 "cat" then 20 "dog"
        Image.fromarray(np.full((4, 4), i, np.uint8)).save(d / f"{i}.png")
        c = "cat" if i < 20 else "dog"
        rows.append({"image": f"img/{i}.png", "report": f"a photo of a {c}.", "patient_id": f"P{i:02d}",
                     "split": "train", "label:cat": int(c == "cat"), "label:dog": int(c == "dog")})
    man = write_csv(tmp_path / "m.csv", rows)
    args = ["shards", "build", "--manifest", str(man), "--workers", "1", "--maxcount", "10",
            "--label-kind", "single-label", "--template", "a photo of a {c}."]
    assert cli_main([*args, "--out", str(tmp_path / "a")]) == 0
    doc = json.loads((tmp_path / "a" / "index.json").read_text())
    assert doc["labels"] == {"kind": "single-label", "class_names": ["cat", "dog"], "templates": ["a photo of a {c}."],
                             "negative_templates": [], "prompts": {}}
    order = [s.key for s in iter_samples(tmp_path / "a")]
    first_shard = [s.labels["cat"] for s in iter_samples(tmp_path / "a")][:10]
    assert 0 < sum(first_shard) < 10  # both classes in the first shard
    assert cli_main([*args, "--out", str(tmp_path / "b")]) == 0
    assert [s.key for s in iter_samples(tmp_path / "b")] == order  # seeded: reproducible
    assert cli_main([*args, "--seed", "1", "--out", str(tmp_path / "c")]) == 0
    assert [s.key for s in iter_samples(tmp_path / "c")] != order
    spec = tmp_path / "labels.yaml"
    spec.write_text("kind: sometimes\n")
    assert cli_main(["shards", "build", "--manifest", str(man), "--out", str(tmp_path / "d"), "--labels",
                     str(spec)]) == 2
    assert "kind: 'sometimes' is not one of multi-label, single-label, binary" in capsys.readouterr().err
