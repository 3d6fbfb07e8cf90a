"""Export a trained model for other libraries: open_clip, Hugging Face transformers, an MLflow model artifact.

    export("runs/debug", "open_clip", "exports/debug")     # open_clip_config.json + open_clip_model.safetensors
    open_clip.create_model_and_transforms("local-dir:exports/debug")   # the same image / text embeddings
    export("runs/bert", "hf", "exports/bert-hf")           # VisionTextDualEncoderModel folder (ViT + BERT)
    log_model_artifact("runs/debug", run_id=RUN_ID)        # an MLflow pyfunc model of the export, registerable

Every export folder also holds `medvlp_export.json` (architecture spec, run config, modality, step) so that
`load_pretrained(folder)` reads it back into our `MedCLIP`.

open_clip (`--to open_clip`): our 2D towers ARE open_clip's `VisionTransformer` / `ModifiedResNet` and its text
transformer, so the mapping is a rename (`visual.net.*` -> `visual.*`, `text.net.*` -> the top-level text names of
open_clip's `CLIP`) plus the logit scale/bias reshaped (1,) -> (). `preprocess_cfg` carries the modality's
mean/std, the input size and bilinear shortest-side resizing + centre crop (our eval view; torchvision resizes the
PIL image, we resize the float tensor, so resized pixels can differ slightly). Not expressible: the 3D tower
(open_clip has no volumetric tower) and BERT text towers (open_clip's own HF text tower needs a hub model and pools
differently).

Hugging Face (`--to hf`): a `VisionTextDualEncoderModel` folder: our ViT (open_clip's pre-LN ViT with a class
token) maps exactly onto `CLIPVisionModel` (hidden_act="gelu"), the BERT tower onto `BertModel`, the projections
onto `visual_projection` / `text_projection`. `get_image_features` reproduces our image embedding. Our text
embedding is the projected [CLS] state (no BERT pooler), while `get_text_features` projects BERT's tanh pooler;
the export sets the pooler to identity weights, so the exact text embedding is
`text_projection(text_model(ids, attention_mask=ids != pad).last_hidden_state[:, 0])` (`hf_text_embedding`).
ResNet and 3D vision towers and open_clip text towers have no transformers class: they fail with a clear message.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from medvlp.pretrain.checkpoint import save_state_dict
from medvlp.pretrain.pretrained import Pretrained, export_config, load_export, load_pretrained  # noqa: F401
from medvlp.pretrain.weights import (EXPORT_MANIFEST, HF_LAYER as _HF_LAYER, HF_QKV as _QKV,  # noqa: F401
                                     HF_TOP as _HF_TOP, LoadError, from_hf, from_open_clip)

log = logging.getLogger(__name__)

FORMATS = ("open_clip", "hf")
OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"
HF_WEIGHTS = "model.safetensors"


class ExportError(ValueError):
    """A model that the chosen format cannot express; the message says why."""


# ----------------------------------------------------------------------------------------------- open_clip
def _check_open_clip(spec: dict) -> None:
    v, t = spec["vision"]["type"], spec["text"]["type"]
    if v not in ("vit", "resnet"):
        raise ExportError(f"open_clip export: vision tower {v!r} has no open_clip equivalent (open_clip's towers "
                          f"are 2D: ViT or ModifiedResNet)")
    if t != "openclip":
        raise ExportError(f"open_clip export: text tower {t!r} (transformers BERT) has no open_clip equivalent "
                          f"without a hub model; use --to hf")


def open_clip_model_cfg(spec: dict, has_bias: bool) -> dict:
    cfg = {"embed_dim": int(spec["embed_dim"]),
           "vision_cfg": {k: v for k, v in spec["vision"].items() if k not in ("type", "output_tokens")},
           "text_cfg": {k: v for k, v in spec["text"].items() if k != "type"}}
    if has_bias:
        cfg["init_logit_bias"] = float(spec.get("init_logit_bias") or -10.0)
    return cfg


def to_open_clip(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict -> open_clip `CLIP` names."""
    out = {}
    for k, v in sd.items():
        if k.startswith("visual.net."):
            out["visual." + k[len("visual.net."):]] = v
        elif k.startswith("text.net."):
            out[k[len("text.net."):]] = v
        elif k in ("logit_scale", "logit_bias"):
            out[k] = v.reshape(())
        else:
            raise ExportError(f"open_clip export: no open_clip name for {k!r}")
    return out


