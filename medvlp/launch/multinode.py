"""`medvlp launch`: the same medvlp subcommand on one GPU, one node, many nodes, or a SLURM allocation.

Launchers (all real; we only assemble their command lines):
  * one node, G GPUs .............. torchrun --standalone --nproc_per_node G -m medvlp.launch.cli <sub>
  * --hostfile F (N nodes) ........ deepspeed --hostfile F --num_nodes N --num_gpus G --master_addr A --module medvlp.launch.cli <sub>
  * --rdzv HOST:PORT .............. torchrun --nnodes N --nproc_per_node G --rdzv_backend c10d --rdzv_endpoint HOST:PORT
                                    (run the same command on every node; torchrun elects ranks)
  * --slurm ....................... an sbatch script: one task per node, `srun torchrun ... --rdzv_endpoint $MASTER_ADDR`
  * --slurm --array N ............. a SLURM array job (e.g. `shards build --part $SLURM_ARRAY_TASK_ID/N`)
  * --cpu ......................... simulate N nodes × G processes on this machine: gloo, rendezvous on 127.0.0.1

Pretraining under a launcher always gets ``train.resume=true``: when a rank dies the elastic agent (torchrun
``--max-restarts``) restarts every worker and they continue from the last complete checkpoint; without restarts
the job exits non-zero (under ``--cpu`` the other simulated nodes are terminated after ``--fail-grace`` seconds
at the latest; on real nodes their workers fail on the broken process group or at its timeout) and the same
command run again resumes.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

NCCL_ENV = {"NCCL_ASYNC_ERROR_HANDLING": "1", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1", "NCCL_DEBUG": "WARN"}
# torchrun's c10d rendezvous shares one TCPStore across restart rounds by default; after a restart the new
# workers then read the dead workers' gloo/NCCL addresses from it and fail to connect (pytorch#135712). A fresh
# store per round (hosted by worker rank 0) makes `--max-restarts` work.
TORCHRUN_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


@dataclass
class LaunchPlan:
    """What `medvlp launch` will run: commands (one per simulated/real node where it matters) and environment."""

    commands: list[list[str]] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    script: str | None = None  # sbatch script text (SLURM)
    script_path: str | None = None
    batch_note: str = ""
    signal_workers: bool = False  # torchrun plans: a first SIGTERM/SIGINT goes to the launcher's workers


    def render(self) -> str:
        lines = []
        if self.batch_note:
            lines.append(f"# {self.batch_note}")
        lines += [f"export {k}={shlex.quote(v)}" for k, v in sorted(self.env.items())]
        lines += [shlex.join(c) for c in self.commands]
        if self.script is not None:
            lines.append(f"# --- sbatch script {self.script_path or ''} ---")
            lines.append(self.script.rstrip())
        return "\n".join(lines)


def add_launch_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nodes", type=int, default=1, help="number of nodes")
    p.add_argument("--gpus-per-node", type=int, default=None, help="processes per node (default: visible GPUs or 1)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--hostfile", default=None, help="DeepSpeed hostfile ('host slots=G' lines): DeepSpeed launcher")
    g.add_argument("--rdzv", default=None, metavar="HOST:PORT", help="torchrun c10d rendezvous endpoint")
    g.add_argument("--slurm", action="store_true", help="write an sbatch script (srun + torchrun)")
    p.add_argument("--submit", action="store_true", help="with --slurm: call sbatch on the script")
    p.add_argument("--array", type=int, default=0, help="with --slurm: an array job of N tasks (e.g. shard building)")
    p.add_argument("--cpu", action="store_true", help="simulate the nodes on this machine with gloo on 127.0.0.1")
    p.add_argument("--node-rank", type=int, default=None, help="this node's rank (rdzv/static setups)")
    p.add_argument("--master-port", type=int, default=None, help="rendezvous / master port")
    p.add_argument("--max-restarts", type=int, default=0, help="elastic restarts after a rank fails (torchrun)")
    p.add_argument("--rdzv-timeout", type=int, default=120, help="seconds to wait for all nodes at rendezvous")
    p.add_argument("--fail-grace", type=float, default=60.0,
                   help="seconds the other nodes get to exit after one failed, before they are terminated")
    p.add_argument("--timeout", type=float, default=0,
                   help="terminate the whole job after this many seconds (0 = no limit)")
    p.add_argument("--job-name", default="medvlp")
    p.add_argument("--partition", default=None, help="SLURM partition")
    p.add_argument("--time", default="24:00:00", help="SLURM time limit")
    p.add_argument("--cpus-per-task", type=int, default=16, help="SLURM CPUs per node task")
    p.add_argument("--script", default=None, help="where to write the sbatch script (default: ./medvlp-<job>.sbatch)")
    p.add_argument("--dry-run", action="store_true", help="print the commands and environment; run nothing")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="-- <medvlp subcommand ...>")


def _sub(rest: list[str]) -> list[str]:
    rest = list(rest)
    if rest and rest[0] == "--":
        rest = rest[1:]
    if not rest:
        raise SystemExit("medvlp launch: give the subcommand after --, e.g. `medvlp launch -- pretrain debug`")
    if rest[0] == "medvlp":
        rest = rest[1:]
    return rest


def _with_resume(sub: list[str]) -> list[str]:
    if sub and sub[0] == "pretrain" and "--resume" not in sub:
        return sub + ["--resume"]
    return sub


def _free_port() -> int:
    from medvlp.pretrain.engine import free_port

    return free_port()


def _gpus(a) -> int:
    if a.gpus_per_node:
        return a.gpus_per_node
    if a.cpu:
        return 1
    try:
        import torch
        return max(1, torch.cuda.device_count())
    except Exception:  # noqa: BLE001
        return 1


def batch_arithmetic(sub: list[str], world: int) -> str:
    """'global batch = micro × accum × world' for a pretrain subcommand, checked against its config."""
    if not sub or sub[0] != "pretrain":
        return ""
    from medvlp.launch.config import load_config

    recipe = next((x for x in sub[1:] if not x.startswith("-") and "=" not in x), "debug")
    sets = [sub[i + 1] for i, x in enumerate(sub[:-1]) if x == "--set"]
    cfg = load_config(recipe, sets)
    micro, accum = cfg.data.batch_size, cfg.train.grad_accum
    return (f"global batch = micro {micro} x grad_accum {accum} x world {world} = {micro * accum * world} "
            f"samples/step (recipe {recipe})")


def _hostfile_nodes(path: str) -> list[tuple[str, int]]:
    hosts = []
    for i, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        slots = next((int(p.split("=", 1)[1]) for p in parts[1:] if p.startswith("slots=")), None)
        if slots is None:
            raise SystemExit(f"{path} line {i}: expected 'HOST slots=N', got {line!r}")
        hosts.append((parts[0], slots))
    if not hosts:
        raise SystemExit(f"{path}: no hosts")
    return hosts


def _module_cmd() -> list[str]:
    return ["-m", "medvlp.launch.cli"]


_SLURM_VALUES = {  # what each option may hold: #SBATCH lines are not shell-quoted, so they are validated instead
    "job_name": (re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"), "letters, digits, '.', '_', '-' (up to 128)"),
    "partition": (re.compile(r"[A-Za-z0-9._-]+(,[A-Za-z0-9._-]+)*"), "names of letters, digits, '.', '_', '-', "
                  "comma-separated"),
    "time": (re.compile(r"(\d+-)?\d+(:\d+){0,2}"), "minutes, MM:SS, HH:MM:SS or D-HH[:MM[:SS]]"),
}


def check_slurm_values(a) -> None:
    """--job-name / --partition / --time go into #SBATCH lines and file names: refuse anything but plain names."""
    for name, (pattern, allowed) in _SLURM_VALUES.items():
        value = getattr(a, name, None)
        if value is not None and not pattern.fullmatch(str(value)):
            raise SystemExit(f"medvlp launch: --{name.replace('_', '-')} {str(value)!r}: expected {allowed}")


