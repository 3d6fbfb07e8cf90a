"""Report language beyond the slide corpus: extra texts for the tokenizer and a causal-LM warm-up of the bare LM.

    texts = read_texts("notes.jsonl")                    # .txt: one text per line; .jsonl: "text" / "report" /
                                                         # "clinical_notes" field of each object
    losses = warmup_lm(model.lm, tok, texts, steps=200)  # next-token loss on the texts, no slide (gates unused)
    ppl = perplexity(model.lm, tok, held_out)            # exp(mean next-token loss)

With `model.lm_texts: FILE` the tokenizer (when trained here, i.e. in stage 1) learns its vocabulary from the
training reports plus these texts, and with `model.lm_texts_steps: K` stage 2 first trains the bare LM for K steps
on them (AdamW, `model.lm_texts_lr`, batches of 16, cut at `model.context_length` tokens), then trains XATTN + LM
on the slide reports as usual. The texts are read only from that file; nothing is downloaded.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

TEXT_FIELDS = ("text", "report", "clinical_notes", "findings")


def read_texts(path: str | Path) -> list[str]:
    """Non-empty texts of a .txt (one per line) or .jsonl file (the first of `TEXT_FIELDS` each object has)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"model.lm_texts: {p} does not exist")
    out: list[str] = []
    for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        if p.suffix.lower() == ".jsonl":
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                raise ValueError(f"model.lm_texts: {p} line {i} is not JSON") from None
            text = next((str(obj[k]) for k in TEXT_FIELDS if isinstance(obj, dict) and obj.get(k)), "")
        else:
            text = line
        if text.strip():
            out.append(" ".join(text.split()))
    if not out:
        raise ValueError(f"model.lm_texts: {p} holds no text")
    return out


def warmup_lm(lm, tok, texts: list[str], steps: int, lr: float = 1e-3, batch_size: int = 16, context: int = 160,
              seed: int = 0) -> list[float]:
    """Train the LM's own weights (not the XATTN blocks: no latents) on `texts` for `steps`; returns the losses."""
    params = [p for n, p in lm.named_parameters() if ".xattn." not in n]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    g = torch.Generator().manual_seed(seed)
    was = lm.training
    lm.train()
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, len(texts), (min(batch_size, len(texts)),), generator=g).tolist()
        out = lm(**tok.text_batch([texts[i] for i in idx], context), latents=None)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(float(out.loss.detach()))
    for p, f in zip(params, flags):
        p.requires_grad_(f)
    lm.train(was)
    return losses


@torch.no_grad()
def perplexity(lm, tok, texts: list[str], context: int = 160, batch_size: int = 32) -> float:
    """exp(mean next-token loss) of the bare LM on `texts` (token-weighted)."""
    was = lm.training
    lm.eval()
    total, count = 0.0, 0
    for i in range(0, len(texts), batch_size):
        b = tok.text_batch(texts[i:i + batch_size], context)
        n = int((b["labels"][:, 1:] != -100).sum())
        total += float(lm(**b, latents=None).loss) * n
        count += n
    lm.train(was)
    return math.exp(total / max(count, 1))
