"""Reading and validating a build manifest (CSV or JSONL) into `Row`s, with every bad row named by its line.

A manifest has one row per sample. Columns (CSV header / JSON keys):
  image                 2D image path (PNG, JPEG, TIFF, ... anything PIL reads; DICOM .dcm radiographs)
  volume, mask          3D volume (D, H, W) and organ label map: .npy/.npz, NIfTI (.nii, .nii.gz), a DICOM series
                        folder (volume) or a segmentations/ folder of one NIfTI per organ (mask)
  features, coords      patch-feature bag (n, d) and its (n, 2) coordinates, .npy or .pt (slides)
  report | report_file  the report text, inline or as a UTF-8 file
  labels                JSON dict {finding: 1 | 0 | -1}; or one column per finding `label:<finding>` (1/0/-1/blank)
  patient_id            patient of the sample (splits are by patient); blank = the sample's own key
  split                 optional train | val | test; a patient in two splits is an error
  key                   optional sample key (default: derived from the media path); dots and spaces become '_'
  dataset, modality     optional; modality is inferred (image -> cxr, volume -> ct, features -> slide)
  organ_names           CT with a mask: JSON list of organ names in mask-label order (label o + 1 = organ o)
  organs                optional JSON {organ: {"abnormal": 0|1, "sentence": str}}; without it the per-organ
                        sentences and labels come from the report by rules (medvlp.data_shards.organ_report)
  spacing_mm            optional JSON [z, y, x] voxel size of the volume
  organ_merge           optional: merge the mask's labels into fewer organs by name; organ_names may then be
                        "totalseg" (TotalSegmentator's 117 labels), see medvlp.data_shards.readers.totalseg
  These three are stored at the top of the sample's json (the organ_labels / organ_sentences / spacing members).
Any other column is kept verbatim in the sample's meta. Relative paths resolve against the manifest's folder, and
every path must stay under the data root (the manifest's folder, widened by `shards build --root DIR`): see
`medvlp.data_shards.paths` for the policy (`..`, absolute paths elsewhere, symlinks out, FIFOs are refused).

Line numbers: a CSV header is line 1 and the first data row line 2 (a quoted multi-line cell counts its lines);
a JSONL row is its line in the file.
"""
from __future__ import annotations

import codecs
import csv
import hashlib
import io
import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from medvlp.data_shards.paths import PathError, PathPolicy
from medvlp.data_shards.schema import MODALITIES, SPLITS

MEDIA_KINDS = ("image", "volume", "features")  # exactly one per row
PATH_COLUMNS = ("image", "volume", "mask", "features", "coords", "report_file")
_CLINICAL = (".nii", ".nii.gz")  # volume/mask may also be a folder: a DICOM series or a segmentations/ folder
_SUFFIXES = {"volume": (".npy", ".npz", *_CLINICAL), "mask": (".npy", ".npz", *_CLINICAL), "features": (".npy", ".pt"),
             "coords": (".npy", ".pt")}
_KIND_MODALITIES = {"image": ("cxr", "patho"), "volume": ("ct",), "features": ("slide",)}
_SPLIT_ALIASES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "dev": "val", "test": "test"}
_RESERVED = {"key", "image", "volume", "mask", "features", "coords", "report", "report_file", "labels",
             "patient_id", "split", "dataset", "modality", "organ_names", "organs", "spacing_mm", "organ_merge"}
_KEY_REPLACE = str.maketrans({c: "_" for c in " .\t\n\r\\:"})
MAX_LISTED = 50  # errors shown in an exception message (all of them go to build_errors.txt)


class ManifestError(ValueError):
    """Bad manifest rows. `errors` holds one line per problem: 'manifest.csv line 7: column 'image': ...'."""

    user_facing = True  # `medvlp` prints it as one error, without a traceback

    def __init__(self, errors: list[str], header: str = "bad manifest rows"):
        self.errors = list(errors)
        shown = self.errors[:MAX_LISTED]
        more = len(self.errors) - len(shown)
        msg = f"{header} ({len(self.errors)}):\n  " + "\n  ".join(shown) + (f"\n  ... and {more} more" if more else "")
        super().__init__(msg)

    def __reduce__(self):  # picklable across worker processes
        return (ManifestError, (self.errors,))


