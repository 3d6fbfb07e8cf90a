"""Start from public weights, offline: `model.init` (a local open_clip checkpoint) and `model.text_init` (a local
Hugging Face BERT-family folder: text tower + tokenizer). Nothing is downloaded; no file is unpickled.

    model.init=ckpt/open_clip_model.safetensors  model.init_arch=ViT-B-32   # open_clip's own config of that name
    model.init=exports/debug-openclip                                        # a folder with open_clip_config.json
    model.text_init=checkouts/BiomedNLP-PubMedBERT-base-uncased-abstract     # config.json + weights + vocab

Architecture. With `model.init` the model takes the checkpoint's architecture (the registry's `model.name` only
names the run): `model.init_arch` (an open_clip model name, read from the configs bundled in the open_clip wheel, or
a JSON file holding a model config / `{"model_cfg": ...}`), else `open_clip_config.json` in or beside the checkpoint,
else `model.name`'s registry config. Supported open_clip architectures are those built from open_clip's own
VisionTransformer / ModifiedResNet and text transformer with its 49408-token BPE (CLIP, OpenCLIP ViT-*/RN*, the
exports of `medvlp export --to open_clip`); timm or Hugging Face towers, CoCa and quick-GELU configs are refused
with the reason. With `model.text_init` the text tower becomes a BERT of that folder's `config.json` (pool = the
[CLS] state), its vocabulary and tokenizer the folder's; `model.tokenizer` defaults to the folder.

Weights. `.safetensors` through safetensors; `.bin` / `.pt` through `torch.load(weights_only=True)` (a file needing
more than tensors is refused). open_clip names map to ours with the mapping `medvlp export` inverts
(`export.from_open_clip`); a state dict under "state_dict" / "model", a "module." prefix, and CustomTextCLIP's "text."
prefix are unwrapped. BERT weights: a BertModel or BertFor* checkpoint ("bert." prefix, "cls." heads and the pooler
dropped, old LayerNorm gamma/beta names mapped). Every tensor the initialised towers have must be in the file with
its shape; the error names the first few that are not. What is new stays as built (seeded): the BERT text
projection, or everything of a tower no init covers.

Order in `build_model`: registry spec -> init architecture (`init_spec`) -> MedCLIP -> init weights (`load_init`) ->
`model.checkpoint` (a full medvlp state, e.g. a resume, wins).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
OPEN_CLIP_WEIGHT_NAMES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin", "model.safetensors",
                          "pytorch_model.bin")
HF_WEIGHT_NAMES = ("model.safetensors", "pytorch_model.bin")
BERT_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
             "hidden_act", "hidden_dropout_prob", "attention_probs_dropout_prob", "max_position_embeddings",
             "type_vocab_size", "layer_norm_eps", "pad_token_id", "position_embedding_type")
_OC_TOP = {"embed_dim", "vision_cfg", "text_cfg", "custom_text", "init_logit_bias", "init_logit_scale", "quick_gelu",
           "cast_dtype"}


class InitError(ValueError):
    """`model.init` / `model.text_init` cannot be used; the message names the path and why (one line)."""

    user_facing = True


# ----------------------------------------------------------------------------------------------- open_clip
def _weights_file(path: Path, names: tuple[str, ...], what: str) -> Path:
    if path.is_file():
        if path.suffix not in WEIGHT_SUFFIXES:
            raise InitError(f"{what}: {path} is not a {'/'.join(WEIGHT_SUFFIXES)} weights file")
        return path
    if path.is_dir():
        for n in names:
            if (path / n).is_file():
                return path / n
        found = sorted(p for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES)
        if len(found) == 1:
            return found[0]
        raise InitError(f"{what}: {path} holds {'no' if not found else len(found)} weights files "
                        f"({', '.join(names)} expected)")
    raise InitError(f"{what}: {path} does not exist")


def _model_cfg_of(doc: dict, where: str) -> dict:
    cfg = doc.get("model_cfg", doc) if isinstance(doc, dict) else None
    if not isinstance(cfg, dict) or "vision_cfg" not in cfg or "text_cfg" not in cfg:
        raise InitError(f"{where}: not an open_clip model config (needs vision_cfg and text_cfg)")
    return cfg


def open_clip_arch(cfg) -> tuple[dict | None, str]:
    """(open_clip model config, where it came from) for `model.init`; (None, "") = use the registry's."""
    if cfg.init_arch:
        p = Path(cfg.init_arch)
        if p.suffix == ".json":
            if not p.is_file():
                raise InitError(f"model.init_arch: {p} not found")
            return _model_cfg_of(json.loads(p.read_text()), str(p)), str(p)
        import open_clip

        oc = open_clip.get_model_config(cfg.init_arch)
        if oc is None:
            raise InitError(f"model.init_arch: {cfg.init_arch!r} is not an open_clip model name "
                            f"(e.g. {', '.join(open_clip.list_models()[:4])}) nor a .json config")
        return dict(oc), f"open_clip:{cfg.init_arch}"
    init = Path(cfg.init)
    for cand in (init / "open_clip_config.json", init.parent / "open_clip_config.json"):
        if cand.is_file():
            return _model_cfg_of(json.loads(cand.read_text()), str(cand)), str(cand)
    return None, ""


