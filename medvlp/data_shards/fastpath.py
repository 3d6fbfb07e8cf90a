"""The fast 2D stream path (``data.pipeline=fast``): uint8 in the workers, float once per batch on the device.

The reference path (`medvlp.data_shards.transforms.image_view`) decodes every image in full, turns it into float
and crops, resizes, jitters and normalises each sample in float on a CPU core. This path keeps the same views
and draws:

* worker, per sample: the image member stays undecoded until its header (size, mode) is read; the view's
  random numbers are drawn from the sample's own generator by the very `Rand*` objects of `image_view`, in the
  same order (crop box, flip, intensity / colour jitter), so a seed gives the same crop parameters on both paths;
  then the image is decoded (a JPEG at reduced size with libjpeg's DCT scaling when the crop still has at least
  the output's resolution at that scale, `draft_factor`), cropped, resized (bilinear with antialias, on uint8:
  torch's uint8 kernel, within one grey level of the float path) and flipped, all on uint8. The sample carries
  its image as uint8 (C, S, S) and its jitter as a vector of `N_AUG` floats (`image_aug`);
* batch (`finish_batch`, in the training process, on the training device when the loader is given one): uint8
  -> float / 255, the brightness / contrast / gamma (grey) or colour (RGB) jitter with each sample's own
  parameters, grey -> 3 channels, (x - mean) / std. The same formulas as the reference transforms, batched.

16-bit images (PNG shards of radiographs) keep their precision: they are cropped and resized in float32
([0, 1] = x / 65535) and the batch is float. ``data.decode_device`` (auto | cpu | cuda) lets JPEG shards be
decoded on the GPU (`medvlp.data_shards.gpu_decode`): the worker then ships the JPEG bytes and the drawn view,
and the training process decodes the batch with nvJPEG and applies the same `apply_view`.

Shape legend: B batch, C channels (1 grey, 3 RGB), S output side, H/W stored image size, A = N_AUG.
"""
from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from medvlp.data_shards.schema import EncodedImage, Sample
from medvlp.data_shards.transforms import (MEAN_STD, Normalize, RandColorJitter, RandFlip, RandIntensity,
                                           RandResizedCrop, ResizeCenterCrop, _GREY_W, _RGB2YIQ, image_view)

# torchvision 0.29 deprecates its image codecs in favour of torchcodec; they are still the libjpeg-turbo / nvJPEG
# decoders this path needs, and a warning per decoded image would flood the logs
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)

# image_aug layout: [0] intensity on, [1:4] brightness shift, contrast factor, gamma;
#                   [4] colour jitter on, [5:14] 3x3 colour matrix (row major), [14] offset factor k
N_AUG = 15
# view layout (int64): [0] kind (0 crop box, 1 centre view), [1:5] top, left, ch, cw (box) or nh, nw, top, left
# (centre), [5] flip, [6] output side
N_VIEW = 7


# RandColorJitter's matrix in float64 numpy: its torch form is a dozen 3x3 tensor ops, ~0.15 ms a sample in
# per-op overhead; these agree with it to ~1e-7 (float32 rounding)
_GREY_W64 = _GREY_W.double().numpy()
_RGB2YIQ64 = _RGB2YIQ.double().numpy()
_YIQ2RGB64 = np.linalg.inv(_RGB2YIQ64)
_SAT_GREY64 = np.outer(np.ones(3), _GREY_W64)


def colour_matrix(bf: float, cf: float, sf: float, hf: float) -> tuple[np.ndarray, float]:
    """`RandColorJitter.draw`'s (3x3 matrix A, offset factor k) from its drawn factors, in numpy."""
    a = 2 * math.pi * hf
    c, s = math.cos(a), math.sin(a)
    rot = np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])
    sat = sf * np.eye(3) + (1 - sf) * _SAT_GREY64
    return (cf * bf) * (_YIQ2RGB64 @ rot @ _RGB2YIQ64 @ sat), (1 - cf) * bf


@dataclass(frozen=True)
class View:
    """The geometry drawn for one sample, in the stored image's pixels."""

    kind: int  # 0: crop box (top, left, ch, cw) -> S x S; 1: resize whole to (nh, nw), cut S x S at (top, left)
    a: tuple[int, int, int, int]
    flip: bool
    size: int

    def to_tensor(self) -> torch.Tensor:
        return torch.tensor([self.kind, *self.a, int(self.flip), self.size], dtype=torch.int64)

    @staticmethod
    def from_tensor(t: torch.Tensor) -> "View":
        v = [int(x) for x in t.tolist()]
        return View(v[0], tuple(v[1:5]), bool(v[5]), v[6])


