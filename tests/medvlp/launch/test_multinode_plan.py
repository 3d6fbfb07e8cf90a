"""`medvlp launch --dry-run`: the exact commands for each launcher, the batch arithmetic, SLURM scripts."""
import argparse
import sys

import pytest

from medvlp.launch.multinode import add_launch_arguments, plan_launch


def _args(*argv):
    p = argparse.ArgumentParser()
    add_launch_arguments(p)
    return p.parse_args(list(argv))


def test_single_node_torchrun_standalone():
    plan = plan_launch(_args("--gpus-per-node", "8", "--", "pretrain", "rn50-cxr"))
    (cmd,) = plan.commands
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert "--standalone" in cmd and cmd[cmd.index("--nproc_per_node") + 1] == "8"
    assert cmd[-4:] == ["medvlp.launch.cli", "pretrain", "rn50-cxr", "--resume"]
    assert "global batch = micro 256 x grad_accum 1 x world 8 = 2048" in plan.batch_note


def test_rdzv_multinode_command_and_env():
    plan = plan_launch(_args("--nodes", "2", "--gpus-per-node", "8", "--rdzv", "node0:29400", "--max-restarts", "3",
                             "--", "pretrain", "rn50-cxr", "--set", "train.grad_accum=2"))
    (cmd,) = plan.commands
    val = lambda flag: cmd[cmd.index(flag) + 1]  # noqa: E731
    assert val("--nnodes") == "2" and val("--nproc_per_node") == "8" and val("--rdzv_backend") == "c10d"
    assert val("--rdzv_endpoint") == "node0:29400" and val("--max-restarts") == "3"
    assert plan.env["MASTER_ADDR"] == "node0" and plan.env["MASTER_PORT"] == "29400"
    assert plan.env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
    assert "micro 256 x grad_accum 2 x world 16 = 8192" in plan.batch_note


def test_hostfile_uses_deepspeed_launcher(tmp_path):
    hf = tmp_path / "hosts"
    hf.write_text("node-a slots=8\nnode-b slots=8  # second\n")
    plan = plan_launch(_args("--hostfile", str(hf), "--", "pretrain", "rn50-cxr"))
    (cmd,) = plan.commands
    assert cmd[0] == "deepspeed" and cmd[cmd.index("--num_nodes") + 1] == "2"
    assert cmd[cmd.index("--num_gpus") + 1] == "8" and cmd[cmd.index("--master_addr") + 1] == "node-a"
    assert cmd[cmd.index("--module") + 1] == "medvlp.launch.cli"
    assert "world 16 = 4096" in plan.batch_note
    bad = tmp_path / "bad"
    bad.write_text("node-a\n")
    with pytest.raises(SystemExit, match="line 1"):
        plan_launch(_args("--hostfile", str(bad), "--", "pretrain", "debug"))


def test_slurm_script_one_task_per_node():
    plan = plan_launch(_args("--slurm", "--nodes", "2", "--gpus-per-node", "8", "--partition", "gpu",
                             "--", "pretrain", "rn50-cxr"))
    s = plan.script
    assert "#SBATCH --nodes=2" in s and "#SBATCH --ntasks-per-node=1" in s and "#SBATCH --gpus-per-node=8" in s
    assert "#SBATCH --partition=gpu" in s and "scontrol show hostnames" in s
    assert "srun --kill-on-bad-exit=1 python -m torch.distributed.run" in s and "--rdzv_id \"$SLURM_JOB_ID\"" in s
    assert s.rstrip().endswith("-m medvlp.launch.cli pretrain rn50-cxr --resume")
    assert plan.commands == [["sbatch", plan.script_path]]


def test_slurm_array_for_shard_building():
    plan = plan_launch(_args("--slurm", "--array", "3", "--", "shards", "build", "--manifest", "m.csv",
                             "--out", "shards"))
    assert "#SBATCH --array=0-2" in plan.script
    assert "srun medvlp shards build --manifest m.csv --out shards --part $SLURM_ARRAY_TASK_ID/3" in plan.script
    assert plan.batch_note == ""


def test_cpu_simulation_one_torchrun_per_node():
    plan = plan_launch(_args("--cpu", "--nodes", "2", "--gpus-per-node", "1", "--", "pretrain", "debug"))
    assert len(plan.commands) == 2
    for cmd in plan.commands:
        assert cmd[cmd.index("--rdzv_endpoint") + 1].startswith("127.0.0.1:")
        assert cmd[cmd.index("--nnodes") + 1] == "2"
    assert plan.env["CUDA_VISIBLE_DEVICES"] == "" and "world 2" in plan.batch_note


def test_missing_subcommand():
    with pytest.raises(SystemExit, match="give the subcommand"):
        plan_launch(_args("--nodes", "1"))


def test_torchrun_plans_use_a_fresh_store_per_restart_round():
    """Without it a `--max-restarts` restart reads the dead workers' addresses from the shared store."""
    for argv in (("--cpu", "--nodes", "2"), ("--nodes", "2", "--rdzv", "node0:29400"), ("--gpus-per-node", "2")):
        plan = plan_launch(_args(*argv, "--", "pretrain", "debug"))
        assert plan.env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1", argv
    script = plan_launch(_args("--slurm", "--nodes", "2", "--", "pretrain", "debug")).script
    assert "export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in script


def _plan(*codes):
    from medvlp.launch.multinode import LaunchPlan
    return LaunchPlan(commands=[[sys.executable, "-c", c] for c in codes])


def test_run_plan_terminates_survivors_after_a_failed_node():
    import time

    from medvlp.launch.multinode import run_plan

    t0 = time.monotonic()
    rc = run_plan(_plan("import sys; sys.exit(3)", "import time; time.sleep(60)"), fail_grace=1.0)
    assert rc == 3 and time.monotonic() - t0 < 20


def test_run_plan_timeout_and_success():
    import time

    from medvlp.launch.multinode import run_plan

    assert run_plan(_plan("pass", "pass")) == 0
    t0 = time.monotonic()
    assert run_plan(_plan("import time; time.sleep(60)"), timeout=1.0) != 0
    assert time.monotonic() - t0 < 20
