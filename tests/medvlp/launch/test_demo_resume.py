"""An interrupted demo says so in results.md with the step it reached, and the rerun continues from its
checkpoint (same MLflow run) instead of starting over."""
import json

import pytest

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]


def _extra(tmp_path, *more):
    return ["data.batch_size=8", "data.shuffle_buffer=16", "optim.warmup_steps=1", "eval.kshot=[]",
            "eval.linear_probe=false", "eval.bootstrap=10", "tracking.log_model=false", "tracking.system_metrics=false",
            f"tracking.uri=sqlite:///{tmp_path}/demo.db", *more]


def test_interrupted_demo_reports_the_step_and_the_rerun_continues(tmp_path, monkeypatch):
    from medvlp.launch.demo import run_demo

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "demo_out"
    first = run_demo(str(out), n=64, steps=4, extra=_extra(tmp_path, "train.stop_after=2"))
    text = (out / "results.md").read_text()
    assert first["interrupted"] and first["steps_done"] == 2
    assert "**Interrupted** (train.stop_after) at step 2 of 4" in text and "continue from that checkpoint" in text
    assert "| finding" not in text and not (out / "runs" / "debug" / "model.safetensors").exists()
    kept = out / "runs" / "debug" / "checkpoints" / "step_00000002" / "COMPLETE"
    stamp = kept.stat().st_mtime_ns

    second = run_demo(str(out), n=64, steps=4, extra=_extra(tmp_path))
    text = (out / "results.md").read_text()
    assert not second["interrupted"] and second["resumed_from"] == 2 and second["steps_done"] == 4
    assert "over 4 steps (continued from step 2)" in text and "Interrupted" not in text
    assert kept.stat().st_mtime_ns == stamp  # the first session's checkpoint was continued, not replaced
    assert second["run_id"] == first["run_id"]  # the same MLflow run goes on
    log = [json.loads(x)["step"] for x in (out / "runs" / "debug" / "train_log.jsonl").read_text().splitlines()]
    assert log == [1, 2, 3, 4]  # steps 1-2 were not trained again

