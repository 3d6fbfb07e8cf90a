"""Text tokenizers of the two text towers, as picklable callables (data-loader workers call them).

* `BpeTokenizer`: open_clip's byte-level BPE (`open_clip.tokenizer.SimpleTokenizer`, whose vocab ships inside the
  open_clip wheel, so nothing is downloaded). Ids: [SOT] text [EOT] then zeros; [EOT] = 49407 is the largest id,
  which is how the open_clip text tower finds it (argmax).
* `WordPieceTokenizer`: a BERT WordPiece vocab trained on the corpus's own reports (`train_tokenizer`,
  `train_tokenizer_from_shards`) and saved as a `transformers.PreTrainedTokenizerFast` directory (tokenizer.json +
  tokenizer_config.json). Ids: [CLS] text [SEP] then [PAD] (= 0), truncated to the context length.

The saved directory is the artifact to keep: the `tokenizers` WordPiece trainer breaks ties between equally
frequent merges in hash-map order, so retraining on the same texts can give a slightly different vocabulary;
loading a saved directory always gives the same ids.

Both return a LongTensor (B, L) with L = the model's context length. They pickle as their settings only (the
vocabulary is re-read in each process on first use), so a worker receives a few bytes, not the 2 MB BPE tables.
"""
from __future__ import annotations

import itertools
import logging
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # [PAD] first: pad id 0, as BertConfig expects


def _as_list(texts: str | Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        return [texts]
    out = list(texts)
    for i, t in enumerate(out):
        if not isinstance(t, str):
            raise TypeError(f"tokenizer input {i} is {type(t).__name__}, expected str")
    return out


class BpeTokenizer:
    """open_clip BPE: texts -> LongTensor (B, context_length)."""

    kind = "bpe"

    def __init__(self, context_length: int = 77) -> None:
        self.context_length = int(context_length)
        self._tok = None

    def _get(self):
        if self._tok is None:
            from open_clip.tokenizer import SimpleTokenizer

            self._tok = SimpleTokenizer(context_length=self.context_length)
        return self._tok

    @property
    def vocab_size(self) -> int:
        return len(self._get().encoder)

    def __call__(self, texts: str | Sequence[str]) -> torch.Tensor:
        return self._get()(_as_list(texts), context_length=self.context_length).long()

    def __getstate__(self) -> dict:
        return {"context_length": self.context_length, "_tok": None}


class WordPieceTokenizer:
    """A trained WordPiece tokenizer dir (local only): texts -> LongTensor (B, context_length)."""

    kind = "wordpiece"

    def __init__(self, path: str | Path, context_length: int = 77) -> None:
        self.path = str(path)
        self.context_length = int(context_length)
        if not (Path(self.path) / "tokenizer.json").is_file():
            raise FileNotFoundError(f"tokenizer dir {self.path!r} has no tokenizer.json "
                                    "(write one with `medvlp tokenizer train --shards DIR --out DIR`)")
        self._tok = None

    def _get(self):
        if self._tok is None:
            from transformers import PreTrainedTokenizerFast

            self._tok = PreTrainedTokenizerFast.from_pretrained(self.path, local_files_only=True)
        return self._tok

    @property
    def vocab_size(self) -> int:
        return len(self._get())

    @property
    def pad_id(self) -> int:
        return int(self._get().pad_token_id)

    def __call__(self, texts: str | Sequence[str]) -> torch.Tensor:
        out = self._get()(_as_list(texts), padding="max_length", truncation=True, max_length=self.context_length,
                          return_tensors="pt")
        return out["input_ids"].long()

    def __getstate__(self) -> dict:
        return {"path": self.path, "context_length": self.context_length, "_tok": None}


def train_tokenizer(texts: Iterable[str], out_dir: str | Path, vocab_size: int = 8000,
                    min_frequency: int = 2, lowercase: bool = True) -> Path:
    """Train a BERT WordPiece vocab on `texts`; save it as a PreTrainedTokenizerFast dir. Returns out_dir."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < len(SPECIAL_TOKENS) + 1:
        raise ValueError(f"vocab_size: must be > {len(SPECIAL_TOKENS)}, got {vocab_size}")
    tk = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tk.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                        special_tokens=list(SPECIAL_TOKENS), show_progress=False)
    n = [0]

    def counted() -> Iterator[str]:
        for t in texts:
            n[0] += 1
            yield t

    tk.train_from_iterator(counted(), trainer=trainer)
    if n[0] == 0:
        raise ValueError("train_tokenizer: no texts to train on")
    cls_id, sep_id = tk.token_to_id("[CLS]"), tk.token_to_id("[SEP]")
    tk.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                      special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    tk.decoder = decoders.WordPiece()
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out))
    log.info("tokenizer: %d texts -> %d tokens, written to %s", n[0], len(fast), out)
    return out


def iter_shard_texts(shard_dir: str | Path, split: str = "train") -> Iterator[str]:
    """The `txt` member of every sample of `split` in a shard set (split read from the `json` meta); a sample whose
    json or txt cannot be read is skipped with a warning."""
    from medvlp.data_shards.reader import iter_split

    def skip(raw: dict, err: Exception) -> None:  # a corrupt sample is skipped, not fatal
        log.warning("%s: sample %r skipped (%s)", raw.get("__url__"), raw.get("__key__"), err)

    samples = iter_split(str(shard_dir), split, members=("txt",), on_bad=skip)
    try:
        first = next(samples, None)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"no shards under {shard_dir} ({e})") from None
    for raw, _ in itertools.chain([] if first is None else [first], samples):
        if "txt" not in raw:
            continue
        try:
            yield raw["txt"].decode("utf-8")
        except UnicodeDecodeError as e:
            skip(raw, e)


def train_tokenizer_from_shards(shard_dir: str | Path, out_dir: str | Path, vocab_size: int = 8000,
                                min_frequency: int = 2) -> Path:
    """Train the WordPiece vocab on the reports (`txt`) of the train split of a shard dir."""
    return train_tokenizer(iter_shard_texts(shard_dir, "train"), out_dir, vocab_size, min_frequency)


def build_tokenizer(text_type: str, context_length: int, path: str = "") -> BpeTokenizer | WordPieceTokenizer:
    """The tokenizer a text tower of `text_type` reads: BPE for open_clip, WordPiece (from `path`) for BERT."""
    if text_type == "openclip":
        return BpeTokenizer(context_length)
    if text_type == "bert":
        if not path:
            raise ValueError("model.tokenizer: a BERT text tower needs a trained tokenizer dir "
                             "(`medvlp tokenizer train --shards DIR --out DIR`, then model.tokenizer=DIR)")
        return WordPieceTokenizer(path, context_length)
    raise ValueError(f"text.type: {text_type!r} has no tokenizer")

