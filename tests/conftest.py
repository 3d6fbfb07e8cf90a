"""Shared fixtures: a small synthetic radiograph shard set built once per test session."""
import os

import pytest

# One BLAS thread per process when pytest-xdist runs several test processes on the box's cores, two otherwise.
os.environ.setdefault("OMP_NUM_THREADS", "1" if os.environ.get("PYTEST_XDIST_WORKER") else "2")


@pytest.fixture(scope="session")
def cxr_shards(tmp_path_factory):
    """128 synthetic radiographs (64x64) in shards of 32, with index.json."""
    from medvlp.data_shards.synth import synth_to_shards

    out = tmp_path_factory.mktemp("cxr_shards")
    synth_to_shards(out, modality="cxr", n=128, seed=0, shard_size=32, size=64)
    return out


def realdata(name: str):
    """Folder `name` of the real-data root named by $MEDVLP_REALDATA (public data sets in their own layouts:
    covid_cxr_notes/, kather_tiles/), or None when the variable is unset or the folder is absent (tests skip)."""
    import os
    from pathlib import Path

    root = os.environ.get("MEDVLP_REALDATA", "")
    return Path(root) / name if root and (Path(root) / name).is_dir() else None


def tiny_overrides(shards, out_dir, steps=6, **extra):
    """Overrides for a fast CPU pretraining run of the debug model."""
    sets = {
        "data.train_shards": str(shards), "data.batch_size": 8, "data.shuffle_buffer": 16,
        "train.steps": steps, "train.out_dir": str(out_dir), "train.ckpt_every": 3, "train.log_every": 1,
        "optim.warmup_steps": 2, "eval.kshot": "[1, 2]", "eval.kshot_seeds": 1, "eval.bootstrap": 20,
        "tracking.uri": f"sqlite:///{out_dir}/mlruns.db", "tracking.log_model": "false",
    }
    sets.update(extra)
    return [f"{k}={v}" for k, v in sets.items()]


def write_csv(path, rows: list[dict]):
    """A CSV manifest from dict rows (columns in first-seen order)."""
    import csv

    cols = list(dict.fromkeys(c for r in rows for c in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    return path


def saved_pretrained_run(run, name: str, modality: str, seed: int = 0):
    """A freshly initialised `name` model saved as a loadable run folder (model.safetensors + config.json) at `run`.
    Returns the model (eval mode)."""
    import json

    import torch

    from medvlp.pretrain.checkpoint import model_metadata, save_state_dict
    from medvlp.pretrain.config import ModelConfig
    from medvlp.pretrain.model import build_model

    torch.manual_seed(seed)
    model = build_model(ModelConfig(name=name)).eval()
    run.mkdir(parents=True, exist_ok=True)
    save_state_dict(model.state_dict(), run / "model.safetensors", model_metadata(model))
    (run / "config.json").write_text(json.dumps({"model.name": name, "data.modality": modality}))
    return model


@pytest.fixture(autouse=True)
def _grad_mode_is_left_as_found():
    """A library call that switches autograd off globally breaks every later test in the process: fail the test that
    did it (and restore the mode) instead."""
    import torch

    yield
    if not torch.is_grad_enabled():
        torch.set_grad_enabled(True)
        pytest.fail("the test left torch's grad mode disabled (a torch.set_grad_enabled(False) without restore)")
