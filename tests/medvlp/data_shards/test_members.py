"""Batch members: stored ground truth reaches the batch through a real webdataset stream."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from medvlp.data_shards.config import DataConfig
from medvlp.data_shards.members import (MEMBERS, Member, MemberContext, MemberError, MemberSet, MissingField,
                                 boxes_to_view, register_member)
from medvlp.data_shards.schema import Sample
from medvlp.data_shards.stream import collate, make_loader
from medvlp.data_shards.synth import FINDINGS_CXR, synth_samples, synth_to_shards
from medvlp.data_shards.synth.ct import CT_ORGANS
from medvlp.data_shards.synth.histo import PATHO_CLASSES, SLIDE_DIAGNOSES, SLIDE_TISSUES
from medvlp.data_shards.transforms import ResizeCenterCrop, to_float_image

N = 24
SIZES = {"cxr": 32, "patho": 16, "ct": 16, "slide": 8}


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    """Shards of each synthetic modality and the generator's own samples (the truth), keyed by sample key."""
    out = {}
    for mod, size in SIZES.items():
        d = tmp_path_factory.mktemp(mod)
        synth_to_shards(d, modality=mod, n=N, seed=1, shard_size=10, size=size)
        out[mod] = (str(d), {s.key: s for s in synth_samples(mod, N, seed=1, size=size)})
    return out


def _stream(d: str, mod: str, members: list[str], **kw) -> list[dict]:
    base = dict(train_shards=d, modality=mod, batch_size=4, image_size=16, workers=0, shuffle_buffer=0,
                resampled=False, members=members)
    cfg = DataConfig(**{**base, **kw})
    return list(make_loader(cfg, train=False, split="train"))


def test_cxr_boxes(corpora):
    d, truth = corpora["cxr"]
    batches = _stream(d, "cxr", ["boxes"])
    n_boxes = 0
    for b in batches:
        B, K = b["boxes_label"].shape
        assert b["boxes"].shape == (B, K, 4) and b["boxes"].dtype == torch.float32
        assert K == int(b["boxes_count"].max())  # padded to the batch maximum
        for i, key in enumerate(b["key"]):
            want = truth[key].extra["boxes"]
            n = int(b["boxes_count"][i])
            n_boxes += n
            assert n == len(want)
            assert b["boxes"][i, :n].tolist() == [[float(v) for v in w["box"]] for w in want]
            assert [FINDINGS_CXR[j] for j in b["boxes_label"][i, :n].tolist()] == [w["finding"] for w in want]
            assert (b["boxes_label"][i, n:] == -1).all() and (b["boxes"][i, n:] == 0).all()
            # every boxed finding is labelled positive
            assert all(b["labels"][i, j] == 1 for j in b["boxes_label"][i, :n].tolist())
            assert b["boxes_image_hw"][i].tolist() == [32, 32]
    assert n_boxes > 5  # the corpus really has boxes to check


def test_patho_class_index(corpora):
    d, truth = corpora["patho"]
    batches = _stream(d, "patho", ["class_index"])
    got = {k: int(c) for b in batches for k, c in zip(b["key"], b["class_index"])}
    assert got == {k: PATHO_CLASSES.index(s.meta["class"]) for k, s in truth.items() if s.split == "train"}
    assert len(set(got.values())) > 1
    assert all(b["class_index"].dtype == torch.long for b in batches)
    # tumor label and class agree
    for b in batches:
        assert torch.equal(b["labels"][:, 0] == 1, b["class_index"] == PATHO_CLASSES.index("tumor"))


def test_ct_organ_labels_sentences_spacing_mask(corpora):
    d, truth = corpora["ct"]
    batches = _stream(d, "ct", ["organ_labels", "organ_sentences", "spacing", "mask"])
    for b in batches:
        assert b["organ_names"] == CT_ORGANS and b["organ_labels"].shape == (len(b["key"]), len(CT_ORGANS))
        # organ labels equal the per-organ lesion labels, sentences the stored per-organ sentences
        torch.testing.assert_close(b["organ_labels"], b["labels"])
        for i, key in enumerate(b["key"]):
            organs = truth[key].extra["organs"]
            assert b["organ_sentences"][i] == [organs[o]["sentence"] for o in CT_ORGANS]
            assert all(s in truth[key].text for s in b["organ_sentences"][i])
        torch.testing.assert_close(b["spacing"], torch.tensor([[350 / 8, 350 / 16, 350 / 16]] * len(b["key"])))
        assert b["mask"].shape[1:] == b["volume"].shape[2:]


