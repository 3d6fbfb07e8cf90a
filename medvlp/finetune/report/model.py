"""The report model (resampler + MIL head + LM with XATTN) and its tokenizer.

    tok = ReportTokenizer.train(reports, "OUT/tokenizer", vocab_size=1000)   # or ReportTokenizer("OUT/tokenizer")
    model = build_report_model(cfg.model, feat_dim=64, n_classes=3, tok=tok)
    logits_BC = model(feats, feats_mask, coords)                               # stage 1: slide class logits
    out = model(feats, feats_mask, coords, input_ids=ids, attention_mask=am, labels=lab)  # stage 2: out.loss
    ids = model.generate(feats, feats_mask, prompt_ids, coords=coords, max_new_tokens=64)  # latents once per slide

Shape legend: B slides, N patches, D patch features, M latents, O LM width, L tokens, C classes.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from medvlp.finetune.report.lm import ReportLM, build_lm, load_lm
from medvlp.finetune.report.resampler import PerceiverResampler
from medvlp.finetune.report.text import clean, train_text


class ReportTokenizer:
    """WordPiece vocabulary trained on the corpus's reports (`medvlp.pretrain.tokenizer.train_tokenizer`, cased);
    [CLS] serves as BOS, [SEP] as EOS, [PAD] (id 0) pads."""

    def __init__(self, path: str | Path) -> None:
        from transformers import PreTrainedTokenizerFast

        self.path = str(path)
        if not (Path(self.path) / "tokenizer.json").is_file():
            raise FileNotFoundError(f"model.tokenizer: {self.path} has no tokenizer.json")
        self.tok = PreTrainedTokenizerFast.from_pretrained(self.path, local_files_only=True)
        self.pad_id, self.bos_id, self.eos_id = (self.tok.convert_tokens_to_ids(t) for t in ("[PAD]", "[CLS]", "[SEP]"))

    @classmethod
    def train(cls, reports: list[str], out_dir: str | Path, vocab_size: int = 1000) -> "ReportTokenizer":
        from medvlp.pretrain.tokenizer import train_tokenizer

        train_tokenizer([train_text(r) for r in reports], out_dir, vocab_size=vocab_size, min_frequency=1,
                        lowercase=False)
        return cls(out_dir)

    def __len__(self) -> int:
        return len(self.tok)

    def encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def prompt_ids(self, prompt: str, batch: int) -> torch.Tensor:
        """(batch, P) = [BOS] + prompt tokens."""
        return torch.tensor([[self.bos_id] + self.encode(prompt)] * batch, dtype=torch.long)

    def training_batch(self, reports: list[str], prompt: str, context: int) -> dict[str, torch.Tensor]:
        """[BOS] train_text(report) [EOS], right-padded to the longest (at most `context`); labels = ids with the
        prompt and the padding set to -100 (no loss on them)."""
        out = self.text_batch([train_text(r) for r in reports], context)
        out["labels"][:, : 1 + len(self.encode(prompt))] = -100
        return out

    def text_batch(self, texts: list[str], context: int) -> dict[str, torch.Tensor]:
        """[BOS] text [EOS] per text, right-padded to the longest (at most `context`); labels = ids with the padding
        set to -100."""
        rows = [([self.bos_id] + self.encode(t))[: context - 1] + [self.eos_id] for t in texts]
        L = max(len(r) for r in rows)
        ids_BL = torch.full((len(rows), L), self.pad_id, dtype=torch.long)
        am_BL = torch.zeros(len(rows), L, dtype=torch.long)
        for i, r in enumerate(rows):
            ids_BL[i, : len(r)] = torch.tensor(r)
            am_BL[i, : len(r)] = 1
        return {"input_ids": ids_BL, "attention_mask": am_BL, "labels": ids_BL.masked_fill(am_BL == 0, -100)}

    def decode(self, ids: list[int] | torch.Tensor) -> str:
        return clean(self.tok.decode(ids, skip_special_tokens=True))


class ReportModel(nn.Module):
    """Resampler + linear MIL head on the mean latent + causal LM with gated XATTN over the latents."""

    def __init__(self, resampler: PerceiverResampler, n_classes: int, lm: ReportLM) -> None:
        super().__init__()
        self.resampler = resampler
        self.head = nn.Linear(resampler.out_dim, n_classes)
        self.lm = lm

    def latents(self, feats_BND: torch.Tensor, mask_BN: torch.Tensor | None = None,
                coords_BN2: torch.Tensor | None = None) -> torch.Tensor:
        return self.resampler(feats_BND, mask_BN, coords_BN2)

    def forward(self, feats: torch.Tensor, feats_mask: torch.Tensor | None = None, coords: torch.Tensor | None = None,
                input_ids=None, attention_mask=None, labels=None):
        lat_BMO = self.latents(feats, feats_mask, coords)
        if input_ids is None:
            return self.head(lat_BMO.mean(dim=1))
        return self.lm(input_ids, attention_mask=attention_mask, latents=lat_BMO, labels=labels)

    @torch.no_grad()
    def generate(self, feats: torch.Tensor, feats_mask: torch.Tensor | None, prompt_ids: torch.Tensor,
                 coords: torch.Tensor | None = None, **gen_kwargs) -> torch.Tensor:
        """Token ids after the prompt, (B, T); the latents are computed once and reused at every step."""
        lat_BMO = self.latents(feats, feats_mask, coords)
        out = self.lm.generate(prompt_ids, latents=lat_BMO, attention_mask=torch.ones_like(prompt_ids),
                               **gen_kwargs)
        return out[:, prompt_ids.shape[1]:]


def build_report_model(mc, feat_dim: int, n_classes: int, tok: ReportTokenizer) -> ReportModel:
    """The model of `mc` (a ReportModelConfig) for bags of width `feat_dim`."""
    if mc.lm:
        base = load_lm(mc.lm)
        if base.config.vocab_size < len(tok):
            base.resize_token_embeddings(len(tok))
    else:
        base = build_lm(len(tok), hidden=mc.lm_hidden, layers=mc.lm_layers, heads=mc.lm_heads, ffn=mc.lm_ffn,
                        max_positions=mc.context_length + 8, pad_id=tok.pad_id, bos_id=tok.bos_id,
                        eos_id=tok.eos_id, dropout=mc.lm_dropout)
    hidden = base.config.hidden_size
    res = PerceiverResampler(feat_dim, width=mc.width, latents=mc.latents, depth=mc.depth, heads=mc.heads,
                             ff_mult=mc.ff_mult, out_dim=hidden, cap=mc.max_patches, pos_freqs=mc.pos_freqs)
    lm = ReportLM(base, latent_dim=hidden, every=mc.xattn_every, heads=mc.heads, ff_mult=mc.ff_mult)
    if mc.grad_checkpointing:
        lm.set_gradient_checkpointing(True)
    return ReportModel(res, n_classes, lm)
