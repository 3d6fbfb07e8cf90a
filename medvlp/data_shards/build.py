"""Offline shard builder: manifest -> validated rows -> patient-level splits -> shard plan -> parallel, atomic,
idempotent shard writing -> index.json.

Flow and guarantees
  1. Validation runs first, in this process, without decoding anything: every bad row is collected with its line
     (`ManifestError`). on_error="fail" raises before anything is written; "skip" drops the rows and reports them
     (warning + build_errors.txt). Decoding errors found later in the workers are handled the same way (in fail
     mode every row is still tried, so the error lists every undecodable row at once).
  2. Rows are ordered by split, then in a seeded random order within the split (a hash of (seed, key), so a
     part build and the whole build agree and no shard holds one class of a class-sorted manifest), and cut
     into shards by `maxcount` and `maxsize`. The size is estimated from
     the source files on disk (an upper bound for images, which shrink when resized), so no decode is needed.
  3. Workers (forks of one server that imported the builder once) each encode one whole SHARD and write it
     atomically (tmp + rename), then a sidecar `.build/NAME.json` with the shard's plan digest and sha256. A
     rerun skips every shard whose `.tar` and sidecar exist, whose plan digest matches (same rows, same source
     file sizes/mtimes, same image_size) and whose sha256 still matches; our own leftover `*.tmp` files are
     removed first.
  4. `part=(i, n)` builds only the patients with `part_of(patient) == i`; names carry the part and the index is
     index.part{i}of{n}.json; `merge_indexes` joins the parts and checks no sample is missing or doubled.

Image handling: 8-bit L/RGB stay uint8, 16-bit PNG ("I;16", "I") stays uint16; RGBA/P/CMYK -> RGB, LA/1 -> L; the
longer side is resized to at most `image_size` (LANCZOS; uint16 through float32 and rounding). `ImageEncoding`
changes that (shards at training resolution, decoding fast): resize="shortest" brings the shorter side down to
`image_size` (never up), format="jpeg" writes img.jpg at `jpeg_quality` (grey stays a greyscale JPEG). JPEG has
8 bits: a 16-bit image is windowed to uint8 after the resize, u8 = round(255 * clip((x - lo) / (hi - lo), 0, 1))
with (lo, hi) = `window` or the full range (0, 65535), which is the stream's own x / 65535 at 8-bit precision;
uint16="png" keeps 16-bit images as lossless 16-bit PNG instead. index.json's build.image records the choice. DICOM radiographs,
DICOM series folders, NIfTI volumes/masks and segmentations/ folders are read by `medvlp.data_shards.readers` (options in
`ReadOptions`; `salt` hashes patient ids and keys, see `medvlp.data_shards.readers.phi`).
"""
from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import multiprocessing as mp
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, ImageOps

from medvlp.data_shards import readers
from medvlp.data_shards.paths import PathPolicy
from medvlp.data_shards.reader import shard_keys
from medvlp.data_shards.manifest import (ManifestError, Row, assign_splits, check_files, check_global, part_of,
                                  read_manifest)
from medvlp.data_shards.schema import SCHEMA_VERSION, SPLITS, LabelSpec, Sample
from medvlp.data_shards.writer import (ShardInfo, check_index, sha256_file, shard_name, write_index,
                                      write_shard)

__all__ = ["build_shards", "build_rows", "merge_indexes", "ManifestError", "load_row"]

SIDECAR_DIR = ".build"
_PART_INDEX_RE = re.compile(r"^index\.part(\d+)of(\d+)\.json$")


class RowDecodeError(ValueError):
    """A row whose file could not be decoded; `column` names the manifest column."""

    def __init__(self, column: str, message: str):
        self.column = column
        super().__init__(message)

    def __reduce__(self):
        return (RowDecodeError, (self.column, str(self)))


# ------------------------------------------------------------------------------------------------ decoding
UINT16_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def pil_image(im: Image.Image) -> Image.Image | np.ndarray:
    """A loaded PIL image in the form the shards keep: EXIF orientation applied; 16-bit modes ("I;16*", "I") as a
    (H, W) uint16 array; bilevel / grey+alpha as "L"; anything else but "L" / "RGB" as "RGB". Float ("F") images
    are refused (ValueError)."""
    im = ImageOps.exif_transpose(im)
    if im.mode in UINT16_MODES:
        arr = np.asarray(im)
        if arr.dtype != np.uint16:
            if arr.size and (arr.min() < 0 or arr.max() > 65535):
                bad = "negative values" if arr.min() < 0 else "values above 65535"
                raise ValueError(f"32-bit grey values {arr.min()}..{arr.max()}: {bad} do not fit the unsigned 16-bit "
                                 "pixels the shards keep; rescale the image to 0..65535 (16-bit PNG) before building")
            arr = arr.astype(np.uint16)
        return arr
    if im.mode in ("1", "LA", "La"):
        return im.convert("L")
    if im.mode not in ("L", "RGB"):
        if im.mode == "F":
            raise ValueError("floating-point images are not supported; store 8- or 16-bit PNG")
        return im.convert("RGB")
    return im


