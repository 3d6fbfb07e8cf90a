"""The report stage on the fine-tune runner (`medvlp.finetune.runner.Stage`): build / loss / batches / evaluate.

Stage 1 (`finetune.stage=1`): MIL classification. The resampler and a linear head on the mean latent predict the
slide class (cross-entropy on the `class_index` member); the LM is frozen and unused.
Stage 2 (`finetune.stage=2`): report generation. Starts from the stage-1 run (`finetune.init`), freezes the
resampler (unless `finetune.train_resampler`) and the head, and trains the gated XATTN blocks (and, with
`model.train_lm`, the LM) with the causal-LM loss on "[BOS] Final diagnosis: X. <findings> [EOS]" (no loss on the
prompt). The bag goes through the model's forward at every step, so the loss depends on the slide.

Evaluation: stage 1 reports the classification accuracy; stage 2 generates a report per slide of `eval.split` and
scores it against both baselines (`evaluate_reports`), writing OUT/eval/table.md and OUT/eval/generations.jsonl.
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from medvlp.finetune.report.config import ReportConfig
from medvlp.finetune.report.data import class_names, load_split, train_batches
from medvlp.finetune.report.model import ReportModel, ReportTokenizer, build_report_model
from medvlp.finetune.runner import StageContext

log = logging.getLogger("medvlp.finetune.report")
TOKENIZER_DIR = "tokenizer"
WEIGHTS = "model.safetensors"


def _main_process_first():
    try:
        from accelerate import PartialState

        return PartialState().main_process_first()
    except Exception:  # noqa: BLE001 - no accelerate state (a plain call outside the runner)
        import contextlib

        return contextlib.nullcontext()


def _is_main() -> bool:
    try:
        from accelerate import PartialState

        return PartialState().is_main_process
    except Exception:  # noqa: BLE001
        return True


def init_dir(cfg: ReportConfig) -> Path | None:
    """The stage-1 run folder stage 2 starts from (None in stage 1)."""
    if cfg.finetune.stage != 2:
        return None
    if not cfg.finetune.init:
        raise ValueError("finetune.init: stage 2 starts from a stage-1 run folder (finetune.init=RUN_DIR)")
    p = Path(cfg.finetune.init)
    p = p.parent if p.is_file() else p
    if not (p / WEIGHTS).is_file():
        raise FileNotFoundError(f"finetune.init: {p / WEIGHTS} does not exist (run stage 1 first)")
    return p


def tokenizer_for(cfg: ReportConfig) -> ReportTokenizer:
    """model.tokenizer, else the stage-1 run's, else OUT/tokenizer (trained on the training reports if missing)."""
    if cfg.model.tokenizer:
        return ReportTokenizer(cfg.model.tokenizer)
    src = init_dir(cfg)
    out = Path(cfg.finetune.out_dir) / TOKENIZER_DIR
    with _main_process_first():
        if src is not None and (src / TOKENIZER_DIR / "tokenizer.json").is_file():
            if _is_main() and src.resolve() != Path(cfg.finetune.out_dir).resolve():
                shutil.copytree(src / TOKENIZER_DIR, out, dirs_exist_ok=True)
            return ReportTokenizer(src / TOKENIZER_DIR)
        if not (out / "tokenizer.json").is_file():
            if not _is_main():
                raise FileNotFoundError(f"{out}: the main process did not write the tokenizer")
            from medvlp.pretrain.tokenizer import iter_shard_texts

            texts = list(iter_shard_texts(cfg.data.train_shards, "train"))
            if cfg.model.lm_texts:  # real report language beside the corpus's
                from medvlp.finetune.report.lmtext import read_texts

                texts += read_texts(cfg.model.lm_texts)
            ReportTokenizer.train(texts, out, cfg.model.vocab_size)
        return ReportTokenizer(out)


def feat_dim_of(cfg: ReportConfig) -> int:
    if cfg.model.feat_dim:
        return cfg.model.feat_dim
    first = load_split(cfg.data, "train", max_samples=1).feats
    if not first:
        from medvlp.data_shards.require import ShardRequirementError

        raise ShardRequirementError(f"data.train_shards: {cfg.data.train_shards} holds no readable slide feature bag "
                                    "(`feats`) in its train split; the report stage reads slide bags "
                                    "(`medvlp features extract`, or `medvlp shards synth --modality slide`)")
    return int(first[0].shape[1])


def load_weights(model: nn.Module, path: Path) -> None:
    from safetensors.torch import load_file

    state = load_file(str(path))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not fit this model (missing {missing[:4]}, unexpected {unexpected[:4]}); "
                         "were model.* sizes changed between the stages?")


