"""Synthetic chest radiographs: greyscale images with five findings at known boxes, and templated reports.

Anatomy (PA view, so the patient's right lung is on the image's left): dark lung fields with vessel markings
that fade towards the periphery, bright mediastinum, spine, heart and curved ribs, soft tissue, noise. Findings:
  nodule         small bright blob inside a lung, radius 4-6% of the side (24-36 mm; 2.6-3.8 px at 64 px);
                 `nodule_radius` = (lo, hi) changes the range (the lesion-size knob; one uniform draw either way)
  effusion       bright fluid at a lung base with a meniscus (level rising laterally)
  consolidation  bright patchy region inside a lung
  cardiomegaly   enlarged heart silhouette (box = enlarged heart); chronic: a property of the patient
  pneumothorax   very dark crescent without lung markings at an apex, bounded by a bright pleural line
Labels are 1 / 0 / -1; an uncertain (-1) finding is drawn at half strength and hedged in the report ("possible X").
`extra["boxes"]` lists the boxes of findings labelled 1, as [x0, y0, x1, y1] pixels (x1, y1 exclusive).

All random parameters are drawn first (`draw_cxr_spec`), whether or not a finding is present, so that
`render_cxr(spec, strengths)` can redraw the same image with any finding switched off (tests rely on it).

Shape legend: S image side; H, W rows, columns (H = W = S); K ribs.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from medvlp.data_shards.schema import Sample
from medvlp.data_shards.synth.util import (Study, base_meta, grid, join_sentences, mask_box, patient_rng, pick,
                                    sample_key, smooth_noise, soft_step, study_rng, text_rng)

FINDINGS_CXR = ["nodule", "effusion", "consolidation", "cardiomegaly", "pneumothorax"]
DEFAULT_SIZE_CXR = 128
CXR_VISITS = (0.5, 0.3, 0.2)  # P(1, 2, 3 studies per patient)
NODULE_RADIUS = (0.04, 0.06)  # nodule radius range, fractions of the image side
P_FINDING, P_UNCERTAIN = 0.27, 0.06  # per study: P(label 1), P(label -1); cardiomegaly is per patient
MM_PER_IMAGE = 300.0  # field of view, only used to state sizes in reports
SIDE_NAME = {-1: "right", 1: "left"}  # lateral direction on the image (-1 = image left) -> patient side

# ----------------------------------------------------------------------------------------------- parameters
def _draw_anatomy(prng: np.random.Generator) -> dict[str, Any]:
    """Patient-level anatomy (shared by all studies of the patient), in fractions of the image side."""
    cx = 0.5 + prng.normal(0, 0.012)
    dx, rx = 0.2 + prng.normal(0, 0.01), 0.15 + prng.normal(0, 0.008)  # lung offset from midline, half-width
    ry, cy = 0.3 + prng.normal(0, 0.012), 0.46 + prng.normal(0, 0.012)  # lung half-height, centre row
    lungs = {lat: {"x": cx + lat * dx, "y": cy, "rx": rx, "ry": ry, "lat": lat} for lat in (-1, 1)}
    return {
        "cx": cx, "lungs": lungs,
        "heart": {"x": cx + 0.035, "y": 0.64 + prng.normal(0, 0.01), "hw": 0.125 + prng.normal(0, 0.007),
                  "hh": 0.11 + prng.normal(0, 0.005)},
        "body_rx": 0.45 + prng.normal(0, 0.012), "body_ry": 0.56 + prng.normal(0, 0.01),
        "rib_y0": 0.12 + prng.normal(0, 0.008), "rib_step": 0.072 + prng.normal(0, 0.003),
        "has_cardiomegaly": bool(prng.random() < 0.3), "cm_scale": float(prng.uniform(1.35, 1.55)),
    }


def _draw_label(u: float) -> int:
    return 1 if u < P_FINDING else (-1 if u < P_FINDING + P_UNCERTAIN else 0)


def check_nodule_radius(nodule_radius) -> tuple[float, float]:
    """(lo, hi) with 0 < lo <= hi <= 0.25 (fractions of the image side), else a ValueError naming the value."""
    try:
        lo, hi = (float(v) for v in nodule_radius)
    except (TypeError, ValueError):
        raise ValueError(f"nodule_radius: expected (lo, hi) fractions of the image side, got {nodule_radius!r}") \
            from None
    if not 0.0 < lo <= hi <= 0.25:
        raise ValueError(f"nodule_radius: need 0 < lo <= hi <= 0.25 (fractions of the image side), got {lo}, {hi}")
    return lo, hi


def draw_cxr_spec(seed: int, study: Study, size: int,
                  nodule_radius: tuple[float, float] = NODULE_RADIUS) -> dict[str, Any]:
    """Every random number of one radiograph: anatomy, labels, finding geometry, noise fields. `nodule_radius`
    (lo, hi) only rescales the one uniform draw of the radius, so every other number stays the same."""
    spec = _draw_anatomy(patient_rng(seed, "cxr", study.patient))
    rng = study_rng(seed, "cxr", study.index)
    labels = {f: _draw_label(rng.random()) for f in ("nodule", "effusion", "consolidation", "pneumothorax")}
    u = rng.random()
    labels["cardiomegaly"] = (-1 if u < 0.1 else 1) if spec["has_cardiomegaly"] else (-1 if u < 0.03 else 0)
    spec["labels"] = {f: labels[f] for f in FINDINGS_CXR}
    spec["size"] = size
    # Finding geometry, always drawn (fixed order) so switching a finding off changes nothing else.

    def lat() -> int:  # which lung: -1 = image left (patient right), +1 = image right
        return int(rng.choice([-1, 1]))

    spec["nodule"] = {"lat": lat(), "u": rng.uniform(-0.2, 0.6), "v": rng.uniform(-0.6, 0.45),
                      "r": rng.uniform(*nodule_radius)}
    spec["effusion"] = {"lat": lat(), "h": rng.uniform(0.12, 0.3)}
    spec["consolidation"] = {"lat": lat(), "u": rng.uniform(-0.3, 0.5), "v": rng.uniform(-0.5, 0.55),
                             "ax": rng.uniform(0.05, 0.08), "ay": rng.uniform(0.06, 0.1),
                             "patch": smooth_noise(rng, (size, size), size / 12)}
    spec["pneumothorax"] = {"lat": lat(), "c": rng.uniform(0.18, 0.3)}
    spec["lung_tex"] = smooth_noise(rng, (size, size), size / 10)
    spec["lung_fine"] = smooth_noise(rng, (size, size), max(size / 40, 1.5))
    spec["low_freq"] = smooth_noise(rng, (size, size), size / 4)
    spec["pixel_noise"] = rng.standard_normal((size, size))
    spec["gain"], spec["offset"] = rng.uniform(0.92, 1.08), rng.uniform(-6, 6)
    return spec


def _strength(label: int) -> float:
    return {1: 1.0, -1: 0.5, 0: 0.0}[label]


# ----------------------------------------------------------------------------------------------- rendering
def _ellipse_rho(yy, xx, y, x, ry, rx):
    return np.sqrt(((xx - x) / rx) ** 2 + ((yy - y) / ry) ** 2)


def _lung_masks(spec, yy, xx):
    return {lat: soft_step(1 - _ellipse_rho(yy, xx, L["y"], L["x"], L["ry"], L["rx"]), 0.06)
            for lat, L in spec["lungs"].items()}


def _heart_mask(spec, yy, xx, enlarge: float):
    h = spec["heart"]
    scale = 1 + (spec["cm_scale"] - 1) * enlarge
    hw, hh = h["hw"] * scale, h["hh"] * (1 + (scale - 1) * 0.5)
    return soft_step(1 - _ellipse_rho(yy, xx, h["y"] + (hh - h["hh"]) * 0.5, h["x"] + (hw - h["hw"]) * 0.3, hh, hw),
                     0.05)


def _ptx_masks(spec, yy, xx, lungm):
    """(dark region, pleural line) of the pneumothorax: lung outside a shrunken, medially shifted lung."""
    p = spec["pneumothorax"]
    L = spec["lungs"][p["lat"]]
    c = p["c"]
    rho_c = _ellipse_rho(yy, xx, L["y"] + c * L["ry"] * 0.5, L["x"] - p["lat"] * c * L["rx"] * 0.6,
                         L["ry"] * (1 - 0.8 * c), L["rx"] * (1 - c))
    upper = soft_step(L["y"] + 0.2 * L["ry"] - yy, 0.05)
    region = lungm[p["lat"]] * soft_step(rho_c - 1, 0.03) * upper
    line = np.exp(-(((rho_c - 1) / 0.035) ** 2)) * lungm[p["lat"]] * upper
    return region, line


def _finding_layers(spec, yy, xx, lungm):
    """Per-finding intensity masks in [0, 1] at full strength (before blending)."""
    S = spec["size"]
    n = spec["nodule"]
    L = spec["lungs"][n["lat"]]
    nx, ny = L["x"] + n["lat"] * L["rx"] * n["u"], L["y"] + L["ry"] * n["v"]
    nod = np.sqrt(np.clip(1 - ((xx - nx) ** 2 + (yy - ny) ** 2) / n["r"] ** 2, 0, 1))
    e = spec["effusion"]
    L = spec["lungs"][e["lat"]]
    level = L["y"] + 0.95 * L["ry"] - e["h"] * 2 * L["ry"]
    level_x = level - 0.05 * np.clip(e["lat"] * (xx - L["x"]) / L["rx"], 0, 1)  # meniscus rises laterally
    eff = soft_step(yy - level_x, 2.0 / S) * lungm[e["lat"]]
    c = spec["consolidation"]
    L = spec["lungs"][c["lat"]]
    cx_, cy_ = L["x"] + c["lat"] * L["rx"] * c["u"], L["y"] + L["ry"] * c["v"]
    con = (soft_step(1 - _ellipse_rho(yy, xx, cy_, cx_, c["ay"], c["ax"]), 0.3)
           * np.clip(0.7 + 0.3 * c["patch"], 0, 1) * lungm[c["lat"]])
    return {"nodule": nod, "effusion": eff, "consolidation": con}


def render_cxr(spec: dict[str, Any], strengths: dict[str, float] | None = None) -> tuple[np.ndarray, list[dict]]:
    """(uint8 image (S, S), boxes of findings with strength 1). `strengths` defaults to the spec's labels."""
    S = spec["size"]
    st = strengths if strengths is not None else {f: _strength(v) for f, v in spec["labels"].items()}
    yy, xx = grid((S, S))
    lungm = _lung_masks(spec, yy, xx)
    lung_all = np.maximum(lungm[-1], lungm[1])
    cx = spec["cx"]
    # Lung field: dark, with vessel markings brightest near the hila.
    d_hilum = np.minimum(np.hypot(xx - (cx - 0.09), yy - 0.47), np.hypot(xx - (cx + 0.09), yy - 0.47))
    lung = 56 + 6 * spec["lung_tex"] + (20 * np.exp(-d_hilum / 0.1) + 5) * (0.6 + 0.4 * spec["lung_fine"])
    ptx, ptx_line = _ptx_masks(spec, yy, xx, lungm)
    s_ptx = st.get("pneumothorax", 0.0)
    lung = lung * (1 - s_ptx * ptx) + 6 * s_ptx * ptx  # no lung markings beyond the pleural line
    body = soft_step(1 - _ellipse_rho(yy, xx, 0.55, cx, spec["body_ry"], spec["body_rx"]), 0.03)
    img = 8 * (1 - body) + (95 + 35 * np.clip((yy - 0.7) / 0.2, 0, 1)) * body
    img = img * (1 - lung_all) + lung * lung_all
    rib_y = spec["rib_y0"] + spec["rib_step"] * np.arange(9)[:, None, None] + 0.6 * (xx - cx) ** 2  # (K, 1, W)
    ribs = np.exp(-(((yy - rib_y) / 0.012) ** 2)).sum(0) * soft_step(0.8 - yy, 0.05) * body
    img = img + 26 * np.clip(ribs, 0, 1.5) * (1 - 0.5 * (np.abs(xx - cx) < 0.07))
    med = soft_step(0.065 - np.abs(xx - cx), 0.02) * soft_step(yy - 0.08, 0.03)
    img = img * (1 - med) + 160 * med
    spine = soft_step(0.03 - np.abs(xx - cx), 0.01)
    img = img + spine * (18 + 8 * np.cos(2 * np.pi * yy / 0.05))
    heart = _heart_mask(spec, yy, xx, st.get("cardiomegaly", 0.0))
    img = img * (1 - heart) + 172 * heart
    layers = _finding_layers(spec, yy, xx, lungm)
    img = img + 95 * st.get("nodule", 0.0) * layers["nodule"]
    img = img + 85 * st.get("consolidation", 0.0) * layers["consolidation"]
    s_eff = st.get("effusion", 0.0) * layers["effusion"]
    img = img * (1 - s_eff) + 150 * s_eff
    img = img + 45 * s_ptx * ptx_line
    img = spec["gain"] * img + spec["offset"] + 4 * spec["low_freq"] + 4 * spec["pixel_noise"]
    img_HW = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    # Boxes enclose where the finding changes the image by more than ~4 grey levels (pleural line included).
    masks = {"nodule": layers["nodule"] > 0.05, "effusion": layers["effusion"] > 0.05,
             "consolidation": layers["consolidation"] > 0.06, "pneumothorax": (ptx > 0.12) | (ptx_line > 0.1),
             "cardiomegaly": _heart_mask(spec, yy, xx, 1.0) > 0.5}
    boxes = []
    for f in FINDINGS_CXR:
        box = mask_box(masks[f]) if st.get(f, 0.0) >= 1.0 else None
        if box is not None:
            boxes.append({"finding": f, "box": box})
    return img_HW, boxes


