"""Text tokenizers of the two text towers, as picklable callables (data-loader workers call them).

* `BpeTokenizer`: open_clip's byte-level BPE (`open_clip.tokenizer.SimpleTokenizer`, whose vocab ships inside the
  open_clip wheel, so nothing is downloaded). Ids: [SOT] text [EOT] then zeros; [EOT] = 49407 is the largest id,
  which is how the open_clip text tower finds it (argmax).
* `WordPieceTokenizer`: a BERT WordPiece vocab trained on the corpus's own reports (`train_tokenizer`,
  `train_tokenizer_from_shards`) and saved as a `transformers.PreTrainedTokenizerFast` directory (tokenizer.json +
  tokenizer_config.json). Ids: [CLS] text [SEP] then [PAD] (= 0), truncated to the context length.

Vocabulary learning is deterministic: the same texts give a byte-identical tokenizer.json in any process
(`learn_wordpiece_vocab`; why it is ours and not `tokenizers.trainers.WordPieceTrainer` is said there).

Both return a LongTensor (B, L) with L = the model's context length. They pickle as their settings only (the
vocabulary is re-read in each process on first use), so a worker receives a few bytes, not the 2 MB BPE tables.
"""
from __future__ import annotations

import collections
import heapq
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


def count_words(texts: Iterable[str], normalizer, pre_tokenizer) -> tuple[dict[str, int], int]:
    """Word counts of `texts` as the tokenizer sees them (its own normaliser, then its pre-tokeniser), and the
    number of texts."""
    counts: collections.Counter[str] = collections.Counter()
    n = 0
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"tokenizer input {i} is {type(t).__name__}, expected str")
        n += 1
        counts.update(w for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(t)))
    return dict(counts), n


