"""Export a trained model for other libraries: open_clip, Hugging Face transformers, an MLflow model artifact.

    export("runs/debug", "open_clip", "exports/debug")     # open_clip_config.json + open_clip_model.safetensors
    open_clip.create_model_and_transforms("local-dir:exports/debug")   # the same image / text embeddings
    export("runs/bert", "hf", "exports/bert-hf")           # VisionTextDualEncoderModel folder (ViT + BERT)
    export("runs/debug", "mlflow", "exports/debug-mlflow") # an MLflow pyfunc model folder (text + image inputs)
    log_model_artifact("runs/debug", run_id=RUN_ID)        # the same, logged into a run, registerable
    image_preprocess("exports/debug")(png16)               # our exact preprocessing, 8- and 16-bit input

Every export folder also holds `medvlp_export.json` (architecture spec, run config, modality, step, preprocessing)
so that `load_pretrained(folder)` reads it back into our `MedCLIP`, and `PREPROCESSING.md`: the libraries' own image
transforms (open_clip's preprocess_cfg, HF's CLIPImageProcessor) match ours on 8-bit images only; they clip a
16-bit image to 8 bits, so 16-bit input goes through `image_preprocess`. Files get the user's umask modes.

open_clip (`--to open_clip`): our 2D towers ARE open_clip's `VisionTransformer` / `ModifiedResNet` and its text
transformer, so the mapping is a rename (`visual.net.*` -> `visual.*`, `text.net.*` -> the top-level text names of
open_clip's `CLIP`) plus the logit scale/bias reshaped (1,) -> (). `preprocess_cfg` carries the modality's
mean/std, the input size and bilinear shortest-side resizing + centre crop (our eval view; torchvision resizes the
PIL image, we resize the float tensor, so resized pixels can differ slightly). Not expressible: the 3D tower
(open_clip has no volumetric tower) and BERT text towers (open_clip's own HF text tower needs a hub model and pools
differently).

Hugging Face (`--to hf`): a `VisionTextDualEncoderModel` folder: our ViT (open_clip's pre-LN ViT with a class
token) maps exactly onto `CLIPVisionModel` (hidden_act="gelu"), the BERT tower onto `BertModel`, the projections
onto `visual_projection` / `text_projection`; `processor_config.json` / `preprocessor_config.json` make
`AutoProcessor.from_pretrained` work. `get_image_features` reproduces our image embedding. Our text embedding is
the projected [CLS] state (no BERT pooler), while `get_text_features` projects BERT's tanh pooler: the export sets
the pooler to eps * I and stores the projection divided by eps, so get_text_features = W/eps * tanh(eps * CLS) is
our embedding to float precision (pool="cls"); `hf_text_embedding` is exact for either pool.
ResNet and 3D vision towers and open_clip text towers have no transformers class: they fail with a clear message.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from medvlp.pretrain.checkpoint import save_state_dict
from medvlp.pretrain.pretrained import Pretrained, export_config, load_export, load_pretrained  # noqa: F401
from medvlp.pretrain.weights import (EXPORT_MANIFEST, HF_LAYER as _HF_LAYER, HF_QKV as _QKV,  # noqa: F401
                                     HF_TOP as _HF_TOP, LoadError, from_hf, from_open_clip)

log = logging.getLogger(__name__)

FORMATS = ("open_clip", "hf")
CLI_FORMATS = (*FORMATS, "mlflow")  # `medvlp export --to`
OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"
HF_WEIGHTS = "model.safetensors"
HF_POOLER_SCALE = 1e-4  # see to_hf: makes get_text_features our text embedding
PREPROCESSING_NOTE = "PREPROCESSING.md"


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


def _mean_std(modality: str):
    from medvlp.data_shards.transforms import MEAN_STD

    return MEAN_STD.get(modality, MEAN_STD["cxr"])


def export_open_clip(pre: Pretrained, out: Path) -> Path:
    spec = pre.model.spec
    _check_open_clip(spec)
    sd = {k: v.detach().float() for k, v in pre.model.state_dict().items()}
    mean, std = _mean_std(pre.modality)
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
    # get_text_features = text_projection(tanh(pooler(CLS))): a pooler of eps * I and a projection of W / eps give
    # W / eps * tanh(eps * CLS) = W @ CLS (1 + O((eps * |CLS|)^2)), i.e. our text embedding to float precision
    out["text_model.pooler.dense.weight"] = torch.eye(hidden) * HF_POOLER_SCALE
    out["text_model.pooler.dense.bias"] = torch.zeros(hidden)
    out["text_projection.weight"] = sd["text.proj.weight"] / HF_POOLER_SCALE
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


def hf_image_processor(pre: Pretrained):
    """A CLIPImageProcessor doing our eval view on 8-bit images: shortest side to S (bilinear), centre S x S crop,
    /255, the modality's mean/std."""
    from transformers import CLIPImageProcessor

    mean, std = _mean_std(pre.modality)
    size = int(pre.model.image_size)
    return CLIPImageProcessor(do_resize=True, size={"shortest_edge": size}, resample=2, do_center_crop=True,
                              crop_size={"height": size, "width": size}, do_rescale=True, rescale_factor=1 / 255,
                              do_normalize=True, image_mean=list(mean), image_std=list(std), do_convert_rgb=True)


