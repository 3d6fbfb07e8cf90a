"""Unit tests of the report model parts: resampler, gated XATTN, generation, the stage-2 loss, report parsing."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from medvlp.finetune.report.lm import ReportLM, build_lm
from medvlp.finetune.report.resampler import PerceiverResampler, cap_bag
from medvlp.finetune.report.text import composition_vector, parse_composition, parse_diagnosis, report_text, train_text

torch.set_num_threads(1)


def _resampler(**kw) -> PerceiverResampler:
    torch.manual_seed(0)
    return PerceiverResampler(feat_dim=12, width=16, latents=5, depth=2, heads=4, out_dim=24, **kw).eval()


def test_resampler_shape_independent_of_bag_size():
    res = _resampler()
    for n in (1, 7, 300):
        assert res(torch.randn(3, n, 12)).shape == (3, 5, 24)


def test_padded_patches_do_not_change_the_latents():
    res = _resampler()
    bag = torch.randn(1, 9, 12)
    ref = res(bag)
    padded = torch.cat([bag, 100 * torch.randn(1, 6, 12)], dim=1)  # garbage in the padding
    mask = torch.zeros(1, 15, dtype=torch.bool)
    mask[:, :9] = True
    torch.testing.assert_close(res(padded, mask), ref, rtol=0, atol=1e-6)
    # in a batch with a longer bag, each bag's latents are its own
    other = torch.randn(1, 15, 12)
    both = res(torch.cat([padded, other]), torch.cat([mask, torch.ones(1, 15, dtype=torch.bool)]))
    torch.testing.assert_close(both[:1], ref, rtol=0, atol=1e-6)


def test_resampler_rejects_wrong_feature_width():
    with pytest.raises(ValueError, match=r"expected a bag \(B, N, 12\)"):
        _resampler()(torch.randn(2, 4, 13))


def test_cap_bag_keeps_real_patches_only():
    feats = torch.arange(2 * 10, dtype=torch.float32).view(2, 10, 1)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, 3:] = False  # bag 1 has 3 real patches
    f, m = cap_bag(feats, mask, 4, train=True, generator=torch.Generator().manual_seed(0))
    assert f.shape == (2, 4, 1) and m.tolist()[1] == [True, True, True, False]
    assert set(f[0, :, 0].tolist()) <= set(range(10)) and f[0, :, 0].tolist() == sorted(f[0, :, 0].tolist())
    assert f[1, :3, 0].tolist() == [10.0, 11.0, 12.0]
    f, m = cap_bag(feats, mask, 4, train=False)
    assert f[0, :, 0].tolist() == [0.0, 3.0, 6.0, 9.0]  # even stride


def _lms(every=1):
    torch.manual_seed(0)
    bare = build_lm(40, hidden=32, layers=3, heads=4, ffn=64, dropout=0.0).eval()
    model = ReportLM(copy.deepcopy(bare), latent_dim=16, every=every, heads=4).eval()
    return bare, model


@pytest.mark.parametrize("every", [1, 2])
def test_gates_at_zero_give_exactly_the_bare_lm(every):
    bare, model = _lms(every)
    assert len(model.xattn_blocks()) == (3 if every == 1 else 2)
    ids = torch.randint(4, 40, (2, 9))
    lat = torch.randn(2, 5, 16)
    assert torch.equal(model(ids, latents=lat).logits, bare(input_ids=ids).logits)
    for blk in model.xattn_blocks():  # open the gates: now the slide matters
        blk.gate_attn.data.fill_(0.5)
    assert not torch.allclose(model(ids, latents=lat).logits, bare(input_ids=ids).logits)


def test_xattn_gets_gradients_under_gradient_checkpointing():
    _, model = _lms()
    model.train()
    model.set_gradient_checkpointing(True)
    assert model.lm.is_gradient_checkpointing and model._ctx.checkpointing
    for p in model.lm.parameters():
        p.requires_grad_(False)  # the LM frozen: only XATTN trains (the case the reference got wrong)
    blocks = model.xattn_blocks()
    for blk in blocks:
        blk.gate_attn.data.fill_(0.1)
        blk.gate_ff.data.fill_(0.1)
        for p in blk.parameters():
            p.requires_grad_(True)
    ids = torch.randint(4, 40, (2, 9))
    lat = torch.randn(2, 5, 16)
    out = model(ids, latents=lat, labels=ids)
    out.loss.backward()
    for i, blk in enumerate(blocks):
        for name, p in blk.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, f"block {i} {name} has no gradient"
    # and with gates at 0 the gates themselves still get gradients
    model.zero_grad()
    for blk in blocks:
        blk.gate_attn.data.zero_()
        blk.gate_ff.data.zero_()
    model(ids, latents=lat, labels=ids).loss.backward()
    assert all(blk.gate_attn.grad.abs().item() > 0 for blk in blocks)


@pytest.mark.parametrize("strategy", ["greedy", "beam", "nucleus"])
def test_generation_stops_at_eos(strategy):
    from medvlp.finetune.report.config import GenerateConfig
    from medvlp.finetune.report.evaluate import generation_kwargs

    _, model = _lms()
    eos = 3
    with torch.no_grad():  # make EOS the most likely next token everywhere after the first step
        model.lm.output_projection.weight.zero_()
        model.lm.output_projection.weight[eos] = 0.0
    bias = torch.full((40,), -10.0)
    bias[eos] = 10.0
    model.lm.output_projection.bias = torch.nn.Parameter(bias)

    class Tok:
        eos_id, pad_id, bos_id = eos, 0, 2
    kw = generation_kwargs(GenerateConfig(strategy=strategy, max_new_tokens=20), Tok)
    prompt = torch.tensor([[2, 5, 6]] * 2)
    out = model.generate(prompt, latents=torch.randn(2, 5, 16), **kw)
    assert out.shape[1] == prompt.shape[1] + 1 and (out[:, -1] == eos).all()


def test_changing_the_bag_changes_the_stage2_loss(tmp_path):
    from medvlp.finetune.report.config import ReportModelConfig
    from medvlp.finetune.report.model import ReportTokenizer, build_report_model

    reports = ["Tumor occupies about 40% of the tissue. Final diagnosis: carcinoma.",
               "No tumor is identified. Final diagnosis: benign tissue."] * 4
    tok = ReportTokenizer.train(reports, tmp_path / "tok", vocab_size=200)
    mc = ReportModelConfig(latents=4, width=16, depth=1, lm_hidden=32, lm_layers=2, lm_ffn=64, lm_dropout=0.0)
    torch.manual_seed(0)
    model = build_report_model(mc, feat_dim=8, n_classes=3, tok=tok).eval()
    for blk in model.lm.xattn_blocks():  # a trained model has open gates
        blk.gate_attn.data.fill_(1.0)
    batch = tok.training_batch(reports[:2], mc.prompt, mc.context_length)
    assert (batch["labels"][:, :4] == -100).all()  # [BOS] Final diagnosis : carry no loss
    feats = torch.randn(2, 6, 8)
    loss_a = model(feats, None, **batch).loss
    loss_b = model(feats + 1.0, None, **batch).loss
    assert torch.isfinite(loss_a) and abs(loss_a.item() - loss_b.item()) > 1e-4


def test_report_layout_and_parsing_round_trip():
    r = ("Inflammatory infiltrate covers about 5% of the tissue. Carcinoma involves about 60% of the sampled "
         "tissue. Areas of necrosis make up less than 5% of the section. The remaining tissue (about 30%) is "
         "unremarkable. Final diagnosis: carcinoma.")
    t = train_text(r)
    assert t.startswith("Final diagnosis: carcinoma. Inflammatory") and report_text(t) == r
    assert parse_composition(r) == {"inflammation": 5.0, "tumor": 60.0, "necrosis": 2.5, "normal": 30.0}
    assert parse_diagnosis(r, ["benign", "inflammation", "carcinoma"]) == "carcinoma"
    assert parse_diagnosis("Final diagnosis: chronic inflammation.", ["benign", "inflammation"]) == "inflammation"
    assert parse_diagnosis("Tumor everywhere.", ["benign"]) is None
    # detokenised model output (spaces before punctuation) parses the same
    assert composition_vector(report_text("Final diagnosis : carcinoma . Tumor occupies about 40 % of the tissue ."),
                              ["normal", "tumor"]) == [60.0, 40.0]


def test_synthetic_slide_reports_parse_back_to_their_ground_truth():
    from medvlp.data_shards.synth import synth_samples

    tissues = ["normal", "tumor", "inflammation", "necrosis"]
    classes = ["benign", "inflammation", "carcinoma"]
    for s in synth_samples("slide", n=80, seed=3):
        assert parse_diagnosis(s.text, classes) == s.meta["diagnosis"], s.text
        got = np.array(composition_vector(s.text, tissues))
        true = 100 * np.array([s.extra["composition"][t] for t in tissues])
        assert np.abs(got - true).max() <= 5.0, (s.text, s.extra["composition"])