@dataclass
class Row:
    """One validated manifest row; paths are resolved, labels parsed, split possibly still None (assigned later)."""

    source: str  # manifest file name, for messages
    line: int  # line of the row in the manifest
    key: str
    kind: str  # image | volume | features
    paths: dict[str, str]  # column -> resolved path
    given: dict[str, str]  # column -> path as written in the manifest (for messages)
    text: str | None  # inline report, or None when read from paths["report_file"]
    labels: dict[str, int]
    patient_id: str
    split: str | None
    modality: str
    dataset: str = ""
    meta: dict[str, Any] = field(default_factory=dict)  # extra columns, kept verbatim
    extra: dict[str, Any] = field(default_factory=dict)  # organ_names / organs / spacing_mm (sample json top level)
    est_bytes: int = 0  # source bytes on disk (+ text): the shard-size estimate

    def where(self, column: str | None = None) -> str:
        col = f": column '{column}'" if column else ""
        return f"{self.source} line {self.line}{col}"

    def fingerprint(self) -> dict:
        """What the encoded sample depends on: fields plus size/mtime of every source file."""
        stats = {}
        for col, p in sorted(self.paths.items()):
            try:
                st = os.stat(p)
                stats[col] = [st.st_size, st.st_mtime_ns]
            except OSError:
                stats[col] = None
        return {"key": self.key, "kind": self.kind, "paths": self.paths, "stats": stats, "text": self.text,
                "labels": self.labels, "patient_id": self.patient_id, "split": self.split,
                "modality": self.modality, "dataset": self.dataset, "meta": self.meta, "extra": self.extra}


# ------------------------------------------------------------------------------------------------ parsing
def sanitise_key(key: str) -> str:
    """Tar-member-safe key: webdataset splits member names at the first dot, so dots/spaces/colons become '_'."""
    key = key.strip().translate(_KEY_REPLACE).strip("/")
    while "//" in key:
        key = key.replace("//", "/")
    return key


def derive_key(given_path: str, base_dir: Path, dataset: str = "") -> str:
    """Key from the media path: relative path without its suffix (last two components if outside the base)."""
    p = Path(given_path)
    if p.is_absolute():
        try:
            p = p.relative_to(base_dir)
        except ValueError:
            p = Path(*p.parts[-2:])
    stem = p.with_suffix("").as_posix().lstrip("./")
    return sanitise_key(f"{dataset}/{stem}" if dataset else stem)


def parse_label_value(v: Any) -> int | None:
    """1 / 0 / -1 (uncertain) from int, float, bool or text; blank/None -> None (not stated)."""
    if v is None or (isinstance(v, str) and v.strip() == ""):
        return None
    if isinstance(v, bool):
        return int(v)
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise ValueError(f"label value {v!r} is not 1, 0, -1 or blank") from None
    if f not in (1.0, 0.0, -1.0):
        raise ValueError(f"label value {v!r} is not 1, 0, -1 or blank")
    return int(f)