def spec_from_open_clip(oc: dict, name: str) -> dict:
    """An open_clip model config -> our architecture spec (open_clip's own towers only; else InitError)."""
    unknown = sorted(set(oc) - _OC_TOP)
    if unknown or oc.get("quick_gelu"):
        why = f"keys {unknown}" if unknown else "quick_gelu (QuickGELU towers)"
        raise InitError(f"{name}: open_clip architecture with {why} is not supported here (medvlp builds "
                        "open_clip's VisionTransformer / ModifiedResNet and text transformer with GELU)")
    v, t = dict(oc["vision_cfg"]), dict(oc["text_cfg"])
    for tower, c, keys in (("vision", v, ("timm_model_name",)), ("text", t, ("hf_model_name", "hf_tokenizer_name"))):
        used = [k for k in keys if c.get(k)]
        if used:
            raise InitError(f"{name}: its {tower} tower is a {used[0].split('_')[0]} model ({c[used[0]]}); medvlp "
                            "initialises open_clip's own towers only")
    if int(t.get("vocab_size", 49408)) != 49408:
        raise InitError(f"{name}: text vocab_size {t['vocab_size']} is not open_clip's BPE (49408)")
    spec = {"embed_dim": int(oc["embed_dim"]), "name": name, "source": name,
            "vision": {"type": "resnet" if isinstance(v.get("layers"), (list, tuple)) else "vit", **v},
            "text": {"type": "openclip", **t}}
    if isinstance(spec["vision"].get("layers"), tuple):
        spec["vision"]["layers"] = list(spec["vision"]["layers"])
    for k in ("init_logit_scale", "init_logit_bias"):
        if oc.get(k) is not None:
            spec[k] = float(oc[k])
    return spec


def read_state(path: Path, what: str) -> dict[str, torch.Tensor]:
    """A weights file read safely (safetensors, or torch.load(weights_only=True)), unwrapped."""
    from medvlp.pretrain.weights import LoadError, read_weights

    try:
        sd, _ = read_weights(path)
    except LoadError as e:
        raise InitError(f"{what}: {e}") from None
    return sd


