"""What the image-caption importers (covid_chestxray, medpix, roco) share: paths kept inside the source folder,
one-line errors for a layout that is not the expected one, label groups declared from the data, and splits recorded
as group-disjoint in the index.

Path policy (local to these importers): every image path a source file names is taken relative to the source
folder; an absolute path, a path with `..`, or a path whose real location (symlinks followed) is outside the source
folder is a bad row (reported with its line, like a manifest row), never read. The source's own files
(metadata.csv, Descriptions.json, ...) are checked the same way.

Label groups: besides the sample-level `labels` (index.json["labels"]), an importer declares single-label groups
read from a sample's meta field (e.g. view = PA / AP / L, modality = CT / MR): index.json["label_groups"] =
{group: {"field": meta key, "spec": LabelSpec dict}}. Classes with fewer than `min_count` samples are left out
of a group (their samples are not scored for it); a group needs >= 2 classes. `medvlp.pretrain.retrieval` scores
zero-shot on every group.
"""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any, Iterable

from medvlp.data_shards.manifest import Row, assign_splits, check_files, check_global
from medvlp.data_shards.paths import PathError, PathPolicy
from medvlp.data_shards.schema import LabelSpec


class LayoutError(ValueError):
    """The source folder is not the layout the importer reads (a missing file or column): one line, no traceback."""

    user_facing = True


def options(kind: str, opts: dict[str, Any], spec: dict) -> dict[str, Any]:
    """`common.coerce_options`, with its errors and bad split / on_error values as one-line LayoutErrors."""
    from medvlp.data_shards.importers.common import coerce_options

    try:
        o = coerce_options(kind, opts, spec)
    except ValueError as e:
        raise LayoutError(str(e)) from None
    if o.get("split", "auto") not in ("auto", "train", "val", "test"):
        raise LayoutError(f"{kind} importer: option split={o['split']!r} is not auto, train, val or test")
    if o.get("on_error", "skip") not in ("skip", "fail"):
        raise LayoutError(f"{kind} importer: option on_error={o['on_error']!r} is not skip or fail")
    for k in ("val_frac", "test_frac"):
        if k in o and not 0 <= o[k] <= 1:
            raise LayoutError(f"{kind} importer: option {k}={o[k]} is not in [0, 1]")
    return o


def source_root(src: str | os.PathLike, kind: str) -> Path:
    """The source folder (must exist and be a folder)."""
    root = Path(src)
    if not root.is_dir():
        raise LayoutError(f"{kind} importer: {root} is not a folder (give the data set's top folder)")
    return root


def resolve_within(root: Path, given: str) -> tuple[str | None, str | None]:
    """(path under `root`, None) or (None, why). These layouts name their files relative to their folder, so an
    absolute path is refused; the rest is the data-root policy (`medvlp.data_shards.paths.PathPolicy`): the written
    path and its real location (symlinks followed) stay under `root`, and a FIFO, socket or device is refused."""
    g = str(given).strip()
    if not g:
        return None, "empty path"
    rel = g.replace("\\", "/")
    if Path(rel).is_absolute() or (len(g) > 1 and g[1] == ":"):
        return None, f"{g!r}: an absolute path (paths must be relative to the source folder)"
    try:
        return str(PathPolicy.for_source(root).resolve(rel, base=root, walk=False)), None
    except PathError as e:
        return None, {"symlink": f"{g!r}: a symlink that leaves the source folder",
                      "special": f"{g!r}: not a regular file (a FIFO, socket or device)"}.get(
                          e.reason, f"{g!r}: leaves the source folder ('..')")


def source_file(root: Path, name: str, kind: str, what: str) -> Path:
    """A required file of the layout, inside the source folder."""
    path, err = resolve_within(root, name)
    if err is not None:
        raise LayoutError(f"{kind} importer: {name}: {err}")
    if not Path(path).is_file():
        raise LayoutError(f"{kind} importer: {root / name} not found ({what})")
    return Path(path)


def require_columns(have: Iterable[str], need: Iterable[str], where: str) -> None:
    """LayoutError naming the missing columns / keys (one line) unless all of `need` are in `have`."""
    have = set(have)
    missing = [c for c in need if c not in have]
    if missing:
        raise LayoutError(f"{where}: missing column(s) {missing} (has {sorted(have)[:20]})")


def label_group(field: str, values: Iterable[str], min_count: int, templates: list[str],
                prompts: dict[str, list[str]] | None = None) -> dict | None:
    """A single-label group over the values seen >= min_count times (None with fewer than two such classes)."""
    counts = Counter(v for v in values if v)
    classes = sorted(c for c, n in counts.items() if n >= min_count)
    if len(classes) < 2:
        return None
    own = {c: {"positive": list(p)} for c, p in (prompts or {}).items() if c in classes}
    spec = LabelSpec(kind="single-label", class_names=classes, templates=list(templates), prompts=own)
    return {"field": field, "spec": spec.to_dict(), "counts": {c: counts[c] for c in classes}}


def split_record(rows: list[Row], group: str) -> dict[str, Any]:
    """What index.json records of the split: the grouping column, groups and samples per split, and that no
    group is in two splits (raises if one is: the importer assigned splits wrongly)."""
    where: dict[str, str] = {}
    groups: Counter = Counter()
    samples: Counter = Counter()
    for r in rows:
        prev = where.setdefault(r.patient_id, r.split)
        if prev != r.split:
            raise AssertionError(f"group {r.patient_id!r} is in splits {prev!r} and {r.split!r}")
        samples[r.split] += 1
    for s in where.values():
        groups[s] += 1
    return {"group_by": group, "group_disjoint": True, "groups": dict(sorted(groups.items())),
            "samples": dict(sorted(samples.items()))}


def usable_rows(rows: list[Row], errors: list[str], kind: str, where: str | Path, what: str,
                if_none: str) -> list[Row]:
    """The builder's global and file checks (duplicate keys, missing files, ...: bad rows are appended to
    `errors`); a LayoutError naming `where` when no row is left (`if_none` says why when nothing was bad)."""
    rows, more = check_global(rows)
    errors += more
    rows, more = check_files(rows)  # before split records and label counts, so they count what is built
    errors += more
    if not rows:
        raise LayoutError(f"{kind} importer: {where}: no usable {what} ({len(errors)} bad; first: "
                          f"{errors[0] if errors else if_none})")
    return rows


def place_rows(rows: list[Row], o: dict[str, Any], release_splits: bool = False) -> None:
    """Splits: option split=train|val|test puts every row there unless the release's own splits are used; rows
    still without a split go by group (`Row.patient_id`: patient, case, image) with a seeded hash."""
    if not release_splits and o["split"] != "auto":
        for r in rows:
            r.split = o["split"]
    assign_splits(rows, o["val_frac"], o["test_frac"], o["seed"])


def limit_rows(rows: list[Row], limit: int) -> list[Row]:
    """At most `limit` rows per split (0 = all), in source order (splits already assigned)."""
    if not limit:
        return rows
    seen: Counter = Counter()
    out = []
    for r in rows:
        if seen[r.split] < limit:
            seen[r.split] += 1
            out.append(r)
    return out
