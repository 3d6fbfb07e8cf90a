"""Beam search of the report generator: greedy at one beam, a better sequence than greedy where one exists, the
no-repeat-n-gram and repetition rules, length normalisation, the KV cache, and the wiring into generate_ids."""
from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch

from medvlp.finetune.report.decode import LMStep, banned_ngram_tokens, beam_search
from medvlp.finetune.report.lm import ReportLM, build_lm

pytestmark = pytest.mark.timeout(300)
torch.set_num_threads(1)
PAD, EOS, BOS, A, B, C = 0, 1, 2, 3, 4, 5
V = 6


def table_lm(table: dict):
    """A step function whose next-token distribution depends only on the last token: table[last] = {tok: p}
    (unlisted tokens get 1e-9)."""

    def step(ids_RL, parent):  # noqa: ARG001 - no cache to reorder
        out = torch.full((ids_RL.shape[0], V), 1e-9)
        for r, last in enumerate(ids_RL[:, -1].tolist()):
            for tok, p in table.get(last, {EOS: 1.0}).items():
                out[r, tok] = p
        return out.log()
    return step


def _tiny_lm():
    torch.manual_seed(0)
    lm = ReportLM(build_lm(40, hidden=32, layers=2, heads=4, ffn=64, dropout=0.0), latent_dim=16, heads=4).eval()
    for blk in lm.xattn_blocks():  # open gates: the latents matter
        blk.gate_attn.data.fill_(0.7)
        blk.gate_ff.data.fill_(0.3)
    return lm


def test_one_beam_is_greedy_token_for_token():
    lm = _tiny_lm()
    lat = torch.randn(3, 5, 16)
    prompt = torch.tensor([[2, 5, 6]] * 3)
    ref = lm.generate(prompt, latents=lat, attention_mask=torch.ones_like(prompt), max_new_tokens=30,
                      do_sample=False, num_beams=1, eos_token_id=3, pad_token_id=0)[:, 3:].tolist()
    got = beam_search(LMStep(lm, lat), prompt, num_beams=1, max_new_tokens=30, eos_id=3)
    assert got == [r[: r.index(3)] if 3 in r else r for r in ref]  # HF pads after EOS; token 0 may be generated
    assert len({tuple(r) for r in got}) == 3  # the slides' latents gave different reports


def test_kv_cache_and_full_recompute_agree():
    lm = _tiny_lm()
    lat = torch.randn(2, 5, 16).repeat_interleave(4, dim=0)
    prompt = torch.tensor([[2, 5, 6]] * 2)

    def full(ids, parent):  # noqa: ARG001
        return lm(ids, attention_mask=torch.ones_like(ids), latents=lat).logits[:, -1]
    a = beam_search(full, prompt, num_beams=4, max_new_tokens=20, eos_id=3, return_scores=True)
    b = beam_search(LMStep(lm, lat), prompt, num_beams=4, max_new_tokens=20, eos_id=3, return_scores=True)
    assert a[0] == b[0]
    assert a[2] == pytest.approx(b[2], abs=1e-4)


def test_beam_finds_the_likelier_report_greedy_misses():
    # greedy takes A (0.6), then EOS at 0.4: p = 0.24; B (0.4) then EOS at 0.99 is p = 0.396
    step = table_lm({BOS: {A: 0.6, B: 0.4}, A: {EOS: 0.4, A: 0.3, B: 0.3}, B: {EOS: 0.99, A: 0.005, B: 0.005}})
    prompt = torch.tensor([[BOS]])
    greedy, _, g_lp = beam_search(step, prompt, num_beams=1, max_new_tokens=5, eos_id=EOS, return_scores=True)
    beam, _, b_lp = beam_search(step, prompt, num_beams=2, max_new_tokens=5, eos_id=EOS, return_scores=True)
    assert greedy == [[A]] and beam == [[B]]
    assert g_lp[0] == pytest.approx(math.log(0.24), abs=1e-4)
    assert b_lp[0] == pytest.approx(math.log(0.396), abs=1e-4) and b_lp[0] > g_lp[0]


def test_length_penalty_decides_between_short_and_long():
    # "" (EOS now) p = 0.5; [A] then EOS p = 0.5 * 0.98: the sum prefers the short one, sum / T the long one
    step = table_lm({BOS: {EOS: 0.5, A: 0.5}, A: {EOS: 0.98, B: 0.02}, B: {EOS: 1.0}})
    prompt = torch.tensor([[BOS]])
    assert beam_search(step, prompt, num_beams=2, max_new_tokens=5, eos_id=EOS, length_penalty=0.0) == [[]]
    assert beam_search(step, prompt, num_beams=2, max_new_tokens=5, eos_id=EOS, length_penalty=1.0) == [[A]]


