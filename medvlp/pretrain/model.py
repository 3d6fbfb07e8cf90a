"""MedCLIP: an image tower and a text tower, each with a linear projection, and a learned temperature.

    img (B, C, H, W) or vol (B, 1, D, H, W) --vision tower--> (B, E) --L2--> img_emb
    tok (B, L)                               --text tower---> (B, E) --L2--> txt_emb
    s = exp(clamp(t, max=log 100)), t initialised to log(1/0.07)          (CLIP, docs/methods.md §1)

`build_model(ModelConfig)` reads the architecture from the registry (`medvlp/pretrain/model_configs/*.json`), attaches the
tokenizer the text tower reads (`model.tokenizer`, picklable for data-loader workers) and loads
`ModelConfig.checkpoint` when given. SigLIP (`build_model(cfg, loss_cfg)` with `loss_cfg.kind == "siglip"`) adds a
learned logit bias: init t = log 10, b = -10 (Zhai et al., 2023); `forward` then also returns the bias.

Weight decay (`decay_param_names`): matrices and conv kernels only. Excluded: biases, every norm's affine
parameters, 1-d parameters, the positional / class embeddings and the logit scale / bias (they set a scale or a
position code, not a feature; open_clip's `no_weight_decay` lists the same). Token embeddings ARE decayed, as in
open_clip's training.

FLOPs (`flops_per_sample`): an exact count of one sample's forward matmuls and convolutions, by running the model
on the `meta` device under `torch.utils.flop_counter.FlopCounterMode` (no memory, no compute), times 3 for
forward + backward (backward = two matmuls per forward matmul). Norms, activations and softmax are not counted
(the usual MFU convention); attention score/value products are.

Shape legend: B batch, C channels, H/W image size, D depth, L tokens, W width, E embed dim.
"""
from __future__ import annotations

import logging
import math
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from medvlp.pretrain.config import LossConfig, ModelConfig
from medvlp.pretrain.registry import get_model_config
from medvlp.pretrain.spine import decay_param_names  # noqa: F401 - the optimizer's rule, used on models
from medvlp.pretrain.tokenizer import build_tokenizer
from medvlp.pretrain.towers import BertText, build_text, build_vision

log = logging.getLogger(__name__)

CLIP_INIT_LOGIT_SCALE = math.log(1 / 0.07)
SIGLIP_INIT_LOGIT_SCALE = math.log(10.0)
SIGLIP_INIT_LOGIT_BIAS = -10.0
MAX_LOGIT_SCALE = math.log(100.0)  # s = exp(t) <= 100


