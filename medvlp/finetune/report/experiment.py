"""The report table over seeds: the generator (stage 1 + stage 2, greedy / beam / nucleus) against the mean-feature
regressor, its attention-MIL twin, retrieval, template and the oracle, on the facts that need positions or rare
patches. Every "±" is the sample sd over seeds and every difference a paired bootstrap over seeds x test slides
(`medvlp.finetune.sweep`).

    python -m medvlp.finetune.report.experiment --shards out/shards/slide --out runs/report-table \
        --seeds 0 1 2 [--variants frozen tuned] [--stage1-steps 150 --stage2-steps 600] \
        [--strategies greedy beam nucleus --num-beams 4 --length-penalty 1.0 --no-repeat-ngram auto]

Beam decoding is `transformers`' `generate` (`num_beams`, `length_penalty`, `no_repeat_ngram_size`,
`repetition_penalty`, `early_stopping=True`); `--no-repeat-ngram auto` = the smallest n-gram size that no training
report repeats (`decode.auto_no_repeat_ngram`), so the rule never forbids a report the corpus writes.
Variants of the generator: `frozen` = HistoGPT (stage 2 trains the XATTN blocks + LM, the stage-1 resampler is
frozen); `tuned` = stage 2 also trains the resampler (`finetune.train_resampler`). Hyper-parameters are the
recipe's; the baselines' alpha / C / steps are picked on the validation split; the test split is scored once.
Writes OUT/table.{md,csv} (methods), OUT/facts.{md,csv} (accuracy per fact), OUT/diffs.{md,csv} (model minus
each baseline), OUT/results.json (every seed's numbers) and OUT/examples.md.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from medvlp.data_shards.config import DataConfig
from medvlp.finetune.report.baselines import (AttentionMIL, MeanFeatureRegressor, diagnosis_phrases, oracle_reports,
                                              reports_of, truth_facts)
from medvlp.finetune.report.config import GenerateConfig, ReportConfig, ReportModelConfig, ReportRunnerConfig
from medvlp.finetune.report.data import load_split
from medvlp.finetune.report.decode import auto_no_repeat_ngram
from medvlp.finetune.report.evaluate import generate_texts, slide_embeddings
from medvlp.finetune.report.metrics import (FACT_COLUMNS, fact_correct, fact_summary, group_metric, retrieval_reports,
                                            score, template_reports)
from medvlp.pretrain.config import TrackingConfig

log = logging.getLogger("medvlp.finetune.report.experiment")
GROUPS = ("position", "rare", "all")


def _cfg(a, seed: int, stage: int, out: Path, **runner) -> ReportConfig:
    kw = dict(stage=stage, out_dir=str(out), steps=a.stage1_steps if stage == 1 else a.stage2_steps,
              batch_size=16, lr=3e-3 if stage == 1 else a.lr2, warmup_steps=10 if stage == 1 else 20,
              log_every=100, progress=False, seed=seed, final_eval=False)
    kw.update(runner)
    return ReportConfig(data=DataConfig(modality="slide", train_shards=str(a.shards), shuffle_buffer=64),
                        model=ReportModelConfig(train_lm=True, pos_freqs=a.pos_freqs),
                        tracking=TrackingConfig(enabled=False), finetune=ReportRunnerConfig(**kw))


def _score(texts, test, truth) -> tuple[dict, np.ndarray]:
    row = score(texts, test.texts, test.classes, test.class_index.tolist(), test.tissues, test.composition)
    C = fact_correct(texts, truth, test.classes, test.tissues)
    row.update(fact_summary(C))
    row["all"] = group_metric("all")(np.isfinite(C).astype(float), np.nan_to_num(C))
    return row, C


def run(a) -> dict:
    from medvlp.finetune.report import ReportStage
    from medvlp.finetune.report.run import load_report_run
    from medvlp.finetune.runner import run_stage

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    dc = DataConfig(modality="slide", train_shards=str(a.shards))
    train, val, test = (load_split(dc, s) for s in ("train", "val", a.split))
    truth = truth_facts(test)
    phrases = diagnosis_phrases(train.texts, train.class_index, train.classes)
    per: dict[str, list[dict]] = {}  # method -> one row per seed
    mats: dict[str, list[np.ndarray]] = {}  # method -> (N, F) per seed
    texts_of: dict[str, list[str]] = {}  # method -> the first seed's reports (examples)
    times: dict[str, float] = {}

    seed_scores: dict[str, dict] = {}

    def add(name, texts):
        row, C = _score(texts, test, truth)
        per.setdefault(name, []).append(row)
        mats.setdefault(name, []).append(C)
        texts_of.setdefault(name, texts)
        seed_scores[name] = {"row": row, "C": np.where(np.isnan(C), -1.0, C).tolist(), "texts": texts}

    t0 = time.process_time()
    reg = MeanFeatureRegressor().fit(train, val)
    reg_texts = reports_of(reg.predict(test), phrases)
    times["regressor"] = time.process_time() - t0
    orc = oracle_reports(test, phrases)
    for seed in a.seeds:
        root = out / f"seed{seed}"
        t0 = time.process_time()
        s1 = root / "stage1"
        root.mkdir(parents=True, exist_ok=True)
        if not a.mil_only and not (a.reuse_stage1 and (s1 / "model.safetensors").is_file()):
            run_stage(ReportStage(), _cfg(a, seed, 1, s1))
        times.setdefault("stage1", 0.0)
        times["stage1"] += time.process_time() - t0
        for variant in ([] if a.mil_only else a.variants):
            t0 = time.process_time()
            cfg2 = _cfg(a, seed, 2, root / f"stage2-{variant}", init=str(s1), train_resampler=variant == "tuned")
            if not (a.reuse_stage2 and (root / f"stage2-{variant}" / "model.safetensors").is_file()):
                run_stage(ReportStage(), cfg2)
            times[f"stage2-{variant}"] = times.get(f"stage2-{variant}", 0.0) + time.process_time() - t0
            model, tok = load_report_run(root / f"stage2-{variant}", cfg2)
            torch.set_grad_enabled(False)
            for strat in (a.strategies_tuned or a.strategies) if variant == "tuned" else a.strategies:
                gen = replace(GenerateConfig(), strategy=strat, seed=seed)
                if strat == "beam":
                    gen = replace(gen, num_beams=a.num_beams, length_penalty=a.length_penalty,
                                  no_repeat_ngram=_no_repeat(a, tok, train.texts),
                                  repetition_penalty=a.repetition_penalty)
                add(f"model {variant}, {strat}", generate_texts(model, tok, gen, test.feats, cfg2.model.prompt,
                                                                test.coords))
            if variant == a.variants[0]:  # retrieval / template read the stage-1 resampler and head
                tr_emb, _ = slide_embeddings(model, train, 32)
                te_emb, te_pred = slide_embeddings(model, test, 32)
                add("retrieval", retrieval_reports(te_emb, tr_emb, train.texts))
                tmpl = template_reports(train.texts, train.class_index.tolist(), len(test.classes))
                add("template", [tmpl[c] for c in te_pred])
            torch.set_grad_enabled(True)
            _save_seed(root, seed_scores, times)  # partial results survive a stop
        if a.skip_mil:
            add("mean-feature regressor", reg_texts)
            add("oracle", orc)
            _save_seed(root, seed_scores, times)
            seed_scores = {}
            continue
        t0 = time.process_time()
        mil = AttentionMIL(train.feats[0].shape[1], seed=seed, pos_freqs=a.pos_freqs, steps=a.mil_steps).fit(train, val)
        add("attention-MIL twin", reports_of(mil.predict(test), phrases))
        times["mil"] = times.get("mil", 0.0) + time.process_time() - t0
        add("mean-feature regressor", reg_texts)
        add("oracle", orc)
        _save_seed(root, seed_scores, times)
        seed_scores = {}
        _write(a, out, per, mats, texts_of, test, times)  # after every seed: nothing lost if stopped
    return per


def _no_repeat(a, tok, texts: list[str]) -> int:
    if a.no_repeat_ngram != "auto":
        return int(a.no_repeat_ngram)
    if not hasattr(a, "_auto_ngram"):
        a._auto_ngram = auto_no_repeat_ngram(tok, texts)
        log.info("beam: no-repeat n-gram size %d (the smallest no training report repeats)", a._auto_ngram)
    return a._auto_ngram


def _save_seed(root: Path, seed_scores: dict, times: dict) -> None:
    tmp = root / "scores.json.tmp"
    tmp.write_text(json.dumps({"methods": seed_scores, "cpu_seconds": times}, default=float))
    tmp.replace(root / "scores.json")


def merge(a) -> None:
    """Tables from the per-seed folders that separate processes wrote (`--seeds S --out OUT` each, then
    `--merge --seeds 0 1 2 --out OUT`)."""
    out = Path(a.out)
    dc = DataConfig(modality="slide", train_shards=str(a.shards))
    test = load_split(dc, a.split)
    per, mats, texts_of, times = {}, {}, {}, {}
    extra = [Path(x) for x in a.extra_seed_dirs]
    fixed: dict[str, list[str]] = {}  # the deterministic rows, computed here for a seed stopped before them
    for d in [out / f"seed{s}" for s in a.seeds] + extra:
        doc = {"methods": {}, "cpu_seconds": {}}
        for root in ([d] if d in extra else [Path(x) / d.name for x in [out, *a.also]]):  # the same seed, other runs
            if (root / "scores.json").is_file():
                part = json.loads((root / "scores.json").read_text())
                for name, m in part["methods"].items():
                    doc["methods"].setdefault(name, m)
                for k, v in part["cpu_seconds"].items():
                    doc["cpu_seconds"][k] = doc["cpu_seconds"].get(k, 0.0) + v
        if d not in extra and not {"mean-feature regressor", "oracle"} <= set(doc["methods"]):
            if not fixed:
                train, val = load_split(dc, "train"), load_split(dc, "val")
                phrases = diagnosis_phrases(train.texts, train.class_index, train.classes)
                fixed = {"mean-feature regressor": reports_of(MeanFeatureRegressor().fit(train, val).predict(test),
                                                              phrases),
                         "oracle": oracle_reports(test, phrases)}
            truth = truth_facts(test)
            for name, texts in fixed.items():
                row, C = _score(texts, test, truth)
                doc["methods"][name] = {"row": row, "C": np.where(np.isnan(C), -1.0, C).tolist(), "texts": texts}
        for name, m in doc["methods"].items():
            if d in extra and not name.startswith("model "):  # further variants only; baselines come once per seed
                continue
            per.setdefault(name, []).append(m["row"])
            C = np.asarray(m["C"], dtype=np.float64)
            mats.setdefault(name, []).append(np.where(C < 0, np.nan, C))
            texts_of.setdefault(name, m["texts"])
        for k, v in doc["cpu_seconds"].items():
            times[k] = times.get(k, 0.0) + v
    _write(a, out, per, mats, texts_of, test, times)


def _write(a, out: Path, per, mats, texts_of, test, times) -> None:
    from medvlp.finetune.sweep import paired_bootstrap_diff, pm, seed_summary, write_table

    cols = [("bleu4", "BLEU-4", 1), ("rougeL", "ROUGE-L", 1), ("diag_acc", "diagnosis acc", 3),
            ("comp_acc", "composition acc", 3), ("clinical", "clinical (old)", 3), ("position", "position facts", 3),
            ("rare", "rare-patch facts", 3), ("all", "all facts", 3)]
    n_seeds = max(len(v) for v in per.values())
    rows = []
    for name, rs in per.items():
        row = {"method": name, "seeds": len(rs)}
        for k, label, dg in cols:
            row[label] = pm(seed_summary([r[k] for r in rs]), dg)
        rows.append(row)
    write_table(rows, out / "table",
                title=f"Split `{a.split}`, {len(test)} slides, {n_seeds} seeds (mean ± sd over seeds)")
    frows = []
    for name, rs in per.items():
        row = {"method": name}
        for k in FACT_COLUMNS:
            row[k] = pm(seed_summary([r[f"fact_{k}"] for r in rs]), 3)
        frows.append(row)
    write_table(frows, out / "facts", title="Accuracy per fact (mean ± sd over seeds)")
    # paired bootstrap: every model row minus each baseline, on the position / rare / all facts
    base = [b for b in ("mean-feature regressor", "attention-MIL twin", "retrieval", "template", "oracle") if b in mats]
    drows = []
    models = [m for m in mats if m.startswith("model ")]
    for m in models:
        S = len(mats[m])
        A = np.stack(mats[m])
        variant, strat = m[len("model "):].rsplit(", ", 1)
        greedy = f"model {variant}, greedy"  # a decoding against greedy on the same trained models
        frozen = f"model frozen, {strat}"  # a variant against the frozen resampler, same decoding
        for b in base + [x for x in (greedy, frozen) if x != m and x in mats]:
            B = np.stack(mats[b][:S])
            if B.shape != A.shape:
                continue
            y = np.isfinite(A[0]).astype(float)
            for g in GROUPS:
                d = paired_bootstrap_diff(group_metric(g), y, np.nan_to_num(A), np.nan_to_num(B), n_boot=a.n_boot)
                drows.append({"model": m, "minus": b, "facts": g, "diff": d["diff"], "ci_lo": d["ci_lo"],
                              "ci_hi": d["ci_hi"], "p_le_0": d["p_le_0"], "seeds": d["n_seeds"],
                              "slides": d["n_items"]})
    if drows:
        write_table(drows, out / "diffs", title="Model minus baseline: mean fact accuracy, paired bootstrap 95% CI "
                                                "over seeds x test slides")
    (out / "results.json").write_text(json.dumps({"per_seed": per, "cpu_seconds": times, "args": {
        k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()}}, indent=1, default=float))
    ex = []
    for i in range(min(6, len(test))):
        ex.append(f"**{test.keys[i]}**\n\n- reference: {test.texts[i]}\n" +
                  "\n".join(f"- {m}: {t[i]}" for m, t in texts_of.items()))
    (out / "examples.md").write_text("\n\n".join(ex) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m medvlp.finetune.report.experiment", description=__doc__.split("\n")[0])
    p.add_argument("--shards", required=True, help="slide-bag shard dir (train / val / test splits)")
    p.add_argument("--out", required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--variants", nargs="+", default=["frozen", "tuned"], choices=["frozen", "tuned"])
    p.add_argument("--strategies", nargs="+", default=["greedy", "beam", "nucleus"],
                   choices=["greedy", "beam", "nucleus"])
    p.add_argument("--stage1-steps", type=int, default=150)
    p.add_argument("--stage2-steps", type=int, default=600)
    p.add_argument("--lr2", type=float, default=5e-3)
    p.add_argument("--pos-freqs", type=int, default=4)
    p.add_argument("--mil-steps", type=int, default=600)
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--split", default="test")
    p.add_argument("--strategies-tuned", nargs="+", default=None, choices=["greedy", "beam", "nucleus"],
                   help="decodings of the `tuned` variant (default: --strategies)")
    p.add_argument("--num-beams", type=int, default=4, help="beams of `beam`")
    p.add_argument("--length-penalty", type=float, default=1.0, help="beam: rank by log-prob sum / tokens ** this")
    p.add_argument("--no-repeat-ngram", default="auto",
                   help="beam: n-gram size never repeated (0 = off; auto = the smallest no training report repeats)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="beam: CTRL penalty (1 = off)")
    p.add_argument("--merge", action="store_true", help="only build the tables from OUT/seed*/scores.json")
    p.add_argument("--extra-seed-dirs", nargs="*", default=[], help="--merge: further seed folders (other variants)")
    p.add_argument("--also", nargs="*", default=[], help="--merge: other OUT folders holding methods of the same seeds")
    p.add_argument("--reuse-stage1", action="store_true", help="keep a finished OUT/seedS/stage1 run")
    p.add_argument("--reuse-stage2", action="store_true", help="keep a finished OUT/seedS/stage2-VARIANT run")
    p.add_argument("--skip-mil", action="store_true", help="no attention-MIL twin")
    p.add_argument("--mil-only", action="store_true", help="only the baselines (no generator)")
    a = p.parse_args(argv)
    if a.no_repeat_ngram != "auto" and not (a.no_repeat_ngram.isdigit()):
        print(f"--no-repeat-ngram {a.no_repeat_ngram}: not a count >= 0 or 'auto'", file=sys.stderr)
        return 2
    try:  # the decoding flags, checked as the config keys they set
        GenerateConfig(strategy="beam", num_beams=a.num_beams, length_penalty=a.length_penalty,
                       repetition_penalty=a.repetition_penalty,
                       no_repeat_ngram=0 if a.no_repeat_ngram == "auto" else int(a.no_repeat_ngram)).validate()
    except ValueError as e:
        key, _, msg = str(e).partition(": ")
        print(f"--{key.replace('_', '-')}: {msg}", file=sys.stderr)
        return 2
    if not (Path(a.shards) / "index.json").is_file():
        print(f"--shards {a.shards}: no index.json (a slide-bag shard dir)", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(1)
    merge(a) if a.merge else run(a)
    if (Path(a.out) / "table.md").is_file():  # --skip-mil without --merge writes the seed's scores.json only
        print((Path(a.out) / "table.md").read_text())
    print((Path(a.out) / "diffs.md").read_text() if (Path(a.out) / "diffs.md").is_file() else "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
