"""Data of a few-label task: read a split's samples and class ids from shards, cut a label budget, and embed
views with the frozen image tower.

    task = TaskSpec.from_index(index_doc, label="tumor", class_names=[...], prompts={...})
    split = read_split("shards/patho", "train", task)                   # labels of every sample, images lazily
    imgs = split.images(idx)                                            # decoded uint8 images of a subset
    feats = embed_views(model, imgs, kind="weak", views=8, ...)         # (V, n, E) frozen embeddings

Class ids. A binary task (`task.label` names one 1/0 label of the shards, e.g. PCam's "tumor") has classes
[negative, positive]; a single-label multi-class data set (one-hot labels, e.g. MedMNIST pathmnist) has one
class per label name, the class being the label that is 1. Samples whose label is uncertain (-1), or with no /
several classes set in the multi-class case, are left out and counted. `task.classes: class_index` reads the
class from the `class_index` batch member instead (json meta.class_index, e.g. the synthetic patches' normal /
tumor / inflamed), with `task.class_names` naming the classes in index order.

Two passes over the split: the first reads only each sample's json (labels), the second decodes the images of
the chosen subset, so a large training split (PCam: 262 144 patches) is never held in memory.
Shape legend: N samples, n subset, V views, E embedding width, C classes, S image side.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch

from medvlp.data_shards.members import MemberError, MissingField
from medvlp.data_shards.schema import decode_sample
from medvlp.data_shards.reader import iter_raw, iter_split, resolve_shards
from medvlp.data_shards.transforms import image_view, strong_view, to_float_image, weak_view

log = logging.getLogger("medvlp.path_clip")


@dataclass
class TaskSpec:
    """What is classified: class names, the prompts of each class, and how a sample's labels give its class."""

    class_names: list[str]
    prompts: list[list[str]]  # per class, >= 1 prompt (their embeddings are averaged: a prompt ensemble)
    label: str = ""  # binary task: the 1/0 label; "" = single-label multi-class over `label_names`
    label_names: list[str] = field(default_factory=list)  # the shards' label names (multi-class)
    member: str = ""  # "class_index": the class comes from that batch member, not from the labels

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @classmethod
    def build(cls, label_names: list[str], *, label: str = "", class_names: list[str] | None = None,
              prompts: dict[str, list[str]] | None = None, classes: str = "labels") -> "TaskSpec":
        """From the shards' label names and the recipe's task section (class names / prompts optional)."""
        prompts = dict(prompts or {})
        if classes not in ("labels", "class_index"):
            raise ValueError(f"task.classes: {classes!r} is not one of labels, class_index")
        if classes == "class_index":
            if not class_names or len(class_names) < 2:
                raise ValueError("task.class_names: the class_index member needs the class names, in index order")
            names = list(class_names)
        elif label:
            if label not in label_names:
                raise ValueError(f"task.label: {label!r} is not a label of the shards ({label_names})")
            names = list(class_names or [f"no {label.replace('_', ' ')}", label.replace("_", " ")])
            if len(names) != 2:
                raise ValueError(f"task.class_names: a binary label needs 2 names (negative, positive), got {names}")
        else:
            if len(label_names) < 2:
                raise ValueError(f"task.label: the shards have one label ({label_names}); name it (binary task)")
            names = list(class_names or [n.replace("_", " ") for n in label_names])
            if len(names) != len(label_names):
                raise ValueError(f"task.class_names: {len(names)} names for {len(label_names)} labels")
        unknown = sorted(set(prompts) - set(names))
        if unknown:
            raise ValueError(f"task.prompts: {unknown} are not class names ({names})")
        plist = []
        for n in names:
            p = prompts.get(n) or [f"a histopathology image of {n}."]
            if isinstance(p, str):
                p = [p]
            plist.append([str(x) for x in p])
        return cls(class_names=names, prompts=plist, label=label, label_names=list(label_names),
                   member="class_index" if classes == "class_index" else "")

    def class_of(self, labels: dict, doc: dict | None = None, key: str = "") -> int:
        """Class id of a sample's label dict (or json `doc`, member mode), or -1 when it has none."""
        if self.member:
            from medvlp.data_shards.members import MEMBERS, MemberContext
            from medvlp.data_shards.schema import Sample

            c = MEMBERS[self.member].decode(doc or {}, Sample(key=key, text=""), MemberContext(tuple(self.label_names)))
            if not 0 <= c < self.num_classes:
                raise ValueError(f"sample {key!r}: class_index {c} is outside the {self.num_classes} task.class_names")
            return int(c)
        if self.label:
            v = labels.get(self.label)
            return int(v) if v in (0, 1) else -1
        hot = [i for i, n in enumerate(self.label_names) if labels.get(n) == 1]
        return hot[0] if len(hot) == 1 else -1


