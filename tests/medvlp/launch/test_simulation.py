"""`medvlp launch --cpu`: two simulated nodes (one torchrun agent each, c10d rendezvous on 127.0.0.1, gloo) train
the debug recipe; a SIGKILLed rank either gets restarted by torchrun (`--max-restarts 1`) or stops the job, and a
rerun resumes from the last COMPLETE checkpoint. Every test drives the real CLI in a subprocess."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import tiny_overrides

REPO = Path(__file__).resolve().parents[3]
pytestmark = pytest.mark.dist


def _clean_env():
    """This process's environment without process-group variables (an in-process run in this pytest may set them)."""
    drop = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"}
    return {**{k: v for k, v in os.environ.items() if k not in drop}, "OMP_NUM_THREADS": "1"}


def _sim_cmd(shards, out_dir, steps, *launch_flags, **sets):
    base = {"tracking.enabled": "false", "train.final_eval": "false", **sets}
    pre = [x for s in tiny_overrides(shards, out_dir, steps=steps, **base) for x in ("--set", s)]
    return [sys.executable, "-m", "medvlp.launch.cli", "launch", "--nodes", "2", "--gpus-per-node", "1", "--cpu",
            *launch_flags, "--", "pretrain", "debug", *pre]


def _start(cmd, log_path):
    """The launcher in its own session (so a failed test can kill the whole tree), output to a file."""
    f = open(log_path, "w")
    return subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=_clean_env(),
                            start_new_session=True)


def _stop_tree(proc):
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _log_lines(out_dir):
    """(step, loss) per line of train_log.jsonl, in the order written (a resume replays steps)."""
    path = Path(out_dir) / "train_log.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return [(r["step"], r["loss"]) for r in rows]


def _children(pid):
    """Direct children of `pid`, from /proc/*/stat (field 4 is the parent pid)."""
    kids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(d.name))
    return kids


def _descendants(pid):
    out, todo = [], [pid]
    while todo:
        kids = _children(todo.pop())
        out += kids
        todo += kids
    return out


def _environ(pid):
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(kv.split("=", 1) for kv in raw.decode(errors="replace").split("\0") if "=" in kv)


def _worker_pid(launcher_pid, rank):
    """The training worker with RANK=rank: a grandchild of `medvlp launch` (launcher -> torchrun agent -> worker)."""
    for pid in _descendants(launcher_pid):
        env = _environ(pid)
        if env.get("RANK") == str(rank) and "TORCHELASTIC_RUN_ID" in env:
            return pid
    return None


def _alive(pid):
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _complete_steps(out_dir):
    from medvlp.pretrain.engine import complete_checkpoints
    return [json.loads((p / "COMPLETE").read_text())["step"] for p in complete_checkpoints(out_dir)]


def _kill_rank_after_checkpoint(proc, out_dir, rank, log_path, deadline_s=180):
    """Wait for a COMPLETE checkpoint and one more logged step, then SIGKILL rank `rank`'s worker.
    Returns (latest complete step before the kill, pids of the launcher's process tree at the kill)."""
    deadline = time.time() + deadline_s
    while time.time() < deadline:
        done = _complete_steps(out_dir)
        if done and len(_log_lines(out_dir)) >= done[-1] + 1:
            break
        assert proc.poll() is None, f"job ended before the kill:\n{Path(log_path).read_text()[-3000:]}"
        time.sleep(0.2)
    else:
        raise AssertionError(f"no complete checkpoint within {deadline_s} s:\n{Path(log_path).read_text()[-3000:]}")
    pid = _worker_pid(proc.pid, rank)
    assert pid is not None, "rank worker not found under the launcher"
    tree = _descendants(proc.pid)
    os.kill(pid, signal.SIGKILL)
    return done[-1], tree


def _check_checkpoints_load(out_dir, world):
    """Every COMPLETE checkpoint's model-state file loads and agrees with its marker (step, data-parallel world)."""
    from medvlp.pretrain.engine import complete_checkpoints
    from medvlp.pretrain.weights import deepspeed_safe_globals, safe_torch_load

    dirs = complete_checkpoints(out_dir)
    assert dirs
    for d in dirs:
        marker = json.loads((d / "COMPLETE").read_text())
        (states,) = d.glob("*model_states.pt")
        sd = safe_torch_load(states, deepspeed_safe_globals())  # DeepSpeed's pickle, read with weights_only=True
        assert sd["step"] == marker["step"] and sd["data"] == marker["data"], d
        assert sd["dp_world_size"] == world and "module" in sd, d
        assert sorted(p.name for p in d.glob("rng_rank*.json")) == [f"rng_rank{r}.json" for r in range(world)]


