"""Config of the report-generation stage (recipe `kind: report`): slide bags -> Perceiver resampler -> causal LM
with gated cross-attention. One root for both training stages (`finetune.stage: 1 | 2`)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from medvlp.data_shards.config import DataConfig
from medvlp.finetune.runner import RunnerConfig
from medvlp.pretrain.config import TrackingConfig

STRATEGIES = ("greedy", "beam", "nucleus")


@dataclass
class ReportModelConfig:
    """Resampler, classifier head and language model (defaults are a small debug size)."""

    feat_dim: int = 0  # patch feature width D of the bags (0 = read from the first training bag)
    latents: int = 16  # M resampler latents (reference: 640)
    width: int = 64  # resampler width (reference: 1536)
    depth: int = 2  # resampler blocks of latent cross-attention + FFN (reference: 6)
    heads: int = 4  # attention heads of the resampler and the XATTN blocks
    ff_mult: int = 4  # FFN expansion of the resampler and the XATTN blocks
    pos_freqs: int = 4  # patch positions into the resampler: sin/cos of bag-scaled coords at F octaves (0 = none)
    max_patches: int = 4096  # bag cap: longer bags are subsampled (random in training, strided otherwise)
    lm: str = ""  # a local pretrained causal LM folder ("" = a BioGPT-architecture LM built from the sizes below)
    lm_hidden: int = 64  # LM width H (BioGPT: 1024 / 1536 large)
    lm_layers: int = 2  # LM decoder layers
    lm_heads: int = 4  # LM attention heads
    lm_ffn: int = 256  # LM feed-forward width
    lm_dropout: float = 0.1  # LM hidden / attention dropout
    context_length: int = 160  # report tokens (prompt included, BOS/EOS included); longer reports are truncated
    xattn_every: int = 1  # a gated XATTN block before every k-th decoder layer (reference: every layer)
    tokenizer: str = ""  # tokenizer dir ("" = OUT/tokenizer, trained on the training reports if missing)
    vocab_size: int = 1000  # WordPiece vocabulary size when the tokenizer is trained here
    train_lm: bool = False  # stage 2: also train the LM's own weights (needed when it starts untrained)
    grad_checkpointing: bool = False  # activation checkpointing of the LM layers and XATTN blocks (stage 2)
    lm_texts: str = ""  # extra report language (.txt one per line / .jsonl "text"): tokenizer corpus + LM warm-up
    lm_texts_steps: int = 0  # stage 2: causal-LM steps of the bare LM on lm_texts before the slide reports
    lm_texts_lr: float = 1e-3  # learning rate of that warm-up
    prompt: str = "Final diagnosis:"  # generation starts from [BOS] + prompt; training texts start with it

    def validate(self) -> None:
        for name in ("latents", "width", "depth", "heads", "ff_mult", "lm_hidden", "lm_layers", "lm_heads",
                     "lm_ffn", "xattn_every", "vocab_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.width % self.heads:
            raise ValueError(f"width: {self.width} is not divisible by heads {self.heads}")
        if self.lm_hidden % self.heads or self.lm_hidden % self.lm_heads:
            raise ValueError(f"lm_hidden: {self.lm_hidden} must be divisible by heads and lm_heads")
        if self.context_length < 8:
            raise ValueError(f"context_length: must be >= 8, got {self.context_length}")
        if self.lm_texts_steps < 0 or (self.lm_texts_steps and not self.lm_texts):
            raise ValueError("lm_texts_steps: must be >= 0, and > 0 needs model.lm_texts")
        from medvlp.pretrain.spine import check_lr

        check_lr("lm_texts_lr", self.lm_texts_lr)
        if self.feat_dim < 0 or self.max_patches < 0 or self.pos_freqs < 0:
            raise ValueError("feat_dim / max_patches / pos_freqs: must be >= 0")


@dataclass
class GenerateConfig:
    """Decoding: `transformers`' `generate` (`evaluate.generation_kwargs` maps these keys to its arguments)."""

    strategy: str = "greedy"  # greedy | beam | nucleus (top-k / top-p sampling with a temperature)
    num_beams: int = 4  # beams of `beam` (generate's num_beams, early_stopping=True; 1 = greedy)
    length_penalty: float = 1.0  # beam: rank finished reports by log-prob sum / tokens ** this (0 = plain sum)
    no_repeat_ngram: int = 0  # never repeat an n-gram of this size, prompt included (no_repeat_ngram_size; 0 = off)
    repetition_penalty: float = 1.0  # CTRL penalty on every token of the prompt and the report so far (1 = off)
    top_k: int = 40  # nucleus: keep the k most likely tokens (reference: 40)
    top_p: float = 0.95  # nucleus: smallest set with this probability mass (reference: 0.95)
    temperature: float = 0.7  # nucleus: softmax temperature (reference: 0.7)
    max_new_tokens: int = 160  # tokens generated after the prompt at most
    batch_size: int = 32  # slides decoded together
    seed: int = 0  # sampling seed

    def validate(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy: {self.strategy!r} is not one of {', '.join(STRATEGIES)}")
        for name in ("num_beams", "max_new_tokens", "batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name}: must be an integer >= 1, got {getattr(self, name)!r}")
        for name in ("no_repeat_ngram", "top_k"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"{name}: must be an integer >= 0, got {getattr(self, name)!r}")
        for name in ("repetition_penalty", "temperature"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not (math.isfinite(v) and v > 0):
                raise ValueError(f"{name}: must be a finite number > 0, got {v!r}")
        if not isinstance(self.length_penalty, (int, float)) or not math.isfinite(self.length_penalty):
            raise ValueError(f"length_penalty: must be a finite number, got {self.length_penalty!r}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p: must be in (0, 1], got {self.top_p!r}")


@dataclass
class ReportEvalConfig:
    """What the evaluation measures."""

    split: str = "test"  # split the reports are generated and scored on
    max_samples: int = 0  # slides scored at most (0 = the whole split)
    examples: int = 8  # example generations written to the table and the MLflow artifact


@dataclass
class ReportRunnerConfig(RunnerConfig):
    """The fine-tune loop, plus which training stage runs."""

    stage: int = 1  # 1: MIL classification through the resampler; 2: report generation (resampler frozen)
    init: str = ""  # stage 2: the stage-1 run folder (or its model.safetensors) to start from
    train_resampler: bool = False  # stage 2: also train the resampler (HistoGPT freezes it: false)

    def validate(self) -> None:
        super().validate()
        if self.stage not in (1, 2):
            raise ValueError(f"stage: {self.stage} is not one of 1, 2")


@dataclass
class ReportConfig:
    """Root config of report generation from whole-slide feature bags."""

    kind: str = "report"  # recipe kind
    data: DataConfig = field(default_factory=lambda: DataConfig(modality="slide"))  # slide-bag shards
    model: ReportModelConfig = field(default_factory=ReportModelConfig)  # resampler + LM
    gen: GenerateConfig = field(default_factory=GenerateConfig)  # decoding
    eval: ReportEvalConfig = field(default_factory=ReportEvalConfig)  # scoring
    finetune: ReportRunnerConfig = field(default_factory=ReportRunnerConfig)  # the runner and the stage
    tracking: TrackingConfig = field(default_factory=TrackingConfig)  # MLflow

    def validate(self) -> None:
        if self.kind != "report":
            raise ValueError(f"kind: {self.kind!r} is not 'report'")
        if self.data.modality != "slide":
            raise ValueError(f"data.modality: report generation reads slide bags, got {self.data.modality!r}")
