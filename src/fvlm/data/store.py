"""The processed data format written by ``fvlm preprocess`` and read by training, evaluation and prediction.

Layout (see docs/architecture.md)::

    OUT/{split}/{volume}/image.b2nd  int16 (D, H, W) HU, clipped to data.hu_window, padded with the window low
    OUT/{split}/{volume}/mask.b2nd   uint8 (D, H, W) 0 = background, k + 1 = anatomy k of the anatomy table
    OUT/{split}/{volume}/meta.json   geometry, per-anatomy voxels and bounding boxes, provenance, storage
    OUT/manifest.csv                 one row per volume (all splits): split, volume, scan, status, ...
    OUT/failures.csv                 split, volume, error (failed volumes only)
    OUT/preprocess_config.json       the data config + anatomy table the store was made with

A volume directory is written under a temporary name and renamed when complete, so a directory that
exists is complete unless the disk was damaged afterwards (:func:`is_complete` checks).

Arrays (format 2) are blosc2 NDArray files (``.b2nd``, a contiguous blosc2 frame): chunks of
:data:`CHUNK_SLICES` full axial slices, each split into one-slice blocks, LZ4-compressed (byte shuffle
for the image, no filter for the mask). Opened memory-mapped, a training crop decompresses only the
chunks its z range touches, in the calling thread. About 0.5 bytes per voxel on the synthetic phantoms
and 1.15 on real CT texture (image + mask), against 3 for the uncompressed format 1 and 1.3-2.5 for the
released float32 ``.nii.gz``; LZ4 was chosen over zstd because it decodes about twice as fast for 15-35 %
more bytes (benchmarks/README.md, loader section). Format 1 stores (plain ``image.npy`` / ``mask.npy``
opened as ``np.memmap``) are still read.

``meta.json`` keys (all lengths in mm, arrays ``(D, H, W)`` = ``(z, y, x)``, vectors ``(x, y, z)``)::

    format (1 = .npy, 2 = .b2nd), split, volume, scan, shape [D, H, W], image_dtype, mask_dtype,
    storage {container: "blosc2-ndarray", image|mask: {file, codec, clevel, filters, chunks, blocks, sha256}}
            (format 2; sha256 of the file as written, checked by ``fvlm preprocess --verify``),
    spacing [x, y, z], origin [x, y, z] (LPS mm of voxel (0, 0, 0)), direction (9, row-major), orientation "LPS",
    hu_window [low, high], pad_value, anatomy_table, crop_size,
    anatomies {name: {"voxels": int, "bbox": [z0, z1, y0, y1, x0, x1] (end-exclusive) or null}} in table order,
    source {image, label, version (v1|v2|hu), version_reason (auto|forced|pairs), evidence, rescale [slope, intercept],
            shape, spacing, origin, direction (of the input), voxels (per anatomy, input grid),
            crop [z0, z1, y0, y1, x0, x1] (input voxels, LPS-reoriented), pad [[before, after] x 3]},
    seconds (wall time of the pass for this volume)

The API here is deliberately small: :func:`open_volume`, :func:`read_meta`, :func:`list_volumes`,
:func:`read_manifest`, :func:`window`, :func:`is_complete`, :func:`write_volume`.

One module, although about 600 lines: it is the one definition of the on-disk format (names, layout, how a
directory is written atomically and checked, which directories may be deleted, how failure records and the
manifest are kept), and its readers and writers must change together. The array container (blosc2 ``.b2nd``
files) is :mod:`fvlm.data.b2nd`.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fvlm.data.b2nd import CODECS, CompressedArray, write_b2nd
from fvlm.data.jobs import FAILURE_FIELDS, write_failures
from fvlm.io import atomic_write_text, file_sha256
from fvlm.paths import safe_component

try:
    import fcntl
except ImportError:  # pragma: no cover - non-POSIX: manifest rebuilds are not locked
    fcntl = None

log = logging.getLogger(__name__)

#: version written by :func:`write_volume` (meta.json ``format``); 1 = uncompressed .npy (read only), 2 = .b2nd
FORMAT_VERSION = 2
IMAGE = "image.b2nd"
MASK = "mask.b2nd"
#: array files of format 1 (still read)
IMAGE_V1 = "image.npy"
MASK_V1 = "mask.npy"
META = "meta.json"
MANIFEST = "manifest.csv"
FAILURES = "failures.csv"
CONFIG = "preprocess_config.json"
#: directories of OUT that are not splits
SIDE_DIRS = frozenset({"texts", "labels", "reports"})
#: data-config keys that determine the stored arrays: a store made with other values must not be mixed
STORE_KEYS = ("anatomy_table", "spacing", "hu_window", "margin", "crop_size")
TMP_PREFIX = ".tmp."
TRASH_PREFIX = ".trash."
FAILED_DIR = ".failed"


@dataclass(frozen=True)
class Geometry:
    """Physical placement of a ``(z, y, x)`` voxel array, in SimpleITK/DICOM (LPS) conventions.

    spacing: (x, y, z) mm; origin: LPS mm of voxel (0, 0, 0); direction: 3 x 3 row-major, column ``a`` is
    the LPS unit vector along array index axis ``a`` (x, y, z).
    """

    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)

    @property
    def matrix(self) -> np.ndarray:
        """Direction as a float64 3 x 3 array (columns = index axes x, y, z)."""
        return np.asarray(self.direction, dtype=np.float64).reshape(3, 3)

    def to_dict(self) -> dict[str, list[float]]:
        return {"spacing": [float(s) for s in self.spacing], "origin": [float(o) for o in self.origin],
                "direction": [float(d) for d in self.direction]}


#: what ``ProcessedVolume.image`` / ``.mask`` can be: lazily decompressed (format 2), memory-mapped (format 1)
#: or in memory (``open_volume(..., mmap=False)``)
ArrayLike = CompressedArray | np.ndarray


@dataclass
class ProcessedVolume:
    """One stored volume: ``image`` int16 (D, H, W) HU, ``mask`` uint8 (D, H, W), ``meta`` dict.

    ``image`` / ``mask`` are :class:`CompressedArray` (format 2) or ``np.memmap`` (format 1) when opened
    lazily, ``np.ndarray`` otherwise; all index like numpy and return arrays.
    """

    path: Path
    image: ArrayLike
    mask: ArrayLike
    meta: dict[str, Any]

    @property
    def name(self) -> str:
        return self.meta["volume"]

    def crop(self, start: tuple[int, int, int], size: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
        """Copy of the window ``[start, start + size)`` (must lie inside): (int16 HU, uint8 mask), (D, H, W).

        Only the chunks (format 2) or pages (format 1) of that window are read from disk.
        """
        sl = tuple(slice(s, s + n) for s, n in zip(start, size, strict=True))
        for s, n, dim in zip(start, size, self.image.shape, strict=True):
            if s < 0 or s + n > dim:
                raise ValueError(f"{self.path}: crop start={start} size={size} outside shape {self.image.shape}")
        return _own(self.image, sl), _own(self.mask, sl)


def _own(array: ArrayLike, sl: tuple[slice, ...]) -> np.ndarray:
    """``array[sl]`` as an array that owns its memory (a decompressed selection already does: no second copy)."""
    out = array[sl]
    return out if isinstance(array, CompressedArray) else np.array(out)


# ------------------------------------------------------------------------------------------------ reading
def volume_dir(out: str | Path, split: str, volume: str) -> Path:
    """``OUT/{split}/{volume}``; ``ValueError`` unless split and volume are single safe names (never outside OUT)."""
    return Path(out) / safe_component(split, "split") / safe_component(volume, "volume name")


def window(hu: np.ndarray, hu_window: tuple[float, float]) -> np.ndarray:
    """HU (any dtype) -> float32 in [0, 1]: ``(clip(hu, low, high) - low) / (high - low)``, same shape."""
    low, high = float(hu_window[0]), float(hu_window[1])
    # the cast to float32 is fused into the subtraction: one pass fewer over the crop than astype + subtract
    out = np.subtract(hu, np.float32(low), dtype=np.float32)
    out *= np.float32(1.0 / (high - low))
    return np.clip(out, 0.0, 1.0, out=out)


def read_meta(out: str | Path, split: str, volume: str) -> dict[str, Any]:
    """The parsed ``meta.json`` of one volume (raises ``FileNotFoundError`` naming the file)."""
    path = volume_dir(out, split, volume) / META
    with open(path) as f:
        return json.load(f)


def _format(meta: dict[str, Any], d: Path) -> int:
    fmt = meta.get("format", 1)
    if fmt not in (1, 2):
        raise ValueError(f"{d}: meta.json format {fmt!r} is not one this fvlm reads (1 or 2); upgrade fvlm or "
                         "re-run fvlm preprocess")
    return int(fmt)


def array_files(meta: dict[str, Any], d: str | Path = "") -> tuple[str, str]:
    """(image file, mask file) names of a volume directory, by its meta.json ``format``."""
    return (IMAGE_V1, MASK_V1) if _format(meta, Path(d)) == 1 else (IMAGE, MASK)


def open_volume(out: str | Path, split: str, volume: str, mmap: bool = True) -> ProcessedVolume:
    """Open a stored volume.

    With ``mmap=True`` the arrays are read lazily (format 2: :class:`CompressedArray`; format 1: read-only
    ``np.memmap``): indexing reads only what the selection needs. ``mmap=False`` decompresses / loads both
    arrays into memory (``np.ndarray``).
    """
    d = volume_dir(out, split, volume)
    meta = read_meta(out, split, volume)
    image_file, mask_file = array_files(meta, d)
    if image_file == IMAGE:
        image: ArrayLike = CompressedArray(d / image_file)
        mask: ArrayLike = CompressedArray(d / mask_file)
        if not mmap:
            image, mask = image[...], mask[...]
    else:
        mode = "r" if mmap else None
        image = np.load(d / image_file, mmap_mode=mode, allow_pickle=False)
        mask = np.load(d / mask_file, mmap_mode=mode, allow_pickle=False)
    if image.shape != mask.shape or list(image.shape) != list(meta["shape"]):
        raise ValueError(f"{d}: image {image.shape}, mask {mask.shape} and meta.json shape {meta['shape']} differ")
    return ProcessedVolume(d, image, mask, meta)


def _npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, data offset) of an .npy file, reading only its header."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        if fortran:
            raise ValueError(f"{path}: Fortran-ordered array (expected C order)")
        return tuple(shape), dtype, f.tell()


def _check_npy(p: Path, shape: tuple[int, ...], dtype: np.dtype) -> str | None:
    got_shape, got_dtype, offset = _npy_header(p)
    if got_shape != shape:
        return f"{p.name} shape {got_shape} != meta shape {shape}"
    if got_dtype != dtype:
        return f"{p.name} dtype {got_dtype} != meta {dtype}"
    want = offset + int(np.prod(shape)) * got_dtype.itemsize
    size = p.stat().st_size
    if size != want:
        return f"{p.name} has {size} bytes, expected {want}"
    return None


def _check_b2nd(p: Path, shape: tuple[int, ...], dtype: np.dtype) -> str | None:
    if not p.is_file():
        raise FileNotFoundError(f"{p} not found")
    # the frame's trailer (chunk index, metalayers) sits at its end: a truncated file does not open
    arr = CompressedArray(p)
    if arr.shape != shape:
        return f"{p.name} shape {arr.shape} != meta shape {shape}"
    if arr.dtype != dtype:
        return f"{p.name} dtype {arr.dtype} != meta {dtype}"
    return None


def check_volume_dir(d: str | Path, verify: bool = False) -> str | None:
    """Why the volume directory ``d`` is not complete and valid, or ``None`` when it is.

    Checks that meta.json parses and that both array files' headers match its shape and dtypes, without
    reading the data: a ``.b2nd`` file must open (its trailer, at the end of the file, is intact), an
    ``.npy`` file (format 1) must hold all its bytes. ``verify=True`` also compares each array file's sha256
    with the one written at creation (``storage.{image,mask}.sha256`` in meta.json): damage in the middle of
    a file, which the header checks cannot see, is found (volumes written before hashes existed pass).
    """
    d = Path(d)
    try:
        with open(d / META) as f:
            meta = json.load(f)
        shape = tuple(int(s) for s in meta["shape"])
        files = array_files(meta, d)
        check = _check_npy if files[0] == IMAGE_V1 else _check_b2nd
        for name, key in zip(files, ("image_dtype", "mask_dtype"), strict=True):
            why = check(d / name, shape, np.dtype(meta[key]))
            if why is not None:
                return why
        if verify:
            storage = meta.get("storage") or {}
            for name, key in zip(files, ("image", "mask"), strict=True):
                expected = (storage.get(key) or {}).get("sha256")
                if expected and file_sha256(d / name) != expected:
                    return f"{name}: content hash differs from the one written at creation (damaged file)"
    except (OSError, ValueError, KeyError, TypeError) as e:  # json.JSONDecodeError is a ValueError
        return f"{type(e).__name__}: {e}"
    return None


def is_complete(out: str | Path, split: str, volume: str, verify: bool = False) -> bool:
    """True when the volume's directory exists and passes :func:`check_volume_dir` (``verify``: content hashes)."""
    d = volume_dir(out, split, volume)
    return d.is_dir() and check_volume_dir(d, verify=verify) is None


