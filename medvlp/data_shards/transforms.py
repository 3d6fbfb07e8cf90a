"""Per-sample transforms for streaming: 2D images, CT volumes and slide feature bags.

Every transform is a callable ``t(x, rng)`` where ``rng`` is a ``np.random.Generator``; the output depends only
on the input and the generator state, so a stream that derives one generator per sample (from seed, epoch, rank,
worker and sample position) is reproducible and can skip samples without changing later ones. Random transforms
are named ``Rand*``; deterministic ones ignore ``rng``.

Shape legend:
  img_CHW   float32 image, C = 1 (grey) or 3 (RGB), values in [0, 1] until `Normalize`
  vol_DHW   float32 CT volume (vol_CDHW: C = one channel per HU window);  mask_DHW  int64 organ label map
  feats_ND  float32 patch-feature bag (N patches of d dims);  coords_N2  int64 patch coordinates
  S         output side of 2D images (cfg.image_size)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from medvlp.data_shards.schema import Sample

# Per-modality normalisation constants (mean, std per RGB channel). Patho uses the ImageNet statistics that
# pathology encoders are usually trained with; radiographs and CT slices are grey, centred at 0.5.
MEAN_STD: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "cxr": ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25)),
    "patho": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
HU_WINDOW = (-1000.0, 1000.0)  # CT Hounsfield window mapped to [-1, 1]
# Horizontal flips swap left and right: wrong for radiographs and CT (laterality is part of the finding).
DEFAULT_FLIP = {"cxr": False, "patho": True, "ct": False, "slide": False}

Transform = Callable[[Any, np.random.Generator], Any]


# ----------------------------------------------------------------------------------------------- 2D basics
def to_float_image(img: np.ndarray) -> torch.Tensor:
    """uint8 (/255) or uint16 (/65535) (H, W) or (H, W, 3) array -> img_CHW float32 in [0, 1]."""
    if img.dtype == np.uint8:
        scale = 255.0
    elif img.dtype == np.uint16:
        scale = 65535.0
    else:
        raise ValueError(f"image dtype {img.dtype} is not uint8 or uint16")
    if img.ndim == 2:
        img = img[None]
    elif img.ndim == 3 and img.shape[2] in (1, 3):
        img = img.transpose(2, 0, 1)
    else:
        raise ValueError(f"image shape {img.shape} is not (H, W) or (H, W, 1|3)")
    return torch.from_numpy(np.ascontiguousarray(img).astype(np.float32) / scale)


def _resize_CHW(img_CHW: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    if tuple(img_CHW.shape[-2:]) == tuple(hw):
        return img_CHW
    # antialias: downscaling stored images without it aliases fine texture (pathology) badly
    return F.interpolate(img_CHW[None], size=hw, mode="bilinear", align_corners=False, antialias=True)[0]


class Compose:
    """Apply transforms in order, each drawing from the same generator."""

    def __init__(self, transforms: Sequence[Transform]) -> None:
        self.transforms = list(transforms)

    def __call__(self, x: Any, rng: np.random.Generator) -> Any:
        for t in self.transforms:
            x = t(x, rng)
        return x


@dataclass
class ResizeCenterCrop:
    """Resize the shorter side to `size`, then take the centre `size` x `size` crop (the eval view)."""

    size: int

    def geometry(self, h: int, w: int) -> tuple[int, int, int, int]:
        """(nh, nw, top, left): the whole image is resized to nh x nw, then cut at (top, left)."""
        s = self.size / min(h, w)
        nh, nw = max(self.size, round(h * s)), max(self.size, round(w * s))
        return nh, nw, (nh - self.size) // 2, (nw - self.size) // 2

    def __call__(self, img_CHW: torch.Tensor, rng: np.random.Generator | None = None) -> torch.Tensor:
        nh, nw, top, left = self.geometry(*img_CHW.shape[-2:])
        img_CHW = _resize_CHW(img_CHW, (nh, nw))
        return img_CHW[:, top:top + self.size, left:left + self.size]


@dataclass
class RandResizedCrop:
    """Crop a random area fraction in `scale` with aspect ratio in `ratio` (log-uniform), resize to `size`."""

    size: int
    scale: tuple[float, float] = (0.5, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)

    def draw(self, h: int, w: int, rng: np.random.Generator) -> tuple[int, int, int, int] | None:
        """The crop box (top, left, ch, cw) of an h x w image, or None: no valid box in 10 draws (extreme
        aspect), the centre view is used."""
        area = h * w
        log_r = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target = area * rng.uniform(*self.scale)
            ar = math.exp(rng.uniform(*log_r))
            cw, ch = round(math.sqrt(target * ar)), round(math.sqrt(target / ar))
            if 0 < cw <= w and 0 < ch <= h:
                return int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw
        return None

    def __call__(self, img_CHW: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        box = self.draw(*img_CHW.shape[-2:], rng)
        if box is None:
            return ResizeCenterCrop(self.size)(img_CHW)
        top, left, ch, cw = box
        return _resize_CHW(img_CHW[:, top:top + ch, left:left + cw], (self.size, self.size))


@dataclass
class RandFlip:
    """Horizontal flip with probability `p` (default off for radiographs: laterality)."""

    p: float = 0.5

    def draw(self, rng: np.random.Generator) -> bool:
        return bool(rng.random() < self.p)

    def __call__(self, img_CHW: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        return img_CHW.flip(-1) if self.draw(rng) else img_CHW


@dataclass
class RandIntensity:
    """Brightness shift, contrast scale about the mean and gamma, each drawn uniformly; output clipped to [0, 1]."""

    brightness: float = 0.1  # additive shift in [-b, b]
    contrast: float = 0.2  # factor in [1 - c, 1 + c]
    gamma: float = 0.2  # exponent in [1 - g, 1 + g]
    p: float = 0.8

    def draw(self, rng: np.random.Generator) -> tuple[float, float, float] | None:
        """(brightness shift, contrast factor, gamma), or None when this sample is left as it is."""
        b, c, g = (rng.uniform(-self.brightness, self.brightness), rng.uniform(1 - self.contrast, 1 + self.contrast),
                   rng.uniform(1 - self.gamma, 1 + self.gamma))
        return None if rng.random() >= self.p else (b, c, g)

    def __call__(self, img_CHW: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        params = self.draw(rng)
        if params is None:
            return img_CHW
        b, c, g = params
        mean = img_CHW.mean()
        out = ((img_CHW - mean) * c + mean + b).clamp(0.0, 1.0)
        return out.pow(g)


@dataclass
class RandColorJitter:
    """Brightness, contrast, saturation and hue jitter of RGB images (stain variation in pathology)."""

    brightness: float = 0.3
    contrast: float = 0.3
    saturation: float = 0.3
    hue: float = 0.05  # fraction of a full turn of the chroma plane
    p: float = 0.8

    def draw_factors(self, rng: np.random.Generator, channels: int = 3) -> tuple[float, float, float, float] | None:
        """(brightness, contrast, saturation factors, hue turn), or None: every draw `draw` makes, in its order."""
        bf, cf, sf = (rng.uniform(1 - a, 1 + a) for a in (self.brightness, self.contrast, self.saturation))
        hf = rng.uniform(-self.hue, self.hue)
        if rng.random() >= self.p or channels != 3:
            return None
        return bf, cf, sf, hf

    def draw(self, rng: np.random.Generator, channels: int = 3) -> tuple[torch.Tensor, float] | None:
        """(3x3 colour matrix A, offset factor k): out = A @ rgb + k * mean grey; None = left as it is (also for
        images that are not RGB)."""
        factors = self.draw_factors(rng, channels)
        if factors is None:
            return None
        bf, cf, sf, hf = factors
        # All four jitters are affine in RGB, so they fold into one 3x3 matrix and an offset (one pass over the
        # pixels): saturation blends with the grey value, a hue shift rotates the chroma plane, and both keep
        # grey (1, 1, 1) fixed, so contrast's pull towards the mean grey survives them unchanged.
        sat = sf * torch.eye(3) + (1 - sf) * torch.ones(3, 1) @ _GREY_W.view(1, 3)
        return cf * bf * (_hue_matrix(hf) @ sat), (1 - cf) * bf

    def __call__(self, img_CHW: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        params = self.draw(rng, img_CHW.shape[0])
        if params is None:
            return img_CHW
        a, k = params
        w = _GREY_W.to(img_CHW.dtype)
        offset = k * float((img_CHW * w.view(3, 1, 1)).sum(0).mean())
        return (torch.einsum("ij,jhw->ihw", a.to(img_CHW.dtype), img_CHW) + offset).clamp(0.0, 1.0)


_GREY_W = torch.tensor([0.299, 0.587, 0.114])


# RGB <-> YIQ: a hue shift is a rotation of the (I, Q) chroma plane, cheaper than a round trip through HSV.
_RGB2YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ2RGB = torch.linalg.inv(_RGB2YIQ)


def _hue_matrix(turn: float) -> torch.Tensor:
    a = 2 * math.pi * turn
    rot = torch.tensor([[1.0, 0.0, 0.0], [0.0, math.cos(a), -math.sin(a)], [0.0, math.sin(a), math.cos(a)]])
    return _YIQ2RGB @ rot @ _RGB2YIQ


def _hue_rotate(img_3HW: torch.Tensor, turn: float) -> torch.Tensor:
    return torch.einsum("ij,jhw->ihw", _hue_matrix(turn).to(img_3HW.dtype), img_3HW)


@dataclass
class RandGaussianNoise:
    """Add N(0, sigma^2) noise with sigma uniform in [0, `std`], with probability `p`."""

    std: float = 0.03
    p: float = 0.5

    def __call__(self, img_CHW: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        sigma = rng.uniform(0.0, self.std)
        if rng.random() >= self.p:
            return img_CHW
        noise = rng.standard_normal(img_CHW.shape, dtype=np.float32) * sigma
        return (img_CHW + torch.from_numpy(noise)).clamp(0.0, 1.0)


@dataclass
class RandBlur:
    """Gaussian blur with sigma uniform in `sigma` (pixels), separable, reflect-padded; probability `p`."""

    sigma: tuple[float, float] = (0.1, 2.0)
    p: float = 0.5

    def __call__(self, img_CHW: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        s = rng.uniform(*self.sigma)
        if rng.random() >= self.p:
            return img_CHW
        return gaussian_blur(img_CHW, s)


def gaussian_blur(img_CHW: torch.Tensor, sigma: float) -> torch.Tensor:
    c, h, w = img_CHW.shape
    r = max(1, min(int(math.ceil(3 * sigma)), (min(h, w) - 1) // 2))  # reflect padding needs r < side
    t = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = (k / k.sum()).to(img_CHW.dtype)
    x = F.pad(img_CHW[None], (r, r, r, r), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    x = F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return x[0]


@dataclass
class Normalize:
    """Replicate grey to 3 channels, then (x - mean) / std with the modality's constants."""

    modality: str = "cxr"

    def __call__(self, img_CHW: torch.Tensor, rng: np.random.Generator | None = None) -> torch.Tensor:
        mean, std = MEAN_STD.get(self.modality, MEAN_STD["cxr"])
        if img_CHW.shape[0] == 1:
            img_CHW = img_CHW.expand(3, -1, -1)
        m = torch.tensor(mean, dtype=img_CHW.dtype).view(3, 1, 1)
        s = torch.tensor(std, dtype=img_CHW.dtype).view(3, 1, 1)
        return ((img_CHW - m) / s).contiguous()


