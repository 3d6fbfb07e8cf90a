"""Shard-set inspector: counts, label prevalence, text statistics, examples, checksums, and a contact sheet.

`inspect_shards(dir)` reads index.json, verifies every shard's sha256 against it, streams every sample (tar
members grouped by key, decoded with `schema.decode_sample`; a sample that fails to decode is counted as corrupt,
never a crash) and returns a plain-text report. With `sheet_path` it also writes a contact-sheet PNG: 2D images
with key and positive labels; CT as the middle axial slice with the mask contour; slides as a scatter of the
patch coordinates coloured by the first principal component of the features.

Legend: HW = image height/width, D = axial slices, n = patches, d = feature width.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path
from typing import Iterator

import numpy as np

from medvlp.data_shards.schema import MODALITY_MEMBER, Sample, SampleDecodeError, decode_sample
from medvlp.data_shards import reader
from medvlp.data_shards.writer import INDEX_NAME, read_index, sha256_file

SHEET_TILES = 16  # samples drawn on the contact sheet
THUMB = 128  # longest side of a stored thumbnail


def iter_samples(shard_dir, index_name: str = INDEX_NAME) -> Iterator[Sample]:
    """Every sample of the shards an index lists, decoded, in order (raises on a corrupt one)."""
    index = "" if index_name == INDEX_NAME else str(Path(shard_dir) / index_name)
    return reader.iter_samples(str(shard_dir), index_path=index)


class _Stats:
    """Accumulates everything the report shows, one sample at a time (constant memory but the thumbnails)."""

    def __init__(self, n_examples: int):
        self.n = 0
        self.splits: Counter = Counter()
        self.labels: dict[str, Counter] = defaultdict(Counter)
        self.chars: list[int] = []
        self.words: list[int] = []
        self.kinds: Counter = Counter()  # "image uint8 grey" -> count
        self.extent: dict[str, tuple[tuple, tuple]] = {}  # kind -> (smallest, largest) shape, per axis
        self.corrupt: list[str] = []
        self.volumes = 0
        self.no_mask: list[str] = []  # keys of volume samples without an organ mask
        self.flag_wrong: list[str] = []  # meta has_mask that contradicts the stored members
        self.examples: list[Sample] = []
        self.tiles: list[Sample] = []
        self.n_examples = n_examples

    def add(self, s: Sample) -> None:
        self.n += 1
        self.splits[s.split] += 1
        for name, v in s.labels.items():
            self.labels[name][int(v)] += 1
        self.chars.append(len(s.text))
        self.words.append(len(s.text.split()))
        if s.volume is not None:
            self.volumes += 1
            if s.mask is None:
                self.no_mask.append(s.key)
            flag = s.meta.get("has_mask")
            if flag is not None and flag != (s.mask is not None):
                self.flag_wrong.append(f"sample {s.key!r}: meta has_mask is {flag} but mask.npy is "
                                       f"{'stored' if s.mask is not None else 'absent'}")
        kind, shape = _array_kind(s)
        if kind:
            self.kinds[kind] += 1
            lo, hi = self.extent.get(kind, (shape, shape))
            self.extent[kind] = (tuple(map(min, lo, shape)), tuple(map(max, hi, shape)))
        if len(self.examples) < self.n_examples:
            self.examples.append(Sample(key=s.key, text=s.text, labels=s.labels, meta=s.meta))
        if len(self.tiles) < SHEET_TILES:
            self.tiles.append(_thumbnail(s))


def _array_kind(s: Sample) -> tuple[str, tuple]:
    if s.image is not None:
        return f"image {s.image.dtype} {'RGB' if s.image.ndim == 3 else 'grey'} (H, W)", s.image.shape[:2]
    if s.volume is not None:
        return f"volume {s.volume.dtype}{' + mask' if s.mask is not None else ''} (D, H, W)", s.volume.shape
    if s.feats is not None:
        return f"feats {s.feats.dtype}{' + coords' if s.coords is not None else ''} (n, d)", s.feats.shape
    return "", ()


def _thumbnail(s: Sample) -> Sample:
    """A light copy for the contact sheet: image/slice downsampled by striding; bags kept (they are small)."""
    t = Sample(key=s.key, text="", labels=s.labels, meta=s.meta, feats=s.feats, coords=s.coords)
    if s.image is not None:
        step = max(1, -(-max(s.image.shape[:2]) // THUMB))
        t.image = s.image[::step, ::step]
    if s.volume is not None:
        mid = s.volume.shape[0] // 2
        t.volume = s.volume[mid:mid + 1]
        t.mask = None if s.mask is None else s.mask[mid:mid + 1]
    return t


def _describe(values: list[int]) -> str:
    if not values:
        return "n/a"
    a = np.asarray(values)
    return (f"min {a.min()}, mean {a.mean():.1f}, median {np.median(a):.0f}, p95 {np.percentile(a, 95):.0f}, "
            f"max {a.max()}")


def inspect_shards(shard_dir, n_examples: int = 4, sheet_path: str | None = None) -> str:
    """Report text for a shard directory; writes a contact-sheet PNG when `sheet_path` is given."""
    return inspect_report(shard_dir, n_examples, sheet_path)[0]


def inspect_report(shard_dir, n_examples: int = 4, sheet_path: str | None = None) -> tuple[str, list[str]]:
    """(report text, problems): problems name every sha256 mismatch, missing shard, corrupt sample and a sample
    count that differs from index.json (what `shards inspect --strict` fails on)."""
    shard_dir = Path(shard_dir)
    doc = read_index(shard_dir)
    lines = [f"shards: {shard_dir}", f"  modality {doc.get('modality')}, schema v{doc.get('schema_version')}, "
             f"{len(doc['shards'])} shards, {doc['num_samples']} samples (index)", f"  built by: {doc.get('command')}"]
    bad_sha, missing = [], []
    stats = _Stats(n_examples)
    need = MODALITY_MEMBER.get(doc.get("modality", ""))
    unfit: list[str] = []  # samples without the member the index's modality is decoded from
    for sh in doc["shards"]:
        path = shard_dir / sh["name"]
        if not path.exists():
            missing.append(sh["name"])
            continue
        if sha256_file(path) != sh["sha256"]:
            bad_sha.append(sh["name"])
        for key, members, err in reader.iter_shard(path):
            if err is not None:
                stats.corrupt.append(err)
                continue
            try:
                sample = decode_sample(members)
            except SampleDecodeError as e:
                stats.corrupt.append(str(e))
                continue
            if need and getattr(sample, need, None) is None:
                unfit.append(sample.key)
            stats.add(sample)
    lines.append(f"  streamed {stats.n} samples; corrupt {len(stats.corrupt)}; sha256 mismatches {len(bad_sha)}; "
                 f"missing shards {len(missing)}")
    lines += [f"    sha256 mismatch: {n}" for n in bad_sha] + [f"    missing: {n}" for n in missing]
    lines += [f"    corrupt: {c}" for c in stats.corrupt[:10]]
    problems = [f"sha256 mismatch: {n}" for n in bad_sha] + [f"missing shard: {n}" for n in missing]
    problems += [f"corrupt: {c}" for c in stats.corrupt]
    if stats.n + len(stats.corrupt) != doc["num_samples"] or (stats.n != doc["num_samples"] and not stats.corrupt):
        lines.append(f"  WARNING: index says {doc['num_samples']} samples, shards hold {stats.n}")
        problems.append(f"count: index.json says {doc['num_samples']} samples, the shards hold {stats.n} readable")
    if unfit:
        msg = (f"index.json modality {doc.get('modality')!r} needs a {need} member; {len(unfit)} of {stats.n} samples "
               f"have none (e.g. {unfit[0]}): the index does not describe these shards, and a stream would refuse "
               "them")
        lines.append(f"  WARNING: {msg}")
        problems.append(f"modality: {msg}")
    lines += _mask_lines(doc, stats, problems)
    lines.append("splits: " + ", ".join(f"{k} {v}" for k, v in sorted(stats.splits.items())))
    for kind, count in stats.kinds.most_common():
        lo, hi = stats.extent[kind]
        lines.append(f"arrays: {kind}: {count} samples, shape {lo} .. {hi}")
    lines += _prevalence(stats)
    lines.append(f"text chars: {_describe(stats.chars)}")
    lines.append(f"text words: {_describe(stats.words)}; empty {sum(c == 0 for c in stats.chars)}")
    lines.append("examples:")
    for s in stats.examples:
        pos = [k for k, v in s.labels.items() if v == 1]
        excerpt = " ".join(s.text.split())
        excerpt = excerpt[:160] + ("..." if len(excerpt) > 160 else "")
        lines.append(f"  {s.key} [{s.split}] positives={pos}: {excerpt}")
    if sheet_path:
        write_contact_sheet(stats.tiles, sheet_path, title=f"{shard_dir.name}: {doc.get('modality')}")
        lines.append(f"contact sheet: {sheet_path}")
    return "\n".join(lines), problems


def _mask_lines(doc: dict, stats: _Stats, problems: list[str]) -> list[str]:
    """Organ masks of a volume set: how many samples have none (named), and any flag or count that disagrees."""
    if not stats.volumes:
        return []
    n = len(stats.no_mask)
    if n:
        shown = ", ".join(stats.no_mask[:5]) + (", ..." if n > 5 else "")
        lines = [f"organ masks: {n} of {stats.volumes} volumes have none (meta has_mask: false; the stream batches "
                 f"a zero map for them, stages that need masks skip them): {shown}"]
    else:
        lines = [f"organ masks: all {stats.volumes} volumes have one"]
    said = doc.get("samples_without_mask")
    if said is not None and int(said) != n and not stats.corrupt:
        lines.append(f"  WARNING: index.json says {said} samples without mask, the shards hold {n}")
        problems.append(f"masks: index.json says {said} samples without mask, the shards hold {n}")
    lines += [f"  WARNING: {w}" for w in stats.flag_wrong[:10]]
    problems += [f"masks: {w}" for w in stats.flag_wrong]
    return lines


def _prevalence(stats: _Stats) -> list[str]:
    if not stats.labels:
        return ["labels: none"]
    out = [f"labels ({len(stats.labels)}): positive / negative / uncertain / unstated, prevalence among stated"]
    width = max(len(n) for n in stats.labels)
    for name in sorted(stats.labels):
        c = stats.labels[name]
        stated = c[1] + c[0] + c[-1]
        out.append(f"  {name:<{width}}  {c[1]:>6} / {c[0]:>6} / {c[-1]:>6} / {stats.n - stated:>6}   "
                   f"{100.0 * c[1] / max(stated, 1):5.1f}%")
    return out


# ------------------------------------------------------------------------------------------------ contact sheet
def _first_pc(feats_nd: np.ndarray) -> np.ndarray:
    x = feats_nd.astype(np.float32)
    x = x - x.mean(axis=0, keepdims=True)
    if x.shape[0] < 2:
        return np.zeros(x.shape[0], np.float32)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    return x @ vt[0]


def _draw_tile(ax, s: Sample) -> None:
    if s.image is not None:
        img = s.image.astype(np.float32)
        lo, hi = np.percentile(img, [0.5, 99.5]) if s.image.dtype == np.uint16 else (0.0, 255.0)
        ax.imshow(np.clip((img - lo) / max(hi - lo, 1e-6), 0, 1), cmap="gray", vmin=0, vmax=1)
    elif s.volume is not None:
        ax.imshow(s.volume[0].astype(np.float32), cmap="gray")
        if s.mask is not None and s.mask.any():
            levels = np.unique(s.mask[0])[1:]
            ax.contour(s.mask[0], levels=np.asarray(levels, float) - 0.5, linewidths=0.6, cmap="tab10")
        elif s.mask is None:
            ax.text(0.02, 0.02, "no mask", transform=ax.transAxes, color="red", fontsize=6)
    elif s.feats is not None:
        pc = _first_pc(s.feats)
        xy = s.coords if s.coords is not None else np.stack([np.arange(len(pc)), pc], 1)
        ax.scatter(xy[:, 0], xy[:, 1], c=pc, s=4, cmap="viridis")
        ax.invert_yaxis()
        ax.set_aspect("equal", adjustable="datalim")
    pos = [k for k, v in s.labels.items() if v == 1]
    ax.set_title(f"{s.key[-28:]}\n{', '.join(pos)[:40] or '-'}", fontsize=6)
    ax.set_xticks([])
    ax.set_yticks([])


def write_contact_sheet(tiles: list[Sample], path: str, title: str = "") -> None:
    """Grid of tiles as a PNG. Uses the Agg canvas directly: no pyplot, no global backend change."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cols = max(1, min(4, len(tiles)))
    rows = max(1, -(-len(tiles) // cols))
    fig = Figure(figsize=(2.2 * cols, 2.4 * rows), dpi=100)
    FigureCanvasAgg(fig)
    for i, s in enumerate(tiles):
        _draw_tile(fig.add_subplot(rows, cols, i + 1), s)
    if not tiles:
        fig.text(0.5, 0.5, "no decodable samples", ha="center")
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