def splits(out: str | Path) -> list[str]:
    """Split directories present in ``out`` (sorted)."""
    out = Path(out)
    if not out.is_dir():
        return []
    return sorted(p.name for p in out.iterdir()
                  if p.is_dir() and not p.name.startswith(".") and p.name not in SIDE_DIRS)


def list_volumes(out: str | Path, split: str, check: bool = False) -> list[str]:
    """Sorted names of the stored volumes of ``split`` (directories with a meta.json).

    Directories appear only complete (atomic rename); ``check=True`` also validates every one with
    :func:`check_volume_dir` (reads three small headers per volume) and drops damaged ones.
    """
    d = Path(out) / safe_component(split, "split")
    if not d.is_dir():
        return []
    names = []
    with os.scandir(d) as it:
        for e in it:
            if e.is_dir() and not e.name.startswith(".") and os.path.exists(os.path.join(e.path, META)):
                if check and check_volume_dir(e.path) is not None:
                    continue
                names.append(e.name)
    return sorted(names)


def read_manifest(out: str | Path):
    """``OUT/manifest.csv`` as a pandas DataFrame (one row per volume; ``status`` is ``ok`` or ``failed``).

    Columns: split, volume, scan, status, shape ("DxHxW"), spacing ("x,y,z" mm), version,
    ``voxels_{anatomy}`` per anatomy, seconds, error.
    """
    import pandas as pd  # here: 0.5 s to import (measured), needed by no other reader of a store (DataLoader workers)

    path = Path(out) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run fvlm preprocess first")
    return pd.read_csv(path, keep_default_na=False, dtype={"split": str, "volume": str, "scan": str,
                                                            "status": str, "error": str})