def test_slide_composition_and_diagnosis(corpora):
    d, truth = corpora["slide"]
    batches = _stream(d, "slide", ["composition", "class_index"])
    for b in batches:
        assert b["composition_names"] == SLIDE_TISSUES
        want = torch.tensor([[truth[k].extra["composition"][t] for t in SLIDE_TISSUES] for k in b["key"]])
        torch.testing.assert_close(b["composition"], want)
        torch.testing.assert_close(b["composition"].sum(1), torch.ones(len(b["key"])))
        assert b["class_index"].tolist() == [SLIDE_DIAGNOSES.index(truth[k].meta["diagnosis"]) for k in b["key"]]


def test_slide_patch_tissue_follows_subsampled_bags(corpora):
    from medvlp.data_shards.synth.histo import slide_centres

    d, truth = corpora["slide"]
    hits = total = 0
    for max_patches in (0, 16):  # whole bags, and bags subsampled (randomly in training) to 16 patches
        cfg = DataConfig(train_shards=d, modality="slide", batch_size=4, workers=0, shuffle_buffer=0, seed=2,
                         max_patches=max_patches, members=["patch_tissue"])
        for b in make_loader(cfg, train=True):
            assert b["tissue_names"] == SLIDE_TISSUES and b["patch_tissue"].shape == b["feats_mask"].shape
            assert torch.equal(b["patch_tissue"] >= 0, b["feats_mask"])
            for i, key in enumerate(b["key"]):
                s = truth[key]
                want = dict(zip(map(tuple, s.coords.tolist()), s.extra["patch_tissue"]))
                n = int(b["feats_mask"][i].sum())
                assert n == (min(len(want), max_patches) if max_patches else len(want))
                got = b["patch_tissue"][i, :n]
                assert got.tolist() == [want[tuple(c)] for c in b["coords"][i, :n].tolist()]
                # and the streamed features lie nearest their own tissue's cluster centre
                c_TE = torch.from_numpy(slide_centres(s.feats.shape[1])).float()
                hits += int((torch.cdist(b["feats"][i, :n], c_TE).argmin(1) == got).sum())
                total += n
    assert hits / total > 0.85, hits / total  # 0.98 on this corpus


@pytest.mark.parametrize("mod,members", [("cxr", ["boxes"]), ("ct", ["organ_labels", "organ_sentences"]),
                                         ("slide", ["composition", "patch_tissue"])])
def test_members_change_nothing_else(corpora, mod, members):
    """Train stream with augmentation: asking for members adds keys and leaves every other entry identical."""
    d, _ = corpora[mod]
    cfg = dict(train_shards=d, modality=mod, batch_size=4, image_size=16, workers=0, shuffle_buffer=8, seed=5)
    plain = list(make_loader(DataConfig(**cfg), train=True))
    more = list(make_loader(DataConfig(**cfg, members=members), train=True))
    assert len(plain) == len(more) > 0
    for a, b in zip(plain, more):
        assert set(b) - set(a) and set(a) <= set(b)
        for k, v in a.items():
            assert torch.equal(v, b[k]) if torch.is_tensor(v) else v == b[k], k


def test_members_through_dataloader_workers(corpora):
    d, truth = corpora["cxr"]
    one = _stream(d, "cxr", ["boxes"])
    two = _stream(d, "cxr", ["boxes"], workers=2)
    by_key = {k: (b["boxes_count"][i], b["boxes"][i]) for b in one for i, k in enumerate(b["key"])}
    for b in two:
        for i, k in enumerate(b["key"]):
            n = int(b["boxes_count"][i])
            assert n == int(by_key[k][0]) and torch.equal(b["boxes"][i, :n], by_key[k][1][:n])


def test_missing_member_fails_naming_member_and_key(corpora):
    d, _ = corpora["patho"]
    with pytest.raises(MemberError, match=r"^sample 'synth-patho/\d+': batch member 'boxes' needs json field "
                                          r"'boxes', which the sample lacks"):
        _stream(d, "patho", ["boxes"])
    # from a DataLoader worker: the same one line, not the worker's traceback
    with pytest.raises(MemberError) as e:
        _stream(d, "patho", ["organ_labels"], workers=1)
    assert "\n" not in str(e.value) and "batch member 'organ_labels' needs json field 'organ_names'" in str(e.value)
    d, _ = corpora["cxr"]
    with pytest.raises(MemberError, match="batch member 'mask' needs a stored organ mask"):
        _stream(d, "cxr", ["mask"])