# -------------------------------------------------------------------------------------- 2D view recipes
def image_view(modality: str, size: int, train: bool, flip: bool | None = None, aug: Any = None) -> Compose:
    """The single-view 2D pipeline: train = crop/flip/intensity or colour jitter; eval = resize + centre crop.

    aug: a `medvlp.data_shards.config.AugmentConfig` (crop range, intensity strengths); None = its defaults."""
    flip = DEFAULT_FLIP.get(modality, False) if flip is None else flip
    if not train:
        return Compose([ResizeCenterCrop(size), Normalize(modality)])
    scale = (0.6, 1.0) if modality == "cxr" else (0.5, 1.0)
    ratio = (3 / 4, 4 / 3)
    if aug is not None:
        scale = tuple(aug.crop_scale) if aug.crop_scale is not None else scale
        ratio = tuple(aug.crop_ratio) if aug.crop_ratio is not None else ratio
    ts: list[Transform] = [RandResizedCrop(size, scale=scale, ratio=ratio)]
    if flip:
        ts.append(RandFlip())
    if modality == "patho":
        ts.append(RandColorJitter())
    else:
        ts.append(RandIntensity() if aug is None else
                  RandIntensity(aug.brightness, aug.contrast, aug.gamma, aug.intensity_p))
    ts.append(Normalize(modality))
    return Compose(ts)