def write_hf_processor(pre: Pretrained, out: Path) -> None:
    """preprocessor_config.json (+ the processor's tokenizer files): `AutoProcessor.from_pretrained(out)` works."""
    from transformers import AutoTokenizer, VisionTextDualEncoderProcessor

    image_processor = hf_image_processor(pre)
    proc = VisionTextDualEncoderProcessor(image_processor=image_processor,
                                          tokenizer=AutoTokenizer.from_pretrained(str(out)))
    proc.save_pretrained(str(out))  # processor_config.json (transformers 5 nests the image processor there)
    image_processor.save_pretrained(str(out))  # preprocessor_config.json: AutoImageProcessor, older transformers


def hf_text_embedding(model, input_ids: torch.Tensor, pad_id: int = 0, pool: str = "cls") -> torch.Tensor:
    """Our (unnormalised) text embedding from an exported VisionTextDualEncoderModel: the projected [CLS] state
    (pool="cls") or the last non-pad token's (pool="eos"), not BERT's tanh pooler."""
    mask = (input_ids != pad_id).long()
    hid = model.text_model(input_ids=input_ids, attention_mask=mask).last_hidden_state
    if pool == "cls":
        pooled = hid[:, 0]
    else:
        pooled = hid[torch.arange(hid.shape[0]), (mask.sum(1) - 1).clamp(min=0)]
    pooler = getattr(model.text_model, "pooler", None)  # the projection is stored divided by the pooler scale
    return model.text_projection(pooled * (float(pooler.dense.weight[0, 0]) if pooler is not None else 1.0))


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
            write_hf_processor(pre, out)
    manifest = {"format": to, "weights": weights.name, "spec": pre.model.spec, "modality": pre.modality,
                "step": pre.step, "source": pre.source, "tokenizer": tok, "config": _config_doc(pre.config),
                "preprocess": preprocess_doc(pre, to)}
    (out / EXPORT_MANIFEST).write_text(json.dumps(manifest, indent=1, default=str) + "\n")
    (out / PREPROCESSING_NOTE).write_text(preprocessing_note(pre, to))
    make_readable(out)
    return out


# ----------------------------------------------------------------------------------------------- preprocessing
def preprocess_doc(pre: Pretrained, to: str) -> dict:
    """What the manifest says about preprocessing: our eval view, and which inputs the target library's own
    transform handles."""
    mean, std = _mean_std(pre.modality)
    lib = {"open_clip": "open_clip's transform (preprocess_cfg)", "hf": "the CLIPImageProcessor "
           "(preprocessor_config.json)"}.get(to, to)
    return {"size": int(pre.model.image_size), "mean": list(mean), "std": list(std),
            "resize": "shortest side to size (bilinear, antialiased), centre crop size x size",
            "scale": "uint8 / 255, uint16 / 65535", "library_transform": lib,
            "library_transform_inputs": "8-bit grey or RGB images only",
            "16-bit or DICOM-derived images": "medvlp.pretrain.export.image_preprocess(folder)"}