def read_store_config(out: str | Path) -> dict[str, Any] | None:
    """``OUT/preprocess_config.json`` (``{"data": ..., "anatomy_table": ...}``) or ``None`` if absent."""
    path = Path(out) / CONFIG
    if not path.exists():
        return None
    with open(path) as f:
        return json.load(f)


def config_mismatch(stored: dict[str, Any], data: dict[str, Any], table: dict[str, Any] | None = None) -> list[str]:
    """The differences between a store's ``preprocess_config.json`` and a data config that matter.

    Only the keys that shape the stored arrays (:data:`STORE_KEYS`) and the anatomy groups are compared;
    sampling options (flip probability, crop sizes at evaluation) may differ. Returns readable lines.
    """
    diffs = []
    sd = stored.get("data", {})
    for k in STORE_KEYS:
        if k == "anatomy_table" and table is not None:
            continue  # compared by content below: a renamed copy of the same table is fine
        a, b = sd.get(k), data.get(k)
        if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
            same = len(a) == len(b) and all(float(x) == float(y) for x, y in zip(a, b, strict=True))
        else:
            same = a == b
        if not same:
            diffs.append(f"data.{k}: store has {a!r}, requested {b!r}")
    # margin after the anatomies' box: empty means data.margin (stores written before the key existed lack it)
    after_a = list(sd.get("margin_after") or sd.get("margin") or [])
    after_b = list(data.get("margin_after") or data.get("margin") or [])
    if [float(x) for x in after_a] != [float(x) for x in after_b]:
        diffs.append(f"data.margin_after: store has {after_a!r}, requested {after_b!r}")
    if table is not None:
        groups_a = [(a["name"], sorted(a["classes"])) for a in stored.get("anatomy_table", {}).get("anatomies", [])]
        groups_b = [(a["name"], sorted(a["classes"])) for a in table.get("anatomies", [])]
        if groups_a != groups_b:
            diffs.append(f"anatomy groups: store has {[g[0] for g in groups_a]}, requested {[g[0] for g in groups_b]}"
                         + (" (same names, different classes)" if [g[0] for g in groups_a] == [g[0] for g in groups_b]
                            else ""))
    return diffs