def weak_view(modality: str, size: int, flip: bool | None = None) -> Compose:
    """Path-CLIP weak view: small crop (+ flip where allowed)."""
    flip = DEFAULT_FLIP.get(modality, False) if flip is None else flip
    ts: list[Transform] = [RandResizedCrop(size, scale=(0.8, 1.0))]
    if flip:
        ts.append(RandFlip())
    return Compose([*ts, Normalize(modality)])


def strong_view(modality: str, size: int, flip: bool | None = None) -> Compose:
    """Path-CLIP strong view: stronger crop (+ flip), colour jitter / intensity, blur and noise."""
    flip = DEFAULT_FLIP.get(modality, False) if flip is None else flip
    ts: list[Transform] = [RandResizedCrop(size, scale=(0.3, 1.0))]
    if flip:
        ts.append(RandFlip())
    ts.append(RandColorJitter(0.4, 0.4, 0.4, 0.1, p=1.0) if modality == "patho" else RandIntensity(0.2, 0.4, 0.4, 1.0))
    ts += [RandBlur(p=0.5), RandGaussianNoise(p=0.5), Normalize(modality)]
    return Compose(ts)


# ------------------------------------------------------------------------------------------------- CT
def hu_window(vol_DHW: np.ndarray | torch.Tensor, window: tuple[float, float] = HU_WINDOW) -> torch.Tensor:
    """Clip HU to `window` and map it linearly to [-1, 1] (float32)."""
    v = torch.as_tensor(np.asarray(vol_DHW, dtype=np.float32))
    lo, hi = window
    return (v.clamp(lo, hi) - lo) / (hi - lo) * 2.0 - 1.0


