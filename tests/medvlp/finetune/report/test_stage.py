"""The report stage end to end on the synthetic slides: stage 1 and stage 2 through the fine-tune runner, generation
and the evaluation table with the template, retrieval, mean-feature regressor and oracle rows (a debug run on CPU)."""
from __future__ import annotations

import json

import pytest
import torch

from medvlp.data_shards.config import DataConfig
from medvlp.finetune.report import ReportConfig, ReportStage
from medvlp.finetune.report.config import ReportModelConfig, ReportRunnerConfig
from medvlp.finetune.runner import run_stage
from medvlp.pretrain.config import TrackingConfig

pytestmark = [pytest.mark.timeout(900), pytest.mark.slow]
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    from medvlp.data_shards.synth import synth_to_shards

    out = tmp_path_factory.mktemp("slides") / "slide"
    synth_to_shards(str(out), modality="slide", n=512, seed=0, shard_size=128)
    return out


def _cfg(slides, out, stage, steps, tracking=None, **runner) -> ReportConfig:
    kw = dict(stage=stage, out_dir=str(out), steps=steps, batch_size=16, lr=3e-3, warmup_steps=10, log_every=50,
              progress=False, seed=0)
    kw.update(runner)
    return ReportConfig(data=DataConfig(modality="slide", train_shards=str(slides), shuffle_buffer=64),
                        model=ReportModelConfig(train_lm=True),
                        tracking=tracking or TrackingConfig(enabled=False), finetune=ReportRunnerConfig(**kw))


def test_stage2_needs_a_stage1_run(slides, tmp_path):
    with pytest.raises(ValueError, match="finetune.init: stage 2 starts from a stage-1 run folder"):
        ReportStage().build(None, _cfg(slides, tmp_path, 2, 1))
    with pytest.raises(FileNotFoundError, match="run stage 1 first"):
        ReportStage().build(None, _cfg(slides, tmp_path, 2, 1, init=str(tmp_path)))


@pytest.fixture(scope="module")
def stage1(slides, tmp_path_factory):
    out = tmp_path_factory.mktemp("stage1")
    r1 = run_stage(ReportStage(), _cfg(slides, out, 1, 100))
    return out, r1


def test_two_stages_generate_and_score_against_every_row(slides, stage1, tmp_path, capsys):
    from medvlp.finetune.report.run import report_table

    s1, r1 = stage1
    assert r1.metrics["acc"] >= 0.9  # MIL classification through the resampler
    assert not any(n.startswith("lm.") for n in r1.trainable)

    cfg2 = _cfg(slides, tmp_path / "s2", 2, 500, init=str(s1), lr=5e-3, warmup_steps=20)
    r2 = run_stage(ReportStage(), cfg2)
    assert not any(n.startswith(("resampler.", "head.")) for n in r2.trainable)  # frozen in stage 2
    assert any(".xattn." in n for n in r2.trainable)
    assert r2.losses[-1][1] < 0.5 * r2.losses[0][1]
    m = r2.metrics
    assert m["bleu4"] > 20 and m["diag_acc"] >= 0.9, m  # the LM learned the reports' language and names the diagnosis
    assert m["oracle/position"] == 1.0 and m["oracle/rare"] == 1.0, m  # the ceiling rung: facts round-trip
    assert m["mean-feature regressor/comp_acc"] > 0.9, m  # the shortcut row sees the composition
    assert (tmp_path / "s2" / "eval" / "table.md").is_file()

    # the table as its own MLflow run, with the example generations as an artifact
    from medvlp.finetune.report.run import load_report_run

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    cfg2.tracking = TrackingConfig(enabled=True, uri=uri, experiment="report-test")
    model, tok = load_report_run(tmp_path / "s2", cfg2)
    res, run_id = report_table(model, tok, cfg2, None, tmp_path / "eval")
    assert res.rows["model"]["bleu4"] == pytest.approx(m["bleu4"])  # the saved weights generate the same reports
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    arts = [a.path for a in client.list_artifacts(run_id, "report_eval")]
    assert "report_eval/generations.jsonl" in arts and "report_eval/table.md" in arts
    assert client.get_run(run_id).data.metrics["template/bleu4"] == pytest.approx(res.rows["template"]["bleu4"])

    # medvlp generate: one JSON line per slide, every strategy stops at EOS with a parsable diagnosis
    from medvlp.launch.cli import main

    out = tmp_path / "reports.jsonl"
    assert main(["generate", "--checkpoint", str(tmp_path / "s2"), "--shards", str(slides), "--out", str(out),
                 "--strategy", "beam", "--max-samples", "6"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 6 and all("Final diagnosis:" in r["report"] for r in rows)
    # bad input: one line, exit code 2
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(s1), "--shards", str(slides), "--out", str(out)]) == 2
    assert "a stage-1 run (its LM is untrained)" in capsys.readouterr().err
    assert main(["generate", "--checkpoint", str(tmp_path / "s2"), "--shards", str(slides), "--out", str(out),
                 "--split", "nosuch"]) == 2
    assert "split 'nosuch' has no samples" in capsys.readouterr().err


def test_stage2_under_deepspeed_with_gradient_checkpointing(slides, stage1, tmp_path):
    """The runner's DeepSpeed plugin (ZeRO-2) trains the XATTN blocks with the LM layers checkpointed."""
    from safetensors.torch import load_file

    cfg = _cfg(slides, tmp_path / "ds", 2, 3, init=str(stage1[0]), batch_size=4, deepspeed="zero2", final_eval=False)
    cfg.model.grad_checkpointing = True
    res = run_stage(ReportStage(), cfg)
    assert res.steps_done == 3 and all(v == v for _, v in res.losses)
    before, after = load_file(str(stage1[0] / "model.safetensors")), load_file(res.weights)
    changed = [k for k in after if ".xattn." in k and not torch.equal(after[k], before[k])]
    assert changed and all(torch.equal(after[k], before[k]) for k in after if k.startswith("resampler."))
