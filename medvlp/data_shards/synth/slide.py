"""Synthetic whole-slide feature bags whose reports need more than the mean patch.

A slide is a tissue section on a grid of patches (one patch per 1 mm grid cell, coords (n, 2) int32 as (x, y)); each
patch has a tissue type (normal, tumor, inflammation, necrosis) and its feature is the type's fixed cluster centre
plus noise plus a per-patient shift, as before. On top of that the bag carries what a pathologist reads from *where*
things are and from *a few* patches:

  position   carcinomas form 1-3 separate foci (8-connected tumour + necrosis cells); the report states how many, the
             largest one's size (its longest bounding-box side, mm) and where it lies (the 3 x 3 region of the
             section's bounding box holding its centroid: "upper left", "upper", ..., "central", ..., "lower right").
  margins    the tissue edge is inked: every edge patch (a 4-neighbour cell outside the tissue) carries an ink
             component. The margin is "involved" when a tumour/necrosis cell lies on the edge, else "clear" at the
             distance (mm, rounded) from the nearest tumour cell to the nearest edge cell.
  rare       mitoses: a few tumour patches (Poisson, more in high grade, most in the worst area) carry a mitosis
             component; the report states their count. Grade: tumour patches carry a differentiation component, a
             bulk grade 1-2 and, in half the carcinomas, a worst area (15-30 % of the tumour) one grade higher; the
             report grades from the worst area. Microinvasive carcinomas (a quarter): one focus of 1-3 patches
             (about 1-2 % of the section) that the bag mean barely moves.

None of these facts is a linear function of the bag-mean feature: the mean has no positions, and 1-3 patches of
~130 move it by less than the patient shift. extra["composition"] = {type: count / n} exactly (as before), and the
report also states the composition in rounded percent and ends with "Final diagnosis: X." (benign / chronic
inflammation / carcinoma). extra["facts"] holds the ground truth that `medvlp.finetune.report.text.parse_facts`
reads back from the report; extra["patch_tissue"], ["patch_mitosis"], ["patch_grade"], ["patch_edge"] the per-patch
truth aligned with the stored bag.

Shape legend: N patches in a bag; E feature dim.
"""
from __future__ import annotations

import math

import numpy as np

from medvlp.data_shards.schema import Sample
from medvlp.data_shards.synth.util import (Study, base_meta, join_sentences, patient_rng, pick, sample_key, study_rng,
                                           text_rng, world_rng)

SLIDE_TISSUES = ["normal", "tumor", "inflammation", "necrosis"]
SLIDE_DIAGNOSES = ["benign", "inflammation", "carcinoma"]
DIAGNOSIS_TEXT = {"benign": "benign tissue", "inflammation": "chronic inflammation", "carcinoma": "carcinoma"}
SLIDE_DIAG_PROBS = (0.35, 0.2, 0.45)
SLIDE_VISITS = (0.7, 0.3)  # P(1, 2 slides per patient)
DEFAULT_DIM_SLIDE = 64
BAG_SIZE = (60, 200)  # patches per slide, inclusive
CLUSTER_STD = 0.7  # within-type spread; centres are ~sqrt(2E) apart, so types stay separable
CELL_MM = 1  # grid step in millimetres
REGIONS = ["upper left", "upper", "upper right", "left", "central", "right", "lower left", "lower", "lower right"]
MICRO_PROB = 0.25  # share of carcinomas that are one microscopic focus
FOCI_PROBS = (0.5, 0.3, 0.2)  # P(1, 2, 3 seeded foci) of the other carcinomas
# Per-patch event components (multiples of a fixed unit direction each; scaled by sqrt(E / 64) so that small test
# dims keep the tissue clusters apart): ink on the edge, a mitotic figure, differentiation (grade - 2).
INK, MITOSIS, GRADE = 2.5, 3.5, 1.5
MITOSIS_RATE = {1: 0.6, 2: 1.5, 3: 3.5}  # Poisson mean of mitotic patches by the tumour's (worst) grade
GRADE_WORDS = {1: "well", 2: "moderately", 3: "poorly"}
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}

