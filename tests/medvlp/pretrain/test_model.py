"""MedCLIP: every registry config builds, open_clip parity, token shapes, scale, decay groups, checkpoints, FLOPs."""
from __future__ import annotations

import json
import math
import pickle

import pytest
import torch

from medvlp.pretrain.config import LossConfig, ModelConfig
from medvlp.pretrain.model import MedCLIP, build_model, decay_param_names, flops_per_sample
from medvlp.pretrain.registry import get_model_config, list_models

DEBUG = [n for n in list_models() if n.startswith("debug")]
LARGE = [n for n in list_models() if not n.startswith(("debug", "patho-rn-tiny"))]


def _n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _inputs(model: MedCLIP, b: int = 2):
    g = torch.Generator().manual_seed(0)
    if model.image_kind == "3d":
        img = torch.randn(b, 1, *model.image_size, generator=g)
    else:
        img = torch.randn(b, 3, model.image_size, model.image_size, generator=g)
    tok = torch.randint(5, 1000, (b, model.context_length), generator=g)
    if model.spec["text"]["type"] == "openclip":
        tok[:, 5] = 49407  # [EOT], the argmax
        tok[:, 6:] = 0
    return img, tok


def test_registry_lists_required_models():
    assert {"debug", "debug-bert", "debug-3d", "RN50", "ViT-B-16"} <= set(list_models())
    assert all(isinstance(d, str) and d for d in list_models(with_descriptions=True).values())


@pytest.mark.parametrize("name", DEBUG)
def test_debug_models_build_and_run(name):
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=name))
    assert _n_params(model) < 5_000_000
    img, tok = _inputs(model)
    img_emb, txt_emb, scale = model(img, tok)
    assert img_emb.shape == txt_emb.shape == (2, model.embed_dim)
    torch.testing.assert_close(img_emb.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(txt_emb.norm(dim=-1), torch.ones(2))
    assert scale.ndim == 0 and scale.item() == pytest.approx(1 / 0.07, rel=1e-6)
    (img_emb.sum() + txt_emb.sum() + scale).backward()
    assert all(p.grad is not None for p in model.parameters()), "every parameter takes part in forward"


@pytest.mark.parametrize("name", LARGE)
def test_large_models_build_on_meta(name):
    """Build only (no forward on CPU); on the meta device so the test costs no memory or init time."""
    with torch.device("meta"):
        model = MedCLIP(get_model_config(name))
    assert _n_params(model) > 50_000_000


@pytest.mark.parametrize("name", ["RN50", "ViT-B-16"])
def test_same_architecture_as_open_clip(name):
    import open_clip

    with torch.device("meta"):  # the class and config open_clip.create_model(name) builds, without its .to(cpu)
        ours = MedCLIP(get_model_config(name))
        ref = open_clip.model.CLIP(**open_clip.get_model_config(name))
    assert _n_params(ours) == _n_params(ref)
    ours_vis = sorted(tuple(p.shape) for p in ours.visual.parameters())
    assert ours_vis == sorted(tuple(p.shape) for p in ref.visual.parameters())


def test_return_tokens_shapes():
    torch.manual_seed(0)
    vit = build_model(ModelConfig(name="debug"))
    emb, tok = vit.encode_image(torch.randn(2, 3, 64, 64), return_tokens=True)
    assert emb.shape == (2, 64) and [tuple(m.shape) for m in tok.maps] == [(2, 64, 8, 8)]  # (B, W, h, w) patch grid
    rn = build_model(ModelConfig(name="debug-rn"))
    emb, tok = rn.encode_image(torch.randn(2, 3, 64, 64), return_tokens=True)
    assert emb.shape == (2, 64) and tuple(tok.last.shape) == (2, 16 * 32, 2, 2)  # (B, C, h, w), stride 32
    ct = build_model(ModelConfig(name="debug-3d"))
    emb, tok = ct.encode_image(torch.randn(2, 1, 16, 64, 64), return_tokens=True)
    assert emb.shape == (2, 64)
    assert [tuple(m.shape) for m in tok.maps] == [(2, 8, 8, 16, 16), (2, 16, 4, 8, 8), (2, 32, 2, 4, 4),
                                                  (2, 64, 1, 2, 2)]
    assert tok.strides == ct.visual.scales == [(2, 4, 4), (4, 8, 8), (8, 16, 16), (16, 32, 32)]
    assert ct.image_kind == "3d" and ct.image_size == (16, 64, 64)


def test_grey_input_equals_repeated_rgb_and_bad_shape_error():
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="debug")).eval()
    grey = torch.randn(2, 1, 64, 64)
    torch.testing.assert_close(model.encode_image(grey), model.encode_image(grey.repeat(1, 3, 1, 1)))
    with pytest.raises(ValueError, match=r"expects \(B, C, H, W\), got shape \(1, 64, 64\)"):
        model.encode_image(grey[0])
    ct = build_model(ModelConfig(name="debug-3d"))
    with pytest.raises(ValueError, match=r"expects \(B, 1, D, H, W\)"):
        ct.encode_image(torch.randn(1, 3, 8, 32, 32))