def _open_clip_to_ours(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from medvlp.pretrain.weights import from_open_clip

    if any(k.startswith("text.") for k in sd):  # CustomTextCLIP keeps its text tower under "text."
        sd = {k.removeprefix("text."): v for k, v in sd.items()}
    return from_open_clip({k: v for k, v in sd.items() if k != "attn_mask"})


def _load_part(model: torch.nn.Module, sd: dict[str, torch.Tensor], prefixes: tuple[str, ...], where: str) -> int:
    """Copy the tensors of `sd` under `prefixes` into `model`; every own tensor under them must be given."""
    own = model.state_dict()
    wanted = [k for k in own if k.startswith(prefixes)]
    missing = [k for k in wanted if k not in sd]
    bad = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in wanted
           if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or bad:
        raise InitError(f"{where}: does not fit the model: missing {missing[:5]}{'...' if len(missing) > 5 else ''}"
                        f", shape mismatch {bad[:5]}")
    with torch.no_grad():
        for k in wanted:
            own[k].copy_(sd[k].to(own[k].dtype))
    return len(wanted)


# ----------------------------------------------------------------------------------------------- Hugging Face
def hf_config(folder: Path) -> dict:
    """The BERT fields of a local HF folder's config.json (model_type bert)."""
    path = folder / "config.json"
    if not path.is_file():
        raise InitError(f"model.text_init: {folder} has no config.json (a Hugging Face model folder is expected)")
    doc = json.loads(path.read_text())
    if doc.get("model_type", "bert") != "bert":
        raise InitError(f"model.text_init: {path}: model_type {doc.get('model_type')!r} is not bert (the BERT "
                        "family: BERT, PubMedBERT, BioBERT, ClinicalBERT)")
    return {k: doc[k] for k in BERT_KEYS if k in doc}


def hf_tokenizer_dir(folder: Path) -> Path:
    """A folder with tokenizer.json for the HF folder: itself, or (vocab.txt only) a fast tokenizer converted once
    into the cache ($MEDVLP_CACHE, default ~/.cache/medvlp) under a hash of vocab.txt and tokenizer_config.json."""
    if (folder / "tokenizer.json").is_file():
        return folder
    vocab = folder / "vocab.txt"
    if not vocab.is_file():
        raise InitError(f"model.text_init: {folder} has neither tokenizer.json nor vocab.txt")
    conf_path = folder / "tokenizer_config.json"
    conf = json.loads(conf_path.read_text()) if conf_path.is_file() else {}
    digest = hashlib.sha256(vocab.read_bytes() + json.dumps(conf, sort_keys=True).encode()).hexdigest()[:16]
    out = Path(os.environ.get("MEDVLP_CACHE", Path.home() / ".cache" / "medvlp")) / "tokenizers" / digest
    if not (out / "tokenizer.json").is_file():
        from transformers import BertTokenizerFast

        tok = BertTokenizerFast(vocab_file=str(vocab), do_lower_case=bool(conf.get("do_lower_case", True)))
        out.mkdir(parents=True, exist_ok=True)
        tok.save_pretrained(str(out))
        log.info("model.text_init: %s has no tokenizer.json; converted its vocab.txt into %s", folder, out)
    return out


def _hf_to_ours(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        k = k.removeprefix("bert.")
        if k.startswith(("cls.", "pooler.")) or k.endswith("position_ids"):
            continue
        k = k.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
        out["text.net." + k] = v
    return out


# ----------------------------------------------------------------------------------------------- build hooks
def resolve(cfg):
    """`cfg` with model.tokenizer defaulting to the text_init folder's tokenizer (None-safe for configs without the
    init keys)."""
    if getattr(cfg, "text_init", ""):
        hf_config(Path(cfg.text_init))  # a folder without config.json says so first
    if getattr(cfg, "text_init", "") and not cfg.tokenizer:
        return dataclasses.replace(cfg, tokenizer=str(hf_tokenizer_dir(Path(cfg.text_init))))
    return cfg


def init_spec(cfg, spec: dict) -> dict:
    """The architecture to build: the registry's `spec` with the open_clip checkpoint's towers (`model.init`) and
    the HF folder's text tower (`model.text_init`) put in."""
    if getattr(cfg, "init", ""):
        oc, where = open_clip_arch(cfg)
        if oc is not None:
            new = spec_from_open_clip(oc, where)
            spec = {**spec, **{k: new[k] for k in ("embed_dim", "vision", "text", "init_logit_scale",
                                                   "init_logit_bias") if k in new}}
            spec["description"] = f"initialised from {cfg.init} ({where})"
    if getattr(cfg, "text_init", ""):
        folder = Path(cfg.text_init)
        bert = hf_config(folder)
        ctx = int(spec["text"].get("context_length", 77))
        ctx = min(ctx, int(bert.get("max_position_embeddings", 512)))
        spec = {**spec, "text": {"type": "bert", "pool": "cls", "context_length": ctx, **bert}}
    return spec


def load_init(model: torch.nn.Module, cfg) -> None:
    """Copy the `model.init` / `model.text_init` weights into a freshly built model."""
    if getattr(cfg, "init", ""):
        path = _weights_file(Path(cfg.init), OPEN_CLIP_WEIGHT_NAMES, "model.init")
        sd = _open_clip_to_ours(read_state(path, "model.init"))
        parts = ("visual.",) if getattr(cfg, "text_init", "") else ("visual.", "text.")
        n = _load_part(model, sd, parts, f"model.init {path}")
        scalars = [k for k in ("logit_scale", "logit_bias") if k in sd and getattr(model, k, None) is not None]
        n += _load_part(model, sd, tuple(scalars), f"model.init {path}") if scalars else 0
        log.info("model.init: %d tensors from %s", n, path)
    if getattr(cfg, "text_init", ""):
        folder = Path(cfg.text_init)
        path = _weights_file(folder, HF_WEIGHT_NAMES, "model.text_init")
        sd = _hf_to_ours(read_state(path, "model.text_init"))
        n = _load_part(model, sd, ("text.net.",), f"model.text_init {path}")
        log.info("model.text_init: %d tensors from %s (text projection new)", n, path)
