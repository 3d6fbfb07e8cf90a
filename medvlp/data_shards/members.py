"""Batch members: ground truth stored in each sample's json, decoded per sample and collated into the batch.

    cfg = DataConfig(..., members=["boxes", "class_index"])    # pretraining asks for none: batches unchanged
    batch["boxes"], batch["boxes_count"], batch["boxes_label"], batch["class_index"]

A `Member` is a name, a `decode(sample_json, sample, ctx) -> value` run in the data workers on every sample
after the image transform (a member with `uses_view=True` also gets the transform's output as a 4th argument),
and a `collate(values, keys) -> {batch key: value}` run on each batch. The registry `MEMBERS` holds the built-in
members below; `register_member` adds one (a fine-tune stage's own field).

Built-in members (json fields as the corpora store them; "meta.x" is the x of the json's "meta"):
  boxes            json "boxes": [{"finding": name, "box": [x0, y0, x1, y1]}, ...] (may be empty; "label" is accepted
                   for "finding"). -> "boxes" (B, K, 4) float xyxy in pixels of the STORED image (x1, y1 exclusive),
                   zero rows past the count; "boxes_count" (B,) long; "boxes_label" (B, K) long, the index of the
                   finding in the data set's label names (index.json label_names), -1 padding; "boxes_image_hw"
                   (B, 2) long, the stored image's (H, W), to map boxes onto the transformed view (`boxes_to_view`).
                   K = the largest count in the batch.
  class_index      json "meta.class_index", else "class_index", else "diagnosis_id" (slides) -> (B,) long.
  organ_labels     json "organs": {organ: {"abnormal": 0|1, ...}} in the order of "organ_names"
                   -> "organ_labels" (B, n_organs) float, "organ_names" list[str].
  organ_sentences  json "organs": {organ: {"sentence": str}} in the order of "organ_names"
                   -> "organ_sentences" list[list[str]] (B lists of n_organs), "organ_names".
  composition      json "composition": {tissue: fraction} in the order of "tissue_names"
                   -> "composition" (B, n_tissues) float, "composition_names" list[str].
  patch_tissue     json "patch_tissue" (tissue id per stored patch) and "tissue_names" -> "patch_tissue" (B, N) long
                   aligned row by row with the batch's "feats" (matched by coordinates, so subsampled bags stay
                   aligned), -1 padding; "tissue_names" list[str].
  spacing          json "spacing_mm": [z, y, x] (CT voxel size of the stored volume) -> (B, 3) float.
  mask             the stored organ label map (CT): already batched as "mask" by the stream (a zero map when a volume
                   has none); asking for the member makes a missing stored mask an error instead.
  has_mask         whether each volume stores an organ mask -> "has_mask" (B,) bool: tells a real all-background mask
                   from the zero map the stream batches for a volume without one (meta has_mask: false).

Missing fields. A requested member that a sample lacks raises `MemberError` naming the member and the sample key
(it is a data set / config mismatch, not a corrupt sample: the stream stops instead of skipping every sample). A
member registered with `missing=<callable returning the padding value>` is optional: samples without the field get
that value (no built-in member is optional). Names (organ_names, tissue_names) must agree across a batch.

Shape legend: B batch, K boxes (padded to the batch maximum).
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

import torch

from medvlp.data_shards.schema import Sample


class MemberError(ValueError):
    """A requested batch member cannot be decoded from a sample (message names the member and the sample key)."""


@dataclass(frozen=True)
class MemberContext:
    """What a decode may need beyond the sample: the data set's label names (index.json) and its modality."""

    label_names: tuple[str, ...] = ()
    modality: str = ""


class MissingField(Exception):
    """Raise from a decode when the sample lacks the member's field, e.g. MissingField("json field 'grade'"):
    it becomes a MemberError naming member and key, or the member's `missing` value when it is optional."""


@dataclass(frozen=True)
class Member:
    name: str
    decode: Callable[[dict, Sample, MemberContext], Any]  # (sample json, decoded Sample, context) -> per-sample value
    collate: Callable[[list, list[str]], dict[str, Any]]  # (values, sample keys) -> {batch key: batch value}
    doc: str = ""  # one-line description of what the member adds to a batch
    missing: Callable[[], Any] | None = None  # optional member: the value of a sample without the field
    uses_view: bool = False  # decode(sample_json, sample, ctx, view) also gets the transformed per-sample tensors


MEMBERS: dict[str, Member] = {}