@pytest.mark.parametrize("num_beams", [1, 3])
def test_no_repeat_ngram_holds(num_beams):
    # an LM that loops A B A B ... (the failure seen in greedy reports)
    step = table_lm({BOS: {A: 0.9, C: 0.1}, A: {B: 0.9, C: 0.1, EOS: 1e-4}, B: {A: 0.9, C: 0.1, EOS: 1e-4},
                     C: {A: 0.5, B: 0.5, EOS: 1e-4}})
    prompt = torch.tensor([[BOS], [BOS]])
    loose = beam_search(step, prompt, num_beams=num_beams, max_new_tokens=12, eos_id=EOS)
    assert any(len({tuple(r[i:i + 2]) for i in range(len(r) - 1)}) < len(r) - 1 for r in loose)  # it does loop
    for n in (2, 3):
        for r in beam_search(step, prompt, num_beams=num_beams, max_new_tokens=12, eos_id=EOS, no_repeat_ngram=n):
            seq = [BOS] + r
            grams = [tuple(seq[i:i + n]) for i in range(len(seq) - n + 1)]
            assert len(grams) == len(set(grams)), (n, r)


def test_banned_ngram_tokens():
    assert banned_ngram_tokens([A, B, C, A], 2) == {B}
    assert banned_ngram_tokens([A, B, A, C, A], 2) == {B, C}
    assert banned_ngram_tokens([A, B, C, A, B], 3) == {C}
    assert banned_ngram_tokens([A, B], 3) == set()
    assert banned_ngram_tokens([A, B], 1) == {A, B}


def test_repetition_penalty_steers_away_from_generated_tokens():
    step = table_lm({t: {A: 0.6, B: 0.4} for t in (BOS, A, B)})
    prompt = torch.tensor([[BOS]])
    assert beam_search(step, prompt, num_beams=1, max_new_tokens=4, eos_id=EOS) == [[A, A, A, A]]
    # log 0.6 * 2 = -1.02 < log 0.4: once A was generated, B wins; then both are penalised, A again
    assert beam_search(step, prompt, num_beams=1, max_new_tokens=4, eos_id=EOS,
                       repetition_penalty=2.0) == [[A, B, A, A]]


def test_bad_arguments_are_refused():
    step = table_lm({BOS: {A: 1.0}})
    with pytest.raises(ValueError, match="num_beams"):
        beam_search(step, torch.tensor([[BOS]]), num_beams=0, max_new_tokens=3, eos_id=EOS)
    with pytest.raises(ValueError, match="repetition_penalty"):
        beam_search(step, torch.tensor([[BOS]]), num_beams=1, max_new_tokens=3, eos_id=EOS, repetition_penalty=0)
    from medvlp.finetune.report.config import GenerateConfig

    with pytest.raises(ValueError, match="no_repeat_ngram"):
        GenerateConfig(no_repeat_ngram=-1).validate()


def test_generate_ids_routes_beam_through_beam_search():
    from medvlp.finetune.report.config import GenerateConfig
    from medvlp.finetune.report.evaluate import generate_ids
    from medvlp.finetune.report.model import ReportModel
    from medvlp.finetune.report.resampler import PerceiverResampler

    torch.manual_seed(0)
    res = PerceiverResampler(8, width=16, latents=5, depth=1, heads=4, out_dim=16, pos_freqs=2)
    lm = ReportLM(copy.deepcopy(_tiny_lm().lm), latent_dim=16, heads=4)
    for blk in lm.xattn_blocks():
        blk.gate_attn.data.fill_(0.7)
    model = ReportModel(res, 3, lm).eval()
    tok = SimpleNamespace(eos_id=3, pad_id=0, bos_id=2, prompt_ids=lambda p, b: torch.tensor([[2, 5, 6]] * b))
    feats = [torch.randn(n, 8) for n in (4, 9, 6)]
    coords = [torch.randint(0, 5, (len(f), 2)) for f in feats]

    def run(**kw):
        return generate_ids(model, tok, GenerateConfig(max_new_tokens=15, batch_size=2, **kw), feats, "p", coords)
    greedy = run(strategy="greedy")
    assert run(strategy="beam", num_beams=1) == greedy
    for r in run(strategy="beam", num_beams=3, no_repeat_ngram=2):
        seq = [2, 5, 6] + r
        assert len({tuple(seq[i:i + 2]) for i in range(len(seq) - 1)}) == len(seq) - 1
    for r in run(strategy="greedy", no_repeat_ngram=2):  # greedy with a repetition rule = one beam with it
        seq = [2, 5, 6] + r
        assert len({tuple(seq[i:i + 2]) for i in range(len(seq) - 1)}) == len(seq) - 1


def test_auto_no_repeat_size_is_the_smallest_repeat_free():
    from medvlp.finetune.report.experiment import longest_repeat_free

    class Tok:
        bos_id = 0
        words = {}

        def encode(self, text):
            return [self.words.setdefault(w, len(self.words) + 1) for w in text.split()]
    # "% of the tissue ." (5 words) repeats in the first report; no 6-gram does
    reports = ["Tumor covers 5 % of the tissue . Necrosis covers 1 % of the tissue . Final diagnosis: carcinoma.",
               "No tumor . Final diagnosis: benign tissue."]
    assert longest_repeat_free(Tok(), reports) == 6
    assert longest_repeat_free(Tok(), reports[1:]) == 1
