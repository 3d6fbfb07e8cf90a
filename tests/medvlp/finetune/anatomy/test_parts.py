"""Pure parts of the anatomy stage against hand-computed values."""
import math

import pytest
import torch
import torch.nn.functional as F

from medvlp.finetune.anatomy.losses import organ_contrastive_loss, soft_targets, vse_loss, vse_targets
from medvlp.finetune.anatomy.organs import OrganQueryPool, pool_organ_masks
from medvlp.finetune.anatomy.vsd import EMACodebook, NormalityVSD, codebook_usage, minmax_scale, minmax_unscale


def test_mask_pooling_matches_hand_computed_flags():
    mask = torch.zeros(1, 4, 4, 4, dtype=torch.long)
    mask[0, 0, 0, 0] = 1  # organ 0: one voxel in cell (0, 0, 0)
    mask[0, 3, 3, 3] = 2  # organ 1: cell (1, 1, 1) -> token 7
    mask[0, 1, 2, 0] = 2  # organ 1: cell (0, 1, 0) -> token 2
    (f,) = pool_organ_masks(mask, 2, [(2, 2, 2)])
    assert f.shape == (1, 2, 8)
    assert f[0, 0].nonzero().flatten().tolist() == [0]
    assert f[0, 1].nonzero().flatten().tolist() == [2, 7]
    # anisotropic stride (1, 2, 2): organ 1 voxel (1, 2, 0) -> cell (1, 1, 0) in a 4x2x2 grid -> 1*4 + 1*2 + 0 = 6
    (g,) = pool_organ_masks(mask, 2, [(1, 2, 2)], [(4, 2, 2)])
    assert g[0, 1].nonzero().flatten().tolist() == [6, 15]
    # odd size: a partial border cell counts (grid = ceil(5 / 2) = 3), as the tower's padded strided convs
    m5 = torch.zeros(1, 5, 5, 5, dtype=torch.long)
    m5[0, 4, 4, 4] = 1
    (h,) = pool_organ_masks(m5, 1, [(2, 2, 2)], [(3, 3, 3)])
    assert h[0, 0].nonzero().flatten().tolist() == [26]


def test_mask_pooling_rejects_bad_input():
    with pytest.raises(ValueError, match="labels 3..3 outside 0..2"):
        pool_organ_masks(torch.full((1, 2, 2, 2), 3), 2, [(2, 2, 2)])
    with pytest.raises(ValueError, match="token map 0 has grid"):
        pool_organ_masks(torch.zeros(1, 4, 4, 4, dtype=torch.long), 2, [(2, 2, 2)], [(4, 4, 4)])


def test_query_pool_sees_only_its_organ_tokens():
    torch.manual_seed(0)
    pool = OrganQueryPool(2, 8, heads=2)
    x = torch.randn(1, 6, 8)
    flags = torch.tensor([[[1, 1, 0, 0, 0, 0], [0, 0, 1, 1, 0, 0]]], dtype=torch.bool)
    out = pool(x, flags)
    x2 = x.clone()
    x2[0, 2:] += 5.0  # not organ 0's tokens
    out2 = pool(x2, flags)
    assert torch.allclose(out[0, 0], out2[0, 0], atol=1e-6)
    assert not torch.allclose(out[0, 1], out2[0, 1], atol=1e-3)
    # an organ without tokens pools to the output of a zero vector (finite, no NaN)
    empty = pool(x, torch.zeros_like(flags))
    assert torch.isfinite(empty).all()


def test_soft_targets_on_a_hand_made_batch():
    normal = torch.tensor([1, 1, 0, 0, 0])
    sents = ["The liver is unremarkable.", "No focal lesion in the liver.", "A 12 mm lesion.", "a 12 mm  lesion",
             "A 20 mm lesion."]
    T = soft_targets(normal, sents)
    expect = torch.tensor([[.5, .5, 0, 0, 0], [.5, .5, 0, 0, 0], [0, 0, .5, .5, 0], [0, 0, .5, .5, 0],
                           [0, 0, 0, 0, 1.]])
    assert torch.allclose(T, expect)
    # hard and soft agree when every sample is abnormal with a distinct sentence
    img = F.normalize(torch.randn(3, 1, 4), dim=-1)
    txt = F.normalize(torch.randn(3, 1, 4), dim=-1)
    present = torch.ones(3, 1, dtype=torch.bool)
    soft = organ_contrastive_loss(img, txt, torch.tensor(10.0), present, torch.zeros(3, 1), [["a"], ["b"], ["c"]])
    hard = organ_contrastive_loss(img, txt, torch.tensor(10.0), present, soft=False)
    logits = 10.0 * img[:, 0] @ txt[:, 0].t()
    ref = 0.5 * (F.cross_entropy(logits, torch.arange(3)) + F.cross_entropy(logits.t(), torch.arange(3)))
    assert torch.allclose(soft, ref) and torch.allclose(hard, ref)