def set_stage_trainable(model: ReportModel, stage: int, train_lm: bool, train_resampler: bool = False) -> None:
    """Stage 1: resampler + head train, LM frozen. Stage 2: XATTN blocks (+ the LM with train_lm, + the resampler
    with train_resampler) train."""
    for p in model.parameters():
        p.requires_grad_(stage == 1)
    if stage == 2 and train_resampler:
        for p in model.resampler.parameters():
            p.requires_grad_(True)
    for p in model.lm.parameters():
        p.requires_grad_(stage == 2 and train_lm)
    if stage == 2:
        for blk in model.lm.xattn_blocks():
            for p in blk.parameters():
                p.requires_grad_(True)


def build_model(cfg: ReportConfig) -> tuple[ReportModel, ReportTokenizer]:
    feat_dim = feat_dim_of(cfg)  # first: shards without bags are refused before the tokenizer is written
    tok = tokenizer_for(cfg)
    classes = class_names(cfg.data)
    model = build_report_model(cfg.model, feat_dim, len(classes), tok)
    src = init_dir(cfg)
    if src is not None:
        load_weights(model, src / WEIGHTS)
    if cfg.finetune.stage == 2 and cfg.model.lm_texts_steps > 0 and not cfg.finetune.resume:
        from medvlp.finetune.report.lmtext import read_texts, warmup_lm

        losses = warmup_lm(model.lm, tok, read_texts(cfg.model.lm_texts), cfg.model.lm_texts_steps,
                           cfg.model.lm_texts_lr, context=cfg.model.context_length, seed=cfg.finetune.seed)
        log.info("LM warm-up on %s: %d steps, loss %.3f -> %.3f", cfg.model.lm_texts, len(losses), losses[0],
                 losses[-1])
    set_stage_trainable(model, cfg.finetune.stage, cfg.model.train_lm, cfg.finetune.train_resampler)
    return model, tok


class ReportStage:
    """Stage protocol of the runner (see the module doc)."""

    def __init__(self) -> None:
        self.tok: ReportTokenizer | None = None

    def build(self, pretrained, cfg: ReportConfig) -> nn.Module:  # noqa: ARG002 - bags are already features
        model, self.tok = build_model(cfg)
        return model

    def loss(self, model: nn.Module, batch: dict):
        if "input_ids" not in batch:  # stage 1
            logits = model(batch["feats"], batch["feats_mask"], batch.get("coords"))
            y = batch["class_index"]
            return F.cross_entropy(logits, y), {"acc": (logits.argmax(-1) == y).float().mean().detach()}
        out = model(batch["feats"], batch["feats_mask"], batch.get("coords"), input_ids=batch["input_ids"],
                    attention_mask=batch["attention_mask"], labels=batch["labels"])
        return out.loss, {}

    def batches(self, cfg: ReportConfig, split: str, ctx: StageContext, *, epoch: int = 0, start_step: int = 0):
        if self.tok is None and cfg.finetune.stage == 2:
            self.tok = tokenizer_for(cfg)
        for b in train_batches(cfg.data, cfg.finetune.batch_size, cfg.finetune.seed, ctx.rank, ctx.world_size,
                               epoch, start_step):
            out = {"feats": b["feats"], "feats_mask": b["feats_mask"], "coords": b["coords"],
                   "class_index": b["class_index"]}
            if cfg.finetune.stage == 2:
                out.update(self.tok.training_batch(b["text"], cfg.model.prompt, cfg.model.context_length))
            yield out

    def evaluate(self, model: nn.Module, cfg: ReportConfig, ctx: StageContext) -> dict:
        if cfg.finetune.stage == 1:
            return classify_metrics(model, cfg)
        from medvlp.finetune.report.evaluate import evaluate_reports, write_eval

        if self.tok is None:
            self.tok = tokenizer_for(cfg)
        res = evaluate_reports(model, self.tok, cfg)
        if ctx.is_main:
            write_eval(res, Path(cfg.finetune.out_dir) / "eval")
        return res.flat()


@torch.no_grad()
def classify_metrics(model: ReportModel, cfg: ReportConfig) -> dict:
    sp = load_split(cfg.data, cfg.eval.split, cfg.eval.max_samples)
    logits = torch.cat([model(f, m, c) for f, m, c in sp.batches(cfg.gen.batch_size)])
    y = torch.from_numpy(sp.class_index)
    return {"acc": float((logits.argmax(-1) == y).float().mean()),
            "ce": float(F.cross_entropy(logits, y)), "n": float(len(sp))}