def _check_resumed(lines, steps, resumed_from):
    """train_log: every step 1..steps; a replay starts right after a checkpoint at or after `resumed_from` and its
    losses equal the first attempt's (exact resume: weights, optimizer, RNG and data position restored)."""
    order = [s for s, _ in lines]
    assert sorted(set(order)) == list(range(1, steps + 1)), order
    assert all(math.isfinite(v) for _, v in lines)
    restarts = [i for i in range(1, len(order)) if order[i] <= order[i - 1]]
    assert len(restarts) == 1, f"expected one resume in the log, got steps {order}"
    i = restarts[0]
    first_new = order[i]
    assert first_new - 1 >= resumed_from, f"resumed at step {first_new}, but step {resumed_from} was complete"
    before = dict(lines[:i])
    replayed = [(s, v) for s, v in lines[i:] if s in before]
    assert replayed, order
    for s, v in replayed:
        assert v == pytest.approx(before[s], rel=1e-5, abs=1e-6), f"step {s}: resumed {v} vs first {before[s]}"


def test_two_simulated_nodes_train(cxr_shards, tmp_path):
    cmd = _sim_cmd(cxr_shards, tmp_path / "run", 6)
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=_clean_env(), timeout=300)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-4000:]
    agents = [ln for ln in out.stdout.splitlines() if "torch.distributed.run" in ln]
    assert len(agents) == 2 and all("--rdzv_endpoint 127.0.0.1:" in ln for ln in agents)
    assert "world 2 = 16 samples/step" in out.stdout and text.count("pretrain done: 6 steps") == 2
    lines = _log_lines(tmp_path / "run")
    assert [s for s, _ in lines] == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(v) for _, v in lines)
    assert _complete_steps(tmp_path / "run") == [3, 6]
    _check_checkpoints_load(tmp_path / "run", world=2)


def test_killed_rank_is_restarted_and_resumes(cxr_shards, tmp_path):
    out_dir, log = tmp_path / "run", tmp_path / "launch.log"
    steps = 20
    proc = _start(_sim_cmd(cxr_shards, out_dir, steps, "--max-restarts", "1", **{"train.ckpt_every": 4}), log)
    try:
        complete_at_kill, _ = _kill_rank_after_checkpoint(proc, out_dir, rank=1, log_path=log)
        rc = proc.wait(timeout=300)
    finally:
        _stop_tree(proc)
    text = log.read_text()
    assert rc == 0, text[-4000:]
    assert "exitcode: -9" in text  # torchrun saw the SIGKILL and restarted the group
    _check_resumed(_log_lines(out_dir), steps, complete_at_kill)
    assert _complete_steps(out_dir)[-1] == steps
    _check_checkpoints_load(out_dir, world=2)


def test_killed_rank_stops_job_then_rerun_resumes(cxr_shards, tmp_path):
    out_dir, log = tmp_path / "run", tmp_path / "launch.log"
    steps = 16
    cmd = _sim_cmd(cxr_shards, out_dir, steps, "--fail-grace", "30", **{"train.ckpt_every": 4})
    proc = _start(cmd, log)
    try:
        complete_at_kill, tree = _kill_rank_after_checkpoint(proc, out_dir, rank=1, log_path=log)
        t0 = time.time()
        rc = proc.wait(timeout=120)  # no hang: the surviving agent and worker exit (or are terminated)
        stopped_in = time.time() - t0
    finally:
        _stop_tree(proc)
    assert rc != 0, log.read_text()[-3000:]
    assert stopped_in < 60
    time.sleep(1.0)
    assert not [p for p in tree if _alive(p)], "processes of the failed job are still running"
    assert complete_at_kill in _complete_steps(out_dir)
    _check_checkpoints_load(out_dir, world=2)

    rerun = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=_clean_env(), timeout=300)
    assert rerun.returncode == 0, (rerun.stdout + rerun.stderr)[-4000:]
    assert "resumed from" in rerun.stdout + rerun.stderr
    _check_resumed(_log_lines(out_dir), steps, complete_at_kill)
    assert _complete_steps(out_dir)[-1] == steps
    _check_checkpoints_load(out_dir, world=2)
