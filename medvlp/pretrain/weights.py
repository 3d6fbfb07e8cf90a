"""Weights on disk, read safely: the low floor under `model.py` (loading a weights file), `pretrained.py` (the
library's front door, `load_pretrained`) and `export.py` (writing other libraries' formats).

* `read_weights(path)`: safetensors, or a legacy torch file through `torch.load(weights_only=True)` only.
* `checkpoint_state_dict(tag_dir)`: the fp32 state dict of a COMPLETE DeepSpeed checkpoint (ZeRO 0-3); every
  DeepSpeed pickle is first opened with the safe loader (`check_deepspeed_files`, `deepspeed_safe_globals`).
* `config_from_dict` / `run_config`: the typed run config stored beside weights.
* `from_open_clip` / `from_hf`: an export's tensor names back to ours (the inverse maps of `export.to_*`).

Nothing here builds a model, so nothing here imports `model.py`. Every failure is a `LoadError` naming the path.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from medvlp.pretrain.checkpoint import (CKPT_DIR, COMPLETE, LEGACY_WEIGHTS, WEIGHTS,  # noqa: F401
                                        LoadError, UnsafeCheckpointError, check_deepspeed_files,
                                        complete_checkpoints, deepspeed_safe_globals, latest_complete,
                                        load_run_config, safe_load_gate, safe_torch_load, tag_for)

log = logging.getLogger(__name__)

EXPORT_MANIFEST = "medvlp_export.json"  # the manifest `export.py` writes into every exported folder


# ----------------------------------------------------------------------------------------------- config
def config_root():
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
    root = config_root()
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
    doc = safe_torch_load(states[0], deepspeed_safe_globals())
    sd = _unwrap(doc.get("module") if isinstance(doc, dict) else doc, states[0])
    return {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}


def pick_checkpoint(run_dir: Path, step: int | None) -> Path | None:
    if step is None:
        return latest_complete(run_dir)
    tag_dir = run_dir / CKPT_DIR / tag_for(int(step))
    if not (tag_dir / COMPLETE).is_file():
        have = [int(p.name.split("_")[1]) for p in complete_checkpoints(run_dir)]
        raise LoadError(f"{run_dir}: no COMPLETE checkpoint at step {step} (complete steps: {have or 'none'})")
    return tag_dir


def final_weights(run_dir: Path) -> Path | None:
    for name in (WEIGHTS, LEGACY_WEIGHTS):
        if (run_dir / name).is_file():
            return run_dir / name
    return None


def read_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A weights file: safetensors, or a legacy torch file through the safe loader only."""
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    return _unwrap(safe_torch_load(path), path), {}


# ----------------------------------------------------------------------------------------------- export formats, read back
def from_open_clip(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """open_clip `CLIP` names -> ours (the inverse of `export.to_open_clip`)."""
    out = {}
    for k, v in sd.items():
        if k.startswith("visual."):
            out["visual.net." + k[len("visual."):]] = v
        elif k in ("logit_scale", "logit_bias"):
            out[k] = v.reshape(1)
        else:
            out["text.net." + k] = v
    return out


HF_LAYER = {"ln_1.weight": "layer_norm1.weight", "ln_1.bias": "layer_norm1.bias",
             "ln_2.weight": "layer_norm2.weight", "ln_2.bias": "layer_norm2.bias",
             "attn.out_proj.weight": "self_attn.out_proj.weight", "attn.out_proj.bias": "self_attn.out_proj.bias",
             "mlp.c_fc.weight": "mlp.fc1.weight", "mlp.c_fc.bias": "mlp.fc1.bias",
             "mlp.c_proj.weight": "mlp.fc2.weight", "mlp.c_proj.bias": "mlp.fc2.bias"}
HF_TOP = {"conv1.weight": "vision_model.embeddings.patch_embedding.weight",
           "class_embedding": "vision_model.embeddings.class_embedding",
           "positional_embedding": "vision_model.embeddings.position_embedding.weight",
           "ln_pre.weight": "vision_model.pre_layrnorm.weight", "ln_pre.bias": "vision_model.pre_layrnorm.bias",
           "ln_post.weight": "vision_model.post_layernorm.weight", "ln_post.bias": "vision_model.post_layernorm.bias"}
HF_QKV = ("q_proj", "k_proj", "v_proj")


def from_hf(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    inv_top = {v: k for k, v in HF_TOP.items()}
    inv_layer = {v: k for k, v in HF_LAYER.items()}
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        if k in inv_top:
            out["visual.net." + inv_top[k]] = v
        elif k == "visual_projection.weight":
            out["visual.net.proj"] = v.t().contiguous()
        elif k.startswith("vision_model.encoder.layers."):
            i, rest = k[len("vision_model.encoder.layers."):].split(".", 1)
            pre = f"visual.net.transformer.resblocks.{i}."
            if rest.startswith("self_attn.") and rest.split(".")[1] in HF_QKV:
                _, name, kind = rest.split(".")
                qkv.setdefault((pre, kind), {})[name] = v
            elif rest in inv_layer:
                out[pre + inv_layer[rest]] = v
        elif k.startswith("text_model.pooler."):
            continue
        elif k.startswith("text_model."):
            out["text.net." + k[len("text_model."):]] = v
        elif k == "text_projection.weight":
            out["text.proj.weight"] = v
        elif k == "logit_scale":
            out["logit_scale"] = v.reshape(1)
    for (pre, kind), parts in qkv.items():
        out[f"{pre}attn.in_proj_{kind}"] = torch.cat([parts[n] for n in HF_QKV], dim=0)
    if "text.proj.weight" in out:  # undo the pooler scaling of `to_hf` (1.0 for an identity pooler)
        out["text.proj.weight"] = out["text.proj.weight"] * _pooler_scale(sd)
    return out


def _pooler_scale(sd: dict[str, torch.Tensor]) -> float:
    w = sd.get("text_model.pooler.dense.weight")
    return float(w[0, 0]) if w is not None and w.numel() else 1.0
