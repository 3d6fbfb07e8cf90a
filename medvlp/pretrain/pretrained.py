"""A trained model as a library object: `load_pretrained(path) -> Pretrained` (model, tokenizer, preprocess, config).

    p = load_pretrained("runs/debug")                 # a run folder: final weights or latest COMPLETE checkpoint
    p = load_pretrained("runs/debug", step=50)        # that checkpoint (DeepSpeed ZeRO 0-3, consolidated to fp32)
    p = load_pretrained("runs/debug/model.safetensors")   # consolidated weights (+ config.yaml/json beside them)
    p = load_pretrained("exports/debug-openclip")     # a folder written by `medvlp export`
    img = p.transform()(png_array)[None]              # the stream's eval view: resize, centre crop, normalise
    emb = p.model.encode_image(img); txt = p.model.encode_text(p.tokenizer(["No effusion."]))

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

import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from medvlp.pretrain.checkpoint import (CKPT_DIR, COMPLETE, LEGACY_WEIGHTS, WEIGHTS, LoadError,  # noqa: F401
                                        UnsafeCheckpointError, _deepspeed_safe_globals, check_deepspeed_files,
                                        complete_checkpoints, latest_complete, safe_load_gate, safe_torch_load,
                                        tag_for)

log = logging.getLogger(__name__)

EXPORT_MANIFEST = "medvlp_export.json"


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


# ----------------------------------------------------------------------------------------------- config
def _fallback_root():
    """The typed root config class: `medvlp.pretrain.config.PretrainConfig` when present, else a local equivalent."""
    try:
        from medvlp.pretrain.config import PretrainConfig  # type: ignore[attr-defined]
        return PretrainConfig
    except ImportError:
        pass
    from medvlp.data_shards.config import DataConfig
    from medvlp.pretrain.config import EvalConfig, LossConfig, ModelConfig, OptimConfig, TrackingConfig, TrainConfig

    @dataclass
    class RunConfig:
        kind: str = "pretrain"
        data: DataConfig = field(default_factory=DataConfig)
        model: ModelConfig = field(default_factory=ModelConfig)
        loss: LossConfig = field(default_factory=LossConfig)
        optim: OptimConfig = field(default_factory=OptimConfig)
        train: TrainConfig = field(default_factory=TrainConfig)
        eval: EvalConfig = field(default_factory=EvalConfig)
        tracking: TrackingConfig = field(default_factory=TrackingConfig)

    return RunConfig


def _section(cls, values: dict, where: str):
    """Dataclass `cls` from stored values (stored keys this version does not know are ignored, with a warning)."""
    names = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in (values or {}).items():
        if k not in names:
            log.warning("%s.%s: stored key unknown to this version; ignored", where, k)
            continue
        cur = getattr(cls(), k) if dataclasses.is_dataclass(cls) else None
        if isinstance(cur, float) and isinstance(v, (int, str)) and not isinstance(v, bool):
            v = float(v)
        kwargs[k] = v
    return cls(**kwargs)


def config_from_dict(doc: dict) -> Any:
    """Typed root config from a stored (nested or dotted-flat) config dict."""
    if any("." in str(k) for k in doc):
        nested: dict = {}
        for key, v in doc.items():
            node = nested
            *head, last = str(key).split(".")
            for h in head:
                node = node.setdefault(h, {})
            node[last] = v
        doc = nested
    root = _fallback_root()
    try:
        from medvlp.pretrain.configtree import build  # type: ignore[import-not-found]
        return build(root, doc)
    except ImportError:
        pass
    kwargs = {}
    for f in dataclasses.fields(root):
        if f.name in doc and isinstance(doc[f.name], dict):
            kwargs[f.name] = _section(f.default_factory().__class__, doc[f.name], f.name)  # type: ignore[misc]
        elif f.name in doc and not isinstance(doc[f.name], dict):
            kwargs[f.name] = doc[f.name]
    return root(**kwargs)


def run_config(run_dir: str | Path) -> Any | None:
    """The typed config of a run folder (`medvlp.pretrain.checkpoint.load_run_config`), None when the folder has none."""
    from medvlp.pretrain.checkpoint import load_run_config

    doc = load_run_config(run_dir)
    if dataclasses.is_dataclass(doc):
        return doc
    return config_from_dict(doc) if doc else None


# ----------------------------------------------------------------------------------------------- safe reads
def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
        return load_file(str(path)), meta
    except Exception as e:  # noqa: BLE001 - a damaged or foreign file: one clear line
        raise LoadError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None


def _unwrap(sd: Any, where: Path) -> dict[str, torch.Tensor]:
    for key in ("model", "state_dict", "module"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
        raise LoadError(f"{where}: not a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in sd.items()}


# ----------------------------------------------------------------------------------------------- checkpoints
def checkpoint_state_dict(tag_dir: Path) -> dict[str, torch.Tensor]:
    """fp32 state dict of a COMPLETE DeepSpeed checkpoint folder: ZeRO 1-3 through DeepSpeed's own
    `get_fp32_state_dict_from_zero_checkpoint`, ZeRO 0 from its module file. Files are checked safe first."""
    import contextlib
    import io

    if not (tag_dir / COMPLETE).is_file():
        raise LoadError(f"{tag_dir}: not a COMPLETE checkpoint (a save was cut short)")
    safe_load_gate(tag_dir)
    if any(tag_dir.glob("*zero_pp_rank_*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # chatter
                sd = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
        except Exception as e:  # noqa: BLE001 - a damaged partition: one clear line
            raise LoadError(f"{tag_dir}: DeepSpeed could not consolidate the ZeRO checkpoint "
                            f"({type(e).__name__}: {e})") from None
        # DeepSpeed's consolidation returns parameters and persistent buffers; fp32 throughout
        return {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}
    states = sorted(tag_dir.glob("mp_rank_*_model_states.pt"))
    if not states:
        raise LoadError(f"{tag_dir}: no DeepSpeed model states (mp_rank_*_model_states.pt)")
    doc = safe_torch_load(states[0], _deepspeed_safe_globals())
    sd = _unwrap(doc.get("module") if isinstance(doc, dict) else doc, states[0])
    return {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}


def _pick_checkpoint(run_dir: Path, step: int | None) -> Path | None:
    if step is None:
        return latest_complete(run_dir)
    tag_dir = run_dir / CKPT_DIR / tag_for(int(step))
    if not (tag_dir / COMPLETE).is_file():
        have = [int(p.name.split("_")[1]) for p in complete_checkpoints(run_dir)]
        raise LoadError(f"{run_dir}: no COMPLETE checkpoint at step {step} (complete steps: {have or 'none'})")
    return tag_dir


def _final_weights(run_dir: Path) -> Path | None:
    for name in (WEIGHTS, LEGACY_WEIGHTS):
        if (run_dir / name).is_file():
            return run_dir / name
    return None


def read_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A weights file: safetensors, or a legacy torch file through the safe loader only."""
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    return _unwrap(safe_torch_load(path), path), {}


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
        cfg = _fallback_root()()
    modality = getattr(getattr(cfg, "data", None), "modality", "cxr")
    model = model.to(map_location).eval()
    return Pretrained(model=model, config=cfg, tokenizer=model.tokenizer, modality=modality,
                      embed_dim=int(model.embed_dim), source=str(source), step=step)


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
        from medvlp.pretrain.export import load_export
        model, cfg, exp_step = load_export(p)
        return _finish(model, cfg, p, exp_step, map_location)
    cfg = run_config(p)
    final = _final_weights(p)
    tag_dir = _pick_checkpoint(p, step)
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