def test_logit_scale_clamped_at_100():
    model = build_model(ModelConfig(name="debug"))
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    assert model.scale().item() == pytest.approx(100.0)
    model.scale().backward()
    assert model.logit_scale.grad.item() == 0.0  # no push beyond the clamp


def test_siglip_init_and_forward():
    model = build_model(ModelConfig(name="debug"), LossConfig(kind="siglip"))
    out = model(*_inputs(model))
    assert len(out) == 4
    assert out[2].item() == pytest.approx(10.0, rel=1e-6) and out[3].item() == pytest.approx(-10.0)
    custom = build_model(ModelConfig(name="debug", init_logit_scale=0.0, init_logit_bias=-2.0))
    assert custom.scale().item() == pytest.approx(1.0) and custom.logit_bias.item() == pytest.approx(-2.0)


@pytest.mark.parametrize("name", ["debug", "debug-3d", "debug-bert"])
def test_grad_checkpointing_gives_same_gradients(name):
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=name)).eval()  # eval: no dropout, so two runs are comparable
    img, tok = _inputs(model)
    grads = []
    for enable in (False, True):
        model.set_grad_checkpointing(enable)
        model.zero_grad(set_to_none=True)
        i, t, s = model(img, tok)
        ((i * t).sum() * s).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-7)


def test_decay_param_names():
    model = build_model(ModelConfig(name="debug"), LossConfig(kind="siglip"))
    names = decay_param_names(model)
    assert "visual.net.proj" in names and "text.net.text_projection" in names
    assert "visual.net.conv1.weight" in names and "text.net.token_embedding.weight" in names
    for excluded in ("logit_scale", "logit_bias", "visual.net.positional_embedding", "visual.net.class_embedding",
                     "text.net.positional_embedding", "visual.net.ln_pre.weight",
                     "visual.net.transformer.resblocks.0.attn.in_proj_bias"):
        assert excluded not in names
    groups = model.param_groups_for_decay(0.1)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    bert = build_model(ModelConfig(name="debug-bert"))
    bnames = decay_param_names(bert)
    assert not any("LayerNorm" in n or "position_embeddings" in n for n in bnames)


def test_checkpoint_round_trip_and_errors(tmp_path):
    torch.manual_seed(0)
    src = build_model(ModelConfig(name="debug"))
    torch.save({"module": {f"module.{k}": v for k, v in src.state_dict().items()}}, tmp_path / "ckpt.pt")
    torch.manual_seed(1)
    dst = build_model(ModelConfig(name="debug", checkpoint=str(tmp_path / "ckpt.pt")))
    for (n, a), b in zip(src.state_dict().items(), dst.state_dict().values()):
        assert torch.equal(a, b), n
    torch.save({"visual.net.proj": torch.zeros(1)}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"bad\.pt: does not fit the model: missing"):
        build_model(ModelConfig(name="debug", checkpoint=str(tmp_path / "bad.pt")))
    with pytest.raises(FileNotFoundError, match="model.checkpoint: .*nope.pt is not a file"):
        build_model(ModelConfig(name="debug", checkpoint=str(tmp_path / "nope.pt")))


def test_registry_errors_name_file_and_key(tmp_path):
    with open(get_model_config("debug")["source"]) as f:
        bad = json.load(f)
    bad["vision"]["widht"] = 64
    p = tmp_path / "typo.json"
    p.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"typo\.json: vision: unknown key 'widht'"):
        build_model(ModelConfig(name=str(p)))
    bad.pop("vision")
    bad["visoin"] = {}
    p.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"typo\.json: unknown key 'visoin'"):
        get_model_config(str(p))
    with pytest.raises(KeyError, match="model 'RN51': not a registered model"):
        get_model_config("RN51")
    with pytest.raises(RuntimeError, match="needs model.tokenizer"):
        build_model(ModelConfig(name="debug-bert")).tokenizer


def test_tokenizer_is_picklable():
    model = build_model(ModelConfig(name="debug"))
    texts = ["no acute cardiopulmonary process", "small left pleural effusion"]
    tok = model.tokenizer
    blob = pickle.dumps(tok)
    assert len(blob) < 10_000  # settings only, not the BPE tables
    assert torch.equal(pickle.loads(blob)(texts), model.tokenize(texts))


def _vit_forward_flops(w, layers, tokens, patch_dim, embed, mlp=4):
    per_layer = tokens * 2 * (4 * w * w + 2 * mlp * w * w) + 2 * 2 * tokens * tokens * w
    return 2 * (tokens - 1) * patch_dim * w + layers * per_layer + 2 * w * embed


def test_flops_per_sample_matches_a_hand_count():
    model = build_model(ModelConfig(name="debug"))
    vis = _vit_forward_flops(64, 2, 65, 3 * 8 * 8, 64)
    txt = _vit_forward_flops(64, 2, 77, 0, 64)  # no patch embedding (a lookup)
    got = flops_per_sample(model)
    assert got == pytest.approx(3 * (vis + txt), rel=1e-9)
    assert flops_per_sample(ModelConfig(name="debug")) == got
    assert flops_per_sample("ViT-B-16") == pytest.approx(3 * 2 * (17.5e9 + 2.9e9), rel=0.05)  # published GMACs
    assert math.isfinite(flops_per_sample("debug-bert")) and flops_per_sample("debug-3d") > 0