# ------------------------------------------------------------------------------------------------ writing
@contextlib.contextmanager
def _temp_volume_dir(out: Path, split: str, volume: str) -> Iterator[Path]:
    parent = volume_dir(out, split, volume).parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = parent / f"{TMP_PREFIX}{volume}.{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_volume(out: str | Path, split: str, volume: str, image: np.ndarray, mask: np.ndarray,
                 meta: dict[str, Any], *, codecs: dict[str, dict[str, Any]] | None = None,
                 chunks: tuple[int, int, int] | None = None) -> Path:
    """Write one volume atomically (format :data:`FORMAT_VERSION`): a temporary directory renamed onto
    ``OUT/{split}/{volume}``.

    A previous (e.g. damaged, or format 1) directory of the same name is replaced. ``meta`` gets ``format``,
    ``shape``, the dtypes and ``storage`` filled in. ``codecs`` (default :data:`CODECS`: ``{"image"|"mask":
    {"codec": blosc2 codec name, "clevel": 0-9, "filters": [blosc2 filter names]}}``) and ``chunks`` (default:
    :data:`CHUNK_SLICES` full slices) change only how the arrays are compressed, never what they hold
    (readers need not know; the benchmark compares variants this way). Returns the final directory.
    """
    if image.dtype != np.int16 or mask.dtype != np.uint8:
        raise TypeError(f"{volume}: expected int16 image and uint8 mask, got {image.dtype} and {mask.dtype}")
    if image.shape != mask.shape or image.ndim != 3:
        raise ValueError(f"{volume}: image {image.shape} and mask {mask.shape} must be equal (D, H, W) shapes")
    if 0 in image.shape:
        raise ValueError(f"{volume}: empty volume {image.shape}")
    codecs = {**CODECS, **(codecs or {})}
    out = Path(out)
    final = volume_dir(out, split, volume)
    with _temp_volume_dir(out, split, volume) as tmp:
        storage = {"container": "blosc2-ndarray", "image": write_b2nd(tmp / IMAGE, image, codecs["image"], chunks),
                   "mask": write_b2nd(tmp / MASK, mask, codecs["mask"], chunks)}
        for key, name in (("image", IMAGE), ("mask", MASK)):  # checked by check_volume_dir(verify=True)
            storage[key]["sha256"] = file_sha256(tmp / name)
        meta = {**meta, "format": FORMAT_VERSION, "shape": [int(s) for s in image.shape], "image_dtype": "int16",
                "mask_dtype": "uint8", "storage": storage}
        (tmp / META).write_text(json.dumps(meta, indent=1) + "\n")
        if final.exists() or final.is_symlink():
            _check_ours(final)
            # rename the old directory aside first: os.replace cannot overwrite a non-empty directory
            trash = final.parent / f"{TRASH_PREFIX}{volume}.{uuid.uuid4().hex[:8]}"
            os.replace(final, trash)
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(tmp, final)
    return final