SLIDE_PROMPTS = {d: ([f"Final diagnosis: {DIAGNOSIS_TEXT[d]}."],
                     [f"Final diagnosis: {DIAGNOSIS_TEXT[o]}." for o in SLIDE_DIAGNOSES if o != d])
                 for d in SLIDE_DIAGNOSES}
_TISSUE_SENTENCES = {
    "tumor": ["tumor occupies {p} of the tissue", "carcinoma involves {p} of the sampled tissue",
              "invasive tumor cells make up {p} of the section"],
    "inflammation": ["inflammatory infiltrate covers {p} of the tissue",
                     "chronic inflammatory cells occupy {p} of the tissue"],
    "necrosis": ["necrosis involves {p} of the tissue", "areas of necrosis make up {p} of the section"],
    "normal": ["normal tissue makes up {p} of the section", "the remaining tissue ({p}) is unremarkable"],
}
_REGION_SENTENCES = ["the tumor is located in the {r} part of the section",
                     "carcinoma is seen in the {r} part of the section"]
_FOCI_SENTENCES = {1: ["a single tumor focus is present, measuring {s} mm",
                       "the tumor forms a single focus of {s} mm"],
                   2: ["{k} separate tumor foci are present, the largest measuring {s} mm",
                       "there are {k} separate foci of carcinoma, the largest {s} mm"]}
_GRADE_SENTENCES = ["the tumor is {w} differentiated (grade {g})",
                    "histological grade {g} ({w} differentiated), graded on the least differentiated area"]
_MITOSIS_SENTENCES = ["{m} mitoses are identified", "mitotic count: {m}"]
_MARGIN_SENTENCES = {"involved": ["the tumor extends to the inked margin", "the inked margin is involved by tumor"],
                     "clear": ["the margins are clear, the closest being {d} mm away",
                               "the tumor is {d} mm from the nearest inked margin"]}


def slide_centres(dim: int) -> np.ndarray:
    """(len(SLIDE_TISSUES), dim) cluster centres of the tissue types; fixed for every seed."""
    return world_rng("slide", dim).standard_normal((len(SLIDE_TISSUES), dim))


def event_directions(dim: int) -> np.ndarray:
    """(3, dim) unit directions of the ink, mitosis and grade components; fixed for every seed."""
    d = world_rng("slide", dim, 1).standard_normal((3, dim))
    return d / np.linalg.norm(d, axis=1, keepdims=True)


def _percent(f: float) -> str:
    if 0 < f < 0.05:
        return f"about {max(1, int(round(f * 100)))}%"
    p = int(round(f * 20)) * 5
    return f"about {p}%"


def region_of(x: float, y: float, box: tuple[float, float, float, float]) -> str:
    """The 3 x 3 region of (x, y) within the box (x0, y0, x1, y1); y grows downwards."""
    x0, y0, x1, y1 = box
    col = min(2, int(3 * (x - x0) / max(x1 - x0 + 1, 1e-9)))
    row = min(2, int(3 * (y - y0) / max(y1 - y0 + 1, 1e-9)))
    return REGIONS[3 * row + col]


def components(cells: set[tuple[int, int]]) -> list[list[tuple[int, int]]]:
    """8-connected components of grid cells, largest first (ties: first cell in raster order)."""
    left, out = set(cells), []
    for c in sorted(cells, key=lambda t: (t[1], t[0])):
        if c not in left:
            continue
        comp, stack = [], [c]
        left.discard(c)
        while stack:
            x, y = stack.pop()
            comp.append((x, y))
            for dx in (-1, 0, 1):
                for dy in (-1, 0, 1):
                    nb = (x + dx, y + dy)
                    if nb in left:
                        left.discard(nb)
                        stack.append(nb)
        out.append(comp)
    return sorted(out, key=len, reverse=True)