# ----------------------------------------------------------------------------------------------- reports
def _where(spec, finding: str) -> tuple[str, str]:
    """(patient side, lung zone) of a finding."""
    p = spec.get(finding)
    if not isinstance(p, dict):
        return "", ""
    v = p.get("v", -0.8)  # effusion sits at a base, pneumothorax at an apex: zone unused
    zone = "upper" if v < -0.25 else ("mid" if v < 0.3 else "lower")
    return SIDE_NAME[p["lat"]], zone


_POSITIVE = {  # report sentences of a present finding; {side}, {zone}, {mm}, {amount} filled per study
    "nodule": ["A {mm} mm nodule in the {side} {zone} lung zone", "{side} {zone} zone pulmonary nodule measuring {mm} mm",
               "small rounded nodular opacity in the {side} {zone} zone",
               "there is a {mm} mm {side} {zone} zone nodule"],
    "effusion": ["{amount} {side} pleural effusion", "there is a {amount} {side} pleural effusion",
                 "fluid in the {side} pleural space with a meniscus",
                 "blunting of the {side} costophrenic angle from a {amount} effusion"],
    "consolidation": ["patchy consolidation in the {side} {zone} zone",
                      "{side} {zone} zone airspace opacity, consistent with consolidation",
                      "focal airspace opacity in the {side} {zone} zone", "consolidation of the {side} {zone} lung zone"],
    "cardiomegaly": ["cardiomegaly", "the cardiac silhouette is enlarged",
                     "enlarged cardiac silhouette, consistent with cardiomegaly", "the heart is enlarged"],
    "pneumothorax": ["small {side} apical pneumothorax", "{side} apical pneumothorax with a visible pleural line",
                     "partially collapsed {side} lung from an apical pneumothorax",
                     "visible pleural line at the {side} apex, consistent with pneumothorax"],
}