def remove_volume(out: str | Path, split: str, volume: str) -> None:
    """Delete a (damaged) volume directory, renaming it aside first so no half-deleted directory remains."""
    final = volume_dir(out, split, volume)
    if final.exists() or final.is_symlink():
        _check_ours(final)
        trash = final.parent / f"{TRASH_PREFIX}{volume}.{uuid.uuid4().hex[:8]}"
        os.replace(final, trash)
        shutil.rmtree(trash, ignore_errors=True)


#: the only entries a volume directory written by :func:`write_volume` (any format) holds
_VOLUME_FILES = frozenset({IMAGE, MASK, IMAGE_V1, MASK_V1, META})


def _check_ours(d: Path) -> None:
    """``ValueError`` unless ``d`` looks like a volume directory this module wrote (a real directory holding
    only array files and meta.json): nothing else is ever deleted or replaced."""
    if d.is_symlink() or not d.is_dir():
        raise ValueError(f"{d} is not a volume directory written by fvlm preprocess (a link or a file): "
                         f"refusing to delete or replace it")
    foreign = sorted(p.name for p in d.iterdir() if p.name not in _VOLUME_FILES)
    if foreign:
        raise ValueError(f"{d} holds files fvlm preprocess does not write ({', '.join(foreign[:5])}): refusing to "
                         f"delete or replace it; move it away or use another --out")