def _grow(xs, ys, free: np.ndarray, seed_idx: int, count: int, jitter: np.ndarray) -> np.ndarray:
    """Indices of the `count` free cells nearest to cell `seed_idx` (with jitter): a compact focus."""
    d = np.hypot(xs - xs[seed_idx], ys - ys[seed_idx]) + jitter
    d = np.where(free, d, np.inf)
    order = np.argsort(d, kind="stable")
    return order[:min(count, int(np.isfinite(d).sum()))]


def _blob(rng: np.random.Generator, n: int):
    g = int(math.ceil(math.sqrt(n / 0.55)))
    ys, xs = np.divmod(np.arange(g * g), g)
    cy, cx = g / 2 + rng.normal(0, g / 10), g / 2 + rng.normal(0, g / 10)
    ay, ax = rng.uniform(0.7, 1.3, 2)
    score = ((ys - cy) / ay) ** 2 + ((xs - cx) / ax) ** 2 + rng.uniform(0, g / 2, g * g)
    cells = np.sort(np.argsort(score, kind="stable")[:n])  # raster order
    return xs[cells], ys[cells]


def _edge(xs, ys) -> np.ndarray:
    occ = set(zip(xs.tolist(), ys.tolist()))
    return np.array([any((x + dx, y + dy) not in occ for dx, dy in ((1, 0), (-1, 0), (0, 1), (0, -1)))
                     for x, y in zip(xs.tolist(), ys.tolist())])


