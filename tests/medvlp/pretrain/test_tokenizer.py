"""Tokenizers: open_clip BPE offline, WordPiece train/save/load round trip, training from shards (train split only)."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from medvlp.pretrain.config import ModelConfig
from medvlp.pretrain.tokenizer import (BpeTokenizer, WordPieceTokenizer, iter_shard_texts, train_tokenizer,
                                train_tokenizer_from_shards)

REPORTS = [
    "No acute cardiopulmonary abnormality.",
    "Small left pleural effusion. No pneumothorax.",
    "Mild cardiomegaly without pulmonary edema.",
    "Right lower lobe opacity, likely atelectasis.",
    "The lungs are clear. Heart size is normal.",
] * 4


def test_bpe_is_offline_and_shaped():
    import open_clip

    tok = BpeTokenizer(77)
    ids = tok(["no pleural effusion", "clear lungs"])
    assert ids.dtype == torch.long and ids.shape == (2, 77)
    eot = ids[0].argmax().item()  # the text tower pools here
    assert ids[0, 0].item() == 49406 and ids[0, eot].item() == 49407 and not ids[0, eot + 1:].any()
    assert torch.equal(ids, open_clip.get_tokenizer("RN50")(["no pleural effusion", "clear lungs"]).long())
    assert tok.vocab_size == 49408


def test_wordpiece_train_save_load_round_trip(tmp_path):
    out = train_tokenizer(REPORTS, tmp_path / "tok", vocab_size=120, min_frequency=1)
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()
    tok = WordPieceTokenizer(out, context_length=16)
    ids = tok(["Small left pleural effusion.", "No pneumothorax"])
    assert ids.shape == (2, 16) and ids.dtype == torch.long
    assert ids[0, 0].item() == 2 and tok.pad_id == 0  # [CLS] first, [PAD] = 0
    n = int((ids[0] != 0).sum())
    assert ids[0, n - 1].item() == 3  # [SEP] closes the text
    assert tok._get().decode(ids[0, 1:n - 1].tolist()) == "small left pleural effusion."
    assert 5 < tok.vocab_size <= 120
    # loaded again (other process, pickled): same ids
    again = pickle.loads(pickle.dumps(tok))
    assert again._tok is None and torch.equal(again(["Small left pleural effusion.", "No pneumothorax"]), ids)
    # a second load of the saved dir reads the same vocabulary
    assert WordPieceTokenizer(out)._get().get_vocab() == tok._get().get_vocab()
    # truncation keeps the context length
    assert tok([" ".join(["effusion"] * 50)]).shape == (1, 16)


def test_wordpiece_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no tokenizer.json"):
        WordPieceTokenizer(tmp_path)
    with pytest.raises(ValueError, match="no texts to train on"):
        train_tokenizer([], tmp_path / "empty", vocab_size=50)
    with pytest.raises(TypeError, match="tokenizer input 1 is int"):
        BpeTokenizer()(["ok", 3])


def _write_shards(out_dir):
    from medvlp.data_shards.schema import Sample
    from medvlp.data_shards.writer import write_index, write_shards

    img = np.zeros((8, 8), np.uint8)
    samples = [Sample(key=f"t/{i}", text=r, image=img, meta={"split": "train", "modality": "cxr"})
               for i, r in enumerate(REPORTS)]
    samples += [Sample(key=f"x/{i}", text="zebraword heldout", image=img, meta={"split": "test", "modality": "cxr"})
                for i in range(3)]
    shards = write_shards(samples, out_dir, maxcount=7)
    write_index(out_dir, shards, "cxr", [], command="test")
    return len(shards)


def test_train_from_shards_reads_train_split_only(tmp_path):
    n_shards = _write_shards(tmp_path / "shards")
    assert n_shards > 1
    texts = list(iter_shard_texts(tmp_path / "shards"))
    assert texts == REPORTS
    out = train_tokenizer_from_shards(tmp_path / "shards", tmp_path / "tok", vocab_size=200, min_frequency=1)
    vocab = WordPieceTokenizer(out)._get().get_vocab()
    assert "effusion" in vocab and "zebraword" not in vocab and "heldout" not in vocab
    with pytest.raises(FileNotFoundError, match="no shards"):
        list(iter_shard_texts(tmp_path / "tok"))


def test_bert_model_takes_the_trained_vocab(tmp_path):
    from medvlp.pretrain.model import build_model

    out = train_tokenizer(REPORTS, tmp_path / "tok", vocab_size=150, min_frequency=1)
    model = build_model(ModelConfig(name="debug-bert", tokenizer=str(out)))
    assert model.text.vocab_size == model.tokenizer.vocab_size
    ids = model.tokenize(["Mild cardiomegaly.", "Clear lungs."])
    assert ids.shape == (2, model.context_length)
    emb = model.encode_text(ids)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2))
    with pytest.raises(ValueError, match="needs a BERT text tower"):
        build_model(ModelConfig(name="debug", tokenizer=str(out)))