def register_member(member: Member, replace: bool = False) -> Member:
    """Add `member` to the registry (an existing name needs `replace=True`)."""
    if not member.name.isidentifier():
        raise ValueError(f"batch member name {member.name!r} must be an identifier")
    if member.name in MEMBERS and not replace:
        raise ValueError(f"batch member {member.name!r} is already registered (pass replace=True)")
    MEMBERS[member.name] = member
    return member


def check_members(names: list[str]) -> list[str]:
    """Validate requested member names; an unknown one fails with the closest known name as a hint."""
    if not isinstance(names, (list, tuple)):
        raise ValueError(f"members: expected a list of member names, got {names!r}")
    seen = set()
    for n in names:
        if n not in MEMBERS:
            close = difflib.get_close_matches(str(n), list(MEMBERS), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"members: unknown batch member {n!r}{hint}; known: {', '.join(sorted(MEMBERS))}")
        if n in seen:
            raise ValueError(f"members: {n!r} is listed twice")
        seen.add(n)
    return list(names)


def sample_json(s: Sample) -> dict:
    """The sample's json document as stored (labels, meta and the ground-truth fields)."""
    return {**s.extra, "labels": s.labels, "meta": s.meta}


class MemberSet:
    """The requested members of one stream: `decode(sample)` per sample, `collate(per-sample dicts)` per batch."""

    def __init__(self, names: list[str], ctx: MemberContext) -> None:
        self.members = [MEMBERS[n] for n in check_members(names)]
        self.ctx = ctx

    def __bool__(self) -> bool:
        return bool(self.members)

    def decode(self, s: Sample, view: dict[str, Any] | None = None) -> dict[str, Any]:
        """Per-sample member values; `view` is the transform's output (image / volume / feats + coords)."""
        doc = sample_json(s)
        out = {}
        for m in self.members:
            try:
                out[m.name] = m.decode(doc, s, self.ctx, view or {}) if m.uses_view else m.decode(doc, s, self.ctx)
            except MissingField as e:
                if m.missing is None:
                    raise MemberError(f"sample {s.key!r}: batch member {m.name!r} needs {e}, which the sample "
                                      "lacks (drop it from data.members or use shards that store it)") from None
                out[m.name] = m.missing()
            except MemberError:
                raise
            except Exception as e:  # noqa: BLE001 - malformed field: one clear line naming member and key
                raise MemberError(f"sample {s.key!r}: batch member {m.name!r}: {type(e).__name__}: {e}") from None
        return out

    def collate(self, values: list[dict[str, Any]], keys: list[str]) -> dict[str, Any]:
        batch: dict[str, Any] = {}
        for m in self.members:
            try:
                batch.update(m.collate([v[m.name] for v in values], keys))
            except MemberError:
                raise
            except Exception as e:  # noqa: BLE001
                raise MemberError(f"batch member {m.name!r} (keys {keys[:4]}...): {type(e).__name__}: {e}") from None
        return batch


# ------------------------------------------------------------------------------------------ helpers
def _need(doc: dict, *path: str) -> Any:
    """doc[path[0]][path[1]]...; a missing step raises MissingField('json field "a.b"')."""
    cur: Any = doc
    for i, k in enumerate(path):
        if not isinstance(cur, dict) or k not in cur:
            raise MissingField(f"json field {'.'.join(path[:i + 1])!r}")
        cur = cur[k]
    return cur


def _same_names(name: str, values: list[tuple[list[str], Any]], keys: list[str]) -> list[str]:
    first = values[0][0]
    for (names, _), key in zip(values, keys):
        if names != first:
            raise MemberError(f"batch member {name!r}: sample {key!r} lists {names}, sample {keys[0]!r} {first}: "
                              "samples of one batch must share the names")
    return list(first)


# ------------------------------------------------------------------------------------------ boxes
def _decode_boxes(doc: dict, s: Sample, ctx: MemberContext) -> tuple[list[list[float]], list[int], tuple[int, int]]:
    raw = _need(doc, "boxes")
    if not isinstance(raw, list):
        raise MemberError(f"sample {s.key!r}: batch member 'boxes': json 'boxes' is {type(raw).__name__}, not a list")
    boxes, labels = [], []
    for j, b in enumerate(raw):
        name = b.get("finding", b.get("label")) if isinstance(b, dict) else None
        xyxy = b.get("box") if isinstance(b, dict) else None
        if name is None or not isinstance(xyxy, (list, tuple)) or len(xyxy) != 4:
            raise MemberError(f"sample {s.key!r}: batch member 'boxes': box {j} is {b!r}, expected "
                              "{'finding': name, 'box': [x0, y0, x1, y1]}")
        if name not in ctx.label_names:
            raise MemberError(f"sample {s.key!r}: batch member 'boxes': box {j} finding {name!r} is not one of the "
                              f"data set's label names {list(ctx.label_names)}")
        boxes.append([float(v) for v in xyxy])
        labels.append(ctx.label_names.index(name))
    hw = tuple(int(n) for n in s.image.shape[:2]) if s.image is not None else (0, 0)
    return boxes, labels, hw


