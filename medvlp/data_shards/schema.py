"""The medvlp sample schema: one in-memory `Sample` <-> one WebDataset sample (a dict of tar members).

Members (README "Shards"):
  __key__          stable id, unique per data set (e.g. ``iuxray/CXR1000``)
  img.png          2D image, 8- or 16-bit grey or RGB (lossless)
  img.jpg          (instead of img.png) 2D image, 8-bit grey or RGB, JPEG (shards built with --image-format jpeg)
  vol.npy          3D volume (D, H, W), int16 HU or float16
  mask.npy         organ label map (D, H, W), uint8
  feats.npy        patch-feature bag (n, d) float16; coords.npy (n, 2) int32
  txt              report / caption, UTF-8
  json             {"labels": {finding: 1|0|-1}, "organs": {...}, "boxes": [...], "meta": {dataset, modality,
                    split, patient_id, ...}}

Encoding is deterministic (same Sample -> same bytes) so that shards built from the same seed are
byte-identical. Decoding raises `SampleDecodeError` naming the key and member, so the stream can skip and
count a corrupt sample instead of crashing.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

SCHEMA_VERSION = 1
MODALITIES = ("cxr", "patho", "ct", "slide")
# The Sample field a sample of each modality is decoded from: a sample without it does not fit its index.
MODALITY_MEMBER = {"cxr": "image", "patho": "image", "ct": "volume", "slide": "feats"}
SPLITS = ("train", "val", "test")
# Keys must be usable as tar member prefixes: webdataset splits a member name at its first dot.
_BAD_KEY_CHARS = set(" .\n\t\\")


class SampleDecodeError(ValueError):
    """A sample (or one of its members) could not be decoded; the message names the key and member."""


@dataclass
class Sample:
    """One image-report pair in memory. Exactly one of image / volume / feats is set."""

    key: str
    text: str
    image: np.ndarray | None = None  # (H, W) or (H, W, 3); uint8 or uint16
    volume: np.ndarray | None = None  # (D, H, W) int16 or float16
    mask: np.ndarray | None = None  # (D, H, W) uint8 organ label map
    feats: np.ndarray | None = None  # (n, d) float16
    coords: np.ndarray | None = None  # (n, 2) int32
    labels: dict[str, int] = field(default_factory=dict)  # finding -> 1 / 0 / -1 (uncertain)
    meta: dict[str, Any] = field(default_factory=dict)  # dataset, modality, split, patient_id, ...
    extra: dict[str, Any] = field(default_factory=dict)  # boxes, organs, composition ... (ground truth)
    jpeg_quality: int = 0  # 0: the image is written lossless (img.png); 1..95: as img.jpg at this quality (uint8)

    @property
    def modality(self) -> str:
        return self.meta.get("modality", "")

    @property
    def split(self) -> str:
        return self.meta.get("split", "train")

    @property
    def patient_id(self) -> str:
        return str(self.meta.get("patient_id", self.key))


def validate_key(key: str) -> str:
    if not key or any(c in _BAD_KEY_CHARS for c in key):
        raise ValueError(f"sample key {key!r} is empty or contains one of ' ', '.', '\\\\', whitespace")
    return key


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def _png_bytes(img: np.ndarray) -> bytes:
    if img.dtype == np.uint16 and img.ndim == 2:
        pil = Image.fromarray(img)  # 16-bit greyscale PNG ("I;16")
    elif img.dtype == np.uint8 and img.ndim in (2, 3):
        pil = Image.fromarray(img)
    else:
        raise ValueError(f"image must be uint8 (H,W)/(H,W,3) or uint16 (H,W); got {img.dtype} {img.shape}")
    buf = io.BytesIO()
    pil.save(buf, format="PNG", compress_level=6)  # no timestamps in PNG -> deterministic bytes
    return buf.getvalue()


def _jpg_bytes(img: np.ndarray, quality: int) -> bytes:
    """uint8 grey (H, W) -> a greyscale JPEG, (H, W, 3) -> RGB (4:2:0); same array and libjpeg -> same bytes."""
    if img.dtype != np.uint8 or img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[2] != 3):
        raise ValueError(f"a JPEG image must be uint8 (H,W)/(H,W,3); got {img.dtype} {img.shape}")
    if not 1 <= quality <= 95:
        raise ValueError(f"jpeg quality must be in 1..95, got {quality}")
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=int(quality), optimize=False, progressive=False)
    return buf.getvalue()


def encode_sample(s: Sample) -> dict[str, Any]:
    """Sample -> WebDataset member dict (bytes values)."""
    validate_key(s.key)
    out: dict[str, Any] = {"__key__": s.key, "txt": s.text.encode("utf-8")}
    if s.image is not None and s.jpeg_quality:
        out["img.jpg"] = _jpg_bytes(s.image, s.jpeg_quality)
    elif s.image is not None:
        out["img.png"] = _png_bytes(s.image)
    if s.volume is not None:
        out["vol.npy"] = _npy_bytes(s.volume)
    if s.mask is not None:
        out["mask.npy"] = _npy_bytes(s.mask.astype(np.uint8))
    if s.feats is not None:
        out["feats.npy"] = _npy_bytes(s.feats.astype(np.float16))
    if s.coords is not None:
        out["coords.npy"] = _npy_bytes(s.coords.astype(np.int32))
    doc = {"labels": s.labels, "meta": s.meta, **s.extra}
    out["json"] = json.dumps(doc, sort_keys=True, ensure_ascii=False).encode("utf-8")
    return out


def _load_npy(raw: bytes) -> np.ndarray:
    return np.load(io.BytesIO(raw), allow_pickle=False)


def _load_png(raw: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(raw)) as im:
        im.load()
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):
            return np.asarray(im, dtype=np.uint16) if im.mode != "I" else np.asarray(im).astype(np.uint16)
        if im.mode not in ("L", "RGB"):
            im = im.convert("RGB")
        return np.asarray(im)


MEDIA_MEMBERS = ("img.png", "img.jpg", "vol.npy", "feats.npy")


@dataclass(frozen=True)
class EncodedImage:
    """An image member left undecoded by ``decode_sample(..., lazy_image=True)``: the fast stream path reads its
    header, draws the crop, and decodes it itself (at reduced size where the codec allows)."""

    member: str  # "img.png" | "img.jpg"
    data: bytes


def decode_sample(members: dict[str, Any], lazy_image: bool = False) -> Sample:
    """WebDataset member dict -> Sample. Raises SampleDecodeError naming key and member. lazy_image: the image
    stays an `EncodedImage` (Sample.image) instead of being decoded."""
    key = members.get("__key__", "?")
    # every sample is written with a txt member and one media member: a sample without them is damaged (e.g. a tar
    # whose member is a hardlink, which the tar reader skips), never an empty report or an image-less sample
    if "txt" not in members:
        raise SampleDecodeError(f"sample {key!r}: no 'txt' member (members: "
                                f"{sorted(k for k in members if not k.startswith('__'))})")
    if not any(m in members for m in MEDIA_MEMBERS):
        raise SampleDecodeError(f"sample {key!r}: no image, volume or feature member (members: "
                                f"{sorted(k for k in members if not k.startswith('__'))})")
    cur = "json"
    try:
        doc = json.loads(members["json"]) if "json" in members else {}
        cur = "txt"
        text = members["txt"].decode("utf-8")
        arrays: dict[str, np.ndarray | None] = {}
        for member, name, loader in (
            ("img.png", "image", _load_png), ("img.jpg", "image", _load_png), ("vol.npy", "volume", _load_npy),
            ("mask.npy", "mask", _load_npy), ("feats.npy", "feats", _load_npy), ("coords.npy", "coords", _load_npy),
        ):
            if member in members:
                cur = member
                if lazy_image and name == "image":
                    arrays[name] = EncodedImage(member, bytes(members[member]))
                    continue
                arrays[name] = loader(members[member])
    except Exception as e:  # noqa: BLE001 - any decoder failure becomes one clear error
        raise SampleDecodeError(f"sample {key!r}: cannot decode member {cur!r}: {type(e).__name__}: {e}") from e
    labels = doc.pop("labels", {}) or {}
    meta = doc.pop("meta", {}) or {}
    return Sample(key=key, text=text, labels=labels, meta=meta, extra=doc, **arrays)


# ----------------------------------------------------------------------------------------------- label spec
LABEL_KINDS = ("multi-label", "single-label", "binary")
DEFAULT_POSITIVE = ("{c}.",)
DEFAULT_NEGATIVE = ("No {c}.",)


@dataclass
class LabelSpec:
    """What a data set's labels mean and how to prompt for them; stored as ``index.json["labels"]``.

    kind            "multi-label" (any subset of the findings, each 1/0/-1), "single-label" (exactly one class per
                    sample, stored one-hot) or "binary" (one finding, 1/0)
    class_names     the classes / findings in the data set's own order
    templates       caption/prompt templates with ``{c}`` for the class name: the class prompts of a single-label
                    set (averaged as an ensemble), the positive prompts of a multi-label or binary one
    negative_templates  the negative prompts of a multi-label or binary finding (ignored for single-label)
    prompts         per-class prompt lists overriding the templates: {name: {"positive": [...], "negative": [...]}}
    """

    kind: str
    class_names: list[str]
    templates: list[str] = field(default_factory=lambda: list(DEFAULT_POSITIVE))
    negative_templates: list[str] = field(default_factory=lambda: list(DEFAULT_NEGATIVE))
    prompts: dict[str, dict[str, list[str]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, where: str = "labels") -> "LabelSpec":
        if self.kind not in LABEL_KINDS:
            raise ValueError(f"{where}.kind: {self.kind!r} is not one of {', '.join(LABEL_KINDS)}")
        if not self.class_names or len(set(self.class_names)) != len(self.class_names):
            raise ValueError(f"{where}.class_names: need >= 1 distinct names, got {self.class_names!r}")
        if self.kind == "binary" and len(self.class_names) != 1:
            raise ValueError(f"{where}.class_names: a binary label set has one finding, got {self.class_names!r}")
        if self.kind == "single-label" and len(self.class_names) < 2:
            raise ValueError(f"{where}.class_names: a single-label set needs >= 2 classes, got {self.class_names!r}")
        for name, tmpls in (("templates", self.templates), ("negative_templates", self.negative_templates)):
            if not isinstance(tmpls, list) or not all(isinstance(t, str) and "{c}" in t for t in tmpls):
                raise ValueError(f"{where}.{name}: need a list of strings with '{{c}}', got {tmpls!r}")
        if not self.templates:
            raise ValueError(f"{where}.templates: need >= 1 template")
        if self.kind != "single-label" and not self.negative_templates and not all(
                self.prompts.get(c, {}).get("negative") for c in self.class_names):
            raise ValueError(f"{where}.negative_templates: a {self.kind} set needs negative prompts")
        unknown = sorted(set(self.prompts) - set(self.class_names))
        if unknown:
            raise ValueError(f"{where}.prompts: classes {unknown} are not in class_names {self.class_names}")
        for c, d in self.prompts.items():
            bad = sorted(set(d) - {"positive", "negative"})
            if bad or not all(isinstance(v, list) and all(isinstance(s, str) for s in v) for v in d.values()):
                raise ValueError(f"{where}.prompts.{c}: expected {{'positive': [str], 'negative': [str]}}, got {d!r}")
        return self

    @staticmethod
    def _readable(name: str) -> str:
        return name.replace("_", " ").strip()

    def positive_prompts(self, name: str) -> list[str]:
        """The class prompts (single-label) or positive prompts (multi-label / binary) of `name`."""
        own = self.prompts.get(name, {}).get("positive")
        return list(own) if own else [t.format(c=self._readable(name)) for t in self.templates]

    def negative_prompts(self, name: str) -> list[str]:
        own = self.prompts.get(name, {}).get("negative")
        return list(own) if own else [t.format(c=self._readable(name)) for t in self.negative_templates]

    def protocol(self) -> str:
        """One line naming the zero-shot protocol this label kind gets."""
        if self.kind == "single-label":
            return (f"single-label: softmax over the {len(self.class_names)} class prompts (CLIP), "
                    f"ensemble of {len(self.templates)} template(s)")
        return f"{self.kind}: per finding, softmax over its positive / negative prompt pair"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "class_names": list(self.class_names), "templates": list(self.templates),
                "negative_templates": list(self.negative_templates),
                "prompts": {c: {k: list(v) for k, v in sorted(d.items())} for c, d in sorted(self.prompts.items())}}

    @classmethod
    def from_dict(cls, doc: dict[str, Any], where: str = "labels") -> "LabelSpec":
        if not isinstance(doc, dict):
            raise ValueError(f"{where}: expected a mapping, got {type(doc).__name__}")
        unknown = sorted(set(doc) - {"kind", "class_names", "templates", "negative_templates", "prompts"})
        if unknown:
            raise ValueError(f"{where}: unknown keys {unknown}")
        for req in ("kind", "class_names"):
            if req not in doc:
                raise ValueError(f"{where}.{req}: missing")
        spec = cls.__new__(cls)
        spec.kind, spec.class_names = doc["kind"], list(doc["class_names"])
        spec.templates = list(doc.get("templates", DEFAULT_POSITIVE))
        spec.negative_templates = list(doc.get("negative_templates", DEFAULT_NEGATIVE))
        spec.prompts = {str(c): {k: list(v) for k, v in d.items()} for c, d in (doc.get("prompts") or {}).items()}
        return spec.validate(where)

    @classmethod
    def infer(cls, label_names: list[str]) -> "LabelSpec":
        """The spec of an index written before label specs existed: multi-label (binary for one finding), with
        the "X." / "No X." pair."""
        names = list(label_names)
        return cls(kind="binary" if len(names) == 1 else "multi-label", class_names=names)