def test_vse_pulls_normals_and_pushes_abnormal_pairs():
    P = vse_targets(torch.tensor([1, 1, 0]))
    assert P.tolist() == [[True, True, False], [True, True, False], [False, False, True]]
    e = torch.eye(3)
    # normals 0, 1 share an embedding, abnormal 2 is orthogonal: lower loss than the abnormal next to a normal
    good = F.normalize(torch.stack([e[0], e[0], e[1]]), dim=-1)[:, None]
    bad = F.normalize(torch.stack([e[0], e[1], e[0]]), dim=-1)[:, None]
    normal = torch.tensor([[1], [1], [0]])
    present = torch.ones(3, 1, dtype=torch.bool)
    assert vse_loss(good, good, normal, present) < vse_loss(bad, bad, normal, present)


def test_minmax_round_trip():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 4) * 7 + 2
    keep = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    xs, lo, hi = minmax_scale(x, keep)
    k = keep.unsqueeze(-1).expand_as(x)
    for r in range(2):
        v = xs[r][k[r]]
        assert math.isclose(float(v.min()), -0.5, abs_tol=1e-6) and math.isclose(float(v.max()), 0.5, abs_tol=1e-6)
    assert (xs[~k] == 0).all()
    back = minmax_unscale(xs, lo, hi)
    assert torch.allclose(back[k], x[k], atol=1e-5)
    assert torch.isfinite(back).all()


def test_ema_codebook_update_against_hand_computed_step():
    cb = EMACodebook(2, 2, decay=0.5, eps=0.0)
    cb.embed.copy_(torch.tensor([[0.0, 0.0], [4.0, 0.0]]))
    cb.embed_sum.copy_(cb.embed)
    cb.cluster_size.fill_(1.0)
    cb.initialised.fill_(True)
    z = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0]])
    idx = cb.assign(z)
    assert idx.tolist() == [0, 1, 0]  # (1,0)->0; (3,0)->4; (0,2): d0 = 4 < d1 = 20
    cb.train()
    zq, q, idx = cb(z, torch.ones(3, dtype=torch.bool))
    # n = [2, 1]; N = 0.5*1 + 0.5*n = [1.5, 1.0]; m0 = 0.5*(0,0) + 0.5*(1,2) = (0.5, 1); m1 = 0.5*(4,0) + 0.5*(3,0)
    assert torch.allclose(cb.cluster_size, torch.tensor([1.5, 1.0]))
    assert torch.allclose(cb.embed, torch.tensor([[0.5 / 1.5, 1.0 / 1.5], [3.5, 0.0]]))
    # straight-through: the forward value is the (pre-update) code, the gradient flows to z unchanged
    assert torch.allclose(q, torch.tensor([[0.0, 0.0], [4.0, 0.0], [0.0, 0.0]]))
    zg = z.clone().requires_grad_(True)
    cb.eval()
    out, _, _ = cb(zg)
    out.sum().backward()
    assert torch.allclose(zg.grad, torch.ones_like(z))
    # rows not marked for update leave the codebook alone; eval never updates
    before = cb.embed.clone()
    cb.train()
    cb(z, torch.zeros(3, dtype=torch.bool))
    assert torch.equal(cb.embed, before)