def hu_windows(vol_DHW: np.ndarray | torch.Tensor, windows: Sequence[Sequence[float]] = (HU_WINDOW,)) -> torch.Tensor:
    """One `hu_window` per (lo, hi) window, stacked as channels: vol_CDHW (C = len(windows)).

    A window given as centre C / width W (e.g. lung C -600 W 1500) is (C - W/2, C + W/2) = (-1350, 150)."""
    v = torch.as_tensor(np.asarray(vol_DHW, dtype=np.float32))
    return torch.stack([hu_window(v, (float(w[0]), float(w[1]))) for w in windows])


def resize_volume(vol_DHW: torch.Tensor, mask_DHW: torch.Tensor | None, size: Sequence[int] | None):
    """Trilinear resize of the volume ((D, H, W) or (C, D, H, W)), nearest of the mask (labels stay labels)."""
    if size is None or tuple(vol_DHW.shape[-3:]) == tuple(size):
        return vol_DHW, mask_DHW
    size = tuple(int(s) for s in size)
    v = vol_DHW[None, None] if vol_DHW.ndim == 3 else vol_DHW[None]
    v = F.interpolate(v, size=size, mode="trilinear", align_corners=False)[0]
    vol_DHW = v[0] if vol_DHW.ndim == 3 else v
    if mask_DHW is not None:
        mask_DHW = F.interpolate(mask_DHW[None, None].float(), size=size, mode="nearest")[0, 0].long()
    return vol_DHW, mask_DHW


