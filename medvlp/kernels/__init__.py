"""Fused kernels: each with a launcher, an autograd.Function and a pure-torch reference."""
from medvlp.kernels.contrastive import BACKENDS, clip_loss, clip_loss_reference, pick_block, resolve_backend, triton_available

__all__ = ["BACKENDS", "clip_loss", "clip_loss_reference", "pick_block", "resolve_backend", "triton_available"]