def clean_temporaries(out: str | Path, split: str, volumes: set[str] | None = None) -> int:
    """Remove leftover temporary/trash directories of a killed run; returns how many were removed.

    ``volumes`` restricts the clean-up to those volumes (a shard cleans only its own, so it never removes
    a directory another shard of the same OUT is writing right now).
    """
    d = Path(out) / safe_component(split, "split")
    if not d.is_dir():
        return 0
    n = 0
    for p in d.iterdir():
        for prefix in (TMP_PREFIX, TRASH_PREFIX):
            if p.name.startswith(prefix):
                vol = p.name[len(prefix):].rsplit(".", 1)[0]
                if volumes is None or vol in volumes:
                    shutil.rmtree(p, ignore_errors=True)
                    n += 1
    return n


# ------------------------------------------------------------------------------------------------ failures
def failure_path(out: str | Path, split: str, volume: str) -> Path:
    return Path(out) / FAILED_DIR / safe_component(split, "split") / f"{safe_component(volume, 'volume name')}.json"


def write_failure(out: str | Path, split: str, volume: str, record: dict[str, Any]) -> None:
    """Record that a volume failed (one small JSON file per volume, so shards never clobber each other)."""
    atomic_write_text(failure_path(out, split, volume), json.dumps({"split": split, "volume": volume, **record}) + "\n")


def clear_failure(out: str | Path, split: str, volume: str) -> None:
    failure_path(out, split, volume).unlink(missing_ok=True)


def read_failures(out: str | Path) -> list[dict[str, Any]]:
    """All per-volume failure records of ``out`` whose volume has no stored directory, sorted."""
    root = Path(out) / FAILED_DIR
    records = []
    if root.is_dir():
        for p in sorted(root.glob("*/*.json")):
            try:
                with open(p) as f:
                    rec = json.load(f)
            except (OSError, ValueError) as e:
                log.warning("unreadable failure record %s: %s", p, e)
                continue
            if p.parent.name == REJECTED_DIR:  # an input row refused before any work (names may be unsafe)
                records.append(rec)
            elif not (Path(out) / rec["split"] / rec["volume"] / META).exists():
                records.append(rec)
    return records


