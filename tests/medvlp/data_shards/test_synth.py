"""The embedded synthetic corpus: determinism, schema round-trip, ground-truth consistency, splits, shards.

Shape legend: S image side; D slices; N patches in a bag; E feature dim.
"""
from __future__ import annotations

import hashlib
import json
import re
import tarfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from medvlp.data_shards.schema import decode_sample, encode_sample
from medvlp.data_shards.synth import FINDINGS_CXR, label_names, label_spec, prompts, synth_samples, synth_to_shards
from medvlp.data_shards.synth.ct import CT_ORGANS, draw_ct_spec, lesion_voxels, render_ct
from medvlp.data_shards.synth.cxr import draw_cxr_spec, render_cxr
from medvlp.data_shards.synth.histo import SLIDE_TISSUES, slide_centres
from medvlp.data_shards.synth.util import Study, iter_studies

MODS = ["cxr", "patho", "ct", "slide"]
SMALL = {"cxr": 48, "patho": 32, "ct": 32, "slide": 16}  # small sizes keep the tests fast


def _dir_digest(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


def _read_tar(path: Path) -> list[dict]:
    """Group tar members into webdataset member dicts (key = name up to the first dot of the basename)."""
    groups: dict[str, dict] = {}
    with tarfile.open(path) as tf:
        for m in tf.getmembers():
            base = m.name.rsplit("/", 1)
            stem, ext = base[-1].split(".", 1)
            key = (base[0] + "/" if len(base) == 2 else "") + stem
            groups.setdefault(key, {"__key__": key})[ext] = tf.extractfile(m).read()
    return list(groups.values())


# ----------------------------------------------------------------------------------------------- determinism
@pytest.mark.parametrize("mod", MODS)
def test_same_seed_byte_identical_shards_different_seed_differs(tmp_path, mod):
    kw = dict(modality=mod, n=10, shard_size=4, size=SMALL[mod])
    a = synth_to_shards(tmp_path / "a", seed=3, **kw)
    b = synth_to_shards(tmp_path / "b", seed=3, **kw)
    c = synth_to_shards(tmp_path / "c", seed=4, **kw)
    assert a == b
    assert _dir_digest(tmp_path / "a") == _dir_digest(tmp_path / "b")
    assert [s["count"] for s in a["shards"]] == [4, 4, 2]
    assert all(sa["sha256"] != sc["sha256"] for sa, sc in zip(a["shards"], c["shards"]))


@pytest.mark.parametrize("mod", MODS)
def test_sample_i_does_not_depend_on_n(mod):
    short = [encode_sample(s) for s in synth_samples(mod, 3, seed=1, size=SMALL[mod])]
    long = [encode_sample(s) for s in synth_samples(mod, 7, seed=1, size=SMALL[mod])]
    assert long[:3] == short


# ----------------------------------------------------------------------------------------------- schema
@pytest.mark.parametrize("mod", MODS)
def test_schema_round_trip_through_shard(tmp_path, mod):
    originals = list(synth_samples(mod, 5, seed=2, size=SMALL[mod]))
    synth_to_shards(tmp_path, modality=mod, n=5, seed=2, shard_size=8, size=SMALL[mod])
    decoded = [decode_sample(m) for m in _read_tar(tmp_path / f"synth-{mod}-000000.tar")]
    assert [d.key for d in decoded] == [o.key for o in originals]
    for o, d in zip(originals, decoded):
        assert d.text == o.text and d.labels == o.labels and d.meta == o.meta
        assert d.extra == json.loads(json.dumps(o.extra))
        for name in ("image", "volume", "mask", "feats", "coords"):
            a, b = getattr(o, name), getattr(d, name)
            assert (a is None) == (b is None), name
            if a is not None:
                assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b), name
        assert set(o.labels) == set(label_names(mod))
        assert o.meta["dataset"] == f"synth-{mod}" and o.meta["modality"] == mod


