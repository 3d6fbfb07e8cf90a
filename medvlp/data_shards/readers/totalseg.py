"""TotalSegmentator label maps: the label names of its `total` task and their merge into a stage's organs by name.

A TotalSegmentator multi-label mask (`TotalSegmentator -i ct.nii.gz -o seg.nii.gz --ml`) numbers 117 structures
(label k = TOTALSEG_TOTAL[k - 1]: spleen, kidney_right, kidney_left, ..., costal_cartilages). The anatomy stage
works on a few organs (e.g. liver, spleen, left_kidney, right_kidney, lung); a manifest row maps the one onto the
other with two cells:

  organ_names   "totalseg" (the 117 names of the total task, in label order) or the explicit JSON list
  organ_merge   JSON list of target organs, each merged from the source labels of the same name or a synonym in
                `MERGE_BY_NAME` (left_kidney <- kidney_left + kidney_cyst_left, lung <- the five lung lobes, ...),
                or a JSON object {target organ: [source label names]} for any other merge

The row's sample then carries `organ_names` = the target organs and `organ_label_map` = the source label -> target
label table (0 = background; a source label that no target takes becomes background); the mask is stored with its
source labels (nothing is lost) and readers of organ tokens relabel it with `relabel`. A target none of whose
sources occurs in the table is an error naming it (a misspelt organ is never silently empty).
"""
from __future__ import annotations

import json
from typing import Any, Sequence

import numpy as np

_VERTEBRAE = ["vertebrae_S1"] + [f"vertebrae_L{i}" for i in range(5, 0, -1)] + \
             [f"vertebrae_T{i}" for i in range(12, 0, -1)] + [f"vertebrae_C{i}" for i in range(7, 0, -1)]
# TotalSegmentator v2, task "total": label k is TOTALSEG_TOTAL[k - 1]
TOTALSEG_TOTAL: list[str] = [
    "spleen", "kidney_right", "kidney_left", "gallbladder", "liver", "stomach", "pancreas", "adrenal_gland_right",
    "adrenal_gland_left", "lung_upper_lobe_left", "lung_lower_lobe_left", "lung_upper_lobe_right",
    "lung_middle_lobe_right", "lung_lower_lobe_right", "esophagus", "trachea", "thyroid_gland", "small_bowel",
    "duodenum", "colon", "urinary_bladder", "prostate", "kidney_cyst_left", "kidney_cyst_right", "sacrum",
    *_VERTEBRAE, "heart", "aorta", "pulmonary_vein", "brachiocephalic_trunk", "subclavian_artery_right",
    "subclavian_artery_left", "common_carotid_artery_right", "common_carotid_artery_left",
    "brachiocephalic_vein_left", "brachiocephalic_vein_right", "atrial_appendage_left", "superior_vena_cava",
    "inferior_vena_cava", "portal_vein_and_splenic_vein", "iliac_artery_left", "iliac_artery_right",
    "iliac_vena_left", "iliac_vena_right", "humerus_left", "humerus_right", "scapula_left", "scapula_right",
    "clavicula_left", "clavicula_right", "femur_left", "femur_right", "hip_left", "hip_right", "spinal_cord",
    "gluteus_maximus_left", "gluteus_maximus_right", "gluteus_medius_left", "gluteus_medius_right",
    "gluteus_minimus_left", "gluteus_minimus_right", "autochthon_left", "autochthon_right", "iliopsoas_left",
    "iliopsoas_right", "brain", "skull", *[f"rib_left_{i}" for i in range(1, 13)],
    *[f"rib_right_{i}" for i in range(1, 13)], "sternum", "costal_cartilages"]
LABEL_SETS = {"totalseg": TOTALSEG_TOTAL}

_LOBES = ["lung_upper_lobe_left", "lung_lower_lobe_left", "lung_upper_lobe_right", "lung_middle_lobe_right",
          "lung_lower_lobe_right"]
