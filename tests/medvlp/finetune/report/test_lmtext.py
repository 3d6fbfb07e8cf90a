"""Extra report language: texts read from .txt / .jsonl, a warm-up of the bare LM that lowers its perplexity on them,
and the tokenizer learning their words."""
from __future__ import annotations

import json

import pytest
import torch

from medvlp.finetune.report.lmtext import perplexity, read_texts, warmup_lm

pytestmark = pytest.mark.timeout(300)
torch.set_num_threads(1)
NOTES = ["The patient presented with fever and cough for three days.",
         "Chest radiograph shows bilateral patchy opacities in the lower zones.",
         "Oxygen saturation improved after supplemental oxygen was given.",
         "Bilateral ground glass opacities were seen on admission imaging."] * 4


def test_read_texts(tmp_path):
    (tmp_path / "a.txt").write_text("one  note\n\n two\n")
    assert read_texts(tmp_path / "a.txt") == ["one note", "two"]
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in [{"clinical_notes": "x y"}, {"id": 1},
                                                                       {"text": "z"}]))
    assert read_texts(tmp_path / "b.jsonl") == ["x y", "z"]
    (tmp_path / "c.jsonl").write_text("{bad\n")
    with pytest.raises(ValueError, match="line 1 is not JSON"):
        read_texts(tmp_path / "c.jsonl")
    with pytest.raises(FileNotFoundError, match="model.lm_texts"):
        read_texts(tmp_path / "nope.txt")


def test_warmup_lowers_perplexity_and_leaves_xattn_alone(tmp_path):
    from medvlp.finetune.report.config import ReportModelConfig
    from medvlp.finetune.report.model import ReportTokenizer, build_report_model

    tok = ReportTokenizer.train(NOTES + ["Final diagnosis: carcinoma."], tmp_path / "tok", vocab_size=200)
    assert len(tok.encode("opacities")) == 1  # the notes' words are in the vocabulary
    torch.manual_seed(0)
    model = build_report_model(ReportModelConfig(lm_hidden=32, width=32, latents=4, context_length=48), 8, 3, tok)
    xattn = {k: v.clone() for k, v in model.lm.state_dict().items() if ".xattn." in k}
    before = perplexity(model.lm, tok, NOTES[:4])
    losses = warmup_lm(model.lm, tok, NOTES, steps=40, lr=3e-3, batch_size=8, context=48)
    after = perplexity(model.lm, tok, NOTES[:4])
    assert after < 0.5 * before and losses[-1] < losses[0]
    assert all(torch.equal(v, model.lm.state_dict()[k]) for k, v in xattn.items())
