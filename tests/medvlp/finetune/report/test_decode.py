"""Decoding of the report generator (`transformers`' `generate` behind `gen.*`): one beam is greedy token for token
(and both match a step-by-step argmax of the model), beam finds the likelier report where greedy does not, the
no-repeat rule holds, the `auto` n-gram size, and bad `gen.*` values name their key."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from medvlp.finetune.report.config import GenerateConfig
from medvlp.finetune.report.decode import auto_no_repeat_ngram
from medvlp.finetune.report.evaluate import generate_ids
from medvlp.finetune.report.lm import ReportLM, build_lm
from medvlp.finetune.report.model import ReportModel
from medvlp.finetune.report.resampler import PerceiverResampler

pytestmark = pytest.mark.timeout(120)
torch.set_num_threads(1)
PAD, EOS, BOS, P1, P2, A, B, C = range(8)  # P1 P2: the prompt after BOS
V = 8
PROMPT = [BOS, P1, P2]


def _tok():
    return SimpleNamespace(eos_id=EOS, pad_id=PAD, bos_id=BOS,
                           prompt_ids=lambda _p, b: torch.tensor([PROMPT] * b))


def _model(lm: ReportLM, feat_dim: int = 8) -> ReportModel:
    torch.manual_seed(1)
    res = PerceiverResampler(feat_dim, width=16, latents=5, depth=1, heads=4, out_dim=lm.config.hidden_size,
                             pos_freqs=2)
    return ReportModel(res, 3, lm).eval()


def _bags(n: int = 3):
    g = torch.Generator().manual_seed(2)
    feats = [torch.randn(k, 8, generator=g) for k in (4, 9, 6, 7, 5)[:n]]
    return feats, [torch.randint(0, 5, (len(f), 2), generator=g) for f in feats]


def _decode(model, feats, coords, **gen):
    return generate_ids(model, _tok(), GenerateConfig(**{"max_new_tokens": 15, "batch_size": 2, **gen}), feats, "p",
                        coords)


def _random_model() -> ReportModel:
    torch.manual_seed(0)
    lm = ReportLM(build_lm(40, hidden=32, layers=2, heads=4, ffn=64, dropout=0.0), latent_dim=32, heads=4)
    for blk in lm.xattn_blocks():  # open gates: the slide matters
        blk.gate_attn.data.fill_(0.7)
        blk.gate_ff.data.fill_(0.3)
    return _model(lm)


def table_model(table: dict[int, dict[int, float]]) -> ReportModel:
    """A real `ReportModel` (BioGPT LM, XATTN gates closed) whose next-token distribution depends only on the last
    token: table[last] = {tok: p}, unlisted tokens 1e-9 (EOS 1.0 after a token with no row). Built by hand: no
    positions, attention and FFN outputs zeroed, one-hot token embeddings, and the output projection solved so that
    the logits are log table[last]."""
    torch.manual_seed(0)
    H = 16
    lm = ReportLM(build_lm(V, hidden=H, layers=1, heads=4, ffn=32, dropout=0.0), latent_dim=H, heads=4)
    base = lm.lm
    with torch.no_grad():
        for name, p in base.named_parameters():
            if "embed_positions" in name or "out_proj" in name or "fc2" in name:
                p.zero_()
        base.biogpt.embed_tokens.weight.copy_(torch.eye(V, H))
        x = {}
        hook = base.output_projection.register_forward_hook(lambda m, i, o: x.setdefault("h", i[0]))
        base(input_ids=torch.arange(V)[None], use_cache=False)
        hook.remove()
        X = x["h"][0].double()  # (V, H): the final hidden state of each token
        T = torch.full((V, V), 1e-9, dtype=torch.float64)
        for last in range(V):
            for tok, p in table.get(last, {EOS: 1.0}).items():
                T[last, tok] = p
        W = torch.linalg.lstsq(X, T.log()).solution  # X W = log T
        base.output_projection.weight.copy_(W.T.float())
        got = base(input_ids=torch.arange(V)[None], use_cache=False).logits[0].double()
        assert torch.allclose(got, T.log(), atol=1e-3), "hand-built LM does not reproduce its table"
    return _model(lm)


def _logp(table, seq):
    out, last = 0.0, PROMPT[-1]
    for t in seq + [EOS]:
        out += math.log(table.get(last, {EOS: 1.0}).get(t, 1e-9))
        last = t
    return out


def test_one_beam_is_greedy_token_for_token_and_both_are_the_argmax():
    model = _random_model()
    feats, coords = _bags()
    greedy = _decode(model, feats, coords, strategy="greedy")
    assert _decode(model, feats, coords, strategy="beam", num_beams=1) == greedy
    assert len({tuple(r) for r in greedy}) == 3  # the slides' latents give different reports
    # the reference: the argmax of the model's full forward at each step (no cache, latents of each slide)
    for f, c, got in zip(feats, coords, greedy):
        ids = torch.tensor([PROMPT])
        with torch.no_grad():
            lat = model.latents(f[None], torch.ones(1, len(f), dtype=torch.bool), c[None])
            ref = []
            for _ in range(15):
                nxt = int(model.lm(ids, attention_mask=torch.ones_like(ids), latents=lat).logits[0, -1].argmax())
                if nxt == EOS:
                    break
                ref.append(nxt)
                ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
        assert got == [t for t in ref if t != PAD]


def test_beam_finds_the_likelier_report_greedy_misses():
    # greedy takes A (0.6) then EOS (0.4): p = 0.24; B (0.4) then EOS (0.99) is p = 0.396
    table = {P2: {A: 0.6, B: 0.4}, A: {EOS: 0.4, A: 0.3, B: 0.3}, B: {EOS: 0.99, A: 0.005, B: 0.005}}
    model = table_model(table)
    feats, coords = _bags(2)
    greedy = _decode(model, feats, coords, strategy="greedy")
    beam = _decode(model, feats, coords, strategy="beam", num_beams=2)
    assert greedy == [[A], [A]] and beam == [[B], [B]]
    assert _logp(table, [B]) == pytest.approx(math.log(0.396)) and _logp(table, [A]) == pytest.approx(math.log(0.24))


def test_length_penalty_reaches_the_search():
    # [] (EOS now) p = 0.5; [A] then EOS p = 0.49: the plain sum keeps the short report, sum / length the long one
    table = {P2: {EOS: 0.5, A: 0.5}, A: {EOS: 0.98, B: 0.02}, B: {EOS: 1.0}}
    model = table_model(table)
    feats, coords = _bags(1)
    assert _decode(model, feats, coords, strategy="beam", num_beams=2, length_penalty=0.0) == [[]]
    assert _decode(model, feats, coords, strategy="beam", num_beams=2, length_penalty=1.0) == [[A]]


@pytest.mark.parametrize("strategy, num_beams", [("greedy", 1), ("beam", 3)])
def test_no_repeat_ngram_holds(strategy, num_beams):
    # an LM that loops A B A B ... (the failure seen in greedy reports)
    table = {P2: {A: 0.9, C: 0.1}, A: {B: 0.9, C: 0.1, EOS: 1e-4}, B: {A: 0.9, C: 0.1, EOS: 1e-4},
             C: {A: 0.5, B: 0.5, EOS: 1e-4}}
    model = table_model(table)
    feats, coords = _bags(2)
    loose = _decode(model, feats, coords, strategy=strategy, num_beams=num_beams, max_new_tokens=12)
    assert all(len({tuple(r[i:i + 2]) for i in range(len(r) - 1)}) < len(r) - 1 for r in loose)  # it loops
    for n in (2, 3):
        for r in _decode(model, feats, coords, strategy=strategy, num_beams=num_beams, max_new_tokens=12,
                         no_repeat_ngram=n):
            seq = PROMPT + r
            grams = [tuple(seq[i:i + n]) for i in range(len(seq) - n + 1)]
            assert len(grams) == len(set(grams)) and len(r) >= 2, (n, r)


def test_auto_no_repeat_size_is_the_smallest_repeat_free():
    class Tok:
        bos_id = 0

        def __init__(self):
            self.words: dict[str, int] = {}

        def encode(self, text):
            return [self.words.setdefault(w, len(self.words) + 1) for w in text.split()]
    # "% of the tissue ." (5 words) repeats in the first report; no 6-gram does
    reports = ["Tumor covers 5 % of the tissue . Necrosis covers 1 % of the tissue . Final diagnosis: carcinoma.",
               "No tumor . Final diagnosis: benign tissue."]
    assert auto_no_repeat_ngram(Tok(), reports) == 6
    assert auto_no_repeat_ngram(Tok(), reports[1:]) == 1


@pytest.mark.parametrize("override, message", [
    ("gen.num_beams=0", "gen.num_beams: must be an integer >= 1, got 0"),
    ("gen.repetition_penalty=-1.5", "gen.repetition_penalty: must be a finite number > 0, got -1.5"),
    ("gen.no_repeat_ngram=-2", "gen.no_repeat_ngram: must be an integer >= 0, got -2"),
    ("gen.length_penalty=inf", "gen.length_penalty: must be a finite number, got inf"),
])
def test_bad_decoding_values_name_their_key(override, message):
    from medvlp.launch.cli import load_stage_config
    from medvlp.launch.config import ConfigError

    with pytest.raises(ConfigError, match=f"^{message}$"):
        load_stage_config("report", "report-synth", [override])


@pytest.mark.parametrize("args, message", [
    (["--num-beams", "0"], "--num-beams: must be an integer >= 1, got 0\n"),
    (["--repetition-penalty", "-1"], "--repetition-penalty: must be a finite number > 0, got -1.0\n"),
])
def test_experiment_refuses_bad_decoding_flags_in_one_line(tmp_path, capsys, args, message):
    from medvlp.finetune.report.experiment import main

    assert main(["--shards", str(tmp_path), "--out", str(tmp_path / "o"), *args]) == 2
    assert capsys.readouterr().err == message