def preprocessing_note(pre: Pretrained, to: str) -> str:
    """PREPROCESSING.md of an export: what the library's own transform reproduces, and the exact path for
    16-bit images."""
    d = preprocess_doc(pre, to)
    load = {"open_clip": 'model, _, preprocess = open_clip.create_model_and_transforms("local-dir:THIS_FOLDER")',
            "hf": 'processor = AutoProcessor.from_pretrained("THIS_FOLDER")'}.get(to, "")
    text_line = ""
    if to == "hf":
        pool = pre.model.spec["text"].get("pool", "cls")
        text_line = ("\nText: `model.get_text_features(**processor(text=..., padding=True, return_tensors=\"pt\"))"
                     ".pooler_output` is our text embedding (unnormalised) to float precision: the exported pooler is "
                     "a scaled identity (see medvlp.pretrain.export.to_hf).\n" if pool == "cls" else
                     f"\nText: this model pools the last non-pad token (pool={pool!r}); `get_text_features` pools "
                     "[CLS] and does NOT give our embedding. Use "
                     "`medvlp.pretrain.export.hf_text_embedding(model, input_ids, pad_id, pool=\"eos\")`.\n")
    return f"""# Preprocessing of this export

Our eval view, which the weights were trained and evaluated with: {d['resize']}, size {d['size']}; pixel values
scaled to [0, 1] ({d['scale']}); normalised with mean {d['mean']} and std {d['std']} (modality {pre.modality}).

8-bit grey or RGB images: {d['library_transform']} reproduces it (resized pixels can differ slightly; on
the project's test models the embeddings had cosine >= 0.9997 with ours):

    {load}

16-bit images (what medvlp shards keep for radiographs, e.g. from DICOM): the library transform is WRONG for
them: it converts the image to 8-bit RGB by clipping, not scaling (a typical radiograph becomes a blank white
image), and the embedding has nothing to do with ours.
Use medvlp's own preprocessing, which scales 16-bit by 1/65535 exactly as training did:

    from medvlp.pretrain.export import image_preprocess
    preprocess = image_preprocess("THIS_FOLDER")   # path, PNG bytes, PIL image or uint8/uint16 array -> (3, S, S)
    pixel_values = preprocess("image16.png")[None]

(or, with the library's transform and a small loss of precision: `Image.fromarray((arr16 >> 8).astype("uint8"))`).
{text_line}"""


def decode_image(image: Any) -> np.ndarray:
    """A path, encoded bytes, PIL image or array -> the (H, W) / (H, W, 3) uint8 or (H, W) uint16 array medvlp's
    transforms take (16-bit PNG modes "I;16*" and "I" stay 16-bit, as in the shards)."""
    import io

    from PIL import Image

    if isinstance(image, np.ndarray):
        if image.dtype not in (np.uint8, np.uint16):
            raise ValueError(f"image array dtype {image.dtype}: expected uint8 or uint16")
        return image
    if isinstance(image, (bytes, bytearray, memoryview)):
        image = Image.open(io.BytesIO(bytes(image)))
    elif isinstance(image, (str, os.PathLike)):
        image = Image.open(image)
    if not isinstance(image, Image.Image):
        raise ValueError(f"image of type {type(image).__name__}: expected a path, bytes, PIL image or array")
    image.load()
    from medvlp.data_shards.build import pil_image  # the shards' own decoding (EXIF, 16-bit, modes)

    return np.asarray(pil_image(image))


def image_preprocess(src: str | os.PathLike | Pretrained) -> Callable[[Any], torch.Tensor]:
    """The exact image preprocessing of a model (an export folder, run folder or weights file, or a loaded
    `Pretrained`): callable(path | bytes | PIL image | uint8/uint16 array) -> normalised (3, S, S) float tensor,
    8- and 16-bit alike (what open_clip's and HF's own transforms get wrong for 16-bit input)."""
    pre = src if isinstance(src, Pretrained) else load_pretrained(src)
    view = pre.transform()

    def preprocess(image: Any) -> torch.Tensor:
        return view(decode_image(image))

    return preprocess


def make_readable(folder: Path) -> None:
    """Files and folders under `folder` get the modes the user's umask gives new files (safetensors writes its
    files 0600, so another user or a serving container could not read an export)."""
    mask = os.umask(0)
    os.umask(mask)
    for p in [folder, *folder.rglob("*")]:
        if p.is_symlink():
            continue
        p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)


