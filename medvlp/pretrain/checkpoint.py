"""Checkpoint files of a pretraining run: DeepSpeed's state, our client state, per-rank RNG, consolidated weights.

    RUN/checkpoints/step_XXXXXXXX/      one checkpoint (tag_for(step))
        mp_rank_00_model_states.pt ...  DeepSpeed's own files (module / ZeRO partitions, optimizer, client state)
        config.json                     the run's resolved config (read without unpickling anything)
        rng_rank<R>.json                rank R's Python / NumPy / torch (/ CUDA) RNG states, as JSON
        COMPLETE                        written last (atomically, after a barrier): the checkpoint is whole;
                                        JSON: step, run_uid (the run that wrote it), client state
    RUN/model.safetensors               consolidated fp32 weights, written when a run ends normally

`latest_complete` never picks a checkpoint that a crash cut short. Nothing here unpickles a file: RNG states are
JSON and weights are safetensors.

The safe-load gate. DeepSpeed's `engine.load_checkpoint` (resume), its ZeRO consolidation
(`medvlp.pretrain.weights`) and accelerate's `load_state` (fine-tune resume) unpickle their files in full
(`weights_only=False`). `safe_load_gate(path)` stands in front of each of them: it opens every pickle file of a
checkpoint (`*.pt`, `*.pth`, `*.bin`, `*.pkl`, `*.ckpt`, recursively) with `torch.load(weights_only=True)` (tensors
memory-mapped, so a check costs the pickle's size, not the tensors'), allowing only DeepSpeed's and accelerate's own
plain data classes, and raises `UnsafeCheckpointError` (a `LoadError`) naming the first file that would run code.
`safe_torch_load` is the one `torch.load` call behind it. `load_checkpoint` calls the gate; `refuse_unsafe` runs it
over every checkpoint a resume may fall back to, so a tampered checkpoint stops the resume (one line, exit 2)
instead of being skipped for an older one.
"""
from __future__ import annotations

import base64
import json
import pickle
import zipfile
import logging
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from medvlp.pretrain.spine import (CKPT_DIR, COMPLETE, complete_checkpoints, latest_complete,  # noqa: F401
                                   prune_checkpoints, tag_for, write_complete)

log = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
LEGACY_WEIGHTS = "model.pt"
CKPT_CONFIG = "config.json"


class LoadError(ValueError):
    """A path that cannot be loaded (a model, weights, a checkpoint); the message names the path and why."""

    user_facing = True


class UnsafeCheckpointError(LoadError):
    """A file that holds pickled objects other than tensors and plain data: loading it would run code from it."""


# ----------------------------------------------------------------------------------------------- RNG (JSON)
def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()