@dataclass
class RandFlip3D:
    """Flip volume and mask together along each of `axes` with probability `p` (axes of (D, H, W); the volume
    may carry a leading channel axis)."""

    axes: tuple[int, ...] = (2,)
    p: float = 0.5

    def __call__(self, pair: tuple[torch.Tensor, torch.Tensor], rng: np.random.Generator):
        vol_DHW, mask_DHW = pair
        for ax in self.axes:
            if rng.random() < self.p:
                vol_DHW, mask_DHW = vol_DHW.flip(ax - 3), mask_DHW.flip(ax - 3)
        return vol_DHW, mask_DHW


@dataclass
class RandIntensity3D:
    """Scale and shift of the windowed volume (values in [-1, 1]) with probability `p`; the mask is untouched."""

    scale: float = 0.1  # factor in [1 - s, 1 + s]
    shift: float = 0.1  # additive shift in [-t, t]
    p: float = 0.8

    def __call__(self, pair: tuple[torch.Tensor, torch.Tensor], rng: np.random.Generator):
        vol_DHW, mask_DHW = pair
        a, b = rng.uniform(1 - self.scale, 1 + self.scale), rng.uniform(-self.shift, self.shift)
        if rng.random() >= self.p:
            return vol_DHW, mask_DHW
        return (vol_DHW * a + b).clamp(-1.0, 1.0), mask_DHW


@dataclass
class RandNoise3D:
    """Gaussian noise on the windowed volume, sigma drawn in [0, `std`], with probability `p`; clipped to [-1, 1]."""

    std: float = 0.02
    p: float = 0.5

    def __call__(self, pair: tuple[torch.Tensor, torch.Tensor], rng: np.random.Generator):
        vol, mask_DHW = pair
        sigma = rng.uniform(0.0, self.std)
        if rng.random() >= self.p:
            return vol, mask_DHW
        noise = torch.from_numpy(rng.standard_normal(tuple(vol.shape), dtype=np.float32)) * sigma
        return (vol + noise).clamp(-1.0, 1.0), mask_DHW


@dataclass
class RandCrop3D:
    """A random sub-volume of `scale` of each axis, resized back to the input size (trilinear / nearest mask)."""

    scale: float = 0.9

    def __call__(self, pair: tuple[torch.Tensor, torch.Tensor], rng: np.random.Generator):
        vol, mask_DHW = pair
        shape = tuple(vol.shape[-3:])
        size = [max(1, round(n * self.scale)) for n in shape]
        start = [int(rng.integers(0, n - s + 1)) for n, s in zip(shape, size)]
        sl = tuple(slice(a, a + s) for a, s in zip(start, size))
        return resize_volume(vol[(..., *sl)], mask_DHW[sl], shape)


# ----------------------------------------------------------------------------------------------- slide
@dataclass
class RandSubsamplePatches:
    """Keep at most `max_patches` patches: a random subset (train) or an even stride (eval), in stored order."""

    max_patches: int
    train: bool = True

    def __call__(self, bag: tuple[np.ndarray, np.ndarray], rng: np.random.Generator):
        feats_ND, coords_N2 = bag
        n = feats_ND.shape[0]
        if self.max_patches <= 0 or n <= self.max_patches:
            return feats_ND, coords_N2
        if self.train:
            idx = np.sort(rng.choice(n, size=self.max_patches, replace=False))
        else:
            idx = np.linspace(0, n - 1, self.max_patches).round().astype(np.int64)
        return feats_ND[idx], coords_N2[idx]


