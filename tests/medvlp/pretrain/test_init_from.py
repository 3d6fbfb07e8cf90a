"""Starting from local public-format weights: an open_clip checkpoint (model.init) and a Hugging Face BERT folder
(model.text_init). Step-0 embeddings equal the source models'; bad inputs are one-line errors; nothing is unpickled."""
from __future__ import annotations

import json
import os
import pickle

import pytest
import torch

from medvlp.pretrain.config import ModelConfig
from medvlp.pretrain.init_from import InitError, spec_from_open_clip
from medvlp.pretrain.model import build_model

pytestmark = pytest.mark.timeout(120)

VIT_CFG = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8,
                                           "head_width": 16},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}
RN_CFG = {"embed_dim": 32, "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 16},
          "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


def _open_clip_model(cfg: dict, seed: int):
    from open_clip.model import CLIP

    torch.manual_seed(seed)
    m = CLIP(**cfg).eval()
    with torch.no_grad():
        m.logit_scale.fill_(2.5)
    return m


def _save(sd: dict, path, fmt: str) -> None:
    sd = {k: v.contiguous() for k, v in sd.items() if k != "attn_mask"}
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(path))
    else:
        torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, path)


@pytest.mark.parametrize("cfg,fmt,how", [(VIT_CFG, "safetensors", "folder"), (RN_CFG, "bin", "arch_json"),
                                         (VIT_CFG, "pt", "beside")])
def test_open_clip_init_step0_embeddings_equal(tmp_path, cfg, fmt, how):
    import open_clip

    ref = _open_clip_model(cfg, seed=3)
    folder = tmp_path / "ckpt"
    folder.mkdir()
    path = folder / f"weights.{fmt}"
    _save(ref.state_dict(), path, fmt)
    if how == "arch_json":
        (tmp_path / "arch.json").write_text(json.dumps({"model_cfg": cfg}))
        mc = ModelConfig(name="debug", init=str(path), init_arch=str(tmp_path / "arch.json"))
    else:
        (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
        mc = ModelConfig(name="debug", init=str(folder if how == "folder" else path))
    torch.manual_seed(0)
    ours = build_model(mc).eval()
    assert ours.embed_dim == 32 and ours.image_size == cfg["vision_cfg"]["image_size"]
    size = cfg["vision_cfg"]["image_size"]
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    texts = ["a chest x-ray showing COVID-19.", "a lateral chest x-ray.", "no acute findings"]
    tok_ours = ours.tokenize(texts)
    tok_ref = open_clip.get_tokenizer("ViT-B-32")(texts)
    assert torch.equal(tok_ours, tok_ref)
    with torch.no_grad():
        torch.testing.assert_close(ours.encode_image(x), ref.encode_image(x, normalize=True), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours.encode_text(tok_ours), ref.encode_text(tok_ref, normalize=True), rtol=1e-5,
                                   atol=1e-6)
    assert float(ours.logit_scale.detach()) == pytest.approx(2.5)


def _hf_bert(folder, vocab_words: list[str], with_tokenizer_json: bool):
    from transformers import BertConfig, BertForMaskedLM, BertTokenizerFast

    folder.mkdir()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + vocab_words
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    torch.manual_seed(5)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64)
    model = BertForMaskedLM(cfg).eval()  # "bert." prefix + an MLM head: what a PubMedBERT checkout holds
    model.save_pretrained(str(folder))
    tok = BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), do_lower_case=True)
    if with_tokenizer_json:
        tok.save_pretrained(str(folder))
    return model, tok