# target organ -> source label names it takes (besides a source of its own name)
MERGE_BY_NAME: dict[str, list[str]] = {
    "left_kidney": ["kidney_left", "kidney_cyst_left"], "right_kidney": ["kidney_right", "kidney_cyst_right"],
    "kidney": ["kidney_left", "kidney_right", "kidney_cyst_left", "kidney_cyst_right"],
    "lung": _LOBES, "lungs": _LOBES, "lung_bases": ["lung_lower_lobe_left", "lung_lower_lobe_right"],
    "left_lung": ["lung_upper_lobe_left", "lung_lower_lobe_left"],
    "right_lung": ["lung_upper_lobe_right", "lung_middle_lobe_right", "lung_lower_lobe_right"],
    "adrenal_glands": ["adrenal_gland_left", "adrenal_gland_right"], "bladder": ["urinary_bladder"],
    "vertebrae": _VERTEBRAE, "ribs": [f"rib_{s}_{i}" for s in ("left", "right") for i in range(1, 13)],
}


def expand_label_set(names: Any) -> Any:
    """A label-set name ("totalseg") -> its label names; anything else unchanged."""
    if isinstance(names, str) and names.strip().lower() in LABEL_SETS:
        return list(LABEL_SETS[names.strip().lower()])
    return names


def merge_table(source: Sequence[str], merge: Sequence[str] | dict[str, Sequence[str]]
                ) -> tuple[list[str], list[int]]:
    """(target organ names, label map (len(source) + 1,): source label -> target label, 0 = background).

    merge: target names (merged by name, `MERGE_BY_NAME`) or {target: [source names]}. The first target that
    claims a source label keeps it. Raises ValueError naming a target without any source in `source`."""
    src = list(source)
    if isinstance(merge, dict):
        spec = {str(t): [str(s) for s in v] for t, v in merge.items()}
    else:
        spec = {str(t): [t, *MERGE_BY_NAME.get(str(t), [])] for t in merge}
    if not spec:
        raise ValueError("organ_merge: no target organs")
    lut = [0] * (len(src) + 1)
    for k, (target, sources) in enumerate(spec.items()):
        hit = [src.index(s) + 1 for s in dict.fromkeys(sources) if s in src]
        if not hit:
            raise ValueError(f"organ_merge: organ {target!r} matches none of the mask's label names "
                             f"(looked for {sorted(set(sources))})")
        for lab in hit:
            if lut[lab] == 0:
                lut[lab] = k + 1
    return list(spec), lut


def relabel(mask: np.ndarray, label_map: Sequence[int]) -> np.ndarray:
    """Source labels -> target labels; a label beyond the table is an error (the mask does not fit its names)."""
    lut = np.asarray(label_map, dtype=np.uint8)
    m = np.asarray(mask)
    if m.size and int(m.max()) >= lut.size:
        raise ValueError(f"organ_label_map: mask label {int(m.max())} is beyond the {lut.size - 1} named labels")
    return lut[m]


def manifest_organs(raw: dict[str, Any]) -> tuple[dict[str, Any], list[tuple[str, str]], dict[str, Any]]:
    """The manifest hook: a row's raw cells -> (the cells with organ_names expanded from a label-set name and, with an
    organ_merge cell, replaced by the target organs (a JSON list); errors (column, message); extra sample fields
    {"organ_label_map": [...], "source_organ_names": [...]})."""
    names = raw.get("organ_names")
    if isinstance(names, str) and names.strip().strip('"').lower() in LABEL_SETS:
        names = expand_label_set(names.strip().strip('"'))
    elif isinstance(names, str) and names.strip().startswith("["):
        try:
            names = json.loads(names)
        except json.JSONDecodeError:
            return raw, [], {}  # reported by the manifest's own organ_names check
    cell = raw.get("organ_merge")
    out = dict(raw)
    if isinstance(names, list):
        out["organ_names"] = names
    if cell is None or (isinstance(cell, str) and not cell.strip()):
        return out, [], {}
    try:
        merge = json.loads(cell) if isinstance(cell, str) else cell
    except json.JSONDecodeError as e:
        return out, [("organ_merge", f"not valid JSON: {e.msg}")], {}
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        return out, [("organ_merge", "needs organ_names (the mask's label names, or \"totalseg\")")], {}
    if not isinstance(merge, (list, dict)):
        return out, [("organ_merge", f"expected a JSON list of organs or {{organ: [labels]}}, got {merge!r}")], {}
    try:
        targets, lut = merge_table(names, merge)
    except ValueError as e:
        return out, [("organ_merge", str(e).removeprefix("organ_merge: "))], {}
    out["organ_names"] = targets
    return out, [], {"organ_label_map": lut, "source_organ_names": list(names)}