def _positive(rng, spec, f: str) -> str:
    side, zone = _where(spec, f)
    fill = {"side": side, "zone": zone}
    if f == "nodule":
        fill["mm"] = int(round(2 * spec["nodule"]["r"] * MM_PER_IMAGE))
    if f == "effusion":
        h = spec["effusion"]["h"]
        fill["amount"] = "small" if h < 0.18 else ("moderate" if h < 0.24 else "large")
    return pick(rng, [t.format(**fill) for t in _POSITIVE[f]])


def _hedged(rng, spec, f: str) -> str:
    side, zone = _where(spec, f)
    return pick(rng, {
        "nodule": [f"possible small nodule in the {side} {zone} zone", f"cannot exclude a {side} {zone} zone nodule"],
        "effusion": [f"possible small {side} pleural effusion", f"cannot exclude a trace {side} effusion"],
        "consolidation": [f"possible early consolidation in the {side} {zone} zone",
                          f"questionable patchy opacity in the {side} {zone} zone, may represent consolidation"],
        "cardiomegaly": ["possible mild cardiomegaly", "borderline cardiac enlargement, cannot exclude cardiomegaly"],
        "pneumothorax": [f"possible small {side} apical pneumothorax",
                         f"questionable {side} apical pleural line, cannot exclude pneumothorax"],
    }[f])


