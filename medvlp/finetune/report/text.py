"""Report texts: the training layout (diagnosis first, after the prompt) and the clinical labels parsed back from a
report, by the same rules for references and generations.

    train_text("Tumor occupies about 40% of the tissue. Final diagnosis: carcinoma.")
        -> "Final diagnosis: carcinoma. Tumor occupies about 40% of the tissue."
    report_text(<that>) -> the original order (diagnosis sentence last)
    parse_diagnosis("... Final diagnosis: chronic inflammation.", ["benign", "inflammation", "carcinoma"])
        -> "inflammation"
    parse_composition("Tumor occupies about 40% ... less than 5% necrosis ...", TISSUE_WORDS)
        -> {"tumor": 40.0, "necrosis": 2.5}

    parse_facts("... The tumor is located in the upper left part of the section. Two separate tumor foci ...")
        -> {"region": "upper left", "foci": 2, "size_mm": ..., "grade": ..., "mitoses": ..., "margin": ...,
            "margin_mm": ...}

Rules. The diagnosis is the phrase after "Final diagnosis:" up to the sentence end; its class is the first class name
whose word (or a word starting with its first 6 letters, so "inflammatory" counts for "inflammation") occurs in
the phrase. A composition statement is a sentence with a percentage ("about N%", "N %", "less than 5%" = 2.5); it
belongs to the tissue whose keyword occurs first in the sentence (`TISSUE_WORDS`). Missing "normal" is the rest.
Findings (`parse_facts`, one sentence at a time, the first statement of each fact counts): region = the longest
`REGIONS` phrase in a sentence naming a "part of the section"; foci = "a single ... focus" (1) or "N separate ...
foci" (a digit or a number word); size = the "N mm" of a foci sentence; grade = "grade N"; mitoses = "no mitoses"
(0) or the number in a sentence about "mitos"/"mitotic"; margin = "involved" for a margin sentence saying "extends
to" / "involved", else "clear" with its "N mm". Facts a report does not state are None.
"""
from __future__ import annotations

import re

DIAGNOSIS_RE = re.compile(r"final\s+diagnosis\s*:\s*([^.]*)\.?", re.IGNORECASE)
TISSUE_WORDS: dict[str, tuple[str, ...]] = {  # tissue -> keywords that name it in a sentence
    "tumor": ("tumor", "tumour", "carcinoma", "malignan"),
    "inflammation": ("inflammat",),
    "necrosis": ("necros", "necrot"),
    "normal": ("normal", "unremarkable", "remaining", "benign"),
}
_PERCENT_RE = re.compile(r"(less\s+than\s+)?(\d+(?:\.\d+)?)\s*%", re.IGNORECASE)
_SENTENCE_RE = re.compile(r"[^.]+")


def clean(text: str) -> str:
    """Detokenised model output -> normal spacing ("about 40 % ." -> "about 40%.")."""
    t = re.sub(r"\s+([.,:;%)])", r"\1", text)
    t = re.sub(r"\(\s+", "(", t)
    return re.sub(r"\s+", " ", t).strip()


def split_diagnosis(report: str) -> tuple[str, str]:
    """(the report without its "Final diagnosis: X." sentence, that sentence or "")."""
    m = DIAGNOSIS_RE.search(report)
    if not m:
        return report.strip(), ""
    body = (report[:m.start()] + report[m.end():]).strip()
    return re.sub(r"\s+", " ", body), m.group(0).strip().rstrip(".") + "."


def train_text(report: str) -> str:
    """Diagnosis sentence first (so that the prompt "Final diagnosis:" starts every training text)."""
    body, diag = split_diagnosis(report)
    return f"{diag} {body}".strip()


def report_text(text: str) -> str:
    """Back to the reference layout: the diagnosis sentence last."""
    body, diag = split_diagnosis(clean(text))
    return f"{body} {diag}".strip()