@pytest.mark.parametrize("with_tokenizer_json", [True, False])
def test_hf_bert_text_init_hidden_states_and_tokens_equal(tmp_path, monkeypatch, with_tokenizer_json):
    monkeypatch.setenv("MEDVLP_CACHE", str(tmp_path / "cache"))
    words = ["chest", "x", "-", "ray", "lung", "opacity", "no", "effusion", "covid", "##19", "left", "."]
    hf, hf_tok = _hf_bert(tmp_path / "bert", words, with_tokenizer_json)
    ours = build_model(ModelConfig(name="debug-bert", text_init=str(tmp_path / "bert"))).eval()
    assert ours.text.context_length == 64 and ours.text.vocab_size == len(words) + 5
    texts = ["Chest X-ray: left lung opacity.", "No effusion", "covid19 unknownword"]
    ids = ours.tokenize(texts)
    ref = hf_tok(texts, padding="max_length", max_length=64, truncation=True, return_tensors="pt")
    assert torch.equal(ids, ref["input_ids"])
    with torch.no_grad():
        got = ours.text.net(input_ids=ids, attention_mask=(ids != 0).long()).last_hidden_state[:, 0]
        want = hf.bert(input_ids=ref["input_ids"], attention_mask=ref["attention_mask"]).last_hidden_state[:, 0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert (tmp_path / "cache" / "tokenizers").is_dir() != with_tokenizer_json


def test_open_clip_vision_with_hf_text(tmp_path):
    ref = _open_clip_model(VIT_CFG, seed=4)
    (tmp_path / "oc").mkdir()
    _save(ref.state_dict(), tmp_path / "oc" / "open_clip_model.safetensors", "safetensors")
    (tmp_path / "oc" / "open_clip_config.json").write_text(json.dumps({"model_cfg": VIT_CFG}))
    _hf_bert(tmp_path / "bert", ["lung", "chest"], True)
    ours = build_model(ModelConfig(init=str(tmp_path / "oc"), text_init=str(tmp_path / "bert"))).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours.encode_image(x), ref.encode_image(x, normalize=True), rtol=1e-5, atol=1e-6)
    assert type(ours.text).__name__ == "BertText" and ours.encode_text(ours.tokenize(["lung"])).shape == (1, 32)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_bad_inits_are_one_line_errors_and_pickles_are_refused(tmp_path):
    (tmp_path / "oc").mkdir()
    with open(tmp_path / "oc" / "weights.pt", "wb") as f:
        pickle.dump({"visual.conv1.weight": _Evil()}, f)
    (tmp_path / "oc" / "open_clip_config.json").write_text(json.dumps({"model_cfg": VIT_CFG}))
    with pytest.raises(InitError, match="refused"):
        build_model(ModelConfig(init=str(tmp_path / "oc" / "weights.pt")))
    ref = _open_clip_model(VIT_CFG, seed=0)
    sd = {k: v for k, v in ref.state_dict().items() if not k.startswith("ln_final")}
    _save(sd, tmp_path / "oc" / "weights.pt", "pt")
    with pytest.raises(InitError, match=r"missing \['text.net.ln_final.weight'"):
        build_model(ModelConfig(init=str(tmp_path / "oc" / "weights.pt")))
    with pytest.raises(InitError, match="does not exist"):
        build_model(ModelConfig(init=str(tmp_path / "nope.safetensors")))
    with pytest.raises(InitError, match="not an open_clip model name"):
        build_model(ModelConfig(init=str(tmp_path / "oc" / "weights.pt"), init_arch="NoSuchNet"))
    with pytest.raises(InitError, match="no config.json"):
        build_model(ModelConfig(text_init=str(tmp_path / "oc")))
    import open_clip

    with pytest.raises(InitError, match="timm model"):
        spec_from_open_clip(open_clip.get_model_config("ViT-B-16-SigLIP"), "open_clip:ViT-B-16-SigLIP")
    spec = spec_from_open_clip(open_clip.get_model_config("RN50"), "open_clip:RN50")
    assert spec["vision"]["type"] == "resnet" and spec["vision"]["layers"] == [3, 4, 6, 3] and spec["embed_dim"] == 1024


def test_cli_train_reports_bad_init_in_one_line(tmp_path, capsys):
    from medvlp.launch.cli import main

    rc = main(["pretrain", "debug", "--set", f"model.init={tmp_path / 'missing.bin'}", "--set",
               f"train.out_dir={tmp_path / 'run'}", "--set", "train.steps=1", "--set", "tracking.enabled=false"])
    err = capsys.readouterr().err
    assert rc == 2 and "model.init" in err and "Traceback" not in err