def plan_launch(a) -> LaunchPlan:
    check_slurm_values(a)
    sub = _with_resume(_sub(a.rest))
    g, n = _gpus(a), a.nodes
    plan = LaunchPlan(env={**({} if a.cpu else NCCL_ENV), **({} if a.hostfile else TORCHRUN_ENV)})
    port = a.master_port or (_free_port() if a.cpu else 29500)
    restarts = ["--max-restarts", str(a.max_restarts)] if a.max_restarts else []
    if a.slurm:
        plan.script = sbatch_script(a, sub, g, port)
        plan.script_path = a.script or f"medvlp-{a.job_name}.sbatch"
        plan.commands = [["sbatch", plan.script_path]]
        world = g * n if not a.array else 1
    elif a.hostfile:
        hosts = _hostfile_nodes(a.hostfile)
        n = a.nodes if a.nodes > 1 else len(hosts)
        g = a.gpus_per_node or hosts[0][1]
        plan.env.update(MASTER_ADDR=hosts[0][0], MASTER_PORT=str(port))
        plan.commands = [["deepspeed", "--hostfile", a.hostfile, "--num_nodes", str(n), "--num_gpus", str(g),
                          "--master_addr", hosts[0][0], "--master_port", str(port), "--module", "medvlp.launch.cli", *sub]]
        world = g * n
    elif a.cpu or a.rdzv or n > 1:
        host, _, p = (a.rdzv or f"127.0.0.1:{port}").partition(":")
        endpoint = f"{host}:{p or port}"
        job = f"{a.job_name}-{uuid.uuid4().hex[:8]}" if a.cpu else a.job_name
        ranks = range(n) if a.cpu else [a.node_rank] if a.node_rank is not None else [None]
        for r in ranks:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(n), "--nproc_per_node", str(g),
                   "--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint, "--rdzv_id", job,
                   "--rdzv_conf", f"join_timeout={a.rdzv_timeout}", *restarts]
            if a.cpu and r is not None:
                cmd += ["--local_addr", "127.0.0.1"]
            cmd += [*_module_cmd(), *sub]
            plan.commands.append(cmd)
        plan.env.update(MASTER_ADDR=host, MASTER_PORT=str(p or port))
        plan.signal_workers = True
        if a.cpu:
            plan.env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
        world = g * n
    else:
        plan.commands = [[sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(g),
                          *restarts, *_module_cmd(), *sub]]
        plan.signal_workers = True
        world = g
    plan.batch_note = batch_arithmetic(sub, world)
    return plan


