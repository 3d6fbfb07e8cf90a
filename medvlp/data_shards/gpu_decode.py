"""JPEG decoding on the GPU for the fast stream path (``data.decode_device``: auto | cpu | cuda).

With it the DataLoader workers only read the tar, parse the JPEG header (size and mode) and draw the sample's
view and jitter (`medvlp.data_shards.fastpath.FastImageTransform`, ``ship_jpeg=True``); the training process
decodes the batch's JPEGs with nvJPEG (`torchvision.io.decode_jpeg(..., device="cuda")`, one batched call) and
applies the same `apply_view` (crop, antialiased bilinear resize, flip) on the GPU, then `finish_images`.
Everything but the decode call is the CPU path's code, so `fastpath.decode_views(..., decode=cpu_decode)` on a CPU
reproduces the CPU fast path; the tests hold them equal. On CUDA the resize runs in float and rounds to uint8
(torch has no uint8 antialiased resize on CUDA): within one grey level of the CPU path.

`auto` picks the GPU when the loader's device is CUDA and torchvision's decoder has CUDA support; otherwise the
workers decode (CPU path).
"""
from __future__ import annotations

from typing import Sequence

import torch


def cpu_decode(datas: Sequence[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """The reference for the GPU decoder: libjpeg-turbo on the CPU (the CPU path's full-size decoder)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    return [decode_jpeg(d, mode=ImageReadMode.UNCHANGED).to(device) for d in datas]


def cuda_decode(datas: Sequence[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """nvJPEG: the whole batch in one call."""
    from torchvision.io import ImageReadMode, decode_jpeg

    return list(decode_jpeg(list(datas), mode=ImageReadMode.UNCHANGED, device=device))


def use_gpu_decode(setting: str, device: torch.device | str | None) -> bool:
    """Whether the workers ship JPEG bytes (True) or decode them (False) under data.decode_device."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if setting == "cpu":
        return False
    if setting == "cuda":
        if dev.type != "cuda" or not torch.cuda.is_available():
            raise ValueError("data.decode_device=cuda needs a CUDA device for the loader (make_loader(device=...))")
        return True
    return dev.type == "cuda" and torch.cuda.is_available()