def _resize_u8_or_f32(x_CHW: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """Bilinear with antialias (the reference's resize) on uint8 or float32; CUDA uint8 goes through float."""
    if tuple(x_CHW.shape[-2:]) == tuple(hw):
        return x_CHW
    if x_CHW.dtype == torch.uint8 and x_CHW.device.type != "cpu":
        y = F.interpolate(x_CHW[None].float(), size=hw, mode="bilinear", align_corners=False, antialias=True)[0]
        return y.round_().clamp_(0, 255).to(torch.uint8)
    return F.interpolate(x_CHW[None], size=hw, mode="bilinear", align_corners=False, antialias=True)[0]


def apply_view(x_CHW: torch.Tensor, view: View, scale: tuple[float, float] = (1.0, 1.0)) -> torch.Tensor:
    """Crop / resize / flip of a decoded image (uint8 or float32, any device). `scale` = (decoded / stored) height
    and width when the image was decoded at reduced size: the box then falls between pixels, and PIL's resize
    of a fractional box (antialiased bilinear as well) cuts it where it is."""
    sy, sx = scale
    if view.kind == 0 and (sy, sx) != (1.0, 1.0) and x_CHW.dtype == torch.uint8 and x_CHW.device.type == "cpu":
        top, left, ch, cw = view.a
        arr = x_CHW[0].numpy() if x_CHW.shape[0] == 1 else x_CHW.permute(1, 2, 0).numpy()
        im = Image.fromarray(np.ascontiguousarray(arr))
        out = _to_CHW(np.asarray(im.resize((view.size, view.size), Image.BILINEAR,
                                           box=(left * sx, top * sy, (left + cw) * sx, (top + ch) * sy))))
    elif view.kind == 0:
        top, left, ch, cw = view.a
        if (sy, sx) != (1.0, 1.0):
            top, left = int(round(top * sy)), int(round(left * sx))
            ch = max(1, min(int(round(ch * sy)), x_CHW.shape[-2] - top))
            cw = max(1, min(int(round(cw * sx)), x_CHW.shape[-1] - left))
        out = _resize_u8_or_f32(x_CHW[:, top:top + ch, left:left + cw], (view.size, view.size))
    else:
        nh, nw, top, left = view.a
        out = _resize_u8_or_f32(x_CHW, (nh, nw))[:, top:top + view.size, left:left + view.size]
    return out.flip(-1) if view.flip else out


def draft_factor(view: View, h: int, w: int) -> int:
    """The largest JPEG DCT reduction (1, 2, 4, 8) at which the region the view reads keeps at least the
    output's resolution, so the reduced decode only replaces part of a downscale the view makes anyway."""
    if view.kind == 0:
        need_h, need_w = view.a[2] / view.size, view.a[3] / view.size
    else:
        need_h, need_w = h / view.a[0], w / view.a[1]
    for k in (8, 4, 2):
        if need_h >= k and need_w >= k:
            return k
    return 1


_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg_sof(data: bytes) -> tuple[int, int, int] | None:
    """(H, W, components) from a JPEG's start-of-frame marker, walking the marker segments; None if not found."""
    i, n = 2, len(data)
    while i + 9 < n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in _SOF:
            return (data[i + 5] << 8) | data[i + 6], (data[i + 7] << 8) | data[i + 8], data[i + 9]
        i += 2 + ((data[i + 2] << 8) | data[i + 3])
    return None


def image_header(img: EncodedImage) -> tuple[int, int, int]:
    """(H, W, C) of an encoded image from its header alone (nothing decoded)."""
    if img.member == "img.jpg" and img.data[:2] == b"\xff\xd8":
        sof = _jpeg_sof(img.data)
        if sof is not None and sof[2] in (1, 3):
            return sof
    with Image.open(io.BytesIO(img.data)) as im:
        w, h = im.size
        return h, w, (1 if im.mode in ("L", "I;16", "I;16L", "I;16B", "I;16N", "I", "1") else 3)


def _pil_to_tensor(im: Image.Image) -> torch.Tensor:
    from medvlp.data_shards.schema import _load_png  # the reference decoder's modes (16-bit, L, RGB)

    if im.mode in ("L", "RGB"):
        arr = np.asarray(im)
    else:
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        arr = _load_png(buf.getvalue())
    return _to_CHW(arr)


def _to_CHW(arr: np.ndarray) -> torch.Tensor:
    if arr.dtype == np.uint16:  # 16-bit keeps its precision: float32 in [0, 1], as the reference sees it
        arr = arr.astype(np.float32) / 65535.0
    elif not arr.flags.writeable or not arr.flags.c_contiguous:  # PIL's arrays are read-only views
        arr = np.array(arr)
    t = torch.from_numpy(arr)
    return t[None] if t.ndim == 2 else t.permute(2, 0, 1)


def _decode_jpeg_full(data: bytes) -> torch.Tensor:
    from torchvision.io import ImageReadMode, decode_jpeg

    return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.UNCHANGED)