def parse_diagnosis(report: str, classes: list[str]) -> str | None:
    """The class named in the "Final diagnosis:" phrase, or None when there is none (see the module doc)."""
    m = DIAGNOSIS_RE.search(report)
    if not m:
        return None
    words = re.findall(r"[a-z]+", m.group(1).lower())
    for c in classes:
        stem = c.lower()[:6]
        if c.lower() in words or any(w.startswith(stem) for w in words):
            return c
    return None


def parse_composition(report: str, tissue_words: dict[str, tuple[str, ...]] | None = None) -> dict[str, float]:
    """{tissue: percent} stated in the report (see the module doc); tissues it does not state are absent."""
    tissue_words = tissue_words or TISSUE_WORDS
    out: dict[str, float] = {}
    for sent in _SENTENCE_RE.findall(report):
        m = _PERCENT_RE.search(sent)
        if not m:
            continue
        low = sent.lower()
        hits = [(low.find(w), t) for t, ws in tissue_words.items() for w in ws if w in low]
        if not hits:
            continue
        tissue = min(hits)[1]
        value = 2.5 if m.group(1) else float(m.group(2))
        out.setdefault(tissue, value)
    return out


def composition_vector(report: str, tissues: list[str], rest: str = "normal") -> list[float]:
    """Percent per tissue in `tissues` order: unstated tissues 0, except `rest` = 100 - the others when unstated."""
    got = parse_composition(report)
    vec = [float(got.get(t, 0.0)) for t in tissues]
    if rest in tissues and rest not in got:
        i = tissues.index(rest)
        vec[i] = max(0.0, 100.0 - sum(v for j, v in enumerate(vec) if j != i))
    return vec


REGIONS = ["upper left", "upper", "upper right", "left", "central", "right", "lower left", "lower", "lower right"]
FACTS = ("region", "foci", "size_mm", "grade", "mitoses", "margin", "margin_mm")
_NUMBER_WORDS = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8}
_INT_RE = re.compile(r"\b(\d+|one|two|three|four|five|six|seven|eight)\b")
_MM_RE = re.compile(r"(\d+)\s*mm\b")


def _int(word: str) -> int:
    return int(word) if word.isdigit() else _NUMBER_WORDS[word]


def parse_facts(report: str) -> dict:
    """{fact: value or None} for `FACTS` (rules in the module doc)."""
    out: dict = {f: None for f in FACTS}
    for sent in _SENTENCE_RE.findall(report.lower()):
        if out["region"] is None and "part of the section" in sent:
            hits = [r for r in REGIONS if re.search(rf"\b{r}\b", sent)]
            if hits:
                out["region"] = max(hits, key=len)
        if out["foci"] is None and re.search(r"\bfoc(us|i)\b", sent):
            if re.search(r"\bsingle\b", sent):
                out["foci"] = 1
            else:
                m = re.search(r"\b(\d+|one|two|three|four|five|six|seven|eight)\s+separate", sent)
                if m:
                    out["foci"] = _int(m.group(1))
            mm = _MM_RE.search(sent)
            if out["foci"] is not None and mm:
                out["size_mm"] = int(mm.group(1))
        if out["grade"] is None:
            m = re.search(r"\bgrade\s+(\d)", sent)
            if m:
                out["grade"] = int(m.group(1))
        if out["mitoses"] is None and re.search(r"mitos|mitotic", sent):
            if re.search(r"\bno\s+mitos", sent):
                out["mitoses"] = 0
            else:
                m = _INT_RE.search(sent)
                if m:
                    out["mitoses"] = _int(m.group(1))
        if out["margin"] is None and "margin" in sent:
            if re.search(r"extends\s+to|\binvolved\b", sent):
                out["margin"], out["margin_mm"] = "involved", 0
            else:
                mm = _MM_RE.search(sent)
                if "clear" in sent or mm:
                    out["margin"] = "clear"
                    out["margin_mm"] = int(mm.group(1)) if mm else None
    return out