@dataclass(frozen=True)
class ImageEncoding:
    """How a build stores 2D images (the default is the lossless store every earlier build wrote)."""

    resize: str = "longest"  # longest: image_size bounds the longer side | shortest: shorter side down to image_size
    format: str = "png"  # png (lossless, 8/16-bit) | jpeg (8-bit img.jpg)
    jpeg_quality: int = 90  # jpeg: libjpeg quality 1..95
    uint16: str = "window"  # jpeg: 16-bit images windowed to 8 bits (window) or kept as 16-bit PNG (png)
    window: tuple[float, float] | None = None  # window: 16-bit (lo, hi) mapped to 0..255; None = (0, 65535)

    def __post_init__(self) -> None:
        if self.resize not in ("longest", "shortest"):
            raise ValueError(f"image resize: {self.resize!r} is not one of longest, shortest")
        if self.format not in ("png", "jpeg"):
            raise ValueError(f"image format: {self.format!r} is not one of png, jpeg")
        if not 1 <= int(self.jpeg_quality) <= 95:
            raise ValueError(f"jpeg quality: {self.jpeg_quality} is not in 1..95")
        if self.uint16 not in ("window", "png"):
            raise ValueError(f"16-bit images: {self.uint16!r} is not one of window, png")
        if self.window is not None and (len(self.window) != 2 or not self.window[0] < self.window[1]):
            raise ValueError(f"16-bit window: need (lo, hi) with lo < hi, got {self.window}")

    @property
    def is_default(self) -> bool:
        return self == ImageEncoding()

    def to_dict(self, image_size: int) -> dict:
        d = {"size": image_size, "resize": self.resize, "format": self.format}
        if self.format == "jpeg":
            d.update(jpeg_quality=self.jpeg_quality, jpeg_subsampling="4:2:0 (RGB)", uint16=self.uint16,
                     window=list(self.window) if self.window else [0, 65535])
        return d


def window_u16(arr: np.ndarray, window: tuple[float, float] | None = None) -> np.ndarray:
    """uint16 -> uint8 by the linear window: round(255 * clip((x - lo) / (hi - lo), 0, 1)); (lo, hi) defaults to
    (0, 65535), i.e. the stream's x / 65535 quantised to 8 bits."""
    lo, hi = window or (0.0, 65535.0)
    y = np.clip((arr.astype(np.float64) - lo) / (hi - lo), 0.0, 1.0)
    return np.rint(y * 255.0).astype(np.uint8)


def encode_image(img: np.ndarray, image_size: int, enc: ImageEncoding) -> tuple[np.ndarray, int]:
    """A loaded image (longer side already <= image_size when resize="longest") -> (stored array, JPEG quality or
    0 for PNG) under `enc`: the shorter-side resize, the 16-bit window, the format."""
    if enc.resize == "shortest":
        img = resize_shortest(img, image_size)
    if enc.format != "jpeg":
        return img, 0
    if img.dtype == np.uint16:
        if enc.uint16 == "png":
            return img, 0
        img = window_u16(img, enc.window)
    return img, int(enc.jpeg_quality)


def resize_shortest(img: np.ndarray, side: int) -> np.ndarray:
    """Shorter side down to `side` (LANCZOS, uint16 through float32); a smaller image is kept as it is."""
    h, w = img.shape[:2]
    if min(h, w) <= side:
        return img
    s = side / min(h, w)
    if h < w:
        nw, nh = max(side, round(w * s)), side
    else:
        nw, nh = side, max(side, round(h * s))
    if img.dtype == np.uint16:
        return _resample_u16(img, nw, nh)
    return np.asarray(Image.fromarray(img).resize((nw, nh), Image.LANCZOS))