def rng_state() -> dict:
    """This process's RNG states as a JSON-serialisable dict."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    st = {"python": [version, list(internal), gauss],
          "numpy": [name, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)],
          "torch": _b64(torch.get_rng_state())}
    if torch.cuda.is_available():
        st["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return st


def set_rng_state(st: dict) -> None:
    """Restore what `rng_state` returned (after a JSON round trip)."""
    version, internal, gauss = st["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = st["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_unb64(st["torch"]))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_unb64(s) for s in st["cuda"]])


def save_rng(path: str | os.PathLike) -> None:
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(rng_state()))
    os.replace(tmp, path)


def load_rng(tag_dir: Path, rank: int) -> bool:
    """Restore rank `rank`'s RNG from `tag_dir` (JSON; a legacy `rng_rank*.pt` only through
    `torch.load(weights_only=True)`). Returns False (with a warning) when nothing could be restored."""
    path = tag_dir / f"rng_rank{rank}.json"
    if path.is_file():
        try:
            set_rng_state(json.loads(path.read_text()))
            return True
        except (ValueError, KeyError, TypeError) as e:
            log.warning("%s: unreadable RNG state (%s); continuing with fresh RNG", path, e)
            return False
    legacy = tag_dir / f"rng_rank{rank}.pt"
    if legacy.is_file():
        try:  # never unpickle arbitrary objects: the safe loader rejects what it does not know
            st = safe_torch_load(legacy)
            random.setstate(st["python"])
            np.random.set_state(st["numpy"])
            torch.set_rng_state(st["torch"])
            return True
        except Exception as e:  # noqa: BLE001 - an old pickle the safe loader refuses: skip, do not execute
            log.warning("%s: legacy pickled RNG state not loaded (the safe loader refused it: %s); continuing "
                        "with fresh RNG", legacy, str(e).splitlines()[0] if str(e) else type(e).__name__)
    return False


# ----------------------------------------------------------------------------------------------- safe-load gate
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".ckpt")
_checked: dict[tuple, bool] = {}  # (path, inode, size, mtime_ns) of files the gate already passed


def safe_torch_load(path: str | os.PathLike, allow: list | None = None, mmap: bool = False) -> Any:
    """`torch.load(weights_only=True)`, refusing (never executing) anything else: `UnsafeCheckpointError` for a
    pickle that needs more than tensors, containers and the `allow`ed classes, `LoadError` for an unreadable file."""
    path = Path(path)
    mmap = mmap and zipfile.is_zipfile(path)  # torch memory-maps only its zip format
    try:
        if allow:
            with torch.serialization.safe_globals(allow):
                return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        first = next((ln for ln in lines if "GLOBAL" in ln or "Unsupported" in ln), lines[0] if lines else "")
        first = first.replace("\x1b[1m", "").replace("\x1b[0m", "")
        raise UnsafeCheckpointError(
            f"{path}: refused: the file holds pickled objects other than tensors, and loading it would run code "
            f"from the file (the safe loader said: {first[:200]}); convert trusted weights to safetensors") from None
    except (RuntimeError, AttributeError, TypeError, ValueError, EOFError, OSError, KeyError, IndexError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LoadError(f"{path}: not a readable torch file ({msg[:200]})") from None


def deepspeed_safe_globals() -> list:
    """DeepSpeed's own plain classes found in its checkpoint pickles (data only, no code on load)."""
    out: list = []
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        out += [LossScaler, DynamicLossScaler]
    except ImportError:
        pass
    try:
        from deepspeed.runtime.zero.config import ZeroStageEnum
        out.append(ZeroStageEnum)
    except ImportError:
        pass
    try:
        from deepspeed.utils.tensor_fragment import fragment_address
        out.append(fragment_address)
    except ImportError:
        pass
    return out


def _gate_allow() -> list:
    """What the gate lets through besides tensors and containers: DeepSpeed's and accelerate's plain classes."""
    allow = deepspeed_safe_globals()
    try:
        from accelerate.utils.other import TORCH_SAFE_GLOBALS
        allow += [g for g in TORCH_SAFE_GLOBALS if g not in allow]
    except ImportError:
        pass
    return allow


def _pickle_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(f for f in path.rglob("*") if f.suffix in PICKLE_SUFFIXES and f.is_file()
                  and not f.name.startswith("rng_rank"))  # legacy RNG pickles: `load_rng` reads them safely itself


def safe_load_gate(path: str | os.PathLike) -> None:
    """THE check before anything unpickles in full (DeepSpeed, accelerate): every pickle file under `path` (a file,
    or a checkpoint folder, recursively) must open with the safe loader. Raises `UnsafeCheckpointError` naming the
    first file that would run code, `LoadError` for one that does not read; a file passed before (same inode, size
    and mtime) is not read again."""
    path = Path(path)
    if not path.exists():
        raise LoadError(f"{path}: no such file or folder")
    allow = None
    for f in _pickle_files(path):
        st = f.stat()
        key = (str(f.resolve()), st.st_ino, st.st_size, st.st_mtime_ns)
        if key in _checked:
            continue
        allow = _gate_allow() if allow is None else allow
        safe_torch_load(f, allow, mmap=True)
        _checked[key] = True


def check_deepspeed_files(tag_dir: Path) -> None:
    """The gate over a DeepSpeed checkpoint folder (kept for callers of the older name)."""
    safe_load_gate(tag_dir)


def refuse_unsafe(tag_dirs: list[Path]) -> None:
    """Before a resume: the gate over every checkpoint it may load or fall back to. A file that would run code stops
    the resume (`UnsafeCheckpointError`); a merely unreadable one is left to the resume's fallback."""
    for tag_dir in tag_dirs:
        try:
            safe_load_gate(tag_dir)
        except UnsafeCheckpointError:
            raise
        except LoadError:
            pass


_deepspeed_safe_globals = deepspeed_safe_globals  # the older private name


