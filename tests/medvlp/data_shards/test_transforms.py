"""Transforms: determinism given the generator, shapes/dtypes, value references, CT and slide handling."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medvlp.data_shards import transforms as T
from medvlp.data_shards.schema import Sample


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _rgb(h: int = 24, w: int = 32, seed: int = 0) -> torch.Tensor:
    return T.to_float_image(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


RANDOM_2D = [T.RandResizedCrop(16), T.RandFlip(), T.RandIntensity(p=1.0), T.RandColorJitter(p=1.0),
             T.RandGaussianNoise(p=1.0), T.RandBlur(p=1.0)]


@pytest.mark.parametrize("t", RANDOM_2D, ids=lambda t: type(t).__name__)
def test_random_2d_transforms_deterministic_given_rng(t):
    x = _rgb()
    a, b = t(x, _rng(7)), t(x, _rng(7))
    assert torch.equal(a, b) and a.dtype == torch.float32
    outs = [t(x, _rng(s)) for s in range(8)]
    assert any(not torch.equal(outs[0], o) for o in outs[1:])  # the generator matters
    assert a.min() >= 0.0 and a.max() <= 1.0


def test_uint8_and_uint16_scaling():
    u16 = np.array([[0, 32768, 65535]], dtype=np.uint16)
    assert torch.allclose(T.to_float_image(u16), torch.tensor([[[0.0, 32768 / 65535, 1.0]]]))
    u8 = np.array([[[0, 128, 255]]], dtype=np.uint8)  # (1, 1, 3) RGB
    assert torch.allclose(T.to_float_image(u8).flatten(), torch.tensor([0.0, 128 / 255, 1.0]))
    with pytest.raises(ValueError, match="float32"):
        T.to_float_image(np.zeros((2, 2), np.float32))


def test_eval_view_shape_and_normalised_values():
    white = np.full((20, 30), 65535, dtype=np.uint16)
    out = T.image_view("cxr", 16, train=False)(T.to_float_image(white), _rng())
    assert out.shape == (3, 16, 16) and out.dtype == torch.float32
    assert torch.allclose(out, torch.full_like(out, (1.0 - 0.5) / 0.25))  # grey -> 3 channels, cxr mean/std
    rgb = np.zeros((16, 16, 3), np.uint8)
    out = T.image_view("patho", 16, train=False)(T.to_float_image(rgb), _rng())
    assert torch.allclose(out[:, 0, 0], torch.tensor([-0.485 / 0.229, -0.456 / 0.224, -0.406 / 0.225]))


def test_resize_center_crop_keeps_the_centre():
    img = torch.zeros(1, 8, 24)
    img[:, :, 8:16] = 1.0  # middle third of a wide image
    out = T.ResizeCenterCrop(8)(img)
    assert out.shape == (1, 8, 8) and torch.allclose(out, torch.ones_like(out))


def test_flip_reference_and_cxr_default_off():
    x = _rgb()
    assert torch.equal(T.RandFlip(p=1.0)(x, _rng()), x.flip(-1))
    view = T.image_view("cxr", 16, train=True)
    assert not any(isinstance(t, T.RandFlip) for t in view.transforms)  # laterality
    assert any(isinstance(t, T.RandFlip) for t in T.image_view("patho", 16, train=True).transforms)


def test_blur_matches_explicit_gaussian_conv():
    x = _rgb(20, 20)
    sigma = 1.3
    r = 4  # ceil(3 * 1.3)
    t = torch.arange(-r, r + 1, dtype=torch.float32)
    k1 = torch.exp(-0.5 * (t / sigma) ** 2)
    k2 = torch.outer(k1, k1) / k1.sum() ** 2
    ref = F.conv2d(F.pad(x[None], (r,) * 4, mode="reflect"), k2.expand(3, 1, -1, -1), groups=3)[0]
    assert torch.allclose(T.gaussian_blur(x, sigma), ref, atol=1e-6)


def test_color_jitter_equals_sequential_reference():
    x = _rgb()
    rng = _rng(11)
    b, c, s = (rng.uniform(0.7, 1.3) for _ in range(3))
    h = rng.uniform(-0.05, 0.05)
    grey = lambda y: (y * torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)).sum(0, keepdim=True)  # noqa: E731
    y = x * b  # brightness, contrast about the mean grey, saturation towards grey, then hue
    y = (y - grey(y).mean()) * c + grey(y).mean()
    y = (y - grey(y)) * s + grey(y)
    ref = T._hue_rotate(y, h).clamp(0, 1)
    assert torch.allclose(T.RandColorJitter(p=1.0)(x, _rng(11)), ref, atol=1e-5)


def test_hue_rotation_identity_and_grey_invariant():
    x = _rgb()
    assert torch.allclose(T._hue_rotate(x, 0.0), x, atol=1e-5)
    assert torch.allclose(T._hue_rotate(x, 1.0), x, atol=1e-5)
    grey = x[:1].expand(3, -1, -1)
    assert torch.allclose(T._hue_rotate(grey, 0.3), grey, atol=1e-5)


def test_weak_strong_pair_differ_and_are_deterministic():
    s = Sample(key="p/1", text="t", image=np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8))
    tf = T.SampleTransform("patho", 32, train=True, pair_views=True)
    a, b = tf(s, _rng(3)), tf(s, _rng(3))
    assert a["image_weak"].shape == a["image_strong"].shape == (3, 32, 32)
    assert not torch.equal(a["image_weak"], a["image_strong"])
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert a["image"] is a["image_weak"]


def test_hu_window_reference_values():
    v = np.array([[[-3000, -1000, 0, 500, 1000, 3000]]], dtype=np.int16)
    assert torch.allclose(T.hu_window(v).flatten(), torch.tensor([-1.0, -1.0, 0.0, 0.5, 1.0, 1.0]))


def test_ct_resize_flip_and_intensity():
    rng = np.random.default_rng(0)
    vol = rng.integers(-1000, 1000, (6, 10, 12)).astype(np.int16)
    mask = rng.integers(0, 5, (6, 10, 12)).astype(np.uint8)
    s = Sample(key="ct/1", text="t", volume=vol, mask=mask)
    out = T.SampleTransform("ct", 16, train=False, volume_size=(4, 8, 8))(s, _rng())
    assert out["volume"].shape == (1, 4, 8, 8) and out["volume"].dtype == torch.float32
    assert out["mask"].shape == (4, 8, 8) and out["mask"].dtype == torch.long
    assert set(out["mask"].unique().tolist()) <= set(range(5))  # nearest: labels stay labels
    v, m = T.hu_window(vol), torch.from_numpy(mask.astype(np.int64))
    fv, fm = T.RandFlip3D(axes=(0, 2), p=1.0)((v, m), _rng())
    assert torch.equal(fv, v.flip(0).flip(2)) and torch.equal(fm, m.flip(0).flip(2))
    a = T.RandIntensity3D(p=1.0)((v, m), _rng(5))
    assert torch.equal(a[0], T.RandIntensity3D(p=1.0)((v, m), _rng(5))[0]) and a[1] is m
    assert not torch.equal(a[0], v) and a[0].abs().max() <= 1.0


def test_slide_subsample_and_collate():
    feats = np.arange(40, dtype=np.float16).reshape(20, 2)
    coords = np.arange(40, dtype=np.int32).reshape(20, 2)
    f, c = T.RandSubsamplePatches(6, train=True)((feats, coords), _rng(1))
    assert f.shape == (6, 2) and np.all(np.diff(f[:, 0]) > 0)  # a subset, stored order kept
    assert np.array_equal(f.astype(np.int32), c)  # rows stay paired
    f2, _ = T.RandSubsamplePatches(6, train=True)((feats, coords), _rng(1))
    assert np.array_equal(f, f2)
    fe, _ = T.RandSubsamplePatches(5, train=False)((feats, coords), _rng(9))
    assert fe[:, 0].tolist() == [0, 10, 20, 28, 38]  # evenly strided rows 0, 5, 10, 14, 19
    bags = [torch.ones(3, 2), 2 * torch.ones(5, 2)]
    feats_BND, mask_BN, coords_BN2 = T.collate_bags(bags, [torch.ones(3, 2, dtype=torch.long)] * 1
                                                    + [torch.ones(5, 2, dtype=torch.long)])
    assert feats_BND.shape == (2, 5, 2) and coords_BN2.shape == (2, 5, 2)
    assert mask_BN.tolist() == [[True] * 3 + [False] * 2, [True] * 5]
    assert feats_BND[0, 3:].abs().sum() == 0 and torch.equal(feats_BND[1], bags[1])
    with pytest.raises(ValueError, match="feature dim"):
        T.collate_bags([torch.ones(2, 2), torch.ones(2, 3)], [torch.zeros(2, 2)] * 2)


def test_sample_without_payload_is_an_error():
    with pytest.raises(ValueError, match="none of img.png"):
        T.SampleTransform("cxr", 16)(Sample(key="x", text="t"), _rng())
