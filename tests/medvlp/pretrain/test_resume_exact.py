"""A pretraining run stopped and resumed ends with the same weights, bit for bit, as one that never stopped (and the
same losses exactly), as the README claims: weights, Adam moments, lr schedule, RNG and data position all restored."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from medvlp.launch.config import flatten, load_config, to_dict
from tests.conftest import tiny_overrides

pytestmark = pytest.mark.timeout(600)

QUIET = {"tracking.enabled": "false", "train.final_eval": "false"}


def _run(cfg):
    from medvlp.pretrain.train import run_pretrain
    return run_pretrain(cfg, flatten(to_dict(cfg)), progress=False)


def _log(out):
    return [json.loads(line) for line in (Path(out) / "train_log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("stop_at", [3])
def test_resumed_run_ends_with_bit_identical_weights(cxr_shards, tmp_path, stop_at):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # equal thread counts give equal float reductions in both runs
    try:
        sets = lambda out, **e: tiny_overrides(cxr_shards, out, steps=6, **QUIET, **{"train.ckpt_every": 1,  # noqa: E731
                                                                                     "train.keep_ckpts": 10, **e})
        full = _run(load_config("debug", sets(tmp_path / "full")))
        first = _run(load_config("debug", sets(tmp_path / "part", **{"train.stop_after": stop_at})))
        assert first.stopped_early and first.steps_done == stop_at
        second = _run(load_config("debug", sets(tmp_path / "part", **{"train.resume": "true"})))
    finally:
        torch.set_num_threads(threads)
    assert second.steps_done == 6
    a, b = dict(full.losses), dict(second.losses)
    assert sorted(b) == list(range(1, 7))
    assert [b[s] for s in range(1, 7)] == [a[s] for s in range(1, 7)]  # exactly, not approximately
    wa, wb = load_file(tmp_path / "full" / "model.safetensors"), load_file(tmp_path / "part" / "model.safetensors")
    assert wa.keys() == wb.keys() and len(wa) > 10
    differ = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not differ, f"weights differ after resume: {differ[:5]}"
    # the comparison can fail: the weights at the stop differ from the final ones
    at_stop = _weights_at_step(tmp_path / "part", stop_at)
    assert any(not torch.equal(wa[k], at_stop[k].to(wa[k].dtype)) for k in wa)


def _weights_at_step(run, step):
    from medvlp.pretrain.pretrained import checkpoint_state_dict
    from medvlp.pretrain.checkpoint import CKPT_DIR, tag_for

    return checkpoint_state_dict(Path(run) / CKPT_DIR / tag_for(step))
