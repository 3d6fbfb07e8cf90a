"""`medvlp plan`: the memory model against a real CPU step, the ZeRO arithmetic, bad sizes."""
import pytest

from medvlp.launch.cli import main
from medvlp.launch.plan import make_plan, measure_step_bytes

GiB = 1024 ** 3


@pytest.mark.parametrize("batch", [8, 32])
def test_planned_peak_is_within_20_percent_of_a_real_cpu_step(batch):
    measured = measure_step_bytes("debug", batch)["peak"]
    planned = make_plan("debug", 1, batch, zero=0, precision="fp32", gpus_per_node=1).total(False, "torch")
    assert abs(planned / measured - 1) <= 0.20, (planned, measured)


def test_zero_stages_partition_the_model_states():
    p = {z: make_plan("debug", 8, 64, zero=z) for z in range(4)}
    n = p[0].model.params
    assert (p[0].weights, p[0].grads, p[0].optimizer) == (2 * n, 2 * n, 12 * n)  # bf16 mixed precision
    assert p[1].optimizer == 12 * n / 8 and p[1].grads == 2 * n
    assert p[2].grads == 2 * n / 8 and p[2].weights == 2 * n
    assert p[3].weights == 2 * n / 8
    assert p[3].comm_model_bytes == pytest.approx(1.5 * p[2].comm_model_bytes)  # 3 passes of weights vs 2 of grads
    one = make_plan("debug", 1, 8, zero=0)
    assert one.comm_s == 0 and one.comm_model_bytes == 0


def test_the_loss_backends_differ_as_designed():
    p = make_plan("debug", 64, 65536, zero=1)
    extra = p.loss_extra
    assert extra["triton"] < extra["chunked"] < extra["torch"]
    assert extra["torch"] - extra["triton"] >= 4 * 1024 * 65536 * 4 - 4 * 65536 * 4  # the 4 n×N fp32 matrices


def test_accumulation_and_checkpointing_shrink_activations():
    full = make_plan("debug", 2, 64, zero=1)
    micro = make_plan("debug", 2, 64, zero=1, micro_batch=8)
    assert micro.grad_accum == 4 and micro.activations == pytest.approx(full.activations / 4)
    assert full.activations_ckpt < full.activations


@pytest.mark.parametrize("args, msg", [
    (dict(gpus=3, global_batch=64), "not a multiple"),
    (dict(gpus=2, global_batch=64, micro_batch=5), "does not divide"),
    (dict(gpus=2, global_batch=64, zero=4), "zero"),
])
def test_bad_sizes_fail_clearly(args, msg):
    with pytest.raises(ValueError, match=msg):
        make_plan("debug", **args)


def test_cli_prints_a_plan_and_refuses_bad_input(capsys):
    assert main(["plan", "--model", "debug", "--gpus", "16", "--global-batch", "4096", "--zero", "3"]) == 0
    out = capsys.readouterr().out
    assert "ZeRO-3" in out and "optimizer state" in out and "2 nodes" in out
    assert main(["plan", "--model", "debug", "--gpus", "3", "--global-batch", "64"]) == 2
    assert "not a multiple" in capsys.readouterr().out


def test_the_embedding_cache_keeps_the_whole_batch_in_the_loss():
    plain = make_plan("debug", 4, 1024, zero=1)
    cached = make_plan("debug", 4, 1024, zero=1, cache_chunk=16)
    assert cached.activations == pytest.approx(plain.activations / 16)
    assert cached.loss_extra["torch"] > plain.loss_extra["torch"]  # same N keys, plus the cached embeddings
    assert cached.compute_s == pytest.approx(plain.compute_s * 4 / 3)
    with pytest.raises(ValueError, match="does not divide"):
        make_plan("debug", 4, 1024, zero=1, cache_chunk=7)