def export(src: str | os.PathLike, to: str, out: str | os.PathLike, step: int | None = None) -> Path:
    """`medvlp export`: load `src` (run folder, weights file or export; `step` for a checkpoint), write `out`
    (`to="mlflow"`: an MLflow pyfunc model folder, `build_mlflow_model`)."""
    if to not in CLI_FORMATS:
        raise ExportError(f"--to: {to!r} is not one of {', '.join(CLI_FORMATS)}")
    if to == "mlflow":
        out = Path(out)
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise ExportError(f"{out}: exists and is not empty; choose a new --out folder")
        if out.is_dir():
            out.rmdir()  # an empty folder: mlflow.pyfunc.save_model wants to create it
        return build_mlflow_model(src, step=step, out=out)
    return export_pretrained(load_pretrained(src, step=step), to, out)


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
                       out: str | os.PathLike | None = None, signature: bool = True) -> Path:
    """An MLflow pyfunc model folder (MLmodel + the export as artifact "export", models-from-code: no pickle) of
    the run's model, in open_clip or hf format (whichever fits unless `to` says). Default folder: RUN/mlflow_model.
    `signature`: declare the DataFrame input/output schema (`mlflow_signature`); without it MLflow does not
    enforce a schema, and `predict` also takes a plain list of texts (mlflow_pyfunc.py)."""
    import tempfile

    import mlflow

    pre = load_pretrained(run_dir, step=step)
    fmt = to or default_format(pre.model.spec)
    out = Path(out) if out is not None else Path(run_dir) / "mlflow_model"
    if out.exists():
        shutil.rmtree(out)
    import warnings

    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        # MLflow's hint about type hints on predict: the explicit signature below is what validates inputs
        warnings.filterwarnings("ignore", message=".*type hints to the `predict` method")
        folder = export_pretrained(pre, fmt, Path(tmp) / "export")
        mlflow.pyfunc.save_model(str(out), python_model=str(Path(__file__).with_name("mlflow_pyfunc.py")),
                                 artifacts={"export": str(folder)}, pip_requirements=[],
                                 signature=mlflow_signature(pre.embed_dim) if signature else None,
                                 metadata={"medvlp_format": fmt, "medvlp_step": pre.step,
                                           "medvlp_embed_dim": pre.embed_dim, "medvlp_modality": pre.modality})
    make_readable(out)
    return out


def mlflow_signature(embed_dim: int):
    """Inputs: optional string "text", optional binary "image" (encoded PNG/JPEG, 8- or 16-bit); outputs: the
    L2-normalised embeddings "text_embedding" / "image_embedding" (E floats; None where the row had no input)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, Schema
    from mlflow.types.schema import Array

    inputs = Schema([ColSpec(DataType.string, "text", required=False),
                     ColSpec(DataType.binary, "image", required=False)])
    outputs = Schema([ColSpec(Array(DataType.float), "text_embedding", required=False),
                      ColSpec(Array(DataType.float), "image_embedding", required=False)])
    return ModelSignature(inputs=inputs, outputs=outputs, params=None)


def log_model_artifact(run_dir: str | os.PathLike, step: int | None = None, to: str | None = None, *,
                       tracker=None, run_id: str | None = None, tracking_uri: str | None = None,
                       artifact_path: str = "model") -> str:
    """Build the run's MLflow pyfunc model (`build_mlflow_model` without an input schema, into RUN/mlflow_model: it
    takes a list of texts as well as the DataFrame of `medvlp export --to mlflow`) and log it as the artifact
    directory `artifact_path` of an MLflow run: through `tracker` (the training loop's `Tracker`; a model no format
    can express is then skipped with a warning), else of `run_id` (default: the run recorded in the latest
    checkpoint). Register it with `mlflow.register_model("runs:/<run_id>/model", NAME)`. Returns that URI ("" when
    skipped)."""
    if tracker is not None:
        rid = getattr(tracker, "run_id", None)
        if not rid:
            return ""
        try:
            folder = build_mlflow_model(run_dir, step, to, signature=False)
        except (ExportError, LoadError) as e:
            log.warning("model artifact not logged: %s", e)
            return ""
        tracker.log_artifact(str(folder), artifact_path)
        return f"runs:/{rid}/{artifact_path}"
    import mlflow

    run_id = run_id or _recorded_run_id(Path(run_dir))
    if run_id is None:
        raise ExportError(f"{run_dir}: no MLflow run recorded in its checkpoints (pass run_id=)")
    folder = build_mlflow_model(run_dir, step, to, signature=False)
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