def _collate_boxes(values: list, keys: list[str]) -> dict[str, torch.Tensor]:
    b, k = len(values), max((len(v[0]) for v in values), default=0)
    boxes_BK4 = torch.zeros(b, k, 4, dtype=torch.float32)
    label_BK = torch.full((b, k), -1, dtype=torch.long)
    count_B = torch.zeros(b, dtype=torch.long)
    for i, (bx, lab, _) in enumerate(values):
        n = len(bx)
        count_B[i] = n
        if n:
            boxes_BK4[i, :n] = torch.tensor(bx, dtype=torch.float32)
            label_BK[i, :n] = torch.tensor(lab, dtype=torch.long)
    hw_B2 = torch.tensor([list(v[2]) for v in values], dtype=torch.long).reshape(b, 2)
    return {"boxes": boxes_BK4, "boxes_count": count_B, "boxes_label": label_BK, "boxes_image_hw": hw_B2}


def boxes_to_view(boxes_BK4: torch.Tensor, image_hw_B2: torch.Tensor, size: int) -> torch.Tensor:
    """Map stored-image boxes onto the eval view (`transforms.ResizeCenterCrop(size)`: shorter side resized to
    `size`, centre crop), clipped to [0, size]. Training views are random crops: their boxes are not tracked."""
    h, w = image_hw_B2[:, 0].double(), image_hw_B2[:, 1].double()
    s = size / torch.minimum(h, w)
    nh = torch.maximum(torch.full_like(h, size), torch.round(h * s))
    nw = torch.maximum(torch.full_like(w, size), torch.round(w * s))
    top, left = torch.div(nh - size, 2, rounding_mode="floor"), torch.div(nw - size, 2, rounding_mode="floor")
    sx, sy = (nw / w)[:, None], (nh / h)[:, None]
    out = boxes_BK4.double().clone()
    out[..., 0::2] = out[..., 0::2] * sx[..., None] - left[:, None, None]
    out[..., 1::2] = out[..., 1::2] * sy[..., None] - top[:, None, None]
    return out.clamp(0, size).to(boxes_BK4.dtype)


# ------------------------------------------------------------------------------------------ the others
def _decode_class_index(doc: dict, s: Sample, ctx: MemberContext) -> int:
    for path in (("meta", "class_index"), ("class_index",), ("diagnosis_id",)):
        try:
            v = _need(doc, *path)
        except MissingField:
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise MemberError(f"sample {s.key!r}: batch member 'class_index': json {'.'.join(path)!r} = {v!r} is "
                              "not a non-negative int")
        return v
    raise MissingField("json field 'meta.class_index' (or 'class_index' / 'diagnosis_id')")


def _organs(doc: dict, s: Sample, member: str, key: str) -> tuple[list[str], list[Any]]:
    names, organs = _need(doc, "organ_names"), _need(doc, "organs")
    vals = []
    for o in names:
        if o not in organs or key not in organs[o]:
            raise MissingField(f"json field 'organs.{o}.{key}'")
        vals.append(organs[o][key])
    return list(names), vals


def _decode_organ_labels(doc: dict, s: Sample, ctx: MemberContext):
    names, vals = _organs(doc, s, "organ_labels", "abnormal")
    return names, [float(v) for v in vals]


def _decode_organ_sentences(doc: dict, s: Sample, ctx: MemberContext):
    names, vals = _organs(doc, s, "organ_sentences", "sentence")
    return names, [str(v) for v in vals]


def _collate_organ_labels(values: list, keys: list[str]) -> dict[str, Any]:
    names = _same_names("organ_labels", values, keys)
    return {"organ_labels": torch.tensor([v for _, v in values], dtype=torch.float32).reshape(len(values), len(names)),
            "organ_names": names}


def _collate_organ_sentences(values: list, keys: list[str]) -> dict[str, Any]:
    return {"organ_sentences": [list(v) for _, v in values],
            "organ_names": _same_names("organ_sentences", values, keys)}


def _decode_composition(doc: dict, s: Sample, ctx: MemberContext):
    comp = _need(doc, "composition")
    names = doc.get("tissue_names") or sorted(comp)
    missing = [t for t in names if t not in comp]
    if missing:
        raise MissingField(f"json field 'composition.{missing[0]}'")
    return list(names), [float(comp[t]) for t in names]