def export_open_clip(pre: Pretrained, out: Path) -> Path:
    from medvlp.data_shards.transforms import MEAN_STD

    spec = pre.model.spec
    _check_open_clip(spec)
    sd = {k: v.detach().float() for k, v in pre.model.state_dict().items()}
    mean, std = MEAN_STD.get(pre.modality, MEAN_STD["cxr"])
    doc = {"model_cfg": open_clip_model_cfg(spec, "logit_bias" in sd),
           "preprocess_cfg": {"mean": list(mean), "std": list(std), "size": int(pre.model.image_size),
                              "interpolation": "bilinear", "resize_mode": "shortest"}}
    out.mkdir(parents=True, exist_ok=True)
    (out / "open_clip_config.json").write_text(json.dumps(doc, indent=2) + "\n")
    save_state_dict(to_open_clip(sd), out / OPEN_CLIP_WEIGHTS, {"format": "pt"})
    return out / OPEN_CLIP_WEIGHTS


# ----------------------------------------------------------------------------------------------- hf
def _check_hf(spec: dict) -> None:
    v, t = spec["vision"]["type"], spec["text"]["type"]
    if v != "vit":
        raise ExportError(f"hf export: vision tower {v!r} has no transformers class (only our ViT maps exactly, "
                          f"onto CLIPVisionModel); use --to open_clip for 2D ResNets")
    if t != "bert":
        raise ExportError(f"hf export: text tower {t!r} is open_clip's; the hf layout is for BERT text towers "
                          f"(use --to open_clip)")
    vis = spec["vision"]
    extra = {k for k in vis if k not in ("type", "image_size", "patch_size", "width", "layers", "head_width",
                                          "mlp_ratio")}
    if extra:
        raise ExportError(f"hf export: ViT options {sorted(extra)} have no CLIPVisionConfig equivalent")


def hf_config(spec: dict, text_config: Any):
    from transformers import CLIPVisionConfig, VisionTextDualEncoderConfig

    vis = spec["vision"]
    width = int(vis["width"])
    vcfg = CLIPVisionConfig(hidden_size=width, intermediate_size=int(width * float(vis.get("mlp_ratio", 4.0))),
                            num_hidden_layers=int(vis["layers"]), num_attention_heads=width // int(vis.get(
                                "head_width", 64)), image_size=int(vis["image_size"]),
                            patch_size=int(vis["patch_size"]), hidden_act="gelu", layer_norm_eps=1e-5,
                            projection_dim=int(spec["embed_dim"]))
    return VisionTextDualEncoderConfig.from_vision_text_configs(vcfg, text_config,
                                                                projection_dim=int(spec["embed_dim"]))