def test_organ_id_conditioning_changes_the_reconstruction():
    torch.manual_seed(0)
    vsd = NormalityVSD(3, 16, "conditioned", code_dim=16, codebook_size=8).eval()
    x = torch.randn(1, 4, 16)
    flags = torch.ones(1, 3, 4, dtype=torch.bool)
    # codes at the encodings of organ 0 and organ 1 (4 tokens each): the id decides which codes the tokens take
    vae, cb = vsd.vaes[0], vsd.codebooks[0]
    xs = minmax_scale(x, flags[:, 0])[0]
    with torch.no_grad():
        z = [vae.enc(torch.cat([vae.enc_in(vsd.organ_id.weight[o])[None, None], vae.enc_in(xs)], 1))[0, 1:]
             for o in (0, 1)]
    cb.embed.copy_(torch.cat(z))
    out = vsd(x, flags)
    assert out.codes[0, 0].tolist() == [0, 1, 2, 3] and out.codes[0, 1].tolist() == [4, 5, 6, 7]
    # same tokens, different organ id -> different reconstruction
    assert not torch.allclose(out.recon[0, 0], out.recon[0, 1], atol=1e-4)
    # swapping the ids swaps the reconstructions
    sw = vsd(x, flags, organ_ids=torch.tensor([1, 0, 2]))
    assert torch.allclose(sw.recon[0, 0], out.recon[0, 1], atol=1e-5)
    # per-anatomy mode: separate VQ-VAEs, no id token
    pa = NormalityVSD(3, 16, "per_anatomy", code_dim=16, codebook_size=8).eval()
    assert pa.organ_id is None and len(pa.codebooks) == 3
    assert not torch.allclose(pa(x, flags).recon[0, 0], pa(x, flags).recon[0, 1], atol=1e-4)
    with pytest.raises(ValueError, match="vsd mode"):
        NormalityVSD(3, 16, "shared")


def test_vsd_trains_only_on_normal_rois_and_reconstructs_in_the_roi():
    torch.manual_seed(0)
    vsd = NormalityVSD(2, 8, "conditioned", code_dim=8, codebook_size=4).train()
    x = torch.randn(2, 3, 8)
    flags = torch.tensor([[[1, 1, 0], [0, 1, 1]], [[1, 0, 0], [1, 1, 1]]], dtype=torch.bool)
    before = vsd.codebooks[0].embed.clone()
    out = vsd(x, flags, normal_BO=torch.zeros(2, 2, dtype=torch.bool))  # nothing normal: no update, zero loss
    assert torch.equal(vsd.codebooks[0].embed, before) and float(out.loss.detach()) == 0.0
    out = vsd(x, flags, normal_BO=torch.ones(2, 2, dtype=torch.bool))
    assert not torch.equal(vsd.codebooks[0].embed, before) and float(out.loss) > 0
    assert (out.recon[~flags] == 0).all() and (out.codes[~flags] == -1).all() and (out.codes[flags] >= 0).all()
    out.loss.backward()
    assert vsd.vaes[0].enc_in[0].weight.grad is not None  # straight-through reaches the encoder


def test_codebook_usage():
    u = codebook_usage(torch.tensor([2.0, 2.0, 0.0, 0.0]))
    assert math.isclose(u["perplexity"], 2.0, rel_tol=1e-9) and u["dead_codes"] == 2


@pytest.mark.timeout(300)
def test_organ_fractions_interior_flags_and_statistic_pooling():
    from medvlp.finetune.anatomy.organs import organ_fractions, organ_token_flags, stat_pool

    mask = torch.zeros(1, 4, 4, 4, dtype=torch.long)
    mask[0, :2, :2, :2] = 1  # organ 0 fills cell 0
    mask[0, 0, 2, 0] = 1  # and one voxel of cell 2
    mask[0, 3, 3, 3] = 2  # organ 1: one voxel of cell 7 only
    (fr,) = organ_fractions(mask, 2, [(2, 2, 2)])
    assert fr[0, 0, 0] == 1.0 and fr[0, 0, 2] == 0.125 and fr[0, 1, 7] == 0.125 and fr.sum() == 1.25
    flags = organ_token_flags(fr)
    assert flags[0, 0].nonzero().flatten().tolist() == [0]  # the boundary cell 2 is not interior
    assert flags[0, 1].nonzero().flatten().tolist() == [7]  # no interior cell: keeps the cell it touches
    x = torch.tensor([[[1.0], [9.0], [5.0], [0.0], [0.0], [0.0], [0.0], [3.0]]])  # (B, L, C=1)
    w = torch.tensor([[[1.0, 0, 1, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0, 0]]])  # organ 0: tokens 0 and 2
    st = stat_pool(x, w)
    assert st.shape == (1, 2, 2)
    assert st[0, 0, 0].item() == pytest.approx(5.0 - 3.0)  # max - mean of {1, 5}
    assert st[0, 0, 1].item() == pytest.approx(2.0, abs=2e-3)  # sd of {1, 5}
    assert st[0, 1].abs().max() == 0  # an organ without tokens: zeros, finite gradient
    x.requires_grad_(True)
    stat_pool(x, w).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad[0, 1].abs().max() == 0  # token 1 is not organ 0's