# ------------------------------------------------------------------------------------ sample -> tensors
@dataclass
class SampleTransform:
    """Sample -> dict of per-sample tensors, per modality (the default transform of the stream).

    2D: {"image"} or, with `pair_views`, {"image", "image_weak", "image_strong"} ("image" is the weak view);
    CT: {"volume" (C, D, H, W) with C = len(hu_windows), "mask" (D, H, W)}; slide: {"feats" (N, d), "coords" (N, 2)}.
    """

    modality: str
    image_size: int
    train: bool = True  # random augmentation (False = the deterministic eval view)
    flip: bool | None = None  # horizontal / 3D flips; None = modality default (DEFAULT_FLIP)
    pair_views: bool = False  # Path-CLIP weak/strong views
    volume_size: Sequence[int] | None = None
    max_patches: int = 0
    hu_windows: Sequence[Sequence[float]] = (HU_WINDOW,)  # CT windows (lo, hi), stacked as channels
    aug: Any = None  # medvlp.data_shards.config.AugmentConfig; None = its defaults

    def __post_init__(self) -> None:
        from medvlp.data_shards.config import AugmentConfig

        s, m, a = self.image_size, self.modality, self.aug or AugmentConfig()
        self._single = image_view(m, s, self.train, self.flip, self.aug)
        self._weak = weak_view(m, s, self.flip) if self.train else self._single
        self._strong = strong_view(m, s, self.flip) if self.train else self._single
        flip3d = DEFAULT_FLIP["ct"] if self.flip is None else self.flip
        ct: list[Transform] = [RandFlip3D(tuple(a.ct_flip_axes))] if flip3d and a.ct_flip_axes else []
        if a.ct_crop_scale < 1:
            ct.append(RandCrop3D(a.ct_crop_scale))
        ct.append(RandIntensity3D(a.ct_scale, a.ct_shift, a.ct_intensity_p))
        if a.ct_noise_std > 0:
            ct.append(RandNoise3D(a.ct_noise_std))
        self._ct = Compose(ct) if self.train else None
        self._bag = RandSubsamplePatches(self.max_patches, self.train)

    def __call__(self, s: Sample, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        if s.image is not None:
            img_CHW = to_float_image(s.image)
            if not self.pair_views:
                return {"image": self._single(img_CHW, rng)}
            weak, strong = self._weak(img_CHW, rng), self._strong(img_CHW, rng)
            return {"image": weak, "image_weak": weak, "image_strong": strong}
        if s.volume is not None:
            vol_CDHW = hu_windows(s.volume, self.hu_windows)
            mask_DHW = torch.from_numpy(s.mask.astype(np.int64)) if s.mask is not None else None
            if mask_DHW is not None and mask_DHW.shape != vol_CDHW.shape[1:]:
                raise ValueError(f"mask shape {tuple(mask_DHW.shape)} != volume shape {tuple(vol_CDHW.shape[1:])}")
            vol_CDHW, mask_DHW = resize_volume(vol_CDHW, mask_DHW, self.volume_size)
            if mask_DHW is None:
                mask_DHW = torch.zeros(vol_CDHW.shape[1:], dtype=torch.long)
            if self._ct is not None:
                vol_CDHW, mask_DHW = self._ct((vol_CDHW, mask_DHW), rng)
            return {"volume": vol_CDHW.contiguous(), "mask": mask_DHW.contiguous()}
        if s.feats is not None:
            n = s.feats.shape[0]
            coords = s.coords if s.coords is not None else np.zeros((n, 2), dtype=np.int64)
            if coords.shape[0] != n:
                raise ValueError(f"coords has {coords.shape[0]} rows but feats has {n}")
            feats_ND, coords_N2 = self._bag((s.feats, coords), rng)
            return {"feats": torch.from_numpy(feats_ND.astype(np.float32)),
                    "coords": torch.from_numpy(coords_N2.astype(np.int64))}
        raise ValueError("sample has none of img.png / vol.npy / feats.npy")


def collate_bags(feats: list[torch.Tensor], coords: list[torch.Tensor]):
    """Zero-pad bags to the longest: feats_BND, feats_mask_BN (True = real patch), coords_BN2."""
    b, n_max = len(feats), max(f.shape[0] for f in feats)
    d = feats[0].shape[1]
    feats_BND = torch.zeros(b, n_max, d, dtype=torch.float32)
    mask_BN = torch.zeros(b, n_max, dtype=torch.bool)
    coords_BN2 = torch.zeros(b, n_max, 2, dtype=torch.long)
    for i, (f, c) in enumerate(zip(feats, coords)):
        if f.shape[1] != d:
            raise ValueError(f"bag {i} has feature dim {f.shape[1]}, bag 0 has {d}")
        feats_BND[i, : f.shape[0]] = f
        mask_BN[i, : f.shape[0]] = True
        coords_BN2[i, : f.shape[0]] = c
    return feats_BND, mask_BN, coords_BN2