def _collate_composition(values: list, keys: list[str]) -> dict[str, Any]:
    names = _same_names("composition", values, keys)
    return {"composition": torch.tensor([v for _, v in values], dtype=torch.float32).reshape(len(values), len(names)),
            "composition_names": names}


def _decode_spacing(doc: dict, s: Sample, ctx: MemberContext) -> list[float]:
    v = _need(doc, "spacing_mm")
    if not isinstance(v, (list, tuple)) or len(v) != 3:
        raise MemberError(f"sample {s.key!r}: batch member 'spacing': json 'spacing_mm' = {v!r} is not [z, y, x]")
    return [float(x) for x in v]


def _decode_patch_tissue(doc: dict, s: Sample, ctx: MemberContext, view: dict) -> tuple[list[str], torch.Tensor]:
    """Tissue id of every patch of the streamed bag, matched by coordinates (the bag may be subsampled)."""
    tissue = _need(doc, "patch_tissue")
    names = list(doc.get("tissue_names") or [])
    if s.coords is None or "coords" not in view:
        raise MissingField("patch coordinates (member coords.npy)")
    if len(tissue) != s.coords.shape[0]:
        raise MemberError(f"sample {s.key!r}: batch member 'patch_tissue': {len(tissue)} patch labels for "
                          f"{s.coords.shape[0]} patches")
    where = {(int(x), int(y)): j for j, (x, y) in enumerate(s.coords.tolist())}
    if len(where) != len(tissue):
        raise MemberError(f"sample {s.key!r}: batch member 'patch_tissue': patch coordinates are not unique")
    idx = [where[(int(x), int(y))] for x, y in view["coords"].tolist()]
    return names, torch.tensor(tissue, dtype=torch.long)[idx]


def _collate_patch_tissue(values: list, keys: list[str]) -> dict[str, Any]:
    names = _same_names("patch_tissue", values, keys)
    n_max = max(len(v) for _, v in values)
    out_BN = torch.full((len(values), n_max), -1, dtype=torch.long)
    for i, (_, v) in enumerate(values):
        out_BN[i, :len(v)] = v
    return {"patch_tissue": out_BN, "tissue_names": names}


def _decode_mask(doc: dict, s: Sample, ctx: MemberContext) -> None:
    if s.mask is None:
        raise MissingField("a stored organ mask (member mask.npy)")
    return None


def _decode_has_mask(doc: dict, s: Sample, ctx: MemberContext) -> bool:
    if s.volume is None:
        raise MissingField("a volume (member vol.npy): has_mask is a CT member")
    return s.mask is not None


def _collate_tensor(values: list, keys: list[str], name: str, dtype: torch.dtype) -> dict[str, Any]:
    return {name: torch.tensor(values, dtype=dtype)}


def _tensor_of(name: str, dtype: torch.dtype) -> Callable[[list, list[str]], dict[str, Any]]:
    return partial(_collate_tensor, name=name, dtype=dtype)  # picklable, for spawned data workers


def _collate_nothing(values: list, keys: list[str]) -> dict[str, Any]:
    return {}


for _m in (
    Member("boxes", _decode_boxes, _collate_boxes, "finding boxes: boxes (B,K,4) xyxy stored-image pixels, "
           "boxes_count (B,), boxes_label (B,K) label index (-1 pad), boxes_image_hw (B,2)"),
    Member("class_index", _decode_class_index, _tensor_of("class_index", torch.long),
           "class index (B,) long from meta.class_index / class_index / diagnosis_id"),
    Member("organ_labels", _decode_organ_labels, _collate_organ_labels,
           "per-organ abnormal flags (B, n_organs) float + organ_names"),
    Member("organ_sentences", _decode_organ_sentences, _collate_organ_sentences,
           "per-organ report sentences list[list[str]] + organ_names"),
    Member("composition", _decode_composition, _collate_composition,
           "slide tissue fractions (B, n_tissues) float + composition_names"),
    Member("patch_tissue", _decode_patch_tissue, _collate_patch_tissue,
           "slide per-patch tissue id (B, N) long aligned with feats (-1 padding) + tissue_names", uses_view=True),
    Member("spacing", _decode_spacing, _tensor_of("spacing", torch.float32),
           "CT voxel spacing (B, 3) float mm (z, y, x) of the stored volume"),
    Member("mask", _decode_mask, _collate_nothing,
           "require a stored organ mask (CT; the stream already batches 'mask')"),
    Member("has_mask", _decode_has_mask, _tensor_of("has_mask", torch.bool),
           "(B,) bool: the volume stores an organ mask (else the batched 'mask' is a zero map)"),
):
    register_member(_m)
