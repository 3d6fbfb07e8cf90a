"""VisionTokens: one token type for the ResNet, ViT and 3D towers."""
import pytest
import torch

from medvlp.pretrain.config import ModelConfig
from medvlp.pretrain.model import build_model
from medvlp.pretrain.tokens import VisionTokens

CASES = {  # model name -> (input shape, kind, number of maps)
    "debug": ((2, 3, 64, 64), "vit", 1),
    "debug-rn": ((2, 3, 64, 64), "resnet", 4),
    "debug-3d": ((2, 1, 16, 64, 64), "resnet3d", 4),
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=request.param)).eval()
    shape, kind, n_maps = CASES[request.param]
    return model, torch.randn(*shape), kind, n_maps


def test_pooled_embedding_equals_encode_image(case):
    model, x, kind, n_maps = case
    with torch.no_grad():
        emb, tok = model.encode_image(x, return_tokens=True)
        ref = model.encode_image(x)
        raw, _ = model.encode_image(x, normalize=False, return_tokens=True)
    assert isinstance(tok, VisionTokens) and tok.kind == kind and len(tok) == n_maps
    assert torch.equal(emb, ref)
    torch.testing.assert_close(raw, model.encode_image(x, normalize=False))
    assert tok.embed_dim == model.embed_dim == emb.shape[1]


def test_layout_strides_times_grid_is_input_size(case):
    model, x, kind, _ = case
    with torch.no_grad():
        _, tok = model.encode_image(x, return_tokens=True)
    in_size = tuple(x.shape[2:])
    for m, stride, ch, grid in zip(tok.maps, tok.strides, tok.channels, tok.grids):
        assert m.shape[:2] == (x.shape[0], ch)
        assert len(stride) == len(in_size) == m.ndim - 2
        assert tuple(s * g for s, g in zip(stride, grid)) == in_size
    assert tok.last is tok.maps[-1]
    vol = [m.shape[2:].numel() for m in tok.maps]
    assert vol == sorted(vol, reverse=True)  # finest first, coarsest last


def test_resnet_attention_pool_of_last_map_reproduces_embedding():
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="debug-rn")).eval()
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        emb, tok = model.encode_image(x, normalize=False, return_tokens=True)
        pooled = model.visual.net.attnpool(tok.last)
        # and the pool really depends on the map: a perturbed map gives another embedding
        other = model.visual.net.attnpool(tok.last + 0.5 * torch.randn_like(tok.last))
    torch.testing.assert_close(pooled, emb, rtol=0, atol=0)
    assert (other - emb).abs().max() > 1e-3
    assert tok.channels == [64, 128, 256, 512] and tok.strides == [(4, 4), (8, 8), (16, 16), (32, 32)]


def test_vit_map_is_the_unprojected_patch_grid():
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="debug")).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        _, tok = model.encode_image(x, return_tokens=True)
        _, tok_BLW = model.visual.net(x)  # open_clip's own (B, L, W) patch tokens
    h, w = tok.grids[0]
    torch.testing.assert_close(tok.last.flatten(2).transpose(1, 2), tok_BLW)
    # token (i, j) of the grid is patch row i, column j: changing one patch of the input changes that token most
    x2 = x.clone()
    x2[:, :, 8:16, 40:48] += 3.0  # patch row 1, column 5
    with torch.no_grad():
        _, tok2 = model.encode_image(x2, return_tokens=True)
    delta_hw = (tok2.last - tok.last).abs().sum((0, 1))
    assert divmod(int(delta_hw.argmax()), w) == (1, 5)


def test_grads_flow_through_tokens():
    model = build_model(ModelConfig(name="debug-3d"))
    _, tok = model.encode_image(torch.randn(1, 1, 16, 64, 64), return_tokens=True)
    tok.maps[0].sum().backward()
    assert model.visual.stem[0].weight.grad.abs().sum() > 0


def test_bad_tokens_are_refused():
    with pytest.raises(ValueError, match="kind"):
        VisionTokens([torch.zeros(1, 2, 3, 3)], [(1, 1)], [2], 4, "cnn")
    with pytest.raises(ValueError, match=r"maps\[0\]"):
        VisionTokens([torch.zeros(1, 2, 3, 3)], [(1, 1)], [5], 4, "vit")