@pytest.mark.timeout(300)
def test_operating_point_comes_from_the_validation_scores():
    import numpy as np

    from medvlp.finetune.anatomy.evaluate import organ_metrics, organ_thresholds

    y_val = np.array([[0], [0], [1], [1]])
    s_val = np.array([[0.1], [0.2], [0.6], [0.9]])
    thr = organ_thresholds(y_val, s_val, np.ones_like(y_val, bool), ["liver"])
    assert thr == {"liver": 0.6}
    y = np.array([[0], [0], [1], [1]])
    s = np.array([[0.3], [0.7], [0.5], [0.8]])  # on test alone the best threshold would be 0.8 or 0.5
    m = organ_metrics(y, s, np.ones_like(y, bool), ["liver"], thr)
    # at 0.6 (from validation): predictions 0, 1, 0, 1 -> sensitivity 1/2, specificity 1/2
    assert (m["sensitivity/liver"], m["specificity/liver"], m["accuracy/liver"]) == (0.5, 0.5, 0.5)
    assert m["auc/liver"] == 0.75
    absent = organ_metrics(y, s, np.zeros_like(y, bool), ["liver"], thr)
    assert math.isnan(absent["auc/liver"]) and math.isnan(absent["sensitivity/liver"])


@pytest.mark.timeout(300)
def test_stem_options_of_the_3d_tower():
    from medvlp.pretrain.towers3d import ResNet3D

    t = ResNet3D(16, {"widths": [8, 16, 32], "blocks": [1, 1, 1], "stem_stride": [1, 1, 1],
                      "stem_kernel": [3, 3, 3]})
    _, tok = t(torch.zeros(1, 1, 16, 32, 32), return_tokens=True)
    assert tok.strides == [(2, 2, 2), (4, 4, 4), (8, 8, 8)] and [tuple(m.shape[2:]) for m in tok.maps] == \
        [(8, 16, 16), (4, 8, 8), (2, 4, 4)]
    with pytest.raises(ValueError, match="stem_stride"):
        ResNet3D(16, {"stem_stride": [3, 1, 1]})
    with pytest.raises(ValueError, match="stem_kernel"):
        ResNet3D(16, {"stem_kernel": [2, 3, 3]})


@pytest.mark.timeout(300)
def test_fast_macro_auc_equals_the_reference():
    import numpy as np

    from medvlp.finetune.anatomy.ablation import macro_auc_fast
    from medvlp.pretrain.metrics import macro_auc

    rng = np.random.default_rng(0)
    y = rng.integers(-1, 2, (40, 5))
    y[:, 4] = 0  # one class only: skipped by both
    s = np.round(rng.random((40, 5)), 1)  # ties
    assert macro_auc_fast(y, s) == pytest.approx(macro_auc(y, s), abs=1e-12)


@pytest.mark.timeout(300)
def test_stem_statistic_reads_the_organ_voxels_of_the_stem_map():
    from medvlp.finetune.anatomy.model import AnatomyModelConfig, OrganEncoder
    from medvlp.pretrain.towers3d import ResNet3D

    torch.manual_seed(0)
    tower = ResNet3D(16, {"image_size": [8, 16, 16], "widths": [8, 16, 32], "blocks": [1, 1, 1],
                          "stem_stride": [1, 1, 1], "stem_kernel": [1, 1, 1]}).eval()
    enc = OrganEncoder(tower, 2, AnatomyModelConfig(width=16, stem_stat=True)).eval()
    assert enc.stat[0].in_features == 2 * 2 * 16 + 2 * 8  # two token scales (C = 16) + the stem's 8 channels
    vol = torch.randn(2, 1, 8, 16, 16)
    mask = torch.zeros(2, 8, 16, 16, dtype=torch.long)
    mask[:, 2:6, 4:10, 4:10] = 1
    mask[:, 1:3, 12:15, 12:15] = 2
    tok, stem = enc.tower(vol)
    _, ref = tower(vol, return_tokens=True)
    assert all(torch.equal(a, b) for a, b in zip(tok.maps, ref.maps)) and tok.strides == ref.strides
    x, w = enc.stem_weights(mask, stem)
    assert x.shape == (2, 8 * 16 * 16, 8) and torch.equal(w[:, 0].bool(), (mask == 1).flatten(1))
    # a pointwise stem: changing one voxel outside every organ leaves the stem statistic of the organs unchanged
    # (up to the stem's GroupNorm statistics over the whole volume), changing one inside organ 0 changes organ 0's
    vol2 = vol.clone()
    vol2[:, 0, 7, 0, 0] += 3.0
    _, stem2 = enc.tower(vol2)
    from medvlp.finetune.anatomy.organs import stat_pool

    assert torch.allclose(stat_pool(*enc.stem_weights(mask, stem2)), stat_pool(x, w), atol=1e-2)
    vol3 = vol.clone()
    vol3[:, 0, 3, 5, 5] += 3.0
    _, stem3 = enc.tower(vol3)
    d = (stat_pool(*enc.stem_weights(mask, stem3)) - stat_pool(x, w)).abs().amax(-1)
    assert (d[:, 0] > 0.1).all() and (d[:, 1] < 1e-2).all()
    out = enc(vol, mask)
    assert out.pooled.shape == (2, 2, 16) and torch.isfinite(out.pooled).all()