def _parse_labels(raw: dict[str, Any]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    labels: dict[str, int] = {}
    errs: list[tuple[str, str]] = []
    blob = raw.get("labels")
    if isinstance(blob, str) and blob.strip():
        try:
            blob = json.loads(blob)
        except json.JSONDecodeError as e:
            errs.append(("labels", f"not valid JSON: {e.msg} at char {e.pos}"))
            blob = None
    if blob not in (None, ""):
        if not isinstance(blob, dict):
            errs.append(("labels", f"expected a JSON object {{finding: 1/0/-1}}, got {type(blob).__name__}"))
        else:
            for name, v in blob.items():
                try:
                    if (val := parse_label_value(v)) is not None:
                        labels[str(name).strip()] = val
                except ValueError as e:
                    errs.append(("labels", f"finding {name!r}: {e}"))
    for col, v in raw.items():
        if isinstance(col, str) and col.startswith("label:"):
            name = col[len("label:"):].strip()
            try:
                val = parse_label_value(v)
            except ValueError as e:
                errs.append((col, str(e)))
                continue
            if val is not None:
                if name in labels and labels[name] != val:
                    errs.append((col, f"{val} contradicts {labels[name]} given in 'labels'"))
                labels[name] = val
    return labels, errs


def _json_cell(raw: dict[str, Any], col: str) -> Any:
    v = raw.get(col)
    if isinstance(v, str):
        v = v.strip()
        return json.loads(v) if v else None
    return v


def _parse_organs(raw: dict[str, Any], kind: str) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """organ_names / organs / spacing_mm cells -> (sample json extras, errors)."""
    extra: dict[str, Any] = {}
    from medvlp.data_shards.readers.totalseg import manifest_organs  # organ_names "totalseg", organ_merge

    raw, errs, merged = manifest_organs(raw)
    vals = {}
    for col in ("organ_names", "organs", "spacing_mm"):
        try:
            vals[col] = _json_cell(raw, col)
        except json.JSONDecodeError as e:
            errs.append((col, f"not valid JSON: {e.msg}"))
    names, organs, spacing = vals.get("organ_names"), vals.get("organs"), vals.get("spacing_mm")
    if (names is not None or organs is not None) and kind != "volume":
        errs.append(("organ_names", "organs need a 'volume' (and its 'mask')"))
    if names is not None:
        if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
            errs.append(("organ_names", f"expected a JSON list of organ names, got {names!r}"))
        else:
            extra["organ_names"] = names
    elif organs is not None:
        errs.append(("organ_names", "'organs' needs 'organ_names' (the mask-label order)"))
    if organs is not None and "organ_names" in extra:
        if not isinstance(organs, dict):
            errs.append(("organs", f"expected a JSON object {{organ: {{abnormal, sentence}}}}, got {organs!r}"))
        else:
            fixed = {}
            for k, organ in enumerate(extra["organ_names"]):
                o = organs.get(organ)
                if not isinstance(o, dict) or o.get("abnormal") not in (0, 1) or not isinstance(o.get("sentence"), str):
                    errs.append(("organs", f"organ {organ!r}: expected {{\"abnormal\": 0|1, \"sentence\": str}}, "
                                           f"got {o!r}"))
                    continue
                fixed[organ] = {"id": k + 1, "abnormal": int(o["abnormal"]), "sentence": o["sentence"]}
            unknown = sorted(set(organs) - set(extra["organ_names"]))
            if unknown:
                errs.append(("organs", f"{unknown} are not in organ_names"))
            extra["organs"] = fixed
    if spacing is not None:
        if not (isinstance(spacing, list) and len(spacing) == 3 and all(isinstance(v, (int, float)) and v > 0
                                                                         for v in spacing)):
            errs.append(("spacing_mm", f"expected [z, y, x] positive numbers, got {spacing!r}"))
        else:
            extra["spacing_mm"] = [float(v) for v in spacing]
    if "organ_names" in extra:
        extra.update(merged)
    return extra, errs


def _text(raw: dict[str, Any], col: str) -> str:
    v = raw.get(col)
    return "" if v is None else str(v).strip()


def _folder_like(given: str) -> bool:
    """A folder name (checked on disk later): trailing '/', no suffix, or a numeric one (a DICOM UID)."""
    return given.endswith(("/", "\\")) or not Path(given).suffix or Path(given).suffix[1:].isdigit()


def parse_row(raw: dict[str, Any], line: int, source: str, base_dir: Path,
              modality: str | None = None) -> tuple[Row | None, list[str]]:
    """One raw row -> (Row, []) or (None, errors). No filesystem access."""
    errs: list[tuple[str | None, str]] = []
    kinds = [k for k in MEDIA_KINDS if _text(raw, k)]
    if len(kinds) != 1:
        errs.append((None, f"needs exactly one of 'image', 'volume', 'features'; got {kinds or 'none'}"))
    kind = kinds[0] if kinds else ""
    given = {c: _text(raw, c) for c in PATH_COLUMNS if _text(raw, c)}
    for col, sfx in _SUFFIXES.items():
        if col in given and not given[col].lower().endswith(sfx) and not (
                col in ("volume", "mask") and _folder_like(given[col])):
            errs.append((col, f"{given[col]!r}: expected one of {', '.join(sfx)}"
                              f"{' or a folder' if col in ('volume', 'mask') else ''}"))
    if "mask" in given and kind != "volume":
        errs.append(("mask", "a mask needs a 'volume'"))
    if "coords" in given and kind != "features":
        errs.append(("coords", "coords need 'features'"))
    text = _text(raw, "report") or None
    if text is None and "report_file" not in given:
        errs.append(("report", "empty (and no 'report_file')"))
    labels, lerrs = _parse_labels(raw)
    errs.extend(lerrs)
    split = _text(raw, "split").lower() or None
    if split is not None:
        if split not in _SPLIT_ALIASES:
            errs.append(("split", f"{split!r} is not one of {', '.join(SPLITS)}"))
        split = _SPLIT_ALIASES.get(split, split)
    mod = _text(raw, "modality").lower() or modality or (_KIND_MODALITIES[kind][0] if kind else "")
    if kind and mod not in _KIND_MODALITIES[kind]:
        col = "modality" if _text(raw, "modality") else kind
        errs.append((col, f"modality {mod!r} does not fit a {kind} row (allowed: {_KIND_MODALITIES[kind]})"))
    elif mod not in MODALITIES and kind:
        errs.append(("modality", f"{mod!r} is not one of {MODALITIES}"))
    dataset = _text(raw, "dataset")
    extra, oerrs = _parse_organs(raw, kind)
    errs.extend(oerrs)
    key = sanitise_key(_text(raw, "key")) if _text(raw, "key") else (
        derive_key(given[kind], base_dir, dataset) if kind else "")
    if kind and not key:
        errs.append(("key", "empty after sanitising"))
    prefix = f"{source} line {line}"
    if errs:
        return None, [f"{prefix}: column '{c}': {m}" if c else f"{prefix}: {m}" for c, m in errs]
    paths = {c: str(p if (p := Path(g)).is_absolute() else base_dir / p) for c, g in given.items()}
    meta = {k: v for k, v in raw.items() if k not in _RESERVED and not str(k).startswith("label:")
            and v not in (None, "")}
    return Row(source=source, line=line, key=key, kind=kind, paths=paths, given=given, text=text, labels=labels,
               patient_id=_text(raw, "patient_id") or key, split=split, modality=mod, dataset=dataset,
               meta=meta, extra=extra), []


# ------------------------------------------------------------------------------------------------ reading
_STRUCTURED = {"key", "image", "volume", "mask", "features", "coords", "report_file", "patient_id", "split",
               "dataset", "modality"}  # single-line columns: a line break in one means a quote went astray
MAX_CELL_CHARS = 64 << 20  # one CSV cell at most (a whole report fits; a runaway quote still ends)
_NOT_UTF8 = re.compile("[\udc80-\udcff]")  # bytes that did not decode, kept as lone surrogates


def read_text(path: Path) -> str:
    """The manifest's text. UTF-8 (with or without BOM) or UTF-16/32 with a BOM; bytes that are not UTF-8 stay as
    lone surrogates, so the rows holding them are reported by line (`not_utf8`) instead of failing the file."""
    data = path.read_bytes()
    for bom, enc in ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
                     (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16")):
        if data.startswith(bom):
            try:
                return data.decode(enc)
            except UnicodeDecodeError as e:
                line = data[:e.start].decode(enc, errors="ignore").count("\n") + 1
                raise ManifestError([f"{path.name} line {line}: not valid {enc.upper()} (byte-order mark says "
                                     f"{enc}): {e.reason}"], header="unreadable manifest") from None
    if b"\x00" in data[:4096]:
        line = data[:data.index(b"\x00")].count(b"\n") + 1
        raise ManifestError([f"{path.name} line {line}: NUL bytes: a binary file or UTF-16 without a byte-order mark; "
                             "save the manifest as UTF-8"], header="unreadable manifest")
    return data.decode("utf-8-sig", errors="surrogateescape")


def not_utf8(values: Iterable[Any]) -> str | None:
    """'byte 0xe9' for the first undecodable byte among the string values, else None."""
    for v in values:
        if isinstance(v, str) and (m := _NOT_UTF8.search(v)):
            return f"byte 0x{ord(m.group()) - 0xDC00:02x}"
    return None


def _utf8_error(where: str, raw: dict) -> str | None:
    for col, v in raw.items():
        if (b := not_utf8([col, v])) is not None:
            return (f"{where}column '{col}': not valid UTF-8 ({b}); save the manifest as UTF-8 (e.g. "
                    "`iconv -f latin1 -t utf-8 in.csv > out.csv`)")
    return None


def iter_csv_rows(path: Path) -> Iterable[tuple[int, dict | None, str | None]]:
    """(line, row, None) per data row, (line, None, error) per broken row; every broken row is reported.

    The first item is (1, {"__header__": [column names]}, None). Strict dialect: a quote must open and close a
    whole cell (a stray or unclosed quote is an error at its line, never a silent merge of rows); a line break
    may sit only inside a quoted free-text cell (report, extra columns), and such a cell must not swallow a line
    that is itself a whole row."""
    text = read_text(Path(path))
    lines = re.split(r"\r\n|\r|\n", text)
    csv.field_size_limit(max(csv.field_size_limit(), MAX_CELL_CHARS))  # long reports are fine (default 128 KiB)
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    header: list[str] | None = None
    while True:
        start = reader.line_num + 1
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            end = max(reader.line_num, start)
            span = f"lines {start}-{end}" if end > start else f"line {start}"
            if "field larger than field limit" in str(e):
                yield start, None, (f"CSV ({span}): a cell longer than {MAX_CELL_CHARS:,} characters (or a quote "
                                    "that never closes and swallows the rest of the file)")
            else:
                yield start, None, (f"CSV syntax ({span}): {e}: a stray or unclosed quote? (quote a whole cell, "
                                    'double a quote inside it: "say ""no""")')
            if header is None:
                return
            continue
        end = reader.line_num
        if header is None:
            if not any(c.strip() for c in cells):
                continue
            header = [c.strip() for c in cells]
            if (b := not_utf8(header)) is not None:
                raise ManifestError([f"{Path(path).name} line {start}: header: not valid UTF-8 ({b}); save the "
                                     "manifest as UTF-8"], header="unreadable manifest")
            yield start, {"__header__": header}, None
            continue
        if not any(c.strip() for c in cells):
            continue  # blank line
        if len(cells) != len(header):
            yield start, None, f"{len(cells)} cells but the header has {len(header)}"
            continue
        raw = dict(zip(header, cells))
        if end > start and (err := _multiline_error(raw, header, lines, start, end)) is not None:
            yield start, None, err
            continue
        if (err := _utf8_error("", raw)) is not None:
            yield start, None, err
            continue
        yield start, raw, None


def _multiline_error(raw: dict, header: list[str], lines: list[str], start: int, end: int) -> str | None:
    """A record spanning lines start..end: legal only as a quoted free-text cell holding no whole row."""
    for col, v in raw.items():
        if "\n" not in v and "\r" not in v:
            continue
        if col in _STRUCTURED or col.startswith("label:"):
            return (f"column '{col}' spans lines {start}-{end}: an unclosed quote? (only free-text columns such as "
                    "'report' may hold line breaks)")
    for ln in range(start + 1, end):  # lines wholly inside the record
        inner = lines[ln - 1] if ln - 1 < len(lines) else ""
        if inner.count(",") >= len(header) - 1 and len(next(csv.reader([inner]), [])) == len(header):
            return (f"a quoted cell spans lines {start}-{end} and swallows line {ln}, which reads as a whole row: "
                    "an unclosed quote?")
    return None


def iter_jsonl_rows(path: Path) -> Iterable[tuple[int, dict | None, str | None]]:
    # split on CR/LF only: str.splitlines would also split at U+2028 etc., which JSON strings may hold raw
    for i, text in enumerate(re.split(r"\r\n|\r|\n", read_text(Path(path))), start=1):
        if not text.strip():
            continue
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            yield i, None, f"not valid JSON: {e.msg} at char {e.pos}"
            continue
        if not isinstance(raw, dict):
            yield i, None, f"expected a JSON object, got {type(raw).__name__}"
            continue
        if (err := _utf8_error("", {k: (v if isinstance(v, str) else json.dumps(v, ensure_ascii=False))
                                    for k, v in raw.items()})) is not None:
            yield i, None, err
            continue
        yield i, raw, None


def read_manifest(path: str | os.PathLike, modality: str | None = None) -> tuple[list[Row], list[str], int]:
    """Parse every row. Returns (good rows, errors, number of data rows). Touches no media file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: manifest not found")
    if modality is not None and modality not in MODALITIES:
        raise ValueError(f"modality: {modality!r} is not one of {MODALITIES}")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        it = iter_csv_rows(path)
    elif suffix in (".jsonl", ".ndjson"):
        it = iter_jsonl_rows(path)
    else:
        raise ValueError(f"{path}: manifest must be .csv or .jsonl, got {suffix!r}")
    rows: list[Row] = []
    errors: list[str] = []
    n = 0
    base = path.parent.resolve()
    for line, raw, err in it:
        if raw is not None and "__header__" in raw:
            header = raw["__header__"]
            missing = []
            if not any(k in header for k in MEDIA_KINDS):
                missing.append("one of 'image', 'volume', 'features'")
            if "report" not in header and "report_file" not in header:
                missing.append("'report' or 'report_file'")
            if missing:
                raise ManifestError([f"{path.name} line 1: missing column {m}" for m in missing])
            continue
        n += 1
        if err is not None:
            errors.append(f"{path.name} line {line}: {err}")
            continue
        row, errs = parse_row(raw, line, path.name, base, modality)
        errors.extend(errs)
        if row is not None:
            rows.append(row)
    return rows, errors, n


# ------------------------------------------------------------------------------------------------ checks
def check_global(rows: list[Row]) -> tuple[list[Row], list[str]]:
    """Duplicate keys, one modality per shard set, one explicit split per patient. Later offending rows drop."""
    errors: list[str] = []
    keep: list[Row] = []
    first_key: dict[str, Row] = {}
    first_split: dict[str, Row] = {}
    modality_row: Row | None = None
    for r in rows:
        if r.key in first_key:
            errors.append(f"{r.where('key')}: duplicate key {r.key!r} (first at line {first_key[r.key].line})")
            continue
        if modality_row is not None and r.modality != modality_row.modality:
            errors.append(f"{r.where('modality')}: {r.modality!r} differs from {modality_row.modality!r} at line "
                          f"{modality_row.line}; build one shard set per modality")
            continue
        if r.split is not None:
            other = first_split.get(r.patient_id)
            if other is not None and other.split != r.split:
                errors.append(f"{r.where('split')}: patient {r.patient_id!r} is in {r.split!r} here but in "
                              f"{other.split!r} at line {other.line}")
                continue
            first_split.setdefault(r.patient_id, r)
        first_key[r.key] = r
        modality_row = modality_row or r
        keep.append(r)
    return keep, errors


def check_files(rows: list[Row], policy: PathPolicy | None = None) -> tuple[list[Row], list[str]]:
    """Every referenced file exists and obeys the path policy (under the data root, no symlink out of it, no FIFO
    or device; see `medvlp.data_shards.paths`); records the size estimate. Bad rows drop.

    `policy` None: only the file-kind check (FIFOs, devices) applies; builders pass the manifest's policy."""
    policy = policy or PathPolicy(("/",), follow_symlinks=True, real_roots=("/",))
    keep, errors = [], []
    for r in rows:
        bad = False
        size = len(r.text.encode("utf-8")) if r.text else 0
        for col, p in r.paths.items():
            try:
                policy.check(p, given=r.given.get(col, p))
                size += os.stat(p).st_size
            except PathError as e:
                errors.append(f"{r.where(col)}: {e}")
                bad = True
            except OSError:
                errors.append(f"{r.where(col)}: file not found: {r.given[col]}")
                bad = True
        if not bad:
            r.est_bytes = size
            keep.append(r)
    return keep, errors


# ------------------------------------------------------------------------------------------------ splits
def hash_unit(*parts: object) -> float:
    """Deterministic number in [0, 1) from the parts (stable across processes and Python versions)."""
    h = hashlib.sha256("\x1f".join(str(p) for p in parts).encode("utf-8")).digest()
    return int.from_bytes(h[:8], "big") / 2.0**64


def assign_splits(rows: list[Row], val_frac: float, test_frac: float, seed: int) -> Counter:
    """Fill missing splits by patient: an explicit split of any row of the patient wins, else a hash of (seed, id)."""
    if not (0 <= val_frac and 0 <= test_frac and val_frac + test_frac <= 1):
        raise ValueError(f"val_frac={val_frac}, test_frac={test_frac}: need fractions >= 0 summing to <= 1")
    explicit = {r.patient_id: r.split for r in rows if r.split is not None}
    counts: Counter = Counter()
    for r in rows:
        if r.split is None:
            r.split = explicit.get(r.patient_id)
        if r.split is None:
            u = hash_unit("split", seed, r.patient_id)
            r.split = "test" if u < test_frac else "val" if u < test_frac + val_frac else "train"
        counts[r.split] += 1
    return counts


def part_of(patient_id: str, n: int) -> int:
    """Which of n parallel build slices owns this patient (independent of the split seed)."""
    return int(hash_unit("part", patient_id) * n)