_NEGATIONS = {
    "nodule": ["no pulmonary nodule", "no suspicious nodule is seen", "no focal nodule"],
    "effusion": ["no pleural effusion", "no pleural fluid", "the costophrenic angles are clear"],
    "consolidation": ["no focal consolidation", "no airspace consolidation", "no focal airspace opacity"],
    "cardiomegaly": ["no cardiomegaly", "heart size is normal", "the cardiac silhouette is normal in size"],
    "pneumothorax": ["no pneumothorax", "there is no pneumothorax", "the lungs are well expanded without pneumothorax"],
}
_NORMAL = ["no acute cardiopulmonary abnormality", "no acute cardiopulmonary process", "normal chest radiograph"]


def _report_prompts(f: str) -> tuple[list[str], list[str]]:
    """Zero-shot prompt sets worded exactly like the reports: every positive sentence template of `f` over both
    sides, the three zones, a small and a large size / amount (deduplicated), and its negation sentences."""
    fills = [{"side": side, "zone": zone, "mm": mm, "amount": amount} for side in ("right", "left")
             for zone in ("upper", "mid", "lower") for mm, amount in ((20, "small"), (28, "large"))]
    pos = list(dict.fromkeys(join_sentences([t.format(**fill)]) for t in _POSITIVE[f] for fill in fills))
    neg = [join_sentences([n]) for n in _NEGATIONS[f]]
    return pos, neg


