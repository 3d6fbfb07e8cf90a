"""The fast 2D stream path (data.pipeline=fast) against the reference transforms: same draws, same crop
parameters (exactly), pixels within the uint8 rounding, batch-side jitter + normalisation equal to the per-sample
one to float tolerance, the GPU-decode path equal to the CPU path but for the decode call."""
from __future__ import annotations


import numpy as np
import pytest
import torch
from PIL import Image

from medvlp.data_shards.config import DataConfig
from medvlp.data_shards.fastpath import (FastImageTransform, View, apply_view, decode_image, draft_factor,
                                         finish_batch, finish_images)
from medvlp.data_shards.gpu_decode import cpu_decode, use_gpu_decode
from medvlp.data_shards.schema import EncodedImage, Sample, decode_sample, encode_sample
from medvlp.data_shards.stream import _collate_fast, make_loader
from medvlp.data_shards.transforms import MEAN_STD, RandResizedCrop, image_view, to_float_image
from medvlp.data_shards.writer import write_index, write_shards

pytestmark = pytest.mark.timeout(90)


def _img(h, w, c=None, seed=0):
    rng = np.random.default_rng(seed)
    low = rng.random((max(h // 16, 2), max(w // 16, 2)) + ((c,) if c else ()))
    x = np.asarray(Image.fromarray((low * 255).astype(np.uint8)).resize((w, h), Image.BICUBIC), np.float32)
    return (x + rng.normal(0, 6, x.shape)).clip(0, 255).astype(np.uint8)


def _jpeg(arr, q=90) -> EncodedImage:
    return decode_sample(encode_sample(Sample(key="k/a", text="t", image=arr, jpeg_quality=q)), lazy_image=True).image


def _reference(modality, size, train, arr, seed):
    ref = image_view(modality, size, train)
    return ref(to_float_image(arr), np.random.default_rng(seed))


def _fast(modality, size, train, img, seed):
    t = FastImageTransform(modality, size, train)
    out = t(Sample(key="k/a", text="t", image=img), np.random.default_rng(seed))
    return finish_images(out["image"][None], out["image_aug"][None], modality)[0], out


@pytest.mark.parametrize("modality,c", [("cxr", None), ("patho", 3)])
def test_eval_view_equals_reference_within_uint8_rounding(modality, c):
    arr = _img(70, 90, c)
    ref = _reference(modality, 48, False, arr, 0)
    fast, _ = _fast(modality, 48, False, arr, 0)
    std = min(MEAN_STD[modality][1])
    assert fast.shape == ref.shape == (3, 48, 48)
    assert (fast - ref).abs().max() <= 1.0 / 255 / std + 1e-5  # the uint8 kernel rounds; nothing random


@pytest.mark.parametrize("modality,c", [("cxr", None), ("patho", 3)])
def test_train_view_same_draws_and_pixels_close(modality, c):
    arr = _img(80, 64, c)
    std = min(MEAN_STD[modality][1])
    for seed in range(6):
        ref = _reference(modality, 40, True, arr, seed)
        fast, out = _fast(modality, 40, True, arr, seed)
        # the same generator is left in the same state: every draw was made, in the same order
        g1, g2 = np.random.default_rng(seed), np.random.default_rng(seed)
        image_view(modality, 40, True)(to_float_image(arr), g1)
        FastImageTransform(modality, 40, True).draw(80, 64, 1 if c is None else 3, g2)
        assert g1.random() == g2.random()
        d = (fast - ref).abs()
        assert d.mean() < 0.5 / 255 / std and d.max() < 4.0 / 255 / std, seed  # gamma can stretch a level


def test_crop_parameters_equal_reference_draws_and_follow_its_distribution():
    crop = RandResizedCrop(224, scale=(0.6, 1.0))
    t = FastImageTransform("cxr", 224, True)
    areas = []
    for seed in range(400):
        view, _ = t.draw(256, 300, 1, np.random.default_rng(seed))
        box = crop.draw(256, 300, np.random.default_rng(seed))
        assert view.kind == 0 and view.a == box
        areas.append(box[2] * box[3] / (256 * 300))
    # equal draws give equal distributions; the area fraction stays in the recipe's (0.6, 1.0) up to rounding
    # (boxes wider than the image are redrawn, which is why its mean sits below 0.8 on both paths)
    assert min(areas) > 0.58 and max(areas) <= 1.0 and np.std(areas) > 0.05
    # extreme aspect: no box in 10 draws -> the centre view, as the reference
    view, _ = t.draw(10, 2000, 1, np.random.default_rng(0))
    assert view.kind == 1


def test_batch_side_jitter_and_normalisation_equal_per_sample_reference():
    for modality, c in (("cxr", 1), ("patho", 3)):
        views = [image_view(modality, 32, True) for _ in range(6)]
        imgs = torch.rand(6, c, 32, 32)
        t = FastImageTransform(modality, 32, True)
        ref, augs = [], []
        for i in range(6):
            _, aug = t.draw(32, 32, c, np.random.default_rng(i))
            # the reference applies the same draws to the same (already cropped) image
            g = np.random.default_rng(i)
            x = imgs[i]
            for step in views[i].transforms:
                if type(step).__name__ == "RandResizedCrop":
                    step.draw(32, 32, g)  # identity crop of this test's input: keep the draws in step
                    x = x
                elif type(step).__name__ == "RandFlip":
                    step.draw(g)
                else:
                    x = step(x, g)
            ref.append(x)
            augs.append(aug)
        batch = finish_images(imgs, torch.stack(augs), modality)
        assert torch.stack([a[0] + a[4] for a in augs]).sum() > 0  # some samples were jittered
        torch.testing.assert_close(batch, torch.stack(ref), rtol=1e-5, atol=1e-5)


def test_numpy_colour_matrix_equals_the_torch_draw():
    from medvlp.data_shards.fastpath import colour_matrix
    from medvlp.data_shards.transforms import RandColorJitter

    t = RandColorJitter()
    for i in range(50):
        g1, g2 = np.random.default_rng(i), np.random.default_rng(i)
        ref, f = t.draw(g1, 3), t.draw_factors(g2, 3)
        assert g1.bit_generator.state == g2.bit_generator.state  # the same draws, in the same order
        if ref is None:
            assert f is None
            continue
        a, k = colour_matrix(*f)
        np.testing.assert_allclose(a, ref[0].numpy(), rtol=0, atol=2e-6)
        assert k == pytest.approx(ref[1], abs=1e-12)
    assert t.draw_factors(np.random.default_rng(0), 1) is None  # grey images: drawn, then left as they are


def test_shard_tars_carry_no_pax_header_per_member(tmp_path):
    import tarfile

    s = Sample(key="k/0", text="t", image=_img(16, 16), labels={}, meta={"split": "train"})
    write_shards([s], tmp_path, maxcount=8)
    (tar,) = tmp_path.glob("*.tar")
    with tarfile.open(tar) as tf:
        members = tf.getmembers()
    assert members and all(m.pax_headers == {} and m.mtime == 0 for m in members)


def test_draft_decode_only_where_the_crop_keeps_its_resolution():
    big = _img(512, 512)
    v_small = View(0, (0, 0, 200, 200), False, 224)  # upscaled crop: full decode
    v_big = View(0, (10, 20, 480, 460), False, 112)  # 4x the output: 1/4 DCT decode
    assert draft_factor(v_small, 512, 512) == 1 and draft_factor(v_big, 512, 512) == 4
    enc = _jpeg(big)
    x, scale = decode_image(enc, v_big)
    assert tuple(x.shape[-2:]) == (128, 128) and scale == (0.25, 0.25)
    fast = apply_view(x, v_big, scale).float()
    full, _ = decode_image(enc, None)
    ref = apply_view(full, v_big).float()
    assert (fast - ref).abs().mean() < 3.0  # grey levels: DCT scaling instead of the first part of the downscale


def test_16bit_keeps_precision_and_mixed_batches_stack():
    arr16 = (_img(40, 40).astype(np.uint16) * 257 + 3)
    fast, out = _fast("cxr", 32, False, arr16, 0)
    assert out["image"].dtype == torch.float32
    ref = _reference("cxr", 32, False, arr16, 0)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    t = FastImageTransform("patho", 16, False)
    samples = [dict(key=f"k{i}", **t(Sample(key="k", text="t", image=im), np.random.default_rng(0)))
               for i, im in enumerate([_img(20, 20), _img(20, 20, 3), arr16[:20, :20]])]
    batch = _collate_fast(samples, [s["key"] for s in samples])
    assert batch["image"].shape == (3, 3, 16, 16) and batch["image"].dtype == torch.float32


def _shards(tmp_path, modality, c, q):
    samples = [Sample(key=f"s/{i}", text=f"t {i}", image=_img(72, 80, c, seed=i), labels={"a": i % 2},
                      meta={"split": "train", "modality": modality}, jpeg_quality=q) for i in range(24)]
    d = tmp_path / f"{modality}-{q}"
    write_index(d, write_shards(samples, d, maxcount=12), modality, ["a"], command="test")
    return d


@pytest.mark.parametrize("modality,c", [("cxr", None), ("patho", 3)])
def test_stream_fast_is_deterministic_and_close_to_reference(tmp_path, modality, c):
    d = _shards(tmp_path, modality, c, 90)
    std = min(MEAN_STD[modality][1])

    def run(pipeline, train):
        cfg = DataConfig(train_shards=str(d), modality=modality, image_size=48, batch_size=8, samples_per_epoch=24,
                         shuffle_buffer=8, seed=3, pipeline=pipeline)
        return [b for b in make_loader(cfg, train=train)]

    for train in (True, False):
        a, b, ref = run("fast", train), run("fast", train), run("reference", train)
        assert [x["key"] for x in a] == [x["key"] for x in ref]
        for x, y, r in zip(a, b, ref):
            assert x["image"].dtype == torch.float32 and x["image"].shape == r["image"].shape
            assert torch.equal(x["image"], y["image"])
            d_ = (x["image"] - r["image"]).abs()
            assert d_.mean() < 0.5 / 255 / std and d_.max() < (4.0 if train else 1.0) / 255 / std + 1e-5


def test_gpu_decode_path_equals_cpu_path_but_for_the_decode_call(tmp_path):
    d = _shards(tmp_path, "patho", 3, 90)
    cfg = DataConfig(train_shards=str(d), modality="patho", image_size=48, batch_size=8, samples_per_epoch=24,
                     seed=1, pipeline="fast")
    cpu = [b for b in make_loader(cfg, train=True)]
    loader = make_loader(cfg, train=True)
    loader.dataset.transform.ship_jpeg = True  # what decode_device=auto does on a CUDA device
    loader.finish, calls = None, []

    def decode(datas, device):
        calls.append(len(datas))
        return cpu_decode(datas, device)

    shipped = [b for b in loader]
    assert "image_src" in shipped[0] and "image" not in shipped[0]
    for b, ref in zip(shipped, cpu):
        out = finish_batch(b, "patho", "cpu", decode=decode)
        assert torch.equal(out["image"], ref["image"])
    assert calls == [8, 8, 8]  # one batched decode call per batch
    assert not use_gpu_decode("auto", "cpu") and not use_gpu_decode("cpu", None)
    with pytest.raises(ValueError, match="decode_device=cuda"):
        use_gpu_decode("cuda", "cpu")


def test_bad_pipeline_values_fail_with_the_key():
    with pytest.raises(ValueError, match="pipeline"):
        DataConfig(pipeline="turbo").validate()
    with pytest.raises(ValueError, match="decode_device"):
        DataConfig(decode_device="tpu").validate()


@pytest.mark.timeout(60)
def test_pipeline_auto_is_fast_only_on_jpeg_shards_built_at_training_resolution(tmp_path):
    from medvlp.data_shards.build import ImageEncoding, build_shards
    from medvlp.data_shards.stream import resolve_pipeline
    from tests.conftest import write_csv

    (tmp_path / "img").mkdir()
    rows = []
    for i in range(8):
        Image.fromarray(_img(60, 80, seed=i)).save(tmp_path / "img" / f"g{i}.png")
        rows.append({"image": f"img/g{i}.png", "report": f"report {i}", "patient_id": f"p{i}",
                     "label:effusion": str(i % 2)})
    man = write_csv(tmp_path / "manifest.csv", rows)
    kw = {"workers": 1, "image_size": 48, "progress": False, "val_frac": 0, "test_frac": 0}
    build_shards(man, tmp_path / "jpeg", encoding=ImageEncoding(resize="shortest", format="jpeg"), **kw)
    build_shards(man, tmp_path / "png", **kw)

    def loader(d, **over):
        cfg = DataConfig(train_shards=str(tmp_path / d), modality="cxr", batch_size=4, shuffle_buffer=0, seed=1,
                         **{"image_size": 32, **over})
        return make_loader(cfg)

    assert DataConfig().pipeline == "auto"
    assert loader("jpeg").finish is not None  # fast: uint8 batches, float on the device
    assert loader("png").finish is None  # today's PNG shards keep the reference path (and their numbers)
    assert loader("jpeg", pipeline="reference").finish is None
    assert loader("jpeg", image_size=64).finish is None  # stored below the training size: reference
    auto, fast = list(loader("jpeg")), list(loader("jpeg", pipeline="fast"))
    assert [b["key"] for b in auto] == [b["key"] for b in fast]
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(auto, fast))
    assert resolve_pipeline("auto", {}, 224) == "reference" and resolve_pipeline("fast", {}, 224) == "fast"