def test_organ_stat_norm_standardises_each_organ_over_the_volumes_that_have_it():
    from medvlp.finetune.anatomy.config import AnatomyConfig
    from medvlp.finetune.anatomy.model import AnatomyModelConfig
    from medvlp.finetune.anatomy.organs import OrganStatNorm

    torch.manual_seed(0)
    x = torch.randn(6, 2, 3) * torch.tensor([[1.0], [100.0]]) + torch.tensor([[0.0], [5.0]])
    present = torch.ones(6, 2, dtype=torch.bool)
    present[4:, 1] = False  # organ 1 absent from the last two volumes
    norm = OrganStatNorm(2, 3, momentum=0.5).train()
    y = norm(x, present)
    for o, keep in ((0, slice(0, 6)), (1, slice(0, 4))):
        ref = (x[keep, o] - x[keep, o].mean(0)) / (x[keep, o].var(0, unbiased=False) + 1e-5).sqrt()
        assert torch.allclose(y[keep, o], ref, atol=1e-4)  # each organ on its own scale, absent volumes not counted
    assert torch.equal(y[4:, 1], torch.zeros(2, 3))  # an absent organ stays zero
    assert torch.allclose(norm.running_mean[1], 0.5 * x[:4, 1].mean(0), atol=1e-4)
    assert torch.allclose(norm.running_var[1], 0.5 + 0.5 * x[:4, 1].var(0, unbiased=True), rtol=1e-4)
    y.sum().backward()
    assert norm.weight.grad is not None and torch.isfinite(norm.weight.grad).all()
    norm.eval()  # evaluation: the running statistics, one volume at a time gives the same as in a batch
    one = norm(x[:1], present[:1])
    assert torch.allclose(one, norm(x, present)[:1])
    ref = (x[0, 1] - norm.running_mean[1]) / (norm.running_var[1] + 1e-5).sqrt()
    assert torch.allclose(one[0, 1], ref, atol=1e-5)
    single = OrganStatNorm(2, 3).train()  # an organ in one volume of the batch keeps the running statistics
    solo = torch.zeros(6, 2, dtype=torch.bool)
    solo[0, 0] = True
    assert torch.allclose(single(x, solo)[0, 0], x[0, 0] / (1 + 1e-5) ** 0.5) and torch.equal(single.running_mean,
                                                                                                torch.zeros(2, 3))
    cfg = AnatomyConfig(head=AnatomyModelConfig(stem_norm=True))
    with pytest.raises(ValueError, match="head.stem_norm"):
        cfg.validate()


@pytest.mark.timeout(60)
def test_organ_bce_scores_only_present_organs():
    from medvlp.finetune.anatomy.e2e import OrganNormalityHead, organ_bce

    logits = torch.tensor([[0.0, 2.0], [1.0, -3.0]])
    labels = torch.tensor([[1, 0], [0, -1]])
    present = torch.tensor([[True, True], [True, False]])
    want = (math.log(2) + math.log(1 + math.exp(2.0)) + math.log(1 + math.exp(1.0))) / 3
    assert organ_bce(logits, labels, present).item() == pytest.approx(want, rel=1e-5)
    assert organ_bce(logits, labels, torch.zeros_like(present)).item() == 0.0
    head = OrganNormalityHead(2, 3)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0, 0], [0, 0, 2.0]]))
        head.bias.copy_(torch.tensor([0.5, -1.0]))
    assert head(torch.ones(1, 2, 3)).tolist() == [[1.5, 1.0]]


@pytest.mark.timeout(120)
def test_e2e_names_bad_input(tmp_path, capsys):
    from medvlp.finetune.anatomy.e2e import main

    assert main(["anatomy-synth-px", "--heldout", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "--heldout" in capsys.readouterr().err
    assert main(["anatomy-synth-px", "--heldout", str(tmp_path), "--out", str(tmp_path / "o"),
                 "--set", "head.stem_stats=true"]) == 2
    assert "head.stem_stats" in capsys.readouterr().err