def test_array_types_and_shapes():
    cxr = next(synth_samples("cxr", 1))
    assert cxr.image.shape == (128, 128) and cxr.image.dtype == np.uint8
    patho = next(synth_samples("patho", 1))
    assert patho.image.shape == (64, 64, 3) and patho.image.dtype == np.uint8
    ct = next(synth_samples("ct", 1))
    assert ct.volume.shape == (32, 64, 64) and ct.volume.dtype == np.int16 and ct.mask.dtype == np.uint8
    assert ct.volume.min() == -1000 or ct.volume.min() < -950  # air around the body
    assert set(np.unique(ct.mask)) == set(range(len(CT_ORGANS) + 1))
    slide = next(synth_samples("slide", 1))
    assert slide.feats.dtype == np.float16 and slide.feats.shape[1] == 64 and slide.coords.dtype == np.int32
    assert 20 <= slide.feats.shape[0] <= 200 and slide.coords.shape == (slide.feats.shape[0], 2)


# ----------------------------------------------------------------------------------------------- cxr truth
_KEYWORDS = {  # written independently of the generator's templates
    "nodule": ("nodule", "nodular"),
    "effusion": ("effusion", "pleural fluid", "pleural space", "costophrenic"),
    "consolidation": ("consolidation", "airspace", "focal opacity", "patchy opacity"),
    "cardiomegaly": ("cardiomegaly", "enlarged", "enlargement"),
    "pneumothorax": ("pneumothorax", "collapsed lung", "pleural line", "collapsed right lung", "collapsed left lung"),
}
_NEG = re.compile(r"\b(no|without|not|normal|clear|negative)\b")
_HEDGE = re.compile(r"\b(possible|cannot exclude|questionable|may represent|borderline)\b")


def _mentions(sentence: str, finding: str) -> bool:
    s = sentence.lower()
    return any(k in s for k in _KEYWORDS[finding]) or (finding == "pneumothorax" and "partially collapsed" in s)


def test_cxr_reports_state_positives_hedge_uncertain_and_never_assert_absent():
    seen = defaultdict(set)
    for s in synth_samples("cxr", 64, seed=5, size=32):
        sentences = [t for t in re.split(r"(?<=\.)\s+", s.text) if t]
        for f in FINDINGS_CXR:
            hits = [t for t in sentences if _mentions(t, f)]
            lab = s.labels[f]
            seen[f].add(lab)
            if lab == 1:
                assert any(not _NEG.search(t.lower()) and not _HEDGE.search(t.lower()) for t in hits), (s.key, f)
            elif lab == -1:
                assert any(_HEDGE.search(t.lower()) for t in hits), (s.key, f, s.text)
            else:
                assert all(_NEG.search(t.lower()) for t in hits), (s.key, f, s.text)
        if all(v == 0 for v in s.labels.values()):
            assert re.search(r"no acute|normal chest", s.text.lower()), s.text
    assert all(seen[f] >= {0, 1} for f in FINDINGS_CXR), seen


def test_cxr_boxes_inside_image_and_finding_changes_its_box():
    S = 64
    checked = defaultdict(int)
    for study in iter_studies(7, "cxr", 40, (0.5, 0.3, 0.2)):
        spec = draw_cxr_spec(7, study, S)
        img, boxes = render_cxr(spec)
        assert {b["finding"] for b in boxes} == {f for f, v in spec["labels"].items() if v == 1}
        for b in boxes:
            f, (x0, y0, x1, y1) = b["finding"], b["box"]
            assert 0 <= x0 < x1 <= S and 0 <= y0 < y1 <= S, b
            strengths = {g: (1.0 if v == 1 else 0.5 if v == -1 else 0.0) for g, v in spec["labels"].items()}
            off, _ = render_cxr(spec, {**strengths, f: 0.0})
            on_mean = img[y0:y1, x0:x1].astype(float).mean()
            off_mean = off[y0:y1, x0:x1].astype(float).mean()
            moved = np.abs(img.astype(int) - off.astype(int)) > 12
            assert moved[y0:y1, x0:x1].sum() >= 0.9 * moved.sum() > 0, f  # the change sits in the box
            if f == "pneumothorax":
                assert on_mean < off_mean - 4, (f, on_mean, off_mean)
            else:
                assert on_mean > off_mean + 5, (f, on_mean, off_mean)
            checked[f] += 1
    assert all(checked[f] > 0 for f in FINDINGS_CXR), checked


