"""Generation and the evaluation table: the model against the template and retrieval baselines, the mean-feature
regressor (the shortcut) and the oracle (the ceiling); facts per `metrics.fact_correct` when the split has ground
truth.

    texts = generate_texts(model, tok, cfg.gen, feats_list, prompt)           # one report per slide
    res = evaluate_reports(model, tok, cfg)                                  # -> ReportEval (rows, examples)
    write_eval(res, "OUT/eval")                                              # table.md, generations.jsonl, metrics.json
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from medvlp.data_shards.transforms import collate_bags
from medvlp.finetune.report.config import GenerateConfig, ReportConfig
from medvlp.finetune.report.data import SlideSplit, load_split
from medvlp.finetune.report.baselines import (MeanFeatureRegressor, diagnosis_phrases, oracle_reports, reports_of,
                                              truth_facts)
from medvlp.finetune.report.metrics import (fact_correct, fact_summary, format_table, retrieval_reports, score,
                                            template_reports)
from medvlp.finetune.report.model import ReportModel, ReportTokenizer
from medvlp.finetune.report.text import report_text


def generation_kwargs(gen: GenerateConfig, tok: ReportTokenizer) -> dict:
    """`transformers` generate() arguments of a decoding strategy. The repetition rules
    (`no_repeat_ngram_size`, `repetition_penalty`) apply to every strategy; off at their defaults (0, 1.0)."""
    kw = dict(max_new_tokens=gen.max_new_tokens, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id,
              bos_token_id=tok.bos_id, use_cache=True, no_repeat_ngram_size=gen.no_repeat_ngram,
              repetition_penalty=float(gen.repetition_penalty))
    if gen.strategy == "greedy" or (gen.strategy == "beam" and gen.num_beams == 1):  # one beam is greedy
        kw.update(do_sample=False, num_beams=1)
    elif gen.strategy == "beam":
        kw.update(do_sample=False, num_beams=gen.num_beams, early_stopping=True, length_penalty=gen.length_penalty)
    else:  # nucleus
        kw.update(do_sample=True, num_beams=1, top_k=gen.top_k, top_p=gen.top_p, temperature=gen.temperature)
    return kw


def _pad(feats: list[torch.Tensor], coords: list[torch.Tensor] | None = None):
    if coords is None:
        coords = [torch.zeros(x.shape[0], 2, dtype=torch.long) for x in feats]
    return collate_bags(feats, coords)


@torch.no_grad()
def generate_ids(model: ReportModel, tok: ReportTokenizer, gen: GenerateConfig, feats: list[torch.Tensor],
                 prompt: str, coords: list[torch.Tensor] | None = None) -> list[list[int]]:
    """Generated token ids after the prompt (EOS and padding removed), one list per slide."""
    model.eval()
    device = next(model.parameters()).device
    kw = generation_kwargs(gen, tok)
    out: list[list[int]] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(gen.seed)
        for i in range(0, len(feats), gen.batch_size):
            f, m, c = _pad(feats[i:i + gen.batch_size], None if coords is None else coords[i:i + gen.batch_size])
            prompt_ids = tok.prompt_ids(prompt, f.shape[0]).to(device)
            c = None if coords is None else c.to(device)
            ids = model.generate(f.to(device), m.to(device), prompt_ids, coords=c, **kw).cpu()
            for row in ids.tolist():
                cut = row.index(tok.eos_id) if tok.eos_id in row else len(row)
                out.append([t for t in row[:cut] if t != tok.pad_id])
    return out


def generate_texts(model: ReportModel, tok: ReportTokenizer, gen: GenerateConfig, feats: list[torch.Tensor],
                   prompt: str, coords: list[torch.Tensor] | None = None) -> list[str]:
    """One report per slide in the reference layout (findings, then "Final diagnosis: X.")."""
    ids = generate_ids(model, tok, gen, feats, prompt, coords)
    return [report_text(f"{prompt} {tok.decode(r)}") for r in ids]


@torch.no_grad()
def slide_embeddings(model: ReportModel, sp: SlideSplit, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean latents (S, O), predicted class (S,)) of every slide of a split."""
    device = next(model.parameters()).device
    embs, preds = [], []
    for f, m, c in sp.batches(batch_size):
        lat = model.latents(f.to(device), m.to(device), c.to(device))
        emb = lat.mean(dim=1)
        embs.append(emb.float().cpu())
        preds.append(model.head(emb).argmax(-1).cpu())
    return torch.cat(embs).numpy(), torch.cat(preds).numpy()