def learn_wordpiece_vocab(word_counts: dict[str, int], vocab_size: int, min_frequency: int = 2,
                          special_tokens: Sequence[str] = SPECIAL_TOKENS, prefix: str = "##") -> dict[str, int]:
    """WordPiece vocabulary (token -> id) learnt from word counts, deterministically.

    The procedure is that of `tokenizers`' `WordPieceTrainer` (its BPE trainer with a continuing-subword prefix):
    ids 0.. are the special tokens, then every character of the words (sorted by code point), then `##c` for
    every character seen after a word's first (sorted by code point), then merges: repeatedly the adjacent pair
    (a, b) of highest count (summed over the words, weighted by their counts) becomes the token a + b without b's
    `##`, until the vocabulary holds `vocab_size` tokens or the best count is below `min_frequency`. Equal counts go
    to the pair with the lower (id of a, id of b), as upstream. A merge that makes a token already in the
    vocabulary (e.g. (ab, ##c) after (a, ##bc)) is applied but adds no token. The whole alphabet is kept even if
    it alone exceeds `vocab_size`, so no character of the training texts encodes to [UNK].

    Why not `WordPieceTrainer` itself: in `tokenizers` (0.23.3 and earlier) it gives the `##c` tokens their ids
    in hash-map iteration order (`BpeTrainer::tokenize_words`, huggingface/tokenizers#1794), and those ids break
    ties between equally frequent merges, so the same texts give different ids, and on count ties different
    tokens, from run to run, even twice in one process. Here the `##c` ids are sorted. When upstream's trainer is
    deterministic, `train_tokenizer` can go back to it (`test_tokenizer.py` compares the two on a corpus where
    upstream is stable).

    Cost: pair counts are updated incrementally through a pair -> words index, so a merge touches only the words
    that hold the pair; a heap with lazy deletion finds the best pair. 100,000 synthetic reports (30k distinct
    words), vocab 8000, one core of a 2-core AMD EPYC: 2-5 s for the merges, 8-16 s for `count_words`.
    """
    vocab: dict[str, int] = {}
    itos: list[str] = []

    def add(tok: str) -> int:
        if tok not in vocab:
            vocab[tok] = len(itos)
            itos.append(tok)
        return vocab[tok]

    for t in special_tokens:
        add(t)
    items = sorted(word_counts.items())  # word order does not change the result; sorted for a stable run
    for c in sorted({c for w, _ in items for c in w}):
        add(c)
    for c in sorted({c for w, _ in items for c in w[1:]}):
        add(prefix + c)
    words = [[vocab[w[0]]] + [vocab[prefix + c] for c in w[1:]] for w, _ in items]
    counts = [n for _, n in items]

    pair_count: dict[tuple[int, int], int] = {}
    where: dict[tuple[int, int], set[int]] = {}
    for i, (w, n) in enumerate(zip(words, counts)):
        for p in itertools.pairwise(w):
            pair_count[p] = pair_count.get(p, 0) + n
            where.setdefault(p, set()).add(i)
    heap = [(-n, a, b) for (a, b), n in pair_count.items()]
    heapq.heapify(heap)
    min_frequency = max(int(min_frequency), 1)
    while len(itos) < vocab_size and heap:
        neg, a, b = heapq.heappop(heap)
        if pair_count.get((a, b), 0) != -neg:
            continue  # stale entry: the pair's current count has its own entry
        if -neg < min_frequency:
            break
        new = add(itos[a] + itos[b].removeprefix(prefix))
        changed: set[tuple[int, int]] = set()
        for i in sorted(where.pop((a, b))):
            w, n = words[i], counts[i]
            merged: list[int] = []
            j = 0
            while j < len(w):  # left to right, non-overlapping
                if j + 1 < len(w) and w[j] == a and w[j + 1] == b:
                    merged.append(new)
                    j += 2
                else:
                    merged.append(w[j])
                    j += 1
            old_pairs = collections.Counter(itertools.pairwise(w))
            new_pairs = collections.Counter(itertools.pairwise(merged))
            for p in old_pairs.keys() | new_pairs.keys():
                d = new_pairs[p] - old_pairs[p]
                if d:
                    pair_count[p] = pair_count.get(p, 0) + d * n
                    changed.add(p)
                if new_pairs[p]:
                    where.setdefault(p, set()).add(i)
                elif p in where:
                    where[p].discard(i)
            words[i] = merged
        pair_count.pop((a, b), None)
        for p in changed:
            n = pair_count.get(p, 0)
            if n > 0:
                heapq.heappush(heap, (-n, p[0], p[1]))
            else:
                pair_count.pop(p, None)
                where.pop(p, None)
    return vocab


def train_tokenizer(texts: Iterable[str], out_dir: str | Path, vocab_size: int = 8000,
                    min_frequency: int = 2, lowercase: bool = True) -> Path:
    """Train a BERT WordPiece vocab on `texts`; save it as a PreTrainedTokenizerFast dir. Returns out_dir.

    `tokenizers` does the normalising (BertNormalizer), pre-tokenising (BertPreTokenizer), encoding (WordPiece,
    [UNK] for what it cannot spell), [CLS]/[SEP] and decoding; the vocabulary is learnt by
    `learn_wordpiece_vocab`, which is deterministic (same texts -> byte-identical tokenizer.json)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if vocab_size < len(SPECIAL_TOKENS) + 1:
        raise ValueError(f"vocab_size: must be > {len(SPECIAL_TOKENS)}, got {vocab_size}")
    normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    word_counts, n = count_words(texts, normalizer, pre_tokenizer)
    if n == 0:
        raise ValueError("train_tokenizer: no texts to train on")
    vocab = learn_wordpiece_vocab(word_counts, vocab_size, min_frequency, SPECIAL_TOKENS)
    tk = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    tk.normalizer = normalizer
    tk.pre_tokenizer = pre_tokenizer
    tk.add_special_tokens(list(SPECIAL_TOKENS))
    cls_id, sep_id = tk.token_to_id("[CLS]"), tk.token_to_id("[SEP]")
    tk.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                      special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    tk.decoder = decoders.WordPiece()
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out))
    log.info("tokenizer: %d texts -> %d tokens, written to %s", n, len(fast), out)
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

