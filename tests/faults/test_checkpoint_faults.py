"""Crafted pickles in checkpoints: the one safe-load gate stands in front of every full unpickle (DeepSpeed's resume
and consolidation, accelerate's load_state), a tampered checkpoint stops `--resume` with one line and exit 2 (no
fallback to an older one), and a merely damaged one still falls back as documented."""
import os

import pytest
import torch

from medvlp.launch.config import flatten, load_config, to_dict
from tests.conftest import tiny_overrides
from tests.faults.conftest import cli_here, one_line_error

pytestmark = pytest.mark.timeout(600)

QUIET = {"tracking.enabled": "false", "train.final_eval": "false"}


class _Boom:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _craft(path, marker):
    """Replace a DeepSpeed file by a pickle that would create `marker` when unpickled in full."""
    torch.save({"module": {"w": torch.zeros(2)}, "payload": _Boom(marker)}, path)


@pytest.fixture(scope="module")
def finished_run(cxr_shards, tmp_path_factory):
    """A 6-step debug run with complete checkpoints at steps 3 and 6."""
    from medvlp.pretrain.train import run_pretrain

    out = tmp_path_factory.mktemp("ckfault") / "run"
    cfg = load_config("debug", tiny_overrides(cxr_shards, out, steps=6, **QUIET))
    run_pretrain(cfg, flatten(to_dict(cfg)), progress=False)
    return out


def _copy(run, tmp_path):
    import shutil

    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst


@pytest.mark.parametrize("which", ["step_00000006", "step_00000003"])
def test_resume_refuses_a_crafted_checkpoint(finished_run, cxr_shards, tmp_path, which):
    """The latest checkpoint (or the one a fallback would reach) is a crafted pickle: nothing runs, no fallback,
    one line naming the file, exit 2."""
    run = _copy(finished_run, tmp_path)
    marker = tmp_path / "pwned"
    _craft(run / "checkpoints" / which / "mp_rank_00_model_states.pt", marker)
    sets = tiny_overrides(cxr_shards, run, steps=9, **QUIET)
    proc = cli_here("pretrain", "debug", "--resume", *[x for s in sets for x in ("--set", s)])
    assert not marker.exists(), "the crafted pickle ran"
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = one_line_error(proc)
    assert f"{which}/mp_rank_00_model_states.pt: refused" in err and "falling back" not in err
    assert not (run / "checkpoints" / "step_00000009").exists()


def test_load_checkpoint_never_hands_a_crafted_file_to_deepspeed(tmp_path, monkeypatch):
    """`checkpoint.load_checkpoint` runs the gate before DeepSpeed's loader (which would unpickle in full)."""
    from medvlp.pretrain import checkpoint as ck

    tag = tmp_path / "checkpoints" / "step_00000001"
    tag.mkdir(parents=True)
    marker = tmp_path / "pwned"
    _craft(tag / "mp_rank_00_model_states.pt", marker)

    class Engine:
        called = False

        def load_checkpoint(self, *a, **k):
            Engine.called = True
            return None, {}

    with pytest.raises(ck.UnsafeCheckpointError, match="mp_rank_00_model_states.pt: refused"):
        ck.load_checkpoint(Engine(), tag)
    assert not Engine.called and not marker.exists()


def test_gate_covers_accelerate_and_nested_files_and_tells_damage_from_danger(tmp_path):
    from medvlp.pretrain.checkpoint import LoadError, UnsafeCheckpointError, refuse_unsafe, safe_load_gate

    marker = tmp_path / "pwned"
    ck = tmp_path / "checkpoint_1"
    (ck / "pytorch_model").mkdir(parents=True)
    torch.save({"step": 3, "lr": torch.ones(1)}, ck / "scheduler.bin")
    safe_load_gate(ck)  # plain data passes
    torch.save({"x": _Boom(marker)}, ck / "pytorch_model" / "mp_rank_00_model_states.pt")  # DeepSpeed layout inside
    with pytest.raises(UnsafeCheckpointError, match="pytorch_model/mp_rank_00_model_states.pt: refused"):
        safe_load_gate(ck)
    torch.save({"x": _Boom(marker)}, ck / "custom_checkpoint_0.pkl")
    with pytest.raises(UnsafeCheckpointError):
        safe_load_gate(ck / "custom_checkpoint_0.pkl")
    assert not marker.exists()
    # a truncated file is damage, not danger: LoadError (resume falls back), and refuse_unsafe lets it through
    bad = tmp_path / "t" / "mp_rank_00_model_states.pt"
    bad.parent.mkdir()
    torch.save({"module": {"w": torch.zeros(3)}}, bad)
    bad.write_bytes(bad.read_bytes()[:100])
    with pytest.raises(LoadError, match="not a readable torch file") as e:
        safe_load_gate(bad.parent)
    assert not isinstance(e.value, UnsafeCheckpointError)
    refuse_unsafe([bad.parent])
    with pytest.raises(UnsafeCheckpointError):
        refuse_unsafe([bad.parent, ck])
    with pytest.raises(LoadError, match="no such file"):
        safe_load_gate(tmp_path / "missing")


def test_gate_rechecks_a_file_that_changed(tmp_path):
    """The gate remembers files it passed by inode, size and mtime: a file replaced after a pass is read again."""
    from medvlp.pretrain.checkpoint import UnsafeCheckpointError, safe_load_gate

    marker = tmp_path / "pwned"
    f = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": {"w": torch.zeros(2)}}, f)
    safe_load_gate(f)
    torch.save({"module": {"w": torch.zeros(2)}, "x": _Boom(marker)}, f)
    os.utime(f, ns=(1, 1))
    with pytest.raises(UnsafeCheckpointError):
        safe_load_gate(f)
    assert not marker.exists()