def test_unknown_member_fails_at_config_build_with_hint():
    from medvlp.launch.config import load_config  # the CLI's recipe + overrides -> typed config tree

    with pytest.raises(ValueError, match=r"data\.members: unknown batch member 'boxs' \(did you mean 'boxes'\?\)"):
        load_config("debug", ["data.members=[boxs]"])
    assert load_config("debug", ["data.members=[boxes, class_index]"]).data.members == ["boxes", "class_index"]
    with pytest.raises(ValueError, match="listed twice"):
        DataConfig(members=["boxes", "boxes"]).validate()
    assert DataConfig().members == []


def test_optional_member_pads_and_custom_member_registers():
    calls = []

    def decode(doc, s, ctx):
        calls.append(s.key)
        if "grade" not in doc:
            raise MissingField("json field 'grade'")
        return int(doc["grade"])

    def coll(values, keys):
        return {"grade": torch.tensor(values)}

    register_member(Member("grade_test", decode, coll, missing=lambda: -1), replace=True)
    try:
        with pytest.raises(ValueError, match="already registered"):
            register_member(Member("grade_test", decode, coll))
        ms = MemberSet(["grade_test"], MemberContext())
        samples = [Sample(key="a", text="", extra={"grade": 3}), Sample(key="b", text="")]
        vals = [ms.decode(s) for s in samples]
        assert ms.collate(vals, ["a", "b"])["grade"].tolist() == [3, -1]
    finally:
        MEMBERS.pop("grade_test")


def test_bad_field_values_fail_clearly():
    ms = MemberSet(["boxes"], MemberContext(("nodule",), "cxr"))
    img = np.zeros((8, 8), np.uint8)
    with pytest.raises(MemberError, match=r"sample 'k': batch member 'boxes': box 0 finding 'mass' is not one of"):
        ms.decode(Sample(key="k", text="", image=img, extra={"boxes": [{"finding": "mass", "box": [0, 0, 1, 1]}]}))
    with pytest.raises(MemberError, match=r"sample 'k': batch member 'boxes': box 0 is"):
        ms.decode(Sample(key="k", text="", image=img, extra={"boxes": [[0, 0, 1, 1]]}))
    ms = MemberSet(["class_index"], MemberContext())
    with pytest.raises(MemberError, match=r"'class_index': json 'meta.class_index' = 'x'"):
        ms.decode(Sample(key="k", text="", meta={"class_index": "x"}))
    ms = MemberSet(["organ_labels"], MemberContext())
    mk = {"organ_names": ["liver"]}
    a = ms.decode(Sample(key="a", text="", extra={**mk, "organs": {"liver": {"abnormal": 1}}}))
    b = ms.decode(Sample(key="b", text="", extra={"organ_names": ["lung"], "organs": {"lung": {"abnormal": 0}}}))
    with pytest.raises(MemberError, match="must share the names"):
        ms.collate([a, b], ["a", "b"])


def test_empty_boxes_batch_and_collate_without_members():
    ms = MemberSet(["boxes"], MemberContext(("nodule",), "cxr"))
    img = np.zeros((8, 8), np.uint8)
    vals = [ms.decode(Sample(key=k, text="", image=img, extra={"boxes": []})) for k in "ab"]
    out = ms.collate(vals, ["a", "b"])
    assert out["boxes"].shape == (2, 0, 4) and out["boxes_count"].tolist() == [0, 0]
    per = [{"key": k, "text": "", "labels": torch.zeros(1)} for k in "ab"]
    assert set(collate(per, ["x"])) == {"key", "text", "labels", "label_names"}


def test_boxes_to_view_follows_the_eval_crop():
    """A bright rectangle at a stored box lands inside the mapped box of the ResizeCenterCrop view."""
    img = np.zeros((40, 60), np.uint8)  # H 40, W 60: resized to 16x24, 4 columns cropped each side
    img[10:20, 30:45] = 255
    view = ResizeCenterCrop(16)(to_float_image(img))[0]
    box = boxes_to_view(torch.tensor([[[30.0, 10.0, 45.0, 20.0]]]), torch.tensor([[40, 60]]), 16)[0, 0]
    x0, y0, x1, y1 = box.tolist()
    assert (x0, y0, x1, y1) == pytest.approx((8.0, 4.0, 14.0, 8.0))
    ys, xs = torch.nonzero(view > 0.5, as_tuple=True)
    assert x0 <= xs.min() and xs.max() < x1 and y0 <= ys.min() and ys.max() < y1