@dataclass
class SplitData:
    """One split's keys and class ids; images are decoded on demand from the shard URLs."""

    urls: list[str]
    split: str
    keys: list[str]
    y_N: np.ndarray
    modality: str
    skipped: int = 0  # samples without a usable class

    def __len__(self) -> int:
        return len(self.keys)

    def images(self, idx: np.ndarray | list[int] | None = None) -> list[np.ndarray]:
        """Decoded images of the samples at `idx` (positions in this split), in the order of `idx`."""
        idx = np.arange(len(self.keys)) if idx is None else np.asarray(idx)
        want = {self.keys[i]: j for j, i in enumerate(idx)}
        out: list[np.ndarray | None] = [None] * len(idx)
        for raw in iter_raw(self.urls):
            j = want.get(raw.get("__key__"))
            if j is None:
                continue
            s = decode_sample(raw)
            if s.image is None:
                raise ValueError(f"{s.key}: no 2D image (Path-CLIP adapts 2D image models)")
            out[j] = s.image
        missing = [self.keys[i] for i, o in zip(idx, out) if o is None]
        if missing:
            raise ValueError(f"{self.split}: samples {missing[:3]} vanished from the shards between two reads")
        return out  # type: ignore[return-value]


def read_split(shards: str, split: str, task: TaskSpec, limit: int = 0) -> SplitData:
    """Keys and class ids of `split` (json members only). `limit` > 0 keeps the first `limit` usable samples."""
    ss = resolve_shards(shards, split)
    keys, ys, skipped = [], [], 0

    def unreadable(raw: dict, e: Exception) -> None:
        raise ValueError(f"{shards}: sample {raw.get('__key__')!r} has no readable json member ({e})")

    for raw, doc in iter_split(shards, split, members=(), on_bad=unreadable):
        try:
            c = task.class_of(doc.get("labels") or {}, doc, raw["__key__"])
        except (MissingField, MemberError) as e:  # a data set / task mismatch, not a corrupt sample
            raise ValueError(f"{shards}: sample {raw['__key__']!r}: task.classes {task.member}: {e}") from e
        if c < 0:
            skipped += 1
            continue
        keys.append(raw["__key__"])
        ys.append(c)
        if limit and len(keys) >= limit:
            break
    if not keys:
        raise ValueError(f"{shards}: split {split!r} has no sample with a usable class for {task.class_names}")
    if skipped:
        log.warning("%s [%s]: %d samples without a usable class left out", shards, split, skipped)
    return SplitData(ss.urls, split, keys, np.asarray(ys, dtype=np.int64), ss.modality, skipped)


def view_transform(kind: str, modality: str, size: int):
    """'eval' (deterministic), 'train' (the stream's training view), 'weak' or 'strong' (Path-CLIP views)."""
    if kind == "eval":
        return image_view(modality, size, train=False)
    if kind == "train":
        return image_view(modality, size, train=True)
    if kind == "weak":
        return weak_view(modality, size)
    if kind == "strong":
        return strong_view(modality, size)
    raise ValueError(f"view kind {kind!r} is not one of eval, train, weak, strong")


def make_views(images: list[np.ndarray], kind: str, modality: str, size: int, seed: int,
               view: int = 0) -> torch.Tensor:
    """(n, C, S, S) float views; the RNG of image j is seeded from (seed, view, j): reproducible per image."""
    t = view_transform(kind, modality, size)
    out = []
    for j, img in enumerate(images):
        rng = np.random.Generator(np.random.PCG64([int(seed), int(view), j]))
        out.append(t(to_float_image(img), rng))
    return torch.stack(out)


@torch.no_grad()
def encode(model, x_NCHW: torch.Tensor, batch_size: int = 128) -> torch.Tensor:
    """L2-normalised float32 image embeddings (N, E) from the (frozen) image tower, in batches."""
    p = next(model.parameters())
    out = [model.encode_image(x_NCHW[i:i + batch_size].to(p.device, p.dtype), normalize=True).float().cpu()
           for i in range(0, x_NCHW.shape[0], batch_size)]
    return torch.cat(out)


def embed_views(model, images: list[np.ndarray], kind: str, views: int, modality: str, size: int,
                seed: int) -> torch.Tensor:
    """(V, n, E) embeddings of `views` augmented views of each image (the towers are frozen: a view's embedding
    never changes, so a cache of V views per image is an augmentation pool of size V)."""
    return torch.stack([encode(model, make_views(images, kind, modality, size, seed, v)) for v in range(views)])


@torch.no_grad()
def encode_prompts(model, prompts: list[list[str]]) -> torch.Tensor:
    """(C, E): per class the renormalised mean of its L2-normalised prompt embeddings (prompt ensemble)."""
    p = next(model.parameters())
    rows = []
    for plist in prompts:
        emb = model.encode_text(model.tokenize(plist).to(p.device), normalize=True).float().mean(0)
        rows.append(torch.nn.functional.normalize(emb, dim=-1).cpu())
    return torch.stack(rows)