def sbatch_script(a, sub: list[str], g: int, port: int) -> str:
    lines = ["#!/bin/bash", f"#SBATCH --job-name={a.job_name}", f"#SBATCH --time={a.time}",
             f"#SBATCH --cpus-per-task={a.cpus_per_task}", "#SBATCH --output=%x-%j.out"]
    if a.partition:
        lines.append(f"#SBATCH --partition={a.partition}")
    if a.array:
        lines += [f"#SBATCH --array=0-{a.array - 1}", "#SBATCH --nodes=1", "#SBATCH --ntasks=1", "set -euo pipefail"]
        part = ["--part", f"$SLURM_ARRAY_TASK_ID/{a.array}"] if sub[:2] == ["shards", "build"] else []
        body = " ".join(shlex.quote(x) for x in sub) + (" " + " ".join(part) if part else "")
        lines.append(f"srun medvlp {body}")
        return "\n".join(lines) + "\n"
    lines += [f"#SBATCH --nodes={a.nodes}", "#SBATCH --ntasks-per-node=1", f"#SBATCH --gpus-per-node={g}",
              "set -euo pipefail",
              'export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
              f"export MASTER_PORT={port}"]
    lines += [f"export {k}={v}" for k, v in sorted({**NCCL_ENV, **TORCHRUN_ENV}.items())]
    restarts = f" --max-restarts {a.max_restarts}" if a.max_restarts else ""
    lines.append("srun --kill-on-bad-exit=1 python -m torch.distributed.run --nnodes \"$SLURM_NNODES\" "
                 f"--nproc_per_node {g} --rdzv_backend c10d --rdzv_endpoint \"$MASTER_ADDR:$MASTER_PORT\" "
                 f"--rdzv_id \"$SLURM_JOB_ID\"{restarts} -m medvlp.launch.cli " + " ".join(shlex.quote(x) for x in sub))
    return "\n".join(lines) + "\n"