def decode_image(img: EncodedImage | np.ndarray, view: View | None = None) -> tuple[torch.Tensor, tuple[float, float]]:
    """Decode for `view`: (image_CHW uint8, or float32 in [0, 1] for 16-bit, and its (decoded / stored) scale).
    A JPEG is decoded by libjpeg-turbo (torchvision's decoder: no PIL image in between) or, when `draft_factor`
    allows, by PIL at 1/2, 1/4 or 1/8 size. A grey or RGB JPEG (its start-of-frame marker says so) that the view
    reads at full size goes straight to libjpeg-turbo, without opening a PIL image."""
    if isinstance(img, np.ndarray):
        return _to_CHW(img), (1.0, 1.0)
    if img.member == "img.jpg" and img.data[:2] == b"\xff\xd8":
        sof = _jpeg_sof(img.data)
        if sof is not None and sof[2] in (1, 3) and (view is None or draft_factor(view, sof[0], sof[1]) == 1):
            return _decode_jpeg_full(img.data), (1.0, 1.0)
    if img.member == "img.jpg":
        with Image.open(io.BytesIO(img.data)) as im:
            w, h = im.size
            k = draft_factor(view, h, w) if view is not None else 1
            if k > 1 and im.mode in ("L", "RGB"):
                im.draft(im.mode, (-(-w // k), -(-h // k)))
                im.load()
                x = _pil_to_tensor(im)
                return x, (x.shape[-2] / h, x.shape[-1] / w)
            if im.mode not in ("L", "RGB"):  # CMYK and the like: PIL converts as the reference does
                im.load()
                return _pil_to_tensor(im if im.mode in ("L", "RGB") else im.convert("RGB")), (1.0, 1.0)
        return _decode_jpeg_full(img.data), (1.0, 1.0)
    from medvlp.data_shards.schema import _load_png

    return _to_CHW(_load_png(img.data)), (1.0, 1.0)


class FastImageTransform:
    """Sample (image left encoded) -> {"image": uint8 (C, S, S) (float32 for 16-bit), "image_aug": (A,) float32}.

    The view is `image_view(modality, size, train, flip, aug)`'s: its own Rand* objects draw the parameters.
    With ``ship_jpeg`` (GPU decode) a JPEG is not decoded here: {"image_src": its bytes (uint8), "image_view":
    (N_VIEW,) int64, "image_aug"}; other members are decoded here as usual."""

    lazy_image = True  # the stream leaves the image member encoded (schema.EncodedImage)

    def __init__(self, modality: str, size: int, train: bool, flip: bool | None = None, aug: Any = None,
                 ship_jpeg: bool = False) -> None:
        self.modality, self.size, self.ship_jpeg = modality, size, ship_jpeg
        self.steps = image_view(modality, size, train, flip, aug).transforms
        for t in self.steps:
            if not isinstance(t, (RandResizedCrop, ResizeCenterCrop, RandFlip, RandIntensity, RandColorJitter,
                                  Normalize)):
                raise ValueError(f"pipeline=fast: no uint8 form of {type(t).__name__}")

    def draw(self, h: int, w: int, channels: int, rng: np.random.Generator) -> tuple[View, torch.Tensor]:
        """The view and jitter parameters of an h x w image: the reference's draws, in its order."""
        aug = np.zeros(N_AUG, dtype=np.float32)
        view, flip = None, False
        for t in self.steps:
            if isinstance(t, RandResizedCrop):
                box = t.draw(h, w, rng)
                view = (0, box) if box is not None else (1, ResizeCenterCrop(t.size).geometry(h, w))
            elif isinstance(t, ResizeCenterCrop):
                view = (1, t.geometry(h, w))
            elif isinstance(t, RandFlip):
                flip = t.draw(rng)
            elif isinstance(t, RandIntensity):
                p = t.draw(rng)
                if p is not None:
                    aug[0], aug[1:4] = 1.0, p
            elif isinstance(t, RandColorJitter):
                f = t.draw_factors(rng, channels)
                if f is not None:
                    a, k = colour_matrix(*f)
                    aug[4], aug[5:14], aug[14] = 1.0, a.reshape(9), k
        return View(view[0], tuple(int(v) for v in view[1]), flip, self.size), torch.from_numpy(aug)

    def __call__(self, s: Sample, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        img = s.image
        if img is None:
            raise ValueError("pipeline=fast streams 2D images; this sample has none")
        if isinstance(img, np.ndarray):
            h, w = img.shape[:2]
            c = 1 if img.ndim == 2 else img.shape[2]
        else:
            h, w, c = image_header(img)
        view, aug = self.draw(h, w, c, rng)
        if self.ship_jpeg and isinstance(img, EncodedImage) and img.member == "img.jpg":
            return {"image_src": torch.frombuffer(bytearray(img.data), dtype=torch.uint8),
                    "image_view": view.to_tensor(), "image_aug": aug}
        x_CHW, scale = decode_image(img, view)
        return {"image": apply_view(x_CHW, view, scale).contiguous(), "image_aug": aug}


def harmonize(images: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per-sample images that can be stacked: uint8 unless one is float (then all float in [0, 1]); grey
    expanded to RGB when the batch mixes channel counts (grey jitter is per sample, so nothing changes)."""
    if any(t.is_floating_point() for t in images):
        images = [t.float() / 255.0 if t.dtype == torch.uint8 else t for t in images]
    if len({t.shape[0] for t in images}) > 1:
        images = [t.expand(3, -1, -1).contiguous() if t.shape[0] == 1 else t for t in images]
    return images


def finish_images(img_BCHW: torch.Tensor, aug_BA: torch.Tensor, modality: str) -> torch.Tensor:
    """uint8 / float batch + per-sample jitter -> the normalised float32 (B, 3, S, S) batch the reference makes
    sample by sample (RandIntensity / RandColorJitter, then Normalize), on img_BCHW's device."""
    x = img_BCHW.float().div_(255.0) if img_BCHW.dtype == torch.uint8 else img_BCHW.float()
    aug = aug_BA.to(x.device, torch.float32)
    on = aug[:, 0] > 0
    if bool(on.any()):
        b, c, g = (aug[:, i].view(-1, 1, 1, 1) for i in (1, 2, 3))
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        y = ((x - mean) * c + mean + b).clamp(0.0, 1.0).pow(g)
        x = torch.where(on.view(-1, 1, 1, 1), y, x)
    on = aug[:, 4] > 0
    if bool(on.any()) and x.shape[1] == 3:
        a = aug[:, 5:14].view(-1, 3, 3)
        w = _GREY_W.to(x.device, x.dtype)
        offset = aug[:, 14] * (x * w.view(1, 3, 1, 1)).sum(1).mean(dim=(1, 2))
        y = (torch.einsum("bij,bjhw->bihw", a, x) + offset.view(-1, 1, 1, 1)).clamp(0.0, 1.0)
        x = torch.where(on.view(-1, 1, 1, 1), y, x)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    mean, std = MEAN_STD.get(modality, MEAN_STD["cxr"])
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return ((x - m) / s).contiguous()


def finish_batch(batch: dict, modality: str, device: torch.device | str | None = None,
                 decode: Callable | None = None) -> dict:
    """The batch half of the fast path, in the training process: (GPU-)decode shipped JPEGs, move the uint8
    images to `device`, then float, jitter and normalisation (`finish_images`). `decode` (list of JPEG byte
    tensors, device -> decoded images) replaces the GPU decoder, e.g. `gpu_decode.cpu_decode` in tests."""
    if "image_aug" not in batch:
        return batch
    device = torch.device(device) if device is not None else torch.device("cpu")
    aug = batch.pop("image_aug")
    if "image_src" in batch:
        srcs, views = batch.pop("image_src"), batch.pop("image_view")
        img = decode_views(srcs, views, device, decode=decode)
    else:
        img = batch["image"]
    non_blocking = device.type == "cuda"
    batch["image"] = finish_images(img.to(device, non_blocking=non_blocking), aug.to(device, non_blocking=non_blocking),
                                   modality)
    return batch


def decode_views(items: list, views_BV: torch.Tensor, device: torch.device,
                 decode: Callable[[Sequence[torch.Tensor], torch.device], list[torch.Tensor]] | None = None
                 ) -> torch.Tensor:
    """Per sample either JPEG bytes (decoded here, then its view applied) or an image the worker already made
    (a PNG sample) -> the uint8 (or float, with 16-bit samples) (B, C, S, S) batch on `device`."""
    from medvlp.data_shards.gpu_decode import cpu_decode, cuda_decode

    decode = decode or (cuda_decode if torch.device(device).type == "cuda" else cpu_decode)
    jpeg = [i for i, (data, made) in enumerate(items) if made is None]
    decoded = dict(zip(jpeg, decode([items[i][0] for i in jpeg], device))) if jpeg else {}
    out = []
    for i, (data, made) in enumerate(items):
        if made is not None:
            out.append(made.to(device))
        else:
            out.append(apply_view(decoded[i], View.from_tensor(views_BV[i])).contiguous())
    return torch.stack(harmonize(out))