# ----------------------------------------------------------------------------------------------- checkpoints
def save_checkpoint(engine, out_dir: str | os.PathLike, step: int, client_state: dict, keep: int = 2) -> Path:
    """All ranks call this. Files first, the COMPLETE marker last (rank 0, after every rank has written; it carries
    `client_state["run_uid"]`, and retention then deletes only that run's older checkpoints)."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    root = Path(out_dir) / CKPT_DIR
    tag = tag_for(step)
    tag_dir = root / tag
    if rank == 0 and tag_dir.exists():  # a stale, incomplete attempt at the same step
        (tag_dir / COMPLETE).unlink(missing_ok=True)
    engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
    save_rng(tag_dir / f"rng_rank{rank}.json")
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        cfg = client_state.get("config")
        if cfg:
            (tag_dir / CKPT_CONFIG).write_text(json.dumps(cfg, indent=1, sort_keys=True, default=str) + "\n")
        extra = {k: v for k, v in client_state.items() if k not in ("config", "run_uid")}
        write_complete(tag_dir, step, client_state.get("run_uid"), extra)
        prune_checkpoints(out_dir, keep, client_state.get("run_uid"))  # this run's own checkpoints only
    if dist.is_initialized():
        dist.barrier()
    return tag_dir


def load_checkpoint(engine, tag_dir: Path) -> dict:
    """Load DeepSpeed state + RNG from a complete checkpoint. Returns our client state.

    DeepSpeed's loader unpickles its own `*.pt` files in full: the safe-load gate checks them first."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    safe_load_gate(tag_dir)
    _, client = engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name, load_optimizer_states=True,
                                       load_lr_scheduler_states=True)
    if client is None:
        raise RuntimeError(f"checkpoint {tag_dir}: DeepSpeed could not load it")
    load_rng(tag_dir, rank)
    return client


# ----------------------------------------------------------------------------------------------- weights
def save_state_dict(sd: dict, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """A state dict as safetensors (fp32 as given, contiguous, shared storage broken), written atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in sd.items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={k: str(v) for k, v in (metadata or {}).items()})
    os.replace(tmp, path)
    return path


def model_metadata(module) -> dict[str, str]:
    """What a weights file needs to rebuild its module without the registry: the architecture spec."""
    spec = getattr(module, "spec", None)
    return {"format": "pt", "medvlp_spec": json.dumps(spec, sort_keys=True)} if spec else {"format": "pt"}


def save_model_weights(engine, path: str | os.PathLike) -> None:
    """Consolidated fp32 weights as safetensors (ZeRO-3 gathers the partitions). All ranks call."""
    import contextlib

    import deepspeed

    rank = dist.get_rank() if dist.is_initialized() else 0
    module = engine.module
    params = list(module.parameters())
    if engine.zero_optimization_stage() == 3:
        ctx = deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    else:
        ctx = contextlib.nullcontext()
    with ctx:
        if rank == 0:
            sd = {k: v.detach().float().cpu() for k, v in module.state_dict().items()}
            save_state_dict(sd, path, model_metadata(module))
    if dist.is_initialized():
        dist.barrier()


# ----------------------------------------------------------------------------------------------- run config
def load_run_config(model_dir: str | Path):
    """The typed resolved config (`PretrainConfig`) of a pretraining run: MODEL_DIR/config.yaml, else a legacy flat
    MODEL_DIR/config.json, else the config.json the latest complete checkpoint keeps (JSON: nothing is unpickled).
    Built strictly: an unknown or mistyped stored key fails with `ConfigError` naming its path. None when there is
    no stored config."""
    import yaml

    from medvlp.pretrain.config import PretrainConfig
    from medvlp.pretrain.configtree import ConfigError, build, unflatten

    model_dir = Path(model_dir)
    tag = None
    if not (model_dir / "config.yaml").is_file() and not (model_dir / "config.json").is_file():
        tag = latest_complete(model_dir)
    if (model_dir / "config.yaml").is_file():
        path = model_dir / "config.yaml"
    elif (model_dir / "config.json").is_file():
        path = model_dir / "config.json"
    elif tag is not None and (tag / CKPT_CONFIG).is_file():
        path = tag / CKPT_CONFIG
    else:
        return None
    try:
        doc = yaml.safe_load(path.read_text()) if path.suffix == ".yaml" else json.loads(path.read_text())
    except (yaml.YAMLError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not valid {path.suffix[1:].upper()}: {str(e).splitlines()[0]}") from None
    if not doc:
        return None
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    if any("." in str(k) for k in doc):  # a legacy flat file
        doc = unflatten(doc)
    return build(PretrainConfig, doc)