def test_cxr_uncertain_labels_exist_and_cardiomegaly_is_a_patient_property():
    samples = list(synth_samples("cxr", 64, seed=0, size=32))
    assert any(v == -1 for s in samples for v in s.labels.values())
    by_patient = defaultdict(list)
    for s in samples:
        by_patient[s.patient_id].append(s.labels["cardiomegaly"])
    assert any(len(v) > 1 for v in by_patient.values()), "some patients must have several studies"
    # A chronic finding: one study may be uncertain, but no patient is 1 in one study and 0 in another.
    assert not any({0, 1} <= set(v) for v in by_patient.values()), by_patient


# ----------------------------------------------------------------------------------------------- patho
def test_patho_class_encoded_in_texture_and_caption():
    dark = defaultdict(list)
    for s in synth_samples("patho", 40, seed=0, size=32):
        cls = s.meta["class"]
        assert s.labels == {"tumor": int(cls == "tumor")}
        dark[cls].append(float((s.image.astype(float).mean(-1) < 120).mean()))  # nuclear (haematoxylin) area
        t = s.text.lower()
        if cls == "tumor":
            assert "tumor" in t and not re.search(r"\b(no|without|negative for) tumor", t), t
        else:
            assert re.search(r"healthy|normal|no tumor|without tumor|negative for tumor", t), t
    assert {"normal", "tumor"} <= set(dark)
    assert min(dark["tumor"]) > max(dark["normal"]), (dark["tumor"], dark["normal"])


# ----------------------------------------------------------------------------------------------- ct truth
def test_ct_lesion_voxels_lie_inside_their_organ_and_report_matches():
    size = 32
    n_lesions = 0
    for study in iter_studies(0, "ct", 10, (0.6, 0.4)):
        spec = draw_ct_spec(0, study, size)
        vol = render_ct(spec)
        for k, organ in enumerate(CT_ORGANS):
            les = spec["lesions"][organ]
            off = render_ct(spec, {o: (l["present"] and o != organ) for o, l in spec["lesions"].items()})
            changed = vol != off
            assert not (changed & (spec["mask"] != k + 1)).any(), organ
            assert changed.any() == les["present"], organ
            vox = lesion_voxels(spec, organ)
            assert vox.any() and (spec["mask"][vox] == k + 1).all()
            n_lesions += les["present"]
    assert n_lesions > 0
    for s in synth_samples("ct", 10, seed=0, size=size):
        assert s.extra["organ_names"] == CT_ORGANS
        for k, organ in enumerate(CT_ORGANS):
            o = s.extra["organs"][organ]
            assert o["id"] == k + 1 and s.labels[f"{organ}_lesion"] == o["abnormal"]
            assert o["sentence"] in s.text
            t = o["sentence"].lower()
            said_lesion = bool(re.search(r"lesion|nodule is seen|solid nodule", t)) and not re.search(
                r"\bno\b|unremarkable|normal|clear", t)
            assert said_lesion == bool(o["abnormal"]), o["sentence"]


# ----------------------------------------------------------------------------------------------- slide truth
def test_slide_composition_matches_bag_and_report():
    E = 16
    centres = slide_centres(E)
    for s in synth_samples("slide", 24, seed=0, size=E):
        comp, tissue = s.extra["composition"], np.array(s.extra["patch_tissue"])
        n = s.feats.shape[0]
        assert tissue.shape == (n,) and abs(sum(comp.values()) - 1.0) < 1e-9
        for k, t in enumerate(SLIDE_TISSUES):
            assert comp[t] == np.count_nonzero(tissue == k) / n
        d = ((s.feats.astype(np.float64)[:, None, :] - centres[None]) ** 2).sum(-1)
        assert (d.argmin(1) == tissue).mean() >= 0.95  # each type is its own cluster
        assert len({tuple(c) for c in s.coords.tolist()}) == n  # one patch per grid cell
        diag = s.meta["diagnosis"]
        assert s.labels[diag] == 1 and sum(s.labels.values()) == 1
        assert s.text.endswith(".") and "Final diagnosis:" in s.text
        assert (comp["tumor"] > 0) == (diag == "carcinoma")
        m = re.search(r"(?:tumor|carcinoma)[a-z ]*? (?:about|less than) (\d+)%", s.text.lower())
        if comp["tumor"] > 0:
            assert m and abs(int(m.group(1)) - 100 * comp["tumor"]) <= 2.5 + 1e-9, (s.text, comp)


