"""Per-organ sentences and normal/abnormal labels from a free-text CT report, by rules.

    organs = organs_from_report("Liver: 2 cm hypodense lesion. The spleen is normal.", ["liver", "spleen", "lung"])
    # {"liver":  {"id": 1, "abnormal": 1, "sentence": "Liver: 2 cm hypodense lesion."},
    #  "spleen": {"id": 2, "abnormal": 0, "sentence": "The spleen is normal."},
    #  "lung":   {"id": 3, "abnormal": 0, "sentence": "The lung is unremarkable."}}

The stored form is the synthetic corpus's json "organs" (what the organ_labels / organ_sentences batch members read):
organ -> {"id": mask label, "abnormal": 0 | 1, "sentence": str}; ids follow the order of `organ_names` (1..O).
Rules: the report is cut into sentences; a sentence belongs to every organ whose name (underscores as spaces) or
synonym it contains; an organ's sentence is its sentences joined. An organ sentence is normal when it matches a
negation / normal phrase (no, without, normal, unremarkable, clear, negative, intact); an organ the report does not
mention is taken as normal with the sentence "The <organ> is unremarkable." (reports usually list findings only).
These are simple rules for a first pass: check a sample of their output, or give the "organs" column explicitly.
"""
from __future__ import annotations

import re
from typing import Sequence

NORMAL_RE = re.compile(r"\b(no|not|without|normal|unremarkable|clear|negative|intact|free of)\b", re.IGNORECASE)
_SENT_RE = re.compile(r"(?<=[.!?;])\s+|\n+")
SYNONYMS = {"left_kidney": ["left kidney", "left renal"], "right_kidney": ["right kidney", "right renal"],
            "lung": ["lung", "pulmonary", "lower lobe"], "liver": ["liver", "hepatic"], "spleen": ["spleen", "splenic"],
            "gallbladder": ["gallbladder"], "pancreas": ["pancreas", "pancreatic"], "stomach": ["stomach", "gastric"],
            "kidney": ["kidney", "renal"], "bladder": ["bladder"], "aorta": ["aorta", "aortic"]}


def organ_terms(organ: str, synonyms: dict[str, list[str]] | None = None) -> list[str]:
    table = {**SYNONYMS, **(synonyms or {})}
    return sorted({organ.replace("_", " ").lower(), *[t.lower() for t in table.get(organ, [])]}, key=len,
                  reverse=True)


def organs_from_report(text: str, organ_names: Sequence[str], synonyms: dict[str, list[str]] | None = None
                       ) -> dict[str, dict]:
    """Per-organ {"id", "abnormal", "sentence"} from a report (see the module doc)."""
    if not organ_names:
        raise ValueError("organs_from_report: no organ names")
    sentences = [s.strip() for s in _SENT_RE.split(text) if s and s.strip()]
    out = {}
    for k, organ in enumerate(organ_names):
        terms = organ_terms(organ, synonyms)
        mine = [s for s in sentences if any(re.search(rf"\b{re.escape(t)}\b", s, re.IGNORECASE) for t in terms)]
        if not mine:
            out[organ] = {"id": k + 1, "abnormal": 0, "sentence": f"The {organ.replace('_', ' ')} is unremarkable."}
            continue
        abnormal = int(any(not NORMAL_RE.search(s) for s in mine))
        out[organ] = {"id": k + 1, "abnormal": abnormal, "sentence": " ".join(mine)}
    return out
