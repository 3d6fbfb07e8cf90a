"""Model architectures are data: `medvlp/pretrain/model_configs/NAME.json`, looked up by name or by a path to a JSON file.

A model config:
  {"description": "...",                      one line, shown by `list_models(with_descriptions=True)`
   "embed_dim": E,                            width of the shared image-text space
   "vision": {"type": "vit" | "resnet" | "resnet3d", ...},   open_clip CLIPVisionCfg fields, or ResNet3D's
   "text": {"type": "openclip" | "bert", ...},               open_clip CLIPTextCfg fields, or BertConfig fields
   "init_logit_scale": float,                 optional; default log(1/0.07) (SigLIP: log 10)
   "init_logit_bias": float | null}           optional; a learned logit bias (SigLIP: -10); null = none
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

CONFIG_DIR = Path(__file__).parent / "model_configs"
TOP_KEYS = {"description", "embed_dim", "vision", "text", "init_logit_scale", "init_logit_bias"}
REQUIRED = ("embed_dim", "vision", "text")


def list_models(with_descriptions: bool = False) -> list[str] | dict[str, str]:
    """Names of the registered model configs (sorted), or {name: description}."""
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
    if with_descriptions:
        return {n: _load(CONFIG_DIR / f"{n}.json").get("description", "") for n in names}
    return names


def _load(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from e
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: a model config is a JSON object, got {type(doc).__name__}")
    for k in doc:
        if k not in TOP_KEYS:
            raise ValueError(f"{path}: unknown key {k!r} (allowed: {', '.join(sorted(TOP_KEYS))})")
    for k in REQUIRED:
        if k not in doc:
            raise ValueError(f"{path}: missing key {k!r}")
    for k in ("vision", "text"):
        if not isinstance(doc[k], dict) or "type" not in doc[k]:
            raise ValueError(f"{path}: {k!r} must be an object with a 'type'")
    return doc


def get_model_config(name_or_path: str) -> dict:
    """The model config dict of a registered name (e.g. "debug", "RN50") or of a JSON file path.

    The returned dict is a fresh copy with "name" (the registry name or the file stem) and "source" (the file).
    """
    p = Path(name_or_path)
    if p.suffix == ".json" and p.is_file():
        path = p
    else:
        path = CONFIG_DIR / f"{name_or_path}.json"
        if not path.is_file():
            raise KeyError(f"model {name_or_path!r}: not a registered model ({', '.join(list_models())}) "
                           "nor a path to a .json model config")
    doc = copy.deepcopy(_load(path))
    doc["name"] = path.stem
    doc["source"] = str(path)
    return doc