@dataclass
class ReportEval:
    """The table rows (method -> metrics), per-slide generations and the split it was measured on."""

    rows: dict[str, dict[str, float]]
    generations: list[dict] = field(default_factory=list)
    split: str = "test"
    n: int = 0
    examples: int = 8

    def flat(self) -> dict[str, float]:
        out = dict(self.rows["model"])
        for name, m in self.rows.items():
            if name != "model":
                out.update({f"{name}/{k}": v for k, v in m.items()})
        out["n"] = float(self.n)
        return out

    def table(self) -> str:
        return format_table(self.rows)


@torch.no_grad()
def evaluate_reports(model: ReportModel, tok: ReportTokenizer, cfg: ReportConfig, shards: str | None = None,
                     split: str | None = None) -> ReportEval:
    """Generate a report for every slide of the split and score it, with the template and retrieval baselines
    (both built from the training split of `cfg.data.train_shards`)."""
    model.eval()
    split = split or cfg.eval.split
    test = load_split(cfg.data, split, cfg.eval.max_samples, shards=shards)
    train = load_split(cfg.data, "train")
    if not len(test):
        raise ValueError(f"eval.split: no slides in split {split!r}")
    hyps = generate_texts(model, tok, cfg.gen, test.feats, cfg.model.prompt, test.coords)
    train_emb, train_pred = slide_embeddings(model, train, cfg.gen.batch_size)
    test_emb, test_pred = slide_embeddings(model, test, cfg.gen.batch_size)
    templates = template_reports(train.texts, train.class_index.tolist(), len(test.classes))
    methods = {"model": hyps, "template": [templates[c] for c in test_pred],
               "retrieval": retrieval_reports(test_emb, train_emb, train.texts)}
    has_facts = len(test.tissues) > 0 and len(train) > 1
    if has_facts:  # the shortcut row and the ceiling (needs the composition ground truth)
        val = load_split(cfg.data, "val")
        phrases = diagnosis_phrases(train.texts, train.class_index, train.classes)
        reg = MeanFeatureRegressor().fit(train, val if len(val) else train)
        methods["mean-feature regressor"] = reports_of(reg.predict(test), phrases)
        methods["oracle"] = oracle_reports(test, phrases)
    rows = {name: score(h, test.texts, test.classes, test.class_index.tolist(), test.tissues, test.composition)
            for name, h in methods.items()}
    if has_facts:
        truth = truth_facts(test)
        for name, h in methods.items():
            rows[name].update(fact_summary(fact_correct(h, truth, test.classes, test.tissues)))
    gens = [{"key": k, "report": h, "reference": r, "template": t, "retrieval": n,
             "class": test.classes[int(c)], "predicted_class": test.classes[int(p)]}
            for k, h, r, t, n, c, p in zip(test.keys, hyps, test.texts, methods["template"], methods["retrieval"],
                                           test.class_index, test_pred)]
    return ReportEval(rows, gens, split, len(test), cfg.eval.examples)


def write_eval(res: ReportEval, out_dir: str | Path) -> dict[str, Path]:
    """table.md (the table and example generations), generations.jsonl, metrics.json."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ex = "\n\n".join(f"**{g['key']}** ({g['class']})\n- reference: {g['reference']}\n- model: {g['report']}\n"
                     f"- template: {g['template']}\n- retrieval: {g['retrieval']}"
                     for g in res.generations[: res.examples])
    paths = {"table": out / "table.md", "generations": out / "generations.jsonl", "metrics": out / "metrics.json"}
    paths["table"].write_text(f"Split `{res.split}`, {res.n} slides.\n\n{res.table()}\n\n## Examples\n\n{ex}\n")
    paths["generations"].write_text("".join(json.dumps(g, ensure_ascii=False) + "\n" for g in res.generations))
    paths["metrics"].write_text(json.dumps(res.rows, indent=1))
    return paths