class MedCLIP(nn.Module):
    """CLIP-style dual encoder. Build with `build_model`; `spec` is a registry model config dict."""

    def __init__(self, spec: dict, tokenizer: Any = None, init_logit_scale: float | None = None,
                 init_logit_bias: float | None = None) -> None:
        super().__init__()
        where = spec.get("source", spec.get("name", "model"))
        self.spec = spec
        self.name = spec.get("name", "")
        self.embed_dim = int(spec["embed_dim"])
        self.visual = build_vision(self.embed_dim, spec["vision"], f"{where}: vision")
        self.text = build_text(self.embed_dim, spec["text"], f"{where}: text")
        self.image_kind = "3d" if spec["vision"]["type"] == "resnet3d" else "2d"
        self.image_size = self.visual.image_size  # int (2D, square) or (D, H, W) (3D)
        self.context_length = self.text.context_length
        t0 = spec.get("init_logit_scale", CLIP_INIT_LOGIT_SCALE) if init_logit_scale is None else init_logit_scale
        b0 = spec.get("init_logit_bias") if init_logit_bias is None else init_logit_bias
        # Shape (1,) rather than 0-d: DeepSpeed ZeRO-3 partitions 1-d parameters without special cases.
        self.logit_scale = nn.Parameter(torch.full((1,), float(t0)))
        self.logit_bias = nn.Parameter(torch.full((1,), float(b0))) if b0 is not None else None
        self._tokenizer = tokenizer

    # ------------------------------------------------------------------------------------------ tokenizer
    @property
    def tokenizer(self):
        """Picklable callable: list[str] -> LongTensor (B, context_length)."""
        if self._tokenizer is None:
            raise RuntimeError(f"model {self.name!r} has no tokenizer: its BERT text tower needs model.tokenizer "
                               "(a dir written by `medvlp tokenizer train --shards DIR --out DIR`)")
        return self._tokenizer

    def tokenize(self, texts: str | list[str]) -> torch.Tensor:
        return self.tokenizer(texts)

    # ------------------------------------------------------------------------------------------ encoders
    def encode_image(self, image: torch.Tensor, normalize: bool = True, return_tokens: bool = False):
        """-> emb (B, E), or (emb, VisionTokens) with `return_tokens` (`medvlp.pretrain.tokens`): the per-scale maps
        (B, C_i, *grid_i), finest first, with their strides, channels and the projected width; emb is the same
        tensor `encode_image(x)` returns."""
        out = self.visual(image, return_tokens=return_tokens)
        emb, tokens = out if return_tokens else (out, None)
        if normalize:
            emb = F.normalize(emb, dim=-1)
        return (emb, tokens) if return_tokens else emb

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        emb = self.text(tokens)
        return F.normalize(emb, dim=-1) if normalize else emb

    def scale(self) -> torch.Tensor:
        """s = exp(t) with t clamped at log 100 (no gradient beyond the clamp), as a 0-d tensor."""
        return self.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp().reshape(())

    def forward(self, image: torch.Tensor, tokens: torch.Tensor):
        """-> (img_emb (B, E), txt_emb (B, E), s) L2-normalised; plus the logit bias (0-d) when the model has one."""
        out = (self.encode_image(image), self.encode_text(tokens), self.scale())
        return out + (self.logit_bias.reshape(()),) if self.logit_bias is not None else out

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing in both towers (recompute in backward instead of storing activations)."""
        self.visual.set_grad_checkpointing(enable)
        self.text.set_grad_checkpointing(enable)

    def param_groups_for_decay(self, weight_decay: float) -> list[dict]:
        """Two optimizer groups: `decay_param_names` with `weight_decay`, the rest with 0."""
        names = decay_param_names(self)
        params = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        return [{"params": [p for n, p in params if n in names], "weight_decay": weight_decay},
                {"params": [p for n, p in params if n not in names], "weight_decay": 0.0}]


# ---------------------------------------------------------------------------------------------- build / load
def _spec_for(cfg: ModelConfig, loss_cfg: LossConfig | None) -> tuple[dict, float | None, float | None]:
    spec = get_model_config(cfg.name)
    scale, bias = cfg.init_logit_scale, cfg.init_logit_bias
    if loss_cfg is not None and loss_cfg.kind == "siglip":
        scale = SIGLIP_INIT_LOGIT_SCALE if scale is None and "init_logit_scale" not in spec else scale
        bias = SIGLIP_INIT_LOGIT_BIAS if bias is None and spec.get("init_logit_bias") is None else bias
    return spec, scale, bias


def build_model(cfg: ModelConfig, loss_cfg: LossConfig | None = None) -> MedCLIP:
    """Registry config -> MedCLIP (+ tokenizer, + local checkpoint). `loss_cfg.kind == "siglip"` adds the bias."""
    from medvlp.pretrain import init_from

    cfg = init_from.resolve(cfg)  # model.text_init: its tokenizer
    spec, scale, bias = _spec_for(cfg, loss_cfg)
    spec = init_from.init_spec(cfg, spec)  # model.init / model.text_init: their architecture
    text = spec["text"]
    tokenizer = None
    if text["type"] == "openclip":
        if cfg.tokenizer:
            raise ValueError(f"model.tokenizer: {spec['name']} reads open_clip BPE ids; a WordPiece dir "
                             f"({cfg.tokenizer}) needs a BERT text tower (e.g. debug-bert)")
        if int(text.get("vocab_size", 49408)) != 49408:
            raise ValueError(f"{spec['source']}: text.vocab_size must be 49408 (open_clip BPE)")
        tokenizer = build_tokenizer("openclip", int(text.get("context_length", 77)))
    elif cfg.tokenizer:
        tokenizer = build_tokenizer("bert", int(text.get("context_length", 77)), cfg.tokenizer)
        # The embedding table matches the trained vocabulary: the vocab belongs to the tokenizer, not the config
        # (a model.text_init folder's config.json already says its checkpoint's table size).
        text["vocab_size"] = text["vocab_size"] if cfg.text_init else tokenizer.vocab_size
        text["pad_token_id"] = tokenizer.pad_id
    model = MedCLIP(spec, tokenizer, scale, bias)
    init_from.load_init(model, cfg)  # their weights
    if cfg.checkpoint:
        load_checkpoint(model, cfg.checkpoint)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model


def load_checkpoint(model: nn.Module, path: str | Path, strict: bool = True) -> None:
    """Load a local weights file: safetensors, or a torch file read with `weights_only=True` only (a plain state
    dict, or one under "model"/"state_dict"/"module"; a "module." prefix is dropped). A pickle that needs more than
    tensors is refused with a ValueError, never executed."""
    from medvlp.pretrain.weights import read_weights

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model.checkpoint: {path} is not a file")
    sd, _ = read_weights(path)
    own = model.state_dict()
    bad_shape = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in sd.items()
                 if k in own and tuple(v.shape) != tuple(own[k].shape)]
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    if bad_shape or (strict and (missing or unexpected)):
        raise ValueError(f"{path}: does not fit the model: missing {_few(missing)}, unexpected {_few(unexpected)}, "
                         f"shape mismatch {_few(bad_shape)}")
    model.load_state_dict(sd, strict=strict)
    log.info("loaded %s (%d tensors)", path, len(sd))


def _few(items: list[str], k: int = 5) -> str:
    return f"{items[:k]}{'...' if len(items) > k else ''}"


# ---------------------------------------------------------------------------------------------- FLOPs
@lru_cache(maxsize=32)
def _flops_of_spec(spec_json: str) -> float:
    import json

    from torch.utils.flop_counter import FlopCounterMode

    spec = json.loads(spec_json)
    with torch.device("meta"):
        model = MedCLIP(spec)
        size = model.image_size
        image = (torch.zeros(1, model.visual.in_channels, *size) if model.image_kind == "3d"
                 else torch.zeros(1, 3, size, size))
        tokens = torch.zeros(1, model.context_length, dtype=torch.long)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model.eval().encode_image(image)
        if isinstance(model.text, BertText):  # no padding mask: building it reads data, which meta tensors lack
            model.text.proj(model.text.net(input_ids=tokens).last_hidden_state[:, 0])
        else:
            model.encode_text(tokens)
    return 3.0 * float(counter.get_total_flops())


def flops_per_sample(model_or_cfg: MedCLIP | ModelConfig | str) -> float:
    """Training FLOPs per (image, text) sample: 3 x the exact forward matmul/conv FLOPs (see module doc)."""
    import json

    if isinstance(model_or_cfg, MedCLIP):
        spec = model_or_cfg.spec
    else:
        spec = get_model_config(model_or_cfg.name if isinstance(model_or_cfg, ModelConfig) else model_or_cfg)
    spec = {k: v for k, v in spec.items() if k in ("embed_dim", "vision", "text")}
    return _flops_of_spec(json.dumps(spec, sort_keys=True))
