"""A trained model as a library object: `load_pretrained(path) -> Pretrained` (model, tokenizer, preprocess, config).

    p = load_pretrained("runs/debug")                 # a run folder: final weights or latest COMPLETE checkpoint
    p = load_pretrained("runs/debug", step=50)        # that checkpoint (DeepSpeed ZeRO 0-3, consolidated to fp32)
    p = load_pretrained("runs/debug/model.safetensors")   # consolidated weights (+ config.yaml/json beside them)
    p = load_pretrained("exports/debug-openclip")     # a folder written by `medvlp export`
    img = p.transform()(png_array)[None]              # the stream's eval view: resize, centre crop, normalise
    emb = p.model.encode_image(img); txt = p.model.encode_text(p.tokenizer(["No effusion."]))

This module is the front door: the low-level readers (safetensors, the safe torch loader, DeepSpeed checkpoints,
stored configs) are `medvlp.pretrain.weights`, re-exported here; it also reads folders that
`medvlp.pretrain.export` wrote (`load_export`).

What a run folder resolves to (`step=None`): `model.safetensors` when it is at least as new as the latest COMPLETE
checkpoint (a run that ended normally), else the latest COMPLETE checkpoint; a legacy `model.pt` is read only with
`torch.load(weights_only=True)`. A checkpoint is consolidated by DeepSpeed's own
`get_fp32_state_dict_from_zero_checkpoint` (ZeRO 1-3) or read from its module file (ZeRO 0).

Security: weights and RNG states written by this project are safetensors / JSON, and every `torch.load` here runs
with `weights_only=True`, so a crafted pickle is refused, never executed. DeepSpeed's checkpoint files are pickles:
before handing a checkpoint to DeepSpeed's loader (which unpickles with `weights_only=False`), it passes the one
safe-load gate, `medvlp.pretrain.checkpoint.safe_load_gate`: every pickle file is first opened with the safe loader
(`weights_only=True`, allowing only DeepSpeed's and accelerate's own plain classes) and the checkpoint is refused
if any file needs more. Still, treat checkpoints from others as code.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from medvlp.pretrain.checkpoint import (CKPT_DIR, COMPLETE, WEIGHTS, UnsafeCheckpointError,  # noqa: F401
                                        safe_load_gate)
# The low-level readers live in medvlp.pretrain.weights; their names stay importable from here.
from medvlp.pretrain.weights import (EXPORT_MANIFEST, LoadError, check_deepspeed_files,  # noqa: F401
                                     checkpoint_state_dict, config_from_dict, config_root, deepspeed_safe_globals,
                                     final_weights, from_hf, from_open_clip, pick_checkpoint, read_safetensors,
                                     read_weights, run_config, safe_torch_load)

log = logging.getLogger(__name__)

@dataclass
class Pretrained:
    """A loaded model and what it needs to be used: tokenizer, preprocessing, the typed run config."""

    model: Any  # MedCLIP, eval mode, on CPU (or `map_location`)
    config: Any  # PretrainConfig (the run's resolved config)
    tokenizer: Callable  # list[str] -> LongTensor (B, L)
    modality: str  # cxr | patho | ct | slide: what the model was trained on
    embed_dim: int  # E, the shared embedding width
    source: str = ""  # the weights actually read (file, checkpoint folder or export)
    step: int | None = None  # the training step of those weights, when known

    def transform(self, modality: str | None = None, train: bool = False) -> Callable:
        """The stream's per-sample view for `modality` (default: the model's): a callable on a decoded image,
        uint8/uint16 (H, W) / (H, W, 3) array or float (C, H, W) tensor in [0, 1] -> normalised (3, S, S) tensor;
        for CT, a (D, H, W) Hounsfield volume -> (C, D, H, W), one channel per `data.hu_windows` window. `train=True` gives the random training view."""
        from medvlp.data_shards.transforms import HU_WINDOW, hu_windows, image_view, resize_volume, to_float_image

        modality = modality or self.modality
        size = self.model.image_size
        if modality == "ct" or self.model.image_kind == "3d":
            vol_size = list(size) if not isinstance(size, int) else None

            windows = getattr(getattr(self.config, "data", None), "hu_windows", None) or [HU_WINDOW]

            def ct(vol_DHW):
                v = hu_windows(np.asarray(vol_DHW) if not torch.is_tensor(vol_DHW) else vol_DHW, windows)
                v, _ = resize_volume(v, None, vol_size)
                return v.contiguous()

            return ct
        if modality == "slide":
            raise LoadError("transform: slide feature bags have no image view")
        view = image_view(modality, int(size), train)
        rng = np.random.default_rng()

        def image(img):
            x = img if torch.is_tensor(img) else to_float_image(np.asarray(img))
            return view(x.float(), rng)

        return image


# ----------------------------------------------------------------------------------------------- build
def _tokenizer_for(spec: dict, cfg: Any, base: Path | None = None):
    from medvlp.pretrain.tokenizer import build_tokenizer

    text = spec["text"]
    ctx = int(text.get("context_length", 77))
    if text["type"] == "openclip":
        return build_tokenizer("openclip", ctx)
    tok = getattr(getattr(cfg, "model", None), "tokenizer", "") if cfg is not None else ""
    if base is not None and (base / "tokenizer" / "tokenizer.json").is_file():
        tok = str(base / "tokenizer")
    if not tok or not (Path(tok) / "tokenizer.json").is_file():
        raise LoadError(f"model {spec.get('name', '')!r} has a BERT text tower but its WordPiece tokenizer dir "
                        f"({tok or 'model.tokenizer unset'}) is missing")
    return build_tokenizer("bert", ctx, tok)


def build_from_state(spec: dict, sd: dict[str, torch.Tensor], cfg: Any, where: str,
                     base: Path | None = None):
    """MedCLIP of architecture `spec` holding exactly the tensors `sd` (a logit bias only when `sd` has one)."""
    from medvlp.pretrain.model import MedCLIP

    spec = json.loads(json.dumps(spec))
    tokenizer = _tokenizer_for(spec, cfg, base)
    if spec["text"]["type"] == "bert":
        spec["text"]["vocab_size"] = tokenizer.vocab_size
        spec["text"]["pad_token_id"] = tokenizer.pad_id
    model = MedCLIP(spec, tokenizer, init_logit_bias=0.0 if "logit_bias" in sd else None)
    if "logit_bias" not in sd:
        model.logit_bias = None
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    bad = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own if k in sd
           and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or bad:
        raise LoadError(f"{where}: weights do not fit model {spec.get('name', '')!r}: missing {missing[:5]}, "
                        f"unexpected {unexpected[:5]}, shape mismatch {bad[:5]}")
    model.load_state_dict(sd, strict=True)
    return model.eval()


def _spec_of(meta: dict[str, str], cfg: Any, where: Path) -> dict:
    from medvlp.pretrain.registry import get_model_config

    if meta.get("medvlp_spec"):
        return json.loads(meta["medvlp_spec"])
    name = getattr(getattr(cfg, "model", None), "name", "") if cfg is not None else ""
    if not name:
        raise LoadError(f"{where}: no architecture: the weights carry no spec and no config names model.name")
    try:
        return get_model_config(name)
    except KeyError as e:
        raise LoadError(f"{where}: {e.args[0]}") from None


def _finish(model, cfg: Any, source: Path, step: int | None, map_location) -> Pretrained:
    if cfg is None:
        cfg = config_root()()
    modality = getattr(getattr(cfg, "data", None), "modality", "cxr")
    model = model.to(map_location).eval()
    return Pretrained(model=model, config=cfg, tokenizer=model.tokenizer, modality=modality,
                      embed_dim=int(model.embed_dim), source=str(source), step=step)


# ----------------------------------------------------------------------------------------------- exported folders
def _manifest(folder: Path) -> dict:
    try:
        doc = json.loads((folder / EXPORT_MANIFEST).read_text())
        doc["format"], doc["spec"]  # noqa: B018 - required keys
        return doc
    except (OSError, ValueError, KeyError) as e:
        raise LoadError(f"{folder / EXPORT_MANIFEST}: not a medvlp export manifest ({type(e).__name__}: {e})") \
            from None


def export_config(folder: str | os.PathLike) -> Any:
    """The typed run config stored in an exported folder (its tokenizer path pointing into the folder)."""
    folder = Path(folder)
    doc = _manifest(folder)
    cfg = config_from_dict(doc.get("config") or {})
    if doc.get("tokenizer") and hasattr(cfg, "model"):
        cfg.model.tokenizer = str(folder / doc["tokenizer"])
    return cfg


def load_export(folder: str | os.PathLike):
    """An exported folder (written by `medvlp.pretrain.export`) -> (MedCLIP, typed config, step)."""
    folder = Path(folder)
    doc = _manifest(folder)
    sd, _ = read_safetensors(folder / doc.get("weights", ""))
    if doc["format"] == "open_clip":
        ours = from_open_clip(sd)
    elif doc["format"] == "hf":
        ours = from_hf(sd)
    else:
        raise LoadError(f"{folder}: unknown export format {doc['format']!r}")
    cfg = export_config(folder)
    model = build_from_state(doc["spec"], ours, cfg, str(folder), base=folder)
    return model, cfg, doc.get("step")


# ----------------------------------------------------------------------------------------------- entry point
def load_pretrained(path: str | os.PathLike, step: int | None = None, map_location: str | torch.device = "cpu"
                    ) -> Pretrained:
    """A run folder, a consolidated weights file (with its config beside it) or an exported folder -> Pretrained.

    `step` picks a COMPLETE checkpoint of a run folder (default: the final weights, or the latest checkpoint)."""
    p = Path(path)
    if not p.exists():
        raise LoadError(f"{p}: no such file or folder")
    if p.is_file():
        if step is not None:
            raise LoadError(f"{p}: --step applies to a run folder, not to a weights file")
        cfg = run_config(p.parent)
        sd, meta = read_weights(p)
        spec = _spec_of(meta, cfg, p)
        model = build_from_state(spec, sd, cfg, str(p))
        return _finish(model, cfg, p, _int(meta.get("step")), map_location)
    if (p / EXPORT_MANIFEST).is_file():
        if step is not None:
            raise LoadError(f"{p}: an exported folder holds one step; --step applies to a run folder")
        model, cfg, exp_step = load_export(p)
        return _finish(model, cfg, p, exp_step, map_location)
    cfg = run_config(p)
    final = final_weights(p)
    tag_dir = pick_checkpoint(p, step)
    use_final = final is not None and step is None and (
        tag_dir is None or final.stat().st_mtime >= (tag_dir / COMPLETE).stat().st_mtime)
    if use_final:
        sd, meta = read_weights(final)
        source, at = final, _int(meta.get("step"))
    elif tag_dir is not None:
        sd, meta, source = checkpoint_state_dict(tag_dir), {}, tag_dir
        at = int(tag_dir.name.split("_")[1])
    else:
        raise LoadError(f"{p}: not a run folder ({WEIGHTS} or COMPLETE checkpoints under {CKPT_DIR}/), a weights "
                        f"file, or an exported folder ({EXPORT_MANIFEST})")
    if cfg is None and not meta.get("medvlp_spec"):
        raise LoadError(f"{p}: no config.yaml / config.json: cannot tell which model these weights belong to")
    model = build_from_state(_spec_of(meta, cfg, p), sd, cfg, str(source))
    return _finish(model, cfg, source, at, map_location)


def _int(v: Any) -> int | None:
    try:
        return int(v) if v is not None else None
    except (TypeError, ValueError):
        return None
