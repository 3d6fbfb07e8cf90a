"""Entry points behind the CLI: load a trained report run, write generated reports, make the evaluation table.

    model, tok = load_report_run("runs/report/stage2", cfg)        # cfg: the run's ReportConfig (config.yaml)
    rows = write_generations(model, tok, cfg, "slides/", "reports.jsonl", split="test")
    res = report_table(model, tok, cfg, shards="slides/", out_dir="runs/report/stage2/eval")   # + an MLflow run
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from medvlp.finetune.report.config import ReportConfig
from medvlp.finetune.report.data import load_split
from medvlp.finetune.report.evaluate import ReportEval, evaluate_reports, generate_texts, slide_embeddings, write_eval
from medvlp.finetune.report.model import ReportModel, ReportTokenizer, build_report_model
from medvlp.finetune.report.stage import TOKENIZER_DIR, WEIGHTS


def run_paths(path: str | Path) -> tuple[Path, Path]:
    """(run folder, weights file) of a report run folder or its model.safetensors."""
    p = Path(path)
    weights = p if p.is_file() else p / WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"--checkpoint {path}: no {WEIGHTS} (a finished `medvlp finetune report` run folder)")
    return weights.parent, weights


def load_report_run(path: str | Path, cfg: ReportConfig) -> tuple[ReportModel, ReportTokenizer]:
    """The trained model (eval mode, CPU) and tokenizer of a run; bag width and class count come from the weights."""
    from safetensors.torch import load_file

    run, weights = run_paths(path)
    tok_dir = Path(cfg.model.tokenizer) if cfg.model.tokenizer else run / TOKENIZER_DIR
    tok = ReportTokenizer(tok_dir)
    state = load_file(str(weights))
    if "resampler.proj_in.weight" not in state or "head.weight" not in state:
        raise ValueError(f"{weights}: not the weights of a report model (no resampler / head)")
    feat_dim, n_classes = state["resampler.proj_in.weight"].shape[1], state["head.weight"].shape[0]
    mc = cfg.model
    pos = state.get("resampler.pos.weight")
    pos_freqs = pos.shape[1] // 4 if pos is not None else 0  # runs saved before positions existed: none
    if pos_freqs != mc.pos_freqs:
        import dataclasses

        mc = dataclasses.replace(mc, pos_freqs=pos_freqs)
    model = build_report_model(mc, int(feat_dim), int(n_classes), tok)
    model.load_state_dict(state, strict=True)
    return model.eval(), tok


@torch.no_grad()
def write_generations(model: ReportModel, tok: ReportTokenizer, cfg: ReportConfig, shards: str, out: str | Path,
                      split: str = "test", max_samples: int = 0, class_names: list[str] | None = None) -> list[dict]:
    """One JSON line per slide of `split`: key, report, predicted_class (stage-1 head), reference (stored text)."""
    sp = load_split(cfg.data, split, max_samples, shards=shards, ground_truth=False)
    if not len(sp):
        raise ValueError(f"--shards {shards}: no slides in split {split!r}")
    texts = generate_texts(model, tok, cfg.gen, sp.feats, cfg.model.prompt, sp.coords)
    _, pred = slide_embeddings(model, sp, cfg.gen.batch_size)
    names = class_names or sp.classes
    rows = [{"key": k, "report": t, "predicted_class": names[int(p)] if int(p) < len(names) else int(p),
             "reference": r} for k, t, p, r in zip(sp.keys, texts, pred, sp.texts)]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return rows


def report_table(model: ReportModel, tok: ReportTokenizer, cfg: ReportConfig, shards: str | None, out_dir: str | Path,
                 split: str | None = None, config_flat: dict | None = None) -> tuple[ReportEval, str | None]:
    """The evaluation table (model, template, retrieval) written to out_dir and logged as an MLflow run (metrics,
    the table and the example generations as artifacts). Returns (result, MLflow run id or None)."""
    res = evaluate_reports(model, tok, cfg, shards=shards, split=split)
    paths = write_eval(res, out_dir)
    run_id = None
    if cfg.tracking.enabled:
        from medvlp.pretrain.tracking import Tracker

        tracker = Tracker(cfg.tracking, 0, config_flat or {})
        tracker.start()
        try:
            tracker.set_tags({"medvlp.stage": "report-eval", "eval.split": res.split})
            tracker.log_metrics({f"{m}/{k}": v for m, row in res.rows.items() for k, v in row.items()}, step=0)
            for p in paths.values():
                tracker.log_artifact(p, "report_eval")
            run_id = tracker.run_id
        finally:
            tracker.end("FINISHED")
    return res, run_id