# (positive, negative) prompt sets per finding: the corpus's own report sentences (see `_report_prompts`).
CXR_PROMPTS: dict[str, tuple[list[str], list[str]]] = {f: _report_prompts(f) for f in FINDINGS_CXR}


def cxr_report(rng: np.random.Generator, spec: dict[str, Any]) -> str:
    """Findings in random order, hedges for uncertain ones, negations for about half of the absent ones."""
    labels = spec["labels"]
    sentences = [_positive(rng, spec, f) for f in FINDINGS_CXR if labels[f] == 1]
    sentences += [_hedged(rng, spec, f) for f in FINDINGS_CXR if labels[f] == -1]
    negated = [f for f in FINDINGS_CXR if labels[f] == 0 and rng.random() < 0.5]
    if {"effusion", "pneumothorax"} <= set(negated) and rng.random() < 0.5:
        negated = [f for f in negated if f not in ("effusion", "pneumothorax")]
        sentences.append("no pleural effusion or pneumothorax")
    sentences += [pick(rng, _NEGATIONS[f]) for f in negated]
    if all(labels[f] == 0 for f in ("nodule", "effusion", "consolidation", "pneumothorax")) and rng.random() < 0.3:
        sentences.append("the lungs are clear")
    order = rng.permutation(len(sentences))
    sentences = [sentences[k] for k in order]
    if all(v == 0 for v in labels.values()):
        sentences.insert(int(rng.integers(2)) * len(sentences), pick(rng, _NORMAL))
    if rng.random() < 0.25:
        sentences.insert(0, "PA view of the chest")
    return join_sentences(sentences)


def cxr_sample(seed: int, study: Study, size: int | None = None,
               nodule_radius: tuple[float, float] | None = None) -> Sample:
    size = DEFAULT_SIZE_CXR if size is None else size
    if size < 32:
        raise ValueError(f"cxr size must be >= 32 pixels, got {size}")
    radius = NODULE_RADIUS if nodule_radius is None else check_nodule_radius(nodule_radius)
    spec = draw_cxr_spec(seed, study, size, radius)
    img_HW, boxes = render_cxr(spec)
    text = cxr_report(text_rng(seed, "cxr", study.index), spec)
    return Sample(key=sample_key("cxr", study.index), text=text, image=img_HW,
                  labels=dict(spec["labels"]), meta=base_meta("cxr", study, seed), extra={"boxes": boxes})