def to_hf(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict (ViT + BERT) -> VisionTextDualEncoderModel names."""
    out: dict[str, torch.Tensor] = {}
    width = None
    for k, v in sd.items():
        if k.startswith("visual.net."):
            n = k[len("visual.net."):]
            if n in _HF_TOP:
                out[_HF_TOP[n]] = v
            elif n == "proj":
                out["visual_projection.weight"] = v.t().contiguous()
            elif n.startswith("transformer.resblocks."):
                i, rest = n[len("transformer.resblocks."):].split(".", 1)
                pre = f"vision_model.encoder.layers.{i}."
                if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
                    kind = "weight" if rest.endswith("weight") else "bias"
                    for name, part in zip(_QKV, v.chunk(3, dim=0)):
                        out[f"{pre}self_attn.{name}.{kind}"] = part.contiguous()
                elif rest in _HF_LAYER:
                    out[pre + _HF_LAYER[rest]] = v
                else:
                    raise ExportError(f"hf export: no CLIPVisionModel name for {k!r}")
            else:
                raise ExportError(f"hf export: no CLIPVisionModel name for {k!r}")
            width = v.shape[-1] if n == "class_embedding" else width
        elif k.startswith("text.net."):
            out["text_model." + k[len("text.net."):]] = v
        elif k == "text.proj.weight":
            out["text_projection.weight"] = v
        elif k == "logit_scale":
            out["logit_scale"] = v.reshape(())
        elif k == "logit_bias":
            raise ExportError("hf export: VisionTextDualEncoderModel has no logit bias (a SigLIP-trained model)")
        else:
            raise ExportError(f"hf export: no VisionTextDualEncoderModel name for {k!r}")
    hidden = sd["text.proj.weight"].shape[1]
    out["text_model.pooler.dense.weight"] = torch.eye(hidden)  # identity pooler weights (tanh stays: see doc)
    out["text_model.pooler.dense.bias"] = torch.zeros(hidden)
    return out


def export_hf(pre: Pretrained, out: Path) -> Path:
    from transformers import VisionTextDualEncoderModel

    spec = pre.model.spec
    _check_hf(spec)
    sd = {k: v.detach().float() for k, v in pre.model.state_dict().items()}
    hf_sd = to_hf(sd)
    model = VisionTextDualEncoderModel(config=hf_config(spec, pre.model.text.config))
    own = model.state_dict()
    missing = [k for k in own if k not in hf_sd and not k.endswith("position_ids")]
    unexpected = [k for k in hf_sd if k not in own]
    if missing or unexpected:
        raise ExportError(f"hf export: layout mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.load_state_dict(hf_sd, strict=False)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    return out / HF_WEIGHTS


def hf_text_embedding(model, input_ids: torch.Tensor, pad_id: int = 0, pool: str = "cls") -> torch.Tensor:
    """Our (unnormalised) text embedding from an exported VisionTextDualEncoderModel: the projected [CLS] state
    (pool="cls") or the last non-pad token's (pool="eos"), not BERT's tanh pooler."""
    mask = (input_ids != pad_id).long()
    hid = model.text_model(input_ids=input_ids, attention_mask=mask).last_hidden_state
    if pool == "cls":
        pooled = hid[:, 0]
    else:
        pooled = hid[torch.arange(hid.shape[0]), (mask.sum(1) - 1).clamp(min=0)]
    return model.text_projection(pooled)


# ----------------------------------------------------------------------------------------------- entry points
def _config_doc(cfg: Any) -> dict:
    return dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg or {})


def export_pretrained(pre: Pretrained, to: str, out: str | os.PathLike) -> Path:
    """Write `pre` in format `to` (open_clip | hf) into `out`, with the medvlp manifest. Returns `out`."""
    if to not in FORMATS:
        raise ExportError(f"--to: {to!r} is not one of {', '.join(FORMATS)}")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"{out}: exists and is not empty; choose a new --out folder")
    if to == "open_clip":
        _check_open_clip(pre.model.spec)
    else:
        _check_hf(pre.model.spec)
    weights = export_open_clip(pre, out) if to == "open_clip" else export_hf(pre, out)
    tok = None
    if pre.model.spec["text"]["type"] == "bert":
        src = Path(pre.tokenizer.path)
        shutil.copytree(src, out / "tokenizer")
        tok = "tokenizer"
        if to == "hf":  # AutoTokenizer.from_pretrained(out) works too
            for f in src.iterdir():
                if f.is_file() and not (out / f.name).exists():
                    shutil.copy2(f, out / f.name)
    manifest = {"format": to, "weights": weights.name, "spec": pre.model.spec, "modality": pre.modality,
                "step": pre.step, "source": pre.source, "tokenizer": tok, "config": _config_doc(pre.config)}
    (out / EXPORT_MANIFEST).write_text(json.dumps(manifest, indent=1, default=str) + "\n")
    return out


def export(src: str | os.PathLike, to: str, out: str | os.PathLike, step: int | None = None) -> Path:
    """`medvlp export`: load `src` (run folder, weights file or export; `step` for a checkpoint), write `out`."""
    if to not in FORMATS:
        raise ExportError(f"--to: {to!r} is not one of {', '.join(FORMATS)}")
    return export_pretrained(load_pretrained(src, step=step), to, out)


# ----------------------------------------------------------------------------------------------- MLflow
def default_format(spec: dict) -> str:
    """open_clip when the model fits it, hf for ViT + BERT; ExportError otherwise."""
    try:
        _check_open_clip(spec)
        return "open_clip"
    except ExportError as e1:
        try:
            _check_hf(spec)
            return "hf"
        except ExportError as e2:
            raise ExportError(f"no export format fits this model: {e1}; {e2}") from None


def build_mlflow_model(run_dir: str | os.PathLike, step: int | None = None, to: str | None = None,
                       out: str | os.PathLike | None = None) -> Path:
    """An MLflow pyfunc model folder (MLmodel + the export as artifact "export", models-from-code: no pickle) of
    the run's model, in open_clip or hf format (whichever fits unless `to` says). Default folder: RUN/mlflow_model."""
    import tempfile

    import mlflow

    pre = load_pretrained(run_dir, step=step)
    fmt = to or default_format(pre.model.spec)
    out = Path(out) if out is not None else Path(run_dir) / "mlflow_model"
    if out.exists():
        shutil.rmtree(out)
    with tempfile.TemporaryDirectory() as tmp:
        folder = export_pretrained(pre, fmt, Path(tmp) / "export")
        mlflow.pyfunc.save_model(str(out), python_model=str(Path(__file__).with_name("mlflow_pyfunc.py")),
                                 artifacts={"export": str(folder)}, pip_requirements=[],
                                 metadata={"medvlp_format": fmt, "medvlp_step": pre.step})
    return out


def log_model_artifact(run_dir: str | os.PathLike, step: int | None = None, to: str | None = None, *,
                       tracker=None, run_id: str | None = None, tracking_uri: str | None = None,
                       artifact_path: str = "model") -> str:
    """Build the run's MLflow pyfunc model (`build_mlflow_model`, into RUN/mlflow_model) and log it as the artifact
    directory `artifact_path` of an MLflow run: through `tracker` (the training loop's `Tracker`; a model no format
    can express is then skipped with a warning), else of `run_id` (default: the run recorded in the latest
    checkpoint). Register it with `mlflow.register_model("runs:/<run_id>/model", NAME)`. Returns that URI ("" when
    skipped)."""
    if tracker is not None:
        rid = getattr(tracker, "run_id", None)
        if not rid:
            return ""
        try:
            folder = build_mlflow_model(run_dir, step, to)
        except (ExportError, LoadError) as e:
            log.warning("model artifact not logged: %s", e)
            return ""
        tracker.log_artifact(str(folder), artifact_path)
        return f"runs:/{rid}/{artifact_path}"
    import mlflow

    run_id = run_id or _recorded_run_id(Path(run_dir))
    if run_id is None:
        raise ExportError(f"{run_dir}: no MLflow run recorded in its checkpoints (pass run_id=)")
    folder = build_mlflow_model(run_dir, step, to)
    client = mlflow.tracking.MlflowClient(tracking_uri=tracking_uri)
    client.log_artifacts(run_id, str(folder), artifact_path)
    return f"runs:/{run_id}/{artifact_path}"


def _recorded_run_id(run_dir: Path) -> str | None:
    from medvlp.pretrain.checkpoint import latest_complete

    tag = latest_complete(run_dir)
    if tag is None:
        return None
    try:
        return json.loads((tag / "COMPLETE").read_text()).get("mlflow_run_id") or None
    except (OSError, ValueError):
        return None
