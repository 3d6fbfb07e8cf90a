"""What decoding needs beyond the `transformers` generation API: the `auto` size of the no-repeat-n-gram rule.

    n = auto_no_repeat_ngram(tok, train_reports)      # smallest n that no training report repeats
    gen = replace(gen, strategy="beam", no_repeat_ngram=n)

Greedy, beam and nucleus decoding themselves are `transformers`' `generate` (`ReportModel.generate`, with the
arguments of `evaluate.generation_kwargs`).

Corpus reports repeat phrases on purpose ("... of the tissue." closes every composition sentence), so a small
`no_repeat_ngram_size` forbids reports the corpus writes. The smallest n such that no training report (as the LM
is trained on it: `[BOS]` + `train_text`, tokenized) repeats an n-gram of its own is the smallest rule that never
forbids one of them; it only cuts loops of longer phrases.
"""
from __future__ import annotations


def auto_no_repeat_ngram(tok, texts: list[str]) -> int:
    """The smallest n such that no report of `texts` (`[BOS]` + `train_text(report)`, tokenized by `tok`) repeats
    an n-gram of its own (1 when none repeats a token)."""
    from medvlp.finetune.report.text import train_text

    n = 1
    for t in texts:
        ids = [tok.bos_id] + tok.encode(train_text(t))
        while True:
            grams = [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]
            if len(grams) == len(set(grams)):
                break
            n += 1
    return n