# ----------------------------------------------------------------------------------------------- splits, index
@pytest.mark.parametrize("mod", MODS)
def test_no_patient_in_two_splits_and_80_10_10(mod):
    splits = defaultdict(set)
    for st in iter_studies(0, mod, 400, (0.5, 0.3, 0.2)):
        splits[st.patient].add(st.split)
    assert all(len(v) == 1 for v in splits.values())
    per_split = defaultdict(int)
    full_blocks = (max(splits) + 1) // 10
    for p, v in splits.items():
        if p < full_blocks * 10:
            per_split[next(iter(v))] += 1
    assert per_split == {"train": 8 * full_blocks, "val": full_blocks, "test": full_blocks}
    seen = defaultdict(set)
    for s in synth_samples(mod, 30, seed=0, size=SMALL[mod]):
        seen[s.patient_id].add(s.split)
    assert all(len(v) == 1 for v in seen.values()) and len(seen) < 30  # patients with several studies


def test_all_modalities_write_index_with_matching_counts(tmp_path):
    docs = synth_to_shards(tmp_path, modality="all", n=9, seed=0, shard_size=4, size=32)
    assert set(docs) == set(MODS)
    for mod, doc in docs.items():
        d = tmp_path / mod
        on_disk = json.loads((d / "index.json").read_text())
        assert on_disk == doc and doc["modality"] == mod and doc["label_names"] == label_names(mod)
        assert doc["num_samples"] == 9 == sum(sh["count"] for sh in doc["shards"]) == sum(doc["splits"].values())
        for sh in doc["shards"]:
            members = _read_tar(d / sh["name"])
            assert len(members) == sh["count"]
            assert hashlib.sha256((d / sh["name"]).read_bytes()).hexdigest() == sh["sha256"]
            counts = defaultdict(int)
            for m in members:
                counts[json.loads(m["json"])["meta"]["split"]] += 1
            assert dict(counts) == sh["splits"]


# ----------------------------------------------------------------------------------------------- API, errors
def test_prompts_and_label_names():
    pos, neg = prompts("cxr", "nodule")
    assert pos[0] == "A 20 mm nodule in the right upper lung zone." and neg[0] == "No pulmonary nodule."
    # the cxr prompts are the reports' own sentences: every negative prompt occurs verbatim in some report
    reports = " ".join(s.text for s in synth_samples("cxr", 200, seed=0, size=32))
    for lab in label_names("cxr"):
        assert all(n in reports for n in prompts("cxr", lab)[1] if n != "No pleural effusion."), lab
    spec = label_spec("cxr")
    assert spec.kind == "multi-label" and spec.positive_prompts("nodule") == pos
    assert label_spec("slide").kind == "single-label" and label_spec("patho").kind == "binary"
    for mod in MODS:
        for lab in label_names(mod):
            pos, neg = prompts(mod, lab)
            assert pos and neg and not set(pos) & set(neg)
    with pytest.raises(KeyError, match="cxr: no prompts for label 'edema'"):
        prompts("cxr", "edema")


def test_bad_arguments_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="modality 'mri' is not one of"):
        list(synth_samples("mri", 1))
    with pytest.raises(ValueError, match="modality 'xray' is not one of"):
        label_names("xray")
    with pytest.raises(ValueError, match="seed must be a non-negative int"):
        list(synth_samples("cxr", 1, seed=-1))
    with pytest.raises(ValueError, match="cxr size must be >= 32"):
        list(synth_samples("cxr", 1, size=16))
    with pytest.raises(ValueError, match="shard_size must be a positive int"):
        synth_to_shards(tmp_path, n=1, shard_size=0)
    with pytest.raises(ValueError, match="n must be a non-negative int"):
        list(synth_samples("patho", -2))


def test_study_plan_is_stable():
    plan = list(iter_studies(0, "cxr", 12, (0.5, 0.3, 0.2)))
    assert [st.index for st in plan] == list(range(12))
    assert all(isinstance(st, Study) for st in plan)
    assert plan == list(iter_studies(0, "cxr", 20, (0.5, 0.3, 0.2)))[:12]