def load_image(path: str, image_size: int, resize: str = "longest") -> np.ndarray:
    """Image file -> (H, W) or (H, W, 3) uint8, or (H, W) uint16, longer side <= image_size (resize="longest"),
    or shorter side <= image_size (resize="shortest")."""
    with Image.open(path) as im:
        if resize == "shortest" and im.format == "JPEG" and im.mode in ("L", "RGB"):
            w, h = im.size  # DCT-scaled decode to no less than twice the target (LANCZOS then does the rest)
            im.draft(im.mode, (max(1, w * 2 * image_size // min(w, h)), max(1, h * 2 * image_size // min(w, h))))
        im.load()
        im = pil_image(im)
        if resize == "shortest":
            return resize_shortest(im if isinstance(im, np.ndarray) else np.asarray(im), image_size)
        if isinstance(im, np.ndarray):
            return _resize_u16(im, image_size)
        w, h = im.size
        nw, nh = bounded_size(w, h, image_size)
        if (nw, nh) != (w, h):
            im = im.resize((nw, nh), Image.LANCZOS)
        return np.asarray(im)


def bounded_size(w: int, h: int, limit: int) -> tuple[int, int]:
    """(w, h) scaled down to fit `limit` on the longer side (aspect kept; never scaled up): the stored size."""
    if max(w, h) <= limit:
        return w, h
    s = limit / max(w, h)
    return max(1, round(w * s)), max(1, round(h * s))


def _resize_u16(arr_HW: np.ndarray, image_size: int) -> np.ndarray:
    h, w = arr_HW.shape
    nw, nh = bounded_size(w, h, image_size)
    if (nw, nh) == (w, h):
        return np.ascontiguousarray(arr_HW)
    return _resample_u16(arr_HW, nw, nh)


def _resample_u16(arr_HW: np.ndarray, nw: int, nh: int) -> np.ndarray:
    # PIL has no 16-bit LANCZOS: resample in float32 ("F" mode) and round back.
    out = np.asarray(Image.fromarray(arr_HW.astype(np.float32), mode="F").resize((nw, nh), Image.LANCZOS))
    return np.clip(np.rint(out), 0, 65535).astype(np.uint16)


def _load_array(path: str, prefer: tuple[str, ...]) -> np.ndarray:
    if path.lower().endswith(".pt"):
        import torch  # only slides with .pt features pay for the import

        obj = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(obj, torch.Tensor):
            raise ValueError(f"expected a tensor, got {type(obj).__name__}")
        return obj.float().numpy() if obj.is_floating_point() else obj.numpy()
    data = np.load(path, allow_pickle=False)
    if isinstance(data, np.lib.npyio.NpzFile):
        with data:
            names = list(data.keys())
            name = next((k for k in prefer if k in names), names[0] if len(names) == 1 else None)
            if name is None:
                raise ValueError(f"npz holds {names}; expected one array or one of {list(prefer)}")
            return data[name]
    return data


def _to_int16(arr: np.ndarray, what: str) -> np.ndarray:
    if np.issubdtype(arr.dtype, np.floating):
        return arr.astype(np.float16)
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{what} dtype {arr.dtype} is neither integer nor float")
    if arr.size and (arr.min() < -32768 or arr.max() > 32767):
        raise ValueError(f"{what} values {arr.min()}..{arr.max()} do not fit int16")
    return arr.astype(np.int16)


def _guard(column: str, fn, *args):
    try:
        return fn(*args)
    except RowDecodeError:
        raise
    except Exception as e:  # noqa: BLE001 - any decoder failure becomes a row error naming the column
        raise RowDecodeError(column, f"{type(e).__name__}: {e}") from e


def _load_volume(row: Row) -> tuple[np.ndarray, np.ndarray | None]:
    vol = _guard("volume", _load_array, row.paths["volume"], ("volume", "vol", "image", "arr_0"))
    if vol.ndim != 3:
        raise RowDecodeError("volume", f"expected a 3D (D, H, W) array, got shape {vol.shape}")
    vol = _guard("volume", _to_int16, vol, "volume")
    mask = None
    if "mask" in row.paths:
        mask = _guard("mask", _load_array, row.paths["mask"], ("mask", "seg", "label", "arr_0"))
        if mask.shape != vol.shape:
            raise RowDecodeError("mask", f"shape {mask.shape} differs from the volume's {vol.shape}")
        if not np.issubdtype(mask.dtype, np.integer) or (mask.size and (mask.min() < 0 or mask.max() > 255)):
            raise RowDecodeError("mask", f"expected integer labels 0..255, got {mask.dtype}")
        mask = mask.astype(np.uint8)
    return vol, mask


def _load_features(row: Row) -> tuple[np.ndarray, np.ndarray | None]:
    feats = _guard("features", _load_array, row.paths["features"], ("features", "feats", "arr_0"))
    if feats.ndim != 2:
        raise RowDecodeError("features", f"expected a 2D (n, d) array, got shape {feats.shape}")
    coords = None
    if "coords" in row.paths:
        coords = _guard("coords", _load_array, row.paths["coords"], ("coords", "arr_0"))
        if coords.shape != (feats.shape[0], 2):
            raise RowDecodeError("coords", f"expected shape ({feats.shape[0]}, 2), got {coords.shape}")
        coords = coords.astype(np.int32)
    return feats.astype(np.float16), coords


def _clinical(column: str, fn, *args):
    """A medvlp.data_shards.readers call: its ReadError names the column; any other failure is an error of `column`."""
    try:
        return fn(*args)
    except readers.ReadError as e:
        raise RowDecodeError(e.column, str(e)) from None
    except Exception as e:  # noqa: BLE001 - any decoder failure becomes a row error naming the column
        raise RowDecodeError(column, f"{type(e).__name__}: {e}") from e


def load_row(row: Row, image_size: int, read: readers.ReadOptions | None = None,
             encoding: ImageEncoding | None = None) -> Sample:
    """Decode one validated row into a Sample (its image stored as `encoding` says). Raises RowDecodeError naming
    the column."""
    read = read or readers.ReadOptions()
    enc = encoding or ImageEncoding()
    text = row.text
    if text is None:
        text = _guard("report_file", lambda p: Path(p).read_text(encoding="utf-8").strip(), row.paths["report_file"])
        if not text:
            raise RowDecodeError("report_file", f"{row.given['report_file']}: empty report")
    meta = {**row.meta, "dataset": row.dataset, "modality": row.modality, "split": row.split,
            "patient_id": row.patient_id, **({} if read.hash_ids else {"source": row.given[row.kind]})}
    s = Sample(key=row.key, text=text, labels=dict(sorted(row.labels.items())), meta=meta, extra=dict(row.extra))
    if "organ_names" in s.extra and "organs" not in s.extra:  # per-organ sentences and labels from the report
        from medvlp.data_shards.organ_report import organs_from_report

        s.extra["organs"] = organs_from_report(text, s.extra["organ_names"])
    if row.kind == "image" and readers.is_dicom_file(row.paths["image"]):
        # shortest: the reader keeps the full size and the shorter-side resize below rescales its pixel spacing
        bound = image_size if enc.resize == "longest" else 1 << 30
        s.image, more = _clinical("image", readers.load_image_file, row.paths["image"], bound, read, _resize_u16,
                                  row.modality)
        s.meta.update(more)
    elif row.kind == "image":
        s.image = _guard("image", load_image, row.paths["image"], image_size, enc.resize)
    elif row.kind == "volume" and any(readers.is_clinical_volume(row.paths[c]) for c in ("volume", "mask")
                                      if c in row.paths):
        s.volume, s.mask, more = _clinical("volume", readers.load_volume_files, row.paths["volume"],
                                           row.paths.get("mask"), read, _load_array, row.modality)
        s.meta.update(more)
    elif row.kind == "volume":
        s.volume, s.mask = _load_volume(row)
    else:
        s.feats, s.coords = _load_features(row)
    if s.image is not None and not enc.is_default:
        h, w = s.image.shape[:2]
        s.image, s.jpeg_quality = _guard("image", encode_image, s.image, image_size, enc)
        if "spacing" in s.meta and s.image.shape[:2] != (h, w):
            s.meta["spacing"] = [round(s.meta["spacing"][0] * h / s.image.shape[0], 6),
                                 round(s.meta["spacing"][1] * w / s.image.shape[1], 6)]
    return s


# ------------------------------------------------------------------------------------------------ one shard
class _Abort(Exception):
    """Raised inside the sample generator to abort a shard in fail mode (write_shard then drops the tmp)."""


def _encode_shard(task: dict) -> dict:
    """Worker: encode the rows of one shard, write it atomically and its sidecar. Returns a result dict."""
    errors: list[str] = []
    labels: set[str] = set()

    def samples() -> Iterator[Sample]:
        for row in task["rows"]:
            try:
                read, enc = task.get("read"), task.get("encoding")
                extra = () if read is None and enc is None else (read,) if enc is None else (read, enc)
                s = load_row(row, task["image_size"], *extra)
            except RowDecodeError as e:
                errors.append(f"{row.where(e.column)}: cannot decode {row.given.get(e.column, '')}: {e}")
                continue
            labels.update(s.labels)
            yield s
        if errors and task["on_error"] == "fail":  # every row was tried, so every bad one is reported
            raise _Abort()

    path = Path(task["path"])
    try:
        info = write_shard(path, samples())
    except _Abort:
        return {"name": path.name, "failed": True, "errors": errors}
    result = {"name": path.name, "failed": False, "errors": errors, "info": info.to_dict(),
              "labels": sorted(labels), "planned": len(task["rows"]), "plan": task["plan"]}
    sidecar = path.parent / SIDECAR_DIR / (path.name + ".json")
    tmp = sidecar.with_name(sidecar.name + ".tmp")
    tmp.write_text(json.dumps(result, sort_keys=True))
    os.replace(tmp, sidecar)
    return result


def _reusable(path: Path, plan: str) -> dict | None:
    """The sidecar result of a finished shard with the same plan and an intact file, else None."""
    sidecar = path.parent / SIDECAR_DIR / (path.name + ".json")
    if not (path.exists() and sidecar.exists()):
        return None
    try:
        prev = json.loads(sidecar.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if prev.get("plan") != plan or prev.get("info", {}).get("sha256") != sha256_file(path):
        return None
    return prev


# ------------------------------------------------------------------------------------------------ plan
_SPLIT_ORDER = {s: i for i, s in enumerate(SPLITS)}


def shuffle_key(seed: int, key: str) -> bytes:
    """The seeded within-split position of a sample: a hash of (seed, key), independent of the other rows."""
    return hashlib.blake2b(f"{int(seed)}/{key}".encode("utf-8"), digest_size=8).digest()


def plan_shards(rows: list[Row], maxcount: int, maxsize: int, image_size: int,
                read: readers.ReadOptions | None = None, seed: int = 0,
                encoding: ImageEncoding | None = None) -> list[tuple[list[Row], str]]:
    """Rows ordered by split, then by `shuffle_key(seed, key)`, cut by count and estimated bytes. Each shard gets
    a digest of its inputs."""
    rows = sorted(rows, key=lambda r: (_SPLIT_ORDER.get(r.split, 9), shuffle_key(seed, r.key), r.key))
    groups: list[list[Row]] = []
    size = 0
    for r in rows:
        if not groups or len(groups[-1]) >= maxcount or (groups[-1] and size + r.est_bytes > maxsize):
            groups.append([])
            size = 0
        groups[-1].append(r)
        size += r.est_bytes
    out = []
    for g in groups:
        doc = {"schema": SCHEMA_VERSION, "image_size": image_size, "rows": [r.fingerprint() for r in g]}
        if read is not None and read != readers.ReadOptions():
            doc["read"] = repr(read)
        if encoding is not None and not encoding.is_default:  # default builds keep their digests (shards reused)
            doc["image"] = encoding.to_dict(image_size)
        out.append((g, hashlib.sha256(json.dumps(doc, sort_keys=True).encode("utf-8")).hexdigest()))
    return out


def _clean(out: Path, prefix: str, keep: set[str]) -> None:
    """Remove our own leftover tmp files and shards of this prefix that the current plan no longer has."""
    index_tmp = "index.json.tmp" if prefix == "shard" else f"index.{prefix_to_tag(prefix)}.json.tmp"
    for p in [*out.glob(f"{prefix}-*.tar.tmp"), *(out / SIDECAR_DIR).glob(f"{prefix}-*.tmp"), out / index_tmp]:
        p.unlink(missing_ok=True)
    for p in out.glob(f"{prefix}-*.tar"):
        if p.name not in keep:
            p.unlink(missing_ok=True)
            (out / SIDECAR_DIR / (p.name + ".json")).unlink(missing_ok=True)


def prefix_to_tag(prefix: str) -> str:
    """'part001of003' -> 'part1of3' (index and error-file names carry the part without padding)."""
    m = re.match(r"part(\d+)of(\d+)$", prefix)
    return f"part{int(m.group(1))}of{int(m.group(2))}" if m else ""


def _die_with_parent(builder_pid: int) -> None:
    """Worker initializer: a build worker never outlives its builder (killed with SIGKILL, a lost node, ...).

    The worker's parent is the builder (spawn) or the pool's fork server, which exits when the builder does.
    Linux: the kernel sends SIGKILL when that parent dies (PR_SET_PDEATHSIG); elsewhere, and as a backstop, a
    daemon thread exits the worker once its parent changes or the builder is gone. The killed shard's
    `.tar.tmp` is removed and rebuilt by the next run."""
    import signal
    import threading
    import time

    parent = os.getppid()
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass

    def gone() -> bool:
        if os.getppid() != parent:
            return True
        try:
            os.kill(builder_pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass
        return False

    if gone():  # the parent died before the line above took effect
        os._exit(1)

    def watch() -> None:
        while True:
            time.sleep(0.5)
            if gone():
                os._exit(1)

    threading.Thread(target=watch, daemon=True, name="die-with-parent").start()


def pool_context():
    """Start method of the build workers.

    forkserver where the platform has it: one server process imports this module (numpy, PIL, webdataset and the
    torch webdataset pulls in) once, and every worker is a fork of it, so N workers cost one import instead of N
    interpreters each importing torch (seconds apiece, longer than a small shard takes to encode). Forking from the
    server, not from the builder, stays safe when the builder already runs threads. spawn elsewhere."""
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["__main__", __name__])
        return ctx
    return mp.get_context("spawn")


def _warm_pool(workers: int) -> None:
    """Start the workers' fork server now: it imports in the background while this process reads the manifest."""
    if workers > 1 and pool_context().get_start_method() == "forkserver":
        from multiprocessing import forkserver

        forkserver.ensure_running()


def _run_tasks(tasks: list[dict], workers: int, on_error: str, progress: bool) -> list[dict]:
    from tqdm.auto import tqdm

    results: list[dict] = []
    bar = tqdm(total=len(tasks), unit="shard", desc="build", disable=not progress)
    if workers <= 1 or len(tasks) <= 1:
        for t in tasks:  # fail mode too tries every shard: the error then lists every bad row at once
            results.append(_encode_shard(t))
            bar.update()
    else:
        ctx = pool_context()  # not fork: unsafe once threads (torch, tqdm) exist in the parent
        with cf.ProcessPoolExecutor(max_workers=min(workers, len(tasks)), mp_context=ctx,
                                    initializer=_die_with_parent, initargs=(os.getpid(),)) as ex:
            futs = [ex.submit(_encode_shard, t) for t in tasks]
            for fut in cf.as_completed(futs):
                results.append(fut.result())
                bar.update()
    bar.close()
    return results


# ------------------------------------------------------------------------------------------------ entry points
def build_rows(rows: list[Row], out_dir: str | os.PathLike, *, errors: list[str] | None = None, workers: int = 2,
               maxcount: int = 1000, maxsize: int = 1 << 30, image_size: int = 512, on_error: str = "fail",
               part: tuple[int, int] | None = None, command: str | None = None, progress: bool = True,
               extra: dict | None = None, read: readers.ReadOptions | None = None, seed: int = 0,
               labels: LabelSpec | dict | None = None, encoding: ImageEncoding | None = None) -> dict:
    """Encode validated rows (splits already assigned) into shards + index. Shared by the builder and importers.

    `seed` orders the samples within a split; `labels` is the label spec written into index.json (a dict may
    leave out class_names: the label columns met in the rows are used); `encoding` how 2D images are stored."""
    encoding = encoding or ImageEncoding()
    read, clinical_extra = readers.prepare(rows, read)
    extra = {**(extra or {}), **clinical_extra}
    errors = list(errors or [])
    if errors and on_error == "fail":
        raise ManifestError(errors)
    if not rows:
        raise ManifestError(errors or ["no rows to build"], header="nothing to build")
    _warm_pool(workers)
    out = Path(out_dir)
    (out / SIDECAR_DIR).mkdir(parents=True, exist_ok=True)
    prefix = f"part{part[0]:03d}of{part[1]:03d}" if part else "shard"
    plan = plan_shards(rows, maxcount, maxsize, image_size, read, seed, encoding)
    names = [shard_name(prefix, k) for k in range(len(plan))]
    _clean(out, prefix, set(names))
    done, tasks = {}, []
    for name, (group, digest) in zip(names, plan):
        prev = _reusable(out / name, digest)
        if prev is not None:
            done[name] = prev
        else:
            tasks.append({"path": str(out / name), "rows": group, "plan": digest, "image_size": image_size,
                          "on_error": on_error, "read": None if read == readers.ReadOptions() else read,
                          "encoding": None if encoding.is_default else encoding})
    tag = f".part{part[0]}of{part[1]}" if part else ""
    if tasks:  # the old index may name shards being rewritten: no index until the set is whole again
        (out / f"index{tag}.json").unlink(missing_ok=True)
    for r in _run_tasks(tasks, workers, on_error, progress):
        done[r["name"]] = r
    decode_errors = [e for name in names if name in done for e in done[name]["errors"]]
    if on_error == "fail" and any(r["failed"] for r in done.values()):
        raise ManifestError(decode_errors, header="cannot decode rows (finished shards are kept for a rerun)")
    errors += decode_errors
    _report_errors(out / f"build_errors{tag}.txt", errors)
    infos = [ShardInfo(**done[n]["info"]) for n in names]
    label_names = sorted({lab for n in names for lab in done[n]["labels"]})
    modality = rows[0].modality
    written = sum(i.count for i in infos)
    in_build = (extra or {}).get("num_rows_in_build", len(rows))
    top = {k: extra.pop(k) for k in ("organ_names", "label_groups") if k in extra}  # index-level fields, beside label_names
    build = {**(extra or {}), "num_planned": len(rows), "num_dropped": in_build - written,
             "num_errors": len(errors), "image_size": image_size, "maxcount": maxcount, "maxsize": maxsize,
             "reused_shards": len(names) - len(tasks)}
    if part:
        build["part"] = {"i": part[0], "n": part[1]}
    build["shuffle_seed"] = seed
    if not encoding.is_default:
        build["image"] = encoding.to_dict(image_size)
    return write_index(out, infos, modality, label_names, command=command, extra={**top, "build": build},
                       name=f"index{tag}.json", labels=complete_label_spec(labels, label_names))


def complete_label_spec(labels: LabelSpec | dict | None, label_names: list[str]) -> LabelSpec | None:
    """A label spec with class_names filled from the data when the given one leaves them out."""
    if labels is None or isinstance(labels, LabelSpec):
        return labels
    doc = dict(labels)
    doc.setdefault("class_names", list(label_names))
    doc["prompts"] = {c: v for c, v in (doc.get("prompts") or {}).items() if c in doc["class_names"]}
    return LabelSpec.from_dict(doc, "labels")


def read_label_spec(path: str | os.PathLike) -> dict:
    """A label-spec file (YAML or JSON): {kind, class_names?, templates?, negative_templates?, prompts?}."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"label spec file {p} not found")
    try:
        doc = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ValueError(f"{p}: not valid YAML/JSON: {e}") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{p}: expected a mapping with 'kind' (multi-label | single-label | binary)")
    LabelSpec.from_dict({"class_names": ["_"] if doc.get("kind") != "single-label" else ["_", "__"], **doc},
                        str(p))  # check it now, before any shard is written
    return doc


def _report_errors(path: Path, errors: list[str]) -> None:
    if not errors:
        path.unlink(missing_ok=True)
        return
    path.write_text("\n".join(errors) + "\n", encoding="utf-8")
    warnings.warn(f"skipped {len(errors)} bad rows (listed in {path}); first: {errors[0]}", stacklevel=3)


def build_shards(manifest, out_dir, *, workers=2, maxcount=1000, maxsize=1 << 30, image_size=512, on_error="fail",
                 val_frac=0.1, test_frac=0.1, seed=0, part=None, modality=None, command=None,
                 progress=True, read=None, salt: bytes | None = None,
                 labels: LabelSpec | dict | None = None, root: str | os.PathLike | None = None,
                 follow_symlinks: bool = False, encoding: ImageEncoding | None = None) -> dict:
    """Build WebDataset shards + index from a CSV/JSONL manifest. Returns the index document (see module doc).

    Paths in the manifest must stay under its folder, or under `root` (which widens it); a symlink pointing
    outside both is refused unless `follow_symlinks` (`medvlp.data_shards.paths`).

    read: `readers.ReadOptions` for DICOM/NIfTI rows. salt: hash patient ids, keys and identifier columns with
    it (`readers.phi`) before anything else sees them. labels: the label spec (kind, templates, prompts;
    class_names default to the manifest's label columns); None = multi-label (binary for one label) with
    "X." / "No X." prompts. encoding: how 2D images are stored (`ImageEncoding`; default lossless PNG, longer side
    bounded by image_size)."""
    if on_error not in ("fail", "skip"):
        raise ValueError(f"on_error: {on_error!r} is not 'fail' or 'skip'")
    if maxcount < 1 or maxsize < 1 or image_size < 1:
        raise ValueError(f"maxcount, maxsize, image_size must be >= 1; got {maxcount}, {maxsize}, {image_size}")
    if part is not None:
        i, n = part
        if not 0 <= i < n:
            raise ValueError(f"part: need 0 <= i < n, got {part}")
    _warm_pool(workers)
    rows, errors, n_rows = read_manifest(manifest, modality)
    if salt is not None:
        readers.phi.hash_rows(rows, salt)
        read = readers.replace_options(read, hash_ids=True)
    rows, more = check_global(rows)
    errors += more
    valid_total = len(rows)
    assign_splits(rows, val_frac, test_frac, seed)
    if part is not None:
        rows = [r for r in rows if part_of(r.patient_id, part[1]) == part[0]]
    in_build = len(rows)
    policy = PathPolicy.for_source(Path(manifest).parent, [root] if root else (), follow_symlinks)
    rows, more = check_files(rows, policy)
    errors += more
    errors.sort(key=_line_of)
    if errors and on_error == "fail":
        raise ManifestError(errors)
    extra = {"manifest": {"path": str(Path(manifest).resolve()), "sha256": sha256_file(manifest), "rows": n_rows,
                          "valid_rows": valid_total},
             "seed": seed, "val_frac": val_frac, "test_frac": test_frac, "num_rows_in_build": in_build}
    return build_rows(rows, out_dir, errors=errors, workers=workers, maxcount=maxcount, maxsize=maxsize,
                      image_size=image_size, on_error=on_error, part=part, command=command, progress=progress,
                      extra=extra, read=read, seed=seed, labels=labels, encoding=encoding)


def _line_of(err: str) -> int:
    m = re.search(r" line (\d+)", err)
    return int(m.group(1)) if m else 0


# ------------------------------------------------------------------------------------------------ merge
def merge_indexes(out_dir) -> dict:
    """Join index.part{i}of{n}.json into index.json; every part present, no sample key missing or doubled."""
    out = Path(out_dir)
    parts: dict[int, dict] = {}
    ns = set()
    for p in sorted(out.glob("index.part*of*.json")):
        m = _PART_INDEX_RE.match(p.name)
        if m:
            parts[int(m.group(1))] = check_index(json.loads(p.read_text()), str(p))
            ns.add(int(m.group(2)))
    if not parts:
        raise FileNotFoundError(f"{out}: no index.part*of*.json to merge")
    if len(ns) != 1:
        raise ValueError(f"{out}: part indexes disagree on the number of parts: {sorted(ns)}")
    n = ns.pop()
    missing = [f"index.part{i}of{n}.json" for i in range(n) if i not in parts]
    if missing:
        raise ValueError(f"{out}: missing part indexes {missing}; build them with --part I/{n}")
    docs = [parts[i] for i in range(n)]
    for key in ("modality", "schema_version"):
        if len({d[key] for d in docs}) != 1:
            raise ValueError(f"{out}: parts disagree on {key}: {[d[key] for d in docs]}")
    shas = {d["build"]["manifest"]["sha256"] for d in docs}
    if len(shas) != 1:
        raise ValueError(f"{out}: parts were built from different manifests (sha256 {sorted(shas)})")
    infos = [ShardInfo.from_dict(sh) for d in docs for sh in d["shards"]]
    seen: dict[str, str] = {}
    for sh in infos:
        for key in shard_keys(out / sh.name):
            if key in seen:
                raise ValueError(f"{out}: sample key {key!r} is in both {seen[key]} and {sh.name}")
            seen[key] = sh.name
    expected = docs[0]["build"]["manifest"]["valid_rows"]
    dropped = sum(d["build"]["num_dropped"] for d in docs)
    in_parts = sum(d["build"]["num_rows_in_build"] for d in docs)
    if len(seen) != sum(sh.count for sh in infos):
        raise ValueError(f"{out}: shards hold {sum(sh.count for sh in infos)} samples but {len(seen)} distinct keys")
    if in_parts != expected or len(seen) + dropped != expected:
        raise ValueError(f"{out}: parts cover {in_parts} rows and hold {len(seen)} samples + {dropped} dropped, "
                         f"but the manifest has {expected} valid rows: some sample is missing")
    errs = [t for i in range(n) if (t := out / f"build_errors.part{i}of{n}.txt").exists()]
    if errs:
        (out / "build_errors.txt").write_text("".join(t.read_text(encoding="utf-8") for t in errs), encoding="utf-8")
    build = {"merged_parts": n, "manifest": docs[0]["build"]["manifest"], "num_dropped": dropped,
             "part_commands": [d.get("command") for d in docs]}
    labels = sorted({lab for d in docs for lab in d["label_names"]})
    organs = {json.dumps(d["organ_names"]) for d in docs if "organ_names" in d}
    if len(organs) > 1:
        raise ValueError(f"{out}: parts number organs differently ({sorted(organs)}); rebuild them with --organs")
    top = {"organ_names": json.loads(organs.pop())} if organs else {}
    return write_index(out, infos, docs[0]["modality"], labels, command=f"merge of {n} parts",
                       extra={**top, "build": build}, labels=docs[0].get("labels"))