def run_plan(plan: LaunchPlan, submit: bool = False, timeout: float | None = None, fail_grace: float = 60.0) -> int:
    """Run the plan's commands concurrently (one per simulated node); returns the first failure's exit code or 0.

    Fault handling: when one node's launcher exits non-zero, the others get `fail_grace` seconds to notice (their
    workers see the broken process group, torchrun tears them down) and are then terminated, so a dead rank never
    leaves the job hanging. A first SIGTERM/SIGINT to this process goes to the training workers of every torchrun
    launcher (they checkpoint and exit 0, so torchrun, which treats a signal to itself as a failure, exits 0 too);
    a second one goes to the launchers themselves, which then stop their workers at once. `timeout` bounds the
    whole job.
    """
    if plan.script is not None:
        Path(plan.script_path).write_text(plan.script)
        os.chmod(plan.script_path, 0o755)
        print(f"wrote {plan.script_path}")
        if not submit:
            print(f"submit with: sbatch {plan.script_path}")
            return 0
    env = {**os.environ, **plan.env}
    procs = [subprocess.Popen(c, env=env) for c in plan.commands]

    received = {"n": 0}

    def _forward(signum, frame):  # noqa: ARG001
        received["n"] += 1
        for p in procs:
            if p.poll() is None:
                workers = _children(p.pid) if plan.signal_workers and received["n"] == 1 else []
                for pid in workers or [p.pid]:
                    try:
                        os.kill(pid, signum)
                    except ProcessLookupError:
                        pass

    old = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            old[sig] = signal.signal(sig, _forward)
        except ValueError:  # not the main thread: the caller owns signal handling
            pass
    try:
        return _wait_all(procs, timeout, fail_grace)
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def _children(pid: int) -> list[int]:
    """Direct children of `pid` (Linux /proc; [] elsewhere, and the signal then goes to the launcher)."""
    kids = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return kids
    for name in entries:
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        kids.append(int(name))
            except (OSError, IndexError, ValueError):
                pass
    return kids


def _wait_all(procs: list[subprocess.Popen], timeout: float | None, fail_grace: float) -> int:
    """Poll the launchers; returns the first failure's exit code (not the SIGTERM we send the survivors), or 0."""
    start, failed_at, first_rc = time.monotonic(), None, 0
    while any(p.poll() is None for p in procs):
        now = time.monotonic()
        if failed_at is None and any(p.returncode not in (None, 0) for p in procs):
            failed_at, first_rc = now, _worst(procs)
            print(f"medvlp launch: a node exited with code {first_rc}; giving the others {fail_grace:g} s",
                  file=sys.stderr, flush=True)
        if (failed_at is not None and now - failed_at > fail_grace) or (timeout and now - start > timeout):
            why = "timeout" if failed_at is None else "failed node"
            print(f"medvlp launch: terminating the remaining nodes ({why})", file=sys.stderr, flush=True)
            _terminate(procs)
            return first_rc or max(1, _worst(procs))
        time.sleep(0.2)
    return first_rc or _worst(procs)  # after a forwarded SIGTERM the workers checkpoint and exit 0: a clean stop


def _worst(procs: list[subprocess.Popen]) -> int:
    return max((abs(p.returncode) for p in procs if p.returncode is not None), default=0)


def _terminate(procs: list[subprocess.Popen], wait_s: float = 30.0) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def launch_main(a) -> int:
    plan = plan_launch(a)
    print(plan.render(), flush=True)
    if a.dry_run:
        return 0
    return run_plan(plan, submit=a.submit, timeout=a.timeout or None, fail_grace=a.fail_grace)
