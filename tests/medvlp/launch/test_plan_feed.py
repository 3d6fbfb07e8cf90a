"""`medvlp plan` sizes the data workers per GPU from a per-worker stream rate."""
from __future__ import annotations

import json
import math

import pytest

from medvlp.launch.cli import main
from medvlp.launch.plan import WORKER_RATES, feed_workers, make_plan

pytestmark = pytest.mark.timeout(60)


def test_feed_workers_follow_the_gpu_rate_and_the_margin():
    plan = make_plan("debug", 8, 512, zero=1)
    gpu_rate = (512 // 8) / plan.compute_s
    rate, workers = feed_workers(plan, 1000.0, 1.5)
    assert rate == pytest.approx(gpu_rate)
    assert workers == math.ceil(1.5 * gpu_rate / 1000.0)
    assert feed_workers(plan, 1000.0, 3.0)[1] >= workers


def test_cli_prints_the_workers_and_refuses_a_bad_rate(capsys):
    assert main(["plan", "--model", "debug", "--gpus", "8", "--global-batch", "512", "--worker-rate", "500"]) == 0
    out = capsys.readouterr().out
    assert "DataLoader workers per GPU at 500 samples/s per worker (--worker-rate)" in out
    assert main(["plan", "--model", "debug", "--gpus", "8", "--global-batch", "512", "--worker-rate", "500",
                 "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["feed"]["worker_rate"] == 500 and doc["feed"]["workers_per_gpu"] >= 1
    assert main(["plan", "--model", "debug", "--gpus", "8", "--global-batch", "512", "--worker-rate", "0"]) == 2
    assert "must be > 0" in capsys.readouterr().out


def test_measured_rates_are_recorded_for_the_gpu_recipes_models():
    assert set(WORKER_RATES) == {"RN50", "ViT-B-16"}
    assert all(rate > 0 for rate, _ in WORKER_RATES.values())