#: failure records of input rows refused before any work (e.g. a split or volume name that is not a safe path
#: component), under ``OUT/.failed/.rows/``: named by source file and line, never by the refused names
REJECTED_DIR = ".rows"


def write_rejected_rows(out: str | Path, records: list[dict[str, Any]]) -> None:
    """Replace the refused-row failure records of ``out`` with ``records`` (dicts with split, volume, error,
    ``key``: a unique, safe file stem such as ``pairs-line3``)."""
    d = Path(out) / FAILED_DIR / REJECTED_DIR
    if d.is_dir():
        for old in d.glob("*.json"):  # only the records this function wrote
            old.unlink(missing_ok=True)
    for rec in records:
        key = re.sub(r"[^A-Za-z0-9_.-]", "_", str(rec["key"]))
        atomic_write_text(d / f"{key}.json", json.dumps({k: v for k, v in rec.items() if k != "key"}) + "\n")


# ------------------------------------------------------------------------------------------------ manifest
def _manifest_rows(out: Path, anatomies: list[str]) -> list[dict[str, Any]]:
    rows = []
    for split in splits(out):
        for volume in list_volumes(out, split):
            try:
                meta = read_meta(out, split, volume)
            except (OSError, ValueError) as e:
                rows.append({"split": split, "volume": volume, "scan": "", "status": "failed",
                             "error": f"unreadable meta.json: {e}"})
                continue
            row = {"split": split, "volume": volume, "scan": meta.get("scan", ""), "status": "ok",
                   "shape": "x".join(str(s) for s in meta["shape"]),
                   "spacing": ",".join(f"{s:g}" for s in meta["spacing"]),
                   "version": meta.get("source", {}).get("version", ""),
                   "seconds": f"{meta.get('seconds', 0.0):.3f}", "error": ""}
            for name in anatomies:
                row[f"voxels_{name}"] = meta.get("anatomies", {}).get(name, {}).get("voxels", 0)
            rows.append(row)
    for rec in read_failures(out):
        rows.append({"split": rec["split"], "volume": rec["volume"], "scan": rec.get("scan", ""), "status": "failed",
                     "version": rec.get("version", ""), "seconds": f"{rec.get('seconds', 0.0):.3f}",
                     "error": rec.get("error", "")})
    rows.sort(key=lambda r: (r["split"], _natural(r["volume"])))
    return rows


def _natural(name: str) -> list:
    """Natural sort key: ``valid_2_a_1`` before ``valid_10_a_1``."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", name)]


def _write_csv(path: Path, fields: list[str], rows: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: r.get(k, "") for k in fields})
    atomic_write_text(path, buf.getvalue())


def rebuild_manifest(out: str | Path, anatomies: list[str]) -> tuple[int, int]:
    """Rewrite ``manifest.csv`` and ``failures.csv`` from the meta.json files and failure records on disk.

    Everything is re-read from disk under a lock file, so shards of one OUT that finish at different
    times each leave a manifest that holds every volume finished so far. Returns (ok, failed) counts.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with _lock(out / ".manifest.lock"):
        rows = _manifest_rows(out, anatomies)
        fields = ["split", "volume", "scan", "status", "shape", "spacing", "version",
                  *(f"voxels_{a}" for a in anatomies), "seconds", "error"]
        _write_csv(out / MANIFEST, fields, rows)
        failed = [r for r in rows if r["status"] == "failed"]
        write_failures(out / FAILURES, [[r.get(k, "") for k in FAILURE_FIELDS] for r in failed])
    return len(rows) - len(failed), len(failed)


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock (fcntl) on ``path``; a no-op where fcntl is unavailable."""
    if fcntl is None:  # pragma: no cover - non-POSIX
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
