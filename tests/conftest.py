"""Shared fixtures: a small synthetic radiograph shard set built once per test session."""
import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def cxr_shards(tmp_path_factory):
    """128 synthetic radiographs (64x64) in shards of 32, with index.json."""
    from data_shards.synth import synth_to_shards

    out = tmp_path_factory.mktemp("cxr_shards")
    synth_to_shards(out, modality="cxr", n=128, seed=0, shard_size=32, size=64)
    return out


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