def _layout(rng: np.random.Generator, n: int, diagnosis: str):
    """coords (n, 2), tissue id (n,), grade (n,) (0 off tumour), mitosis (n,) bool, edge (n,) bool."""
    xs, ys = _blob(rng, n)
    edge = _edge(xs, ys)
    tissue = np.zeros(n, dtype=np.int64)
    grade = np.zeros(n, dtype=np.int64)
    mitosis = np.zeros(n, dtype=bool)
    free = np.ones(n, dtype=bool)
    u = rng.uniform(0, 1, 8)  # a fixed number of draws, whatever the diagnosis
    jitter = rng.uniform(0, 1.5, (5, n))
    seeds = rng.permutation(n)
    T = SLIDE_TISSUES.index
    if diagnosis == "carcinoma":
        micro = u[0] < MICRO_PROB
        k = 1 if micro else 1 + int(np.searchsorted(np.cumsum(FOCI_PROBS), u[1], side="right"))
        k = min(k, 3)
        n_tumor = int(rng.integers(1, 4)) if micro else max(k * 3, int((0.1 + 0.4 * u[2]) * n))
        n_necrosis = 0 if micro else int(0.12 * u[3] * n)
        # half the carcinomas are seeded deep inside the section and kept small enough to clear the margin
        e = np.flatnonzero(edge)
        depth = np.sqrt(((xs[:, None] - xs[e][None]) ** 2 + (ys[:, None] - ys[e][None]) ** 2).min(1))
        interior = np.flatnonzero(depth >= (0.6 * depth.max() if u[6] < 0.5 else 0))
        chosen = [int(interior[seeds[0] % len(interior)])]
        if u[6] < 0.5 and not micro:
            n_tumor = min(n_tumor, max(3 * k, int(math.pi * max(depth[chosen[0]] - 1.0, 1.0) ** 2)))
            n_necrosis = min(n_necrosis, n_tumor // 3)
        # further focus seeds, spread out: greedily the farthest of a few random cells from the chosen ones
        for _ in range(k - 1):
            cand = seeds[1:40]
            dist = np.min([np.hypot(xs[cand] - xs[c], ys[cand] - ys[c]) for c in chosen], axis=0)
            chosen.append(int(cand[int(np.argmax(dist))]))
        shares = [1.0] if k == 1 else [0.55 + 0.25 * u[4]] + [(0.45 - 0.25 * u[4]) / (k - 1)] * (k - 1)
        sizes = [max(2 if not micro else 1, int(round(s * n_tumor))) for s in shares]
        if n_necrosis:  # necrosis at the heart of the main focus
            idx = _grow(xs, ys, free, chosen[0], n_necrosis, jitter[0])
            tissue[idx], free[idx] = T("necrosis"), False
        for j, (c, s) in enumerate(zip(chosen, sizes)):
            idx = _grow(xs, ys, free, c, s, jitter[1 + min(j, 1)])
            tissue[idx], free[idx] = T("tumor"), False
        tum = np.flatnonzero(tissue == T("tumor"))
        base = 1 if u[5] < 0.4 else 2
        grade[tum] = base
        if not micro and u[7] < 0.5 and len(tum) >= 4:  # a worst area one grade higher
            area = max(2, int(round((0.15 + 0.3 * u[7]) * len(tum))))
            start = int(tum[int(rng.integers(len(tum)))])
            d = np.hypot(xs[tum] - xs[start], ys[tum] - ys[start])
            grade[tum[np.argsort(d, kind="stable")[:area]]] = base + 1
        worst = int(grade.max())
        m = min(int(rng.poisson(MITOSIS_RATE[worst])), 8, len(tum))
        if m:  # mitoses preferably in the worst area
            w = np.where(grade[tum] == worst, 4.0, 1.0)
            mitosis[rng.choice(tum, size=m, replace=False, p=w / w.sum())] = True
        infl = int(0.12 * u[2] * n)
    else:
        rng.integers(1, 4), rng.poisson(1.0)  # keep the stream aligned with the carcinoma branch
        infl = int((0.3 + 0.3 * u[0]) * n) if diagnosis == "inflammation" else int(0.15 * u[0] * n)
        nec = int((0.08 if diagnosis == "inflammation" else 0.03) * u[1] * n)
        if nec:
            idx = _grow(xs, ys, free, int(seeds[2]), nec, jitter[3])
            tissue[idx], free[idx] = T("necrosis"), False
    if infl:
        idx = _grow(xs, ys, free, int(seeds[1]), infl, jitter[4])
        tissue[idx], free[idx] = T("inflammation"), False
    coords = np.stack([xs, ys], 1).astype(np.int32)
    return coords, tissue, grade, mitosis, edge


def slide_facts(coords: np.ndarray, tissue: np.ndarray, grade: np.ndarray, mitosis: np.ndarray, edge: np.ndarray,
                diagnosis: str) -> dict:
    """The report's facts from the per-patch truth (None where a fact does not apply)."""
    facts = {"diagnosis": diagnosis, "region": None, "foci": None, "size_mm": None, "grade": None, "mitoses": None,
             "margin": None, "margin_mm": None}
    malignant = np.isin(tissue, [SLIDE_TISSUES.index("tumor"), SLIDE_TISSUES.index("necrosis")])
    if diagnosis != "carcinoma" or not malignant.any():
        return facts
    pts = [tuple(c) for c in coords[malignant].tolist()]
    comps = components(set(pts))
    big = np.array(comps[0], dtype=np.float64)
    box = (coords[:, 0].min(), coords[:, 1].min(), coords[:, 0].max(), coords[:, 1].max())
    facts["region"] = region_of(big[:, 0].mean(), big[:, 1].mean(), box)
    facts["foci"] = len(comps)
    facts["size_mm"] = int(CELL_MM * (1 + max(np.ptp(big[:, 0]), np.ptp(big[:, 1]))))
    facts["grade"] = int(grade.max())
    facts["mitoses"] = int(mitosis.sum())
    if (malignant & edge).any():
        facts["margin"], facts["margin_mm"] = "involved", 0
    else:
        t, e = coords[tissue == SLIDE_TISSUES.index("tumor")].astype(float), coords[edge].astype(float)
        d = np.sqrt(((t[:, None] - e[None]) ** 2).sum(-1)).min()
        facts["margin"], facts["margin_mm"] = "clear", max(1, int(round(CELL_MM * d)))
    return facts


def slide_report(rng: np.random.Generator, composition: dict[str, float], facts: dict) -> str:
    """Findings in random order, then the diagnosis (wording drawn from `rng`)."""
    diagnosis = facts["diagnosis"]
    sentences = [pick(rng, _TISSUE_SENTENCES[t]).format(p=_percent(composition[t]))
                 for t in ("tumor", "inflammation", "necrosis") if composition[t] > 0]
    if rng.random() < 0.6:
        sentences.append(pick(rng, _TISSUE_SENTENCES["normal"]).format(p=_percent(composition["normal"])))
    if facts["region"] is not None:
        k = facts["foci"]
        sentences.append(pick(rng, _REGION_SENTENCES).format(r=facts["region"]))
        sentences.append(pick(rng, _FOCI_SENTENCES[min(k, 2)]).format(k=NUMBER_WORDS.get(k, str(k)),
                                                                        s=facts["size_mm"]))
        sentences.append(pick(rng, _GRADE_SENTENCES).format(g=facts["grade"], w=GRADE_WORDS[facts["grade"]]))
        m = facts["mitoses"]
        sentences.append("no mitoses are identified" if m == 0 else "1 mitosis is identified" if m == 1
                         else pick(rng, _MITOSIS_SENTENCES).format(m=m))
        sentences.append(pick(rng, _MARGIN_SENTENCES[facts["margin"]]).format(d=facts["margin_mm"]))
    if diagnosis != "carcinoma" and rng.random() < 0.7:
        sentences.append(pick(rng, ["no tumor is identified", "there is no evidence of malignancy"]))
    sentences = [sentences[k] for k in rng.permutation(len(sentences))]
    return join_sentences(sentences + [f"Final diagnosis: {DIAGNOSIS_TEXT[diagnosis]}"])


def slide_sample(seed: int, study: Study, size: int | None = None) -> Sample:
    E = DEFAULT_DIM_SLIDE if size is None else size
    if E < 4:
        raise ValueError(f"slide feature dim (size) must be >= 4, got {E}")
    rng = study_rng(seed, "slide", study.index)
    diagnosis = SLIDE_DIAGNOSES[int(rng.choice(len(SLIDE_DIAGNOSES), p=SLIDE_DIAG_PROBS))]
    n = int(rng.integers(BAG_SIZE[0], BAG_SIZE[1] + 1))
    coords_N2, tissue_N, grade_N, mitosis_N, edge_N = _layout(rng, n, diagnosis)
    slide_shift_E = 0.15 * patient_rng(seed, "slide", study.patient).standard_normal(E)  # per-patient batch effect
    ink, mit, diff = event_directions(E) * math.sqrt(E / 64)
    feats_NE = (slide_centres(E)[tissue_N] + CLUSTER_STD * rng.standard_normal((n, E)) + slide_shift_E
                + INK * edge_N[:, None] * ink + MITOSIS * mitosis_N[:, None] * mit
                + GRADE * np.where(grade_N > 0, grade_N - 2, 0)[:, None] * diff)
    composition = {t: float(np.count_nonzero(tissue_N == k)) / n for k, t in enumerate(SLIDE_TISSUES)}
    facts = slide_facts(coords_N2, tissue_N, grade_N, mitosis_N, edge_N, diagnosis)
    text = slide_report(text_rng(seed, "slide", study.index), composition, facts)
    meta = {**base_meta("slide", study, seed), "diagnosis": diagnosis}
    extra = {"composition": composition, "tissue_names": list(SLIDE_TISSUES), "patch_tissue": tissue_N.tolist(),
             "patch_grade": grade_N.tolist(), "patch_mitosis": mitosis_N.astype(int).tolist(),
             "patch_edge": edge_N.astype(int).tolist(), "facts": facts,
             "diagnosis_id": SLIDE_DIAGNOSES.index(diagnosis)}
    return Sample(key=sample_key("slide", study.index), text=text, feats=feats_NE.astype(np.float16),
                  coords=coords_N2, labels={d: int(d == diagnosis) for d in SLIDE_DIAGNOSES}, meta=meta,
                  extra=extra)
