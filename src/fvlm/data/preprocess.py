"""``fvlm preprocess``: one fused pass per volume, from CT-RATE files (or NIfTI pairs) to the processed store.

Per volume, in memory, with no intermediate files::

    read (.nii.gz, CRC-checked) -> v1 fix / v2 as is (detected per volume) -> check the label map
    -> reorient to LPS -> merge TotalSegmentator classes into anatomies -> crop the anatomies' bounding box
    plus margin FIRST -> resample to data.spacing (trilinear image, nearest mask) -> crop bbox + margin in the
    target grid -> window (clip to data.hu_window) -> pad to >= data.crop_size -> store (atomic)

The released pipeline ran these as separate stages with a .nii.gz written between each and resampled
whole volumes; cropping before resampling and never writing intermediates is where the speed comes from
(benchmarks/preprocess.py). :func:`prepare_arrays` is the in-memory core, reused by single-scan prediction.

Batch behaviour: volumes that fail (corrupt file, missing metadata, label map mismatch, ...) get one line
in ``OUT/failures.csv`` and no output directory; the others are processed; the exit code is non-zero.
A rerun skips exactly the volumes whose outputs are complete. ``--shard i/N`` and ``--workers K`` split
the work across jobs and processes.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fvlm.anatomy import AnatomyTable, load_anatomy_table
from fvlm.config import DataConfig, load_config
from fvlm.data import ctrate, store
from fvlm.data.store import Geometry
from fvlm.io import atomic_path, atomic_write_text
from fvlm.paths import safe_component
from fvlm.totalseg import MAX_CLASS_ID

try:  # ISA-L inflates gzip about 2x faster than zlib: reading dominates the pass
    from isal import isal_zlib as _zlib
except ImportError:  # pragma: no cover - optional speed-up
    import zlib as _zlib

log = logging.getLogger(__name__)

LPS = np.eye(3)
_GZIP_MAGIC = b"\x1f\x8b"


# ----------------------------------------------------------------------------------------------- reading
@dataclass
class SourceVolume:
    """A voxel array ``(z, y, x)`` with its geometry (LPS; see :class:`fvlm.data.store.Geometry`)."""

    array: np.ndarray
    geometry: Geometry

    @property
    def shape_xyz(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape[::-1])  # type: ignore[return-value]


def _inflate(data: bytes, path: Path) -> bytes:
    """Decompress every gzip member, verifying CRC and length (a truncated file raises)."""
    parts = []
    while True:
        d = _zlib.decompressobj(wbits=31)
        try:
            parts.append(d.decompress(data))
        except Exception as e:  # zlib.error / isal IsalError: both plain Exception subclasses
            raise ValueError(f"corrupt .nii.gz {path}: {e}") from None
        if not d.eof:
            raise ValueError(f"corrupt or truncated .nii.gz {path}: compressed stream ends early")
        data = d.unused_data
        if not data or data.strip(b"\x00") == b"":
            break
    return parts[0] if len(parts) == 1 else b"".join(parts)


def read_nifti(path: str | Path) -> SourceVolume:
    """Read a 3D NIfTI (.nii or .nii.gz) -> array ``(z, y, x)`` as stored + LPS geometry.

    The array is the voxel data as stored (with the header's scl_slope/scl_inter applied when they are
    set), transposed to ``(z, y, x)`` without a copy; the geometry is the header's best affine (sform,
    else qform) converted from RAS to LPS, as SimpleITK reports it. Unlike SimpleITK, a truncated or
    corrupt .nii.gz raises ``ValueError`` (SimpleITK silently returns a partly filled array).
    """
    import nibabel as nib

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found")
    raw = path.read_bytes()
    if raw[:2] == _GZIP_MAGIC:
        raw = _inflate(raw, path)
    if len(raw) < 348:
        raise ValueError(f"{path}: {len(raw)} bytes is too short for a NIfTI header")
    sizeof_hdr = int.from_bytes(raw[:4], "little")
    if sizeof_hdr not in (348, 540):
        sizeof_hdr = int.from_bytes(raw[:4], "big")
    header_cls = nib.Nifti2Header if sizeof_hdr == 540 else nib.Nifti1Header
    try:
        hdr = header_cls.from_fileobj(io.BytesIO(raw), check=False)
        shape = tuple(int(s) for s in hdr.get_data_shape())
        dtype = hdr.get_data_dtype()
        offset = int(hdr["vox_offset"])
        affine = hdr.get_best_affine()
        slope, inter = hdr.get_slope_inter()
    except Exception as e:  # nibabel raises assorted types (HeaderDataError, ValueError) for bad headers
        raise ValueError(f"{path}: not a readable NIfTI header ({type(e).__name__}: {e})") from None
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) != 3:
        raise ValueError(f"{path}: expected a 3D volume, got shape {shape}")
    count = int(np.prod(shape))
    if len(raw) < offset + count * dtype.itemsize:
        raise ValueError(f"{path}: truncated: {len(raw) - offset} data bytes for {shape} {dtype}")
    arr = np.frombuffer(raw, dtype=dtype, count=count, offset=offset).reshape(shape[::-1])
    if not dtype.isnative:
        arr = arr.astype(dtype.newbyteorder("="))
    if slope is not None and np.isfinite(slope) and slope != 0 and (slope != 1 or (inter or 0) != 0):
        arr = arr.astype(np.float32) * np.float32(slope) + np.float32(inter or 0.0)
    return SourceVolume(arr, geometry_from_affine(affine))


def geometry_from_affine(affine: np.ndarray) -> Geometry:
    """NIfTI (RAS) 4 x 4 affine -> LPS :class:`Geometry` (the SimpleITK view of the same file)."""
    a = np.diag([-1.0, -1.0, 1.0]) @ np.asarray(affine, dtype=np.float64)[:3]
    spacing = np.linalg.norm(a[:, :3], axis=0)
    if np.any(spacing <= 0) or not np.all(np.isfinite(a)):
        raise ValueError(f"degenerate affine {np.asarray(affine).tolist()}")
    direction = a[:, :3] / spacing
    return Geometry(tuple(float(s) for s in spacing), tuple(float(o) + 0.0 for o in a[:, 3]),
                    tuple(float(d) + 0.0 for d in direction.ravel()))


def from_sitk(image: Any) -> SourceVolume:
    """A SimpleITK image -> :class:`SourceVolume` (array copied, so it does not depend on the image's life)."""
    import SimpleITK as sitk

    return SourceVolume(sitk.GetArrayFromImage(image),
                        Geometry(tuple(image.GetSpacing()), tuple(image.GetOrigin()), tuple(image.GetDirection())))


# ----------------------------------------------------------------------------------------------- geometry
def check_finite(array: np.ndarray, what: str = "image") -> None:
    """``ValueError`` if a float array holds NaN or infinite voxels (integer arrays cannot)."""
    if array.dtype.kind == "f":
        n_bad = int(array.size - np.count_nonzero(np.isfinite(array)))
        if n_bad:
            n_nan = int(np.count_nonzero(np.isnan(array)))
            raise ValueError(f"{what} holds {n_nan} NaN and {n_bad - n_nan} infinite voxels")


def check_same_grid(image: SourceVolume, label: SourceVolume) -> None:
    """``ValueError`` unless image and label share shape and geometry (spacing 0.1 %, origin 1 % of a voxel)."""
    if image.array.shape != label.array.shape:
        raise ValueError(f"image/label shape mismatch: image (x, y, z) {image.shape_xyz}, label {label.shape_xyz}")
    gi, gl = image.geometry, label.geometry
    if not np.allclose(gi.spacing, gl.spacing, rtol=1e-3, atol=1e-5):
        raise ValueError(f"image/label spacing mismatch: image {_fmt(gi.spacing)} mm, label {_fmt(gl.spacing)} mm")
    tol = 0.01 * min(gi.spacing) + 1e-4
    if not np.allclose(gi.origin, gl.origin, atol=tol):
        raise ValueError(f"image/label origin mismatch: image {_fmt(gi.origin)} mm, label {_fmt(gl.origin)} mm")
    if not np.allclose(gi.matrix, gl.matrix, atol=1e-3):
        raise ValueError(f"image/label direction mismatch: image {_fmt(gi.direction)}, label {_fmt(gl.direction)}")


def _fmt(v: Sequence[float]) -> str:
    return "(" + ", ".join(f"{x:.4g}" for x in v) + ")"


def lps_reorientation(geometry: Geometry) -> tuple[tuple[int, int, int], tuple[bool, bool, bool]]:
    """How to make a volume's index axes run along L, P, S.

    Returns ``(source, flip)``: new index axis ``p`` (x, y, z) is source index axis ``source[p]``, reversed
    when ``flip[p]``. Oblique directions map to the closest axes (as SimpleITK's DICOMOrient does).
    """
    m = geometry.matrix
    source = [int(np.argmax(np.abs(m[p, :]))) for p in range(3)]
    if sorted(source) != [0, 1, 2]:
        # ambiguous 45-degree obliques: assign greedily by the largest remaining component
        source, used = [-1, -1, -1], set()
        for p, a in sorted(((p, a) for p in range(3) for a in range(3)), key=lambda pa: -abs(m[pa[0], pa[1]])):
            if source[p] < 0 and a not in used:
                source[p] = a
                used.add(a)
    flip = tuple(bool(m[p, source[p]] < 0) for p in range(3))
    return tuple(source), flip  # type: ignore[return-value]


def reorient_lps(vol: SourceVolume) -> SourceVolume:
    """The same volume with index axes along L, P, S (a view: transposes and flips only, no resampling)."""
    g = vol.geometry
    source, flip = lps_reorientation(g)
    if source == (0, 1, 2) and not any(flip):
        return vol
    m = g.matrix
    n_xyz = vol.shape_xyz
    arr = vol.array
    # numpy axis of index axis a (x=0, y=1, z=2) is 2 - a; new array order is (z, y, x) = p = 2, 1, 0
    arr = np.transpose(arr, [2 - source[p] for p in (2, 1, 0)])
    origin = np.asarray(g.origin, dtype=np.float64)
    new_m = np.zeros((3, 3))
    spacing = []
    for p in range(3):
        a = source[p]
        col = m[:, a]
        if flip[p]:
            origin = origin + col * g.spacing[a] * (n_xyz[a] - 1)
            col = -col
            arr = np.flip(arr, axis=2 - p)
        new_m[:, p] = col
        spacing.append(g.spacing[a])
    return SourceVolume(arr, Geometry(tuple(spacing), tuple(float(o) for o in origin),
                                      tuple(float(x) + 0.0 for x in new_m.ravel())))


def bounding_box(mask: np.ndarray) -> tuple[int, int, int, int, int, int] | None:
    """(z0, z1, y0, y1, x0, x1), end-exclusive, of the non-zero voxels of a (D, H, W) array; None if empty."""
    zs = np.flatnonzero(mask.any(axis=(1, 2)))
    if zs.size == 0:
        return None
    sub = mask[zs[0] : zs[-1] + 1]
    ys = np.flatnonzero(sub.any(axis=(0, 2)))
    xs = np.flatnonzero(sub.any(axis=(0, 1)))
    return int(zs[0]), int(zs[-1]) + 1, int(ys[0]), int(ys[-1]) + 1, int(xs[0]), int(xs[-1]) + 1


def count_values(mask: np.ndarray, n: int) -> np.ndarray:
    """Voxels with value 1..n of a uint8 array, int64 ``(n,)`` (one compare per value: much faster than
    ``np.bincount``, which first widens every voxel to intp, for the few anatomies of a table)."""
    if n > 16:
        return np.bincount(mask.ravel(), minlength=n + 1)[1 : n + 1].astype(np.int64)
    return np.array([np.count_nonzero(mask == k) for k in range(1, n + 1)], dtype=np.int64)


def class_union(label: np.ndarray, class_ids: Sequence[int]) -> np.ndarray:
    """bool (D, H, W): voxels whose uint8 class id is one of ``class_ids`` (runs of ids cost one compare)."""
    ids = sorted(set(int(i) for i in class_ids))
    runs, start = [], ids[0]
    for a, b in zip(ids, ids[1:] + [None], strict=True):
        if b != a + 1:
            runs.append((start, a))
            start = b
    out = None
    for lo, hi in runs:
        # uint8 wrap-around: (label - lo) <= hi - lo  <=>  lo <= label <= hi
        hit = label == lo if lo == hi else np.subtract(label, np.uint8(lo), dtype=np.uint8) <= np.uint8(hi - lo)
        out = hit if out is None else np.logical_or(out, hit, out=out)
    assert out is not None
    return out


def class_bounding_box(label: np.ndarray, class_ids: Sequence[int], chunk: int = 8
                       ) -> tuple[int, int, int, int, int, int] | None:
    """Bounding box (z0, z1, y0, y1, x0, x1), end-exclusive, of the voxels of ``class_ids`` in a uint8
    (D, H, W) label map; None if there are none. Works in slabs of ``chunk`` slices that stay in cache
    (2-3x faster than one pass per operation over the whole volume)."""
    d, h, w = label.shape
    zp, yp, xp = np.zeros(d, bool), np.zeros(h, bool), np.zeros(w, bool)
    for z in range(0, d, chunk):
        u = class_union(label[z : z + chunk], class_ids)
        zp[z : z + chunk] = u.any(axis=(1, 2))
        yp |= u.any(axis=(0, 2))
        xp |= u.any(axis=(0, 1))
    if not zp.any():
        return None
    (zs,), (ys,), (xs,) = np.nonzero(zp), np.nonzero(yp), np.nonzero(xp)
    return int(zs[0]), int(zs[-1]) + 1, int(ys[0]), int(ys[-1]) + 1, int(xs[0]), int(xs[-1]) + 1


def anatomy_boxes(mask: np.ndarray, names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """{anatomy: {"voxels": int, "bbox": [z0, z1, y0, y1, x0, x1] or None}} of a (D, H, W) anatomy mask."""
    counts = np.concatenate([[0], count_values(mask, len(names))])
    out = {}
    for k, name in enumerate(names):
        n = int(counts[k + 1])
        box = bounding_box(mask == k + 1) if n else None
        out[name] = {"voxels": n, "bbox": list(box) if box else None}
    return out


# ----------------------------------------------------------------------------------------------- the pass
def _resample(arr: np.ndarray, scale_zyx: tuple[float, float, float], mode: str) -> np.ndarray:
    """Resample a (D, H, W) array by ``scale`` with voxel-centre alignment (torch; float32 or uint8)."""
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.ascontiguousarray(arr))[None, None]
    out = F.interpolate(t, scale_factor=scale_zyx, mode=mode, recompute_scale_factor=False,
                        **({"align_corners": False} if mode == "trilinear" else {}))
    return out[0, 0].numpy()


def prepare_arrays(image: SourceVolume | Any, label: SourceVolume | Any, data_cfg: DataConfig, table: AnatomyTable,
                   slope: float = 1.0, intercept: float = 0.0) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """The in-memory pass: image + TotalSegmentator label map -> stored arrays.

    Args:
        image: CT as :class:`SourceVolume` or ``SimpleITK.Image``; values become HU = value * slope + intercept
            (the v1 fix; 1 and 0 for HU input). Geometry must already be the true one.
        label: TotalSegmentator v2 ``total`` label map on the same grid (ids 0..117).
        data_cfg: ``spacing`` (x, y, z) mm, ``margin`` (z, y, x) target voxels, ``hu_window``, ``crop_size``.
        table: the anatomy table whose groups are merged (mask value k + 1 = anatomy k).
    Returns:
        image int16 (D, H, W) HU clipped to the window and padded with its low end, mask uint8 (D, H, W),
        info dict (spacing, origin, direction, orientation, anatomies {name: {voxels, bbox}}, source {...}).
    Raises:
        ValueError naming the problem (NaN voxels, shape/geometry mismatch, unknown class ids, no anatomy).
    """
    if not isinstance(image, SourceVolume):
        image = from_sitk(image)
    if not isinstance(label, SourceVolume):
        label = from_sitk(label)
    check_finite(image.array)
    from fvlm.data.labelmap import align_label

    label = align_label(image, label)  # same grid in another axis order/direction: reordered; else refused
    lab = label.array
    if lab.dtype.kind == "f":
        check_finite(lab, "label map")
        if np.any(lab != np.round(lab)):
            raise ValueError("label map holds non-integer values")
    lo_id, hi_id = (int(lab.min()), int(lab.max())) if lab.size else (0, 0)
    if lo_id < 0 or hi_id > MAX_CLASS_ID:
        bad = np.unique(lab[(lab < 0) | (lab > MAX_CLASS_ID)])[:10]
        raise ValueError(f"label map holds unknown class ids {bad.astype(np.int64).tolist()} (TotalSegmentator v2 "
                         f"'total' ids are 0..{MAX_CLASS_ID})")
    if lab.dtype != np.uint8:
        lab = lab.astype(np.uint8)

    src_geometry = image.geometry
    image = reorient_lps(image)
    label = reorient_lps(SourceVolume(lab, label.geometry))
    g = image.geometry
    # the anatomies' bounding box straight from the class ids; merging (a table look-up) waits for the crop
    box = class_bounding_box(label.array, table.class_ids)
    if box is None:
        raise ValueError(f"no voxel of any configured anatomy ({', '.join(table.names)}; table {table.name!r}) "
                         f"in the label map")

    # crop FIRST: the anatomies' box plus the target-space margin (converted to source voxels) plus one voxel
    # of interpolation support, so only the needed region is resampled
    src_zyx = np.asarray(g.spacing[::-1], dtype=np.float64)
    tgt_zyx = np.asarray(data_cfg.spacing[::-1], dtype=np.float64)
    margin = np.asarray(data_cfg.margin, dtype=np.float64)
    src_margin = np.ceil(margin * tgt_zyx / src_zyx - 1e-6).astype(int) + 1
    shape = image.array.shape
    lo = [max(0, box[2 * a] - src_margin[a]) for a in range(3)]
    hi = [min(shape[a], box[2 * a + 1] + src_margin[a]) for a in range(3)]
    sl = tuple(slice(lo[a], hi[a]) for a in range(3))
    crop_img = image.array[sl].astype(np.float32)
    if slope != 1.0 or intercept != 0.0:
        crop_img *= np.float32(slope)
        crop_img += np.float32(intercept)
    crop_mask = np.take(table.lut, label.array[sl])  # merge: class id -> anatomy mask value
    src_counts = count_values(crop_mask, len(table))

    m = g.matrix
    origin = np.asarray(g.origin, dtype=np.float64) + m @ (np.asarray(lo[::-1], dtype=np.float64) * g.spacing)
    scale = tuple(float(s) for s in src_zyx / tgt_zyx)
    if any(abs(s - 1.0) > 1e-9 for s in scale):
        out_shape = [math.floor(n * s) for n, s in zip(crop_img.shape, scale, strict=True)]
        if min(out_shape) < 1:
            raise ValueError(f"anatomy region {crop_img.shape} (source voxels) is smaller than one target voxel")
        img_r = _resample(crop_img, scale, "trilinear")
        mask_r = _resample(crop_mask, scale, "nearest-exact")
        # voxel-centre alignment: target voxel i sits at source coordinate (i + 0.5) / scale - 0.5
        origin = origin + m @ (0.5 * (np.asarray(data_cfg.spacing) - np.asarray(g.spacing)))
    else:
        img_r, mask_r = crop_img, np.ascontiguousarray(crop_mask)
    del crop_img

    # crop to the box + margin in the target grid (the released semantics), clipped to the resampled region
    box_r = bounding_box(mask_r)
    if box_r is None:
        raise ValueError("every anatomy vanished when resampling to spacing "
                         f"{tuple(data_cfg.spacing)} mm (anatomies smaller than a target voxel)")
    t_lo = [max(0, box_r[2 * a] - int(data_cfg.margin[a])) for a in range(3)]
    # after the box: data.margin_after when set (the released slice [min - 5, max + 5) with max inclusive keeps
    # 4 / 19 voxels after the box: paper_released sets (4, 19, 19)), else data.margin
    after = data_cfg.margin_after or data_cfg.margin
    t_hi = [min(img_r.shape[a], box_r[2 * a + 1] + int(after[a])) for a in range(3)]
    tsl = tuple(slice(t_lo[a], t_hi[a]) for a in range(3))
    tgt = np.asarray(data_cfg.spacing, dtype=np.float64)
    origin = origin + m @ (np.asarray(t_lo[::-1], dtype=np.float64) * tgt)

    # window: round to integer HU and clip, stored as int16
    low, high = math.ceil(data_cfg.hu_window[0]), math.floor(data_cfg.hu_window[1])
    img = img_r[tsl]
    img = np.clip(np.rint(img), low, high).astype(np.int16)
    msk = mask_r[tsl]

    # pad (symmetric) to at least crop_size: image with the window low (0 after windowing), mask with 0
    need = [max(0, int(c) - n) for c, n in zip(data_cfg.crop_size, img.shape, strict=True)]
    pad = [(k // 2, k - k // 2) for k in need]
    if any(p for pp in pad for p in pp):
        img = np.pad(img, pad, mode="constant", constant_values=low)
        msk = np.pad(msk, pad, mode="constant", constant_values=0)
        origin = origin - m @ (np.asarray([p[0] for p in pad][::-1], dtype=np.float64) * tgt)
    msk = np.ascontiguousarray(msk, dtype=np.uint8)
    img = np.ascontiguousarray(img)

    anatomies = anatomy_boxes(msk, table.names)
    lost = [n for n, c in zip(table.names, src_counts, strict=True) if c > 0 and anatomies[n]["voxels"] == 0]
    if lost:
        log.warning("anatomies %s vanished when resampling (smaller than a target voxel)", lost)
    info = {
        "spacing": [float(s) for s in data_cfg.spacing],
        "origin": [float(o) for o in origin],
        "direction": [float(x) + 0.0 for x in m.ravel()],
        "orientation": "LPS",
        "hu_window": [float(data_cfg.hu_window[0]), float(data_cfg.hu_window[1])],
        "pad_value": int(low),
        "anatomy_table": table.name,
        "crop_size": [int(c) for c in data_cfg.crop_size],
        "anatomies": anatomies,
        "source": {
            "shape": [int(s) for s in image.array.shape],
            **{k: v for k, v in src_geometry.to_dict().items()},
            "voxels": {n: int(c) for n, c in zip(table.names, src_counts, strict=True)},
            "crop": [int(v) for a in range(3) for v in (lo[a], hi[a])],
            "pad": [[int(a), int(b)] for a, b in pad],
        },
    }
    return img, msk, info


# ----------------------------------------------------------------------------------------------- jobs
@dataclass
class VolumeJob:
    """One volume to process (picklable, sent to worker processes)."""

    split: str
    volume: str
    scan: str
    image: str
    label: str
    version: str = "auto"  # auto | v1 | v2 (CT-RATE), hu (--pairs: already HU, header trusted)
    metadata: ctrate.VolumeMetadata | None = None
    metadata_file: str = ""


@dataclass
class VolumeResult:
    split: str
    volume: str
    status: str  # ok | failed | skipped
    error: str = ""
    seconds: float = 0.0
    version: str = ""


@dataclass
class RunSummary:
    ok: int = 0
    skipped: int = 0
    failed: int = 0
    results: list[VolumeResult] = field(default_factory=list)


def process_volume(job: VolumeJob, out: str | Path, data_cfg: DataConfig, table: AnatomyTable) -> VolumeResult:
    """Run the pass for one volume and store it; never raises for a problem of the volume.

    On failure nothing of the volume remains in ``out`` except its failure record (one line in failures.csv).
    """
    t0 = time.perf_counter()
    version = ""
    try:
        if job.version in ("auto", "v1") and job.metadata is None:
            raise ValueError(f"missing from the metadata CSV {job.metadata_file or '(none found)'}")
        if job.metadata is not None and job.metadata.conflict:
            raise ValueError(f"{job.volume} is {job.metadata.conflict}")
        if not Path(job.label).exists():
            why = ""
            if job.version in ("auto", "v1") and job.metadata is not None:
                try:  # the usual reason a map is missing: fvlm segment could not fix this volume either
                    job.metadata.fix_geometry()
                except ValueError as e:
                    why = f"; note: {e} (needed if the volume is v1)"
            raise FileNotFoundError(f"label map {job.label} not found (segment the volume with TotalSegmentator v2, "
                                    f"task total, multilabel output){why}")
        image = read_nifti(job.image)
        try:
            check_finite(image.array)  # before version detection, whose statistics NaN would confuse
        except ValueError as e:
            raise ValueError(f"{job.image}: {e}") from None
        if image.array.size and image.array.min() == image.array.max():
            log.warning("%s: the image %s is constant (every voxel %s): not a CT scan, or an empty export?",
                        job.volume, job.image, image.array.flat[0])
        label = read_nifti(job.label)
        slope, intercept = 1.0, 0.0
        if job.version == "hu":
            decision = ctrate.VersionDecision("hu", "pairs", {})
        else:
            stats = ctrate.value_statistics(image.array)
            decision = ctrate.detect_version(image.geometry, stats, job.metadata, job.version)
            if decision.version == "v1":
                assert job.metadata is not None
                md = job.metadata
                try:
                    geometry = md.fix_geometry()
                except ValueError as e:
                    raise ValueError(f"{e} (metadata CSV {job.metadata_file})") from None
                if md.slope is None or md.intercept is None:
                    raise ValueError(f"metadata of {job.volume} has empty RescaleSlope/RescaleIntercept: "
                                     f"cannot fix the v1 values (metadata CSV {job.metadata_file})")
                slope, intercept = md.slope, md.intercept
                image = SourceVolume(image.array, geometry)  # voxel array as stored, geometry from metadata
        version = decision.version
        # label map on the scan's grid (reordered when only the axis order/direction differs); names both files
        from fvlm.data.labelmap import align_label

        label = align_label(image, label, label_name=f"label map {job.label}", image_name=f"scan {job.image}")
        try:
            img, msk, info = prepare_arrays(image, label, data_cfg, table, slope=slope, intercept=intercept)
        except ValueError as e:  # name the files (prepare_arrays works on arrays)
            raise ValueError(f"{e} (image {job.image}, label map {job.label})") from None
        seconds = time.perf_counter() - t0
        info["source"].update({"image": str(job.image), "label": str(job.label), "version": decision.version,
                               "version_reason": decision.reason, "evidence": decision.evidence,
                               "rescale": [slope, intercept]})
        meta = {"format": store.FORMAT_VERSION, "split": job.split, "volume": job.volume, "scan": job.scan,
                **info, "seconds": round(seconds, 3)}
        store.write_volume(out, job.split, job.volume, img, msk, meta)
        store.clear_failure(out, job.split, job.volume)
        return VolumeResult(job.split, job.volume, "ok", seconds=seconds, version=version)
    except Exception as e:  # a batch job records every per-volume failure and goes on
        error = str(e) if isinstance(e, (ValueError, FileNotFoundError)) else f"{type(e).__name__}: {e}"
        if not isinstance(e, (ValueError, FileNotFoundError, OSError)):
            log.warning("%s: unexpected %s", job.volume, type(e).__name__, exc_info=True)
        return _record_failure(job, out, error, time.perf_counter() - t0, version)


def _record_failure(job: VolumeJob, out: str | Path, error: str, seconds: float, version: str = "") -> VolumeResult:
    error = " ".join(error.split())  # one line
    try:
        store.remove_volume(out, job.split, job.volume)  # a damaged earlier output must not look valid
    except ValueError as e:  # not a directory this store wrote (or an unsafe name): left alone, and said so
        error = f"{error}; {' '.join(str(e).split())}"
    try:
        store.write_failure(out, job.split, job.volume, {"scan": job.scan, "error": error,
                                                         "seconds": round(seconds, 3), "version": version,
                                                         "image": job.image, "label": job.label})
    except (ValueError, OSError) as e:
        log.error("%s/%s: cannot record the failure (%s): %s", job.split, job.volume, e, error)
    log.debug("%s failed: %s", job.volume, error)
    return VolumeResult(job.split, job.volume, "failed", error=error, seconds=seconds, version=version)


def _init_worker() -> None:
    """One thread per worker process: K workers x N threads would oversubscribe the cores."""
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)


def _worker(job: VolumeJob, out: str, data_cfg: DataConfig, table: AnatomyTable) -> VolumeResult:
    return process_volume(job, out, data_cfg, table)


# ----------------------------------------------------------------------------------------------- job lists
def parse_shard(text: str) -> tuple[int, int]:
    """``"i/N"`` -> (i, N) with 0 <= i < N."""
    try:
        i, n = (int(x) for x in str(text).split("/"))
    except ValueError:
        raise ValueError(f"--shard must look like i/N (e.g. 0/4), got {text!r}") from None
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"--shard {text!r}: need 0 <= i < N")
    return i, n


def parse_reconstructions(text: str | int | None) -> int | None:
    """``"all"`` -> None, ``"2"`` -> 2."""
    if text is None or str(text).lower() == "all":
        return None
    try:
        k = int(text)
    except ValueError:
        raise ValueError(f"--reconstructions must be 'all' or a positive number, got {text!r}") from None
    if k < 1:
        raise ValueError(f"--reconstructions must be 'all' or >= 1, got {k}")
    return k


def ctrate_jobs(root: str | Path, splits: Sequence[str], version: str = "auto",
                reconstructions: int | None = None, exclude_no_chest: bool = True) -> list[VolumeJob]:
    """Jobs for the volumes of a CT-RATE-format root found on disk (natural order, per split).

    Volumes listed in ``metadata/no_chest_{split}.txt`` (CT-RATE's non-chest CTs, even head scans) are
    left out unless ``exclude_no_chest=False``.
    """
    root = Path(root)
    if not (root / "dataset").is_dir():
        raise FileNotFoundError(f"{root}/dataset not found: --data must be a CT-RATE-format root "
                                f"(dataset/, metadata/, ...)")
    jobs = []
    for split in splits:
        files = ctrate.find_volumes(root, split)
        mpath = ctrate.metadata_path(root, split)
        if mpath.exists():
            metadata = ctrate.read_metadata(mpath)
        elif version == "v2":
            metadata = {}
        else:
            raise FileNotFoundError(f"metadata CSV {mpath} not found (needed to fix and check CT-RATE volumes; "
                                    f"--version v2 processes fixed volumes without it)")
        if not files:
            log.warning("no volumes under %s/dataset/%s[_fixed]", root, split)
            continue
        if exclude_no_chest and ctrate.no_chest_path(root, split).exists():
            listed = set(ctrate.read_volume_list(ctrate.no_chest_path(root, split)))
            excluded = [n for n in files if n in listed]
            files = {n: f for n, f in files.items() if n not in listed}
            log.info("%s: left out %d non-chest volume(s) listed in %s (--include-no-chest keeps them)", split,
                     len(excluded), ctrate.no_chest_path(root, split))
        names = ctrate.select_reconstructions(files, metadata, reconstructions)
        if len(names) < len(files):
            log.info("%s: keeping %d of %d reconstructions (at most %d per scan)", split, len(names), len(files),
                     reconstructions)
        not_on_disk = sum(1 for n in metadata if n not in files)
        if not_on_disk:
            log.info("%s: %d volumes of the metadata are not on disk (not downloaded?)", split, not_on_disk)
        for n in names:
            v = ctrate.parse_volume_name(n)
            jobs.append(VolumeJob(split, n, v.scan_id, str(files[n]), str(ctrate.mask_path(root, n)), version,
                                  metadata.get(n), str(mpath)))
    return jobs


@dataclass
class RejectedRow:
    """A row of an input CSV refused before any work (its names are kept only to be reported)."""

    source: str
    line: int
    split: str
    volume: str
    error: str

    def record(self) -> dict[str, Any]:
        return {"key": f"{Path(self.source).stem}-line{self.line}", "split": self.split, "volume": self.volume,
                "scan": "", "error": self.error, "seconds": 0.0, "version": ""}


def pairs_jobs(csv_path: str | Path, default_split: str = "valid",
               rejected: list[RejectedRow] | None = None) -> list[VolumeJob]:
    """Jobs from a CSV with columns ``volume,image,label[,split]`` (paths relative to the CSV's folder).

    The images must already be HU with a correct header (like CT-RATE v2); no v1 fix is applied. Volume and
    split names must be single safe path components (:func:`fvlm.paths.safe_component`): a row with ``/``,
    ``..`` or a leading dot in either, or listed twice, raises ``ValueError`` naming the file and line, or,
    when ``rejected`` is a list, is appended to it and left out (the batch goes on and reports it).
    """
    csv_path = Path(csv_path)
    if not csv_path.exists():
        raise FileNotFoundError(f"--pairs CSV {csv_path} not found")
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        missing = [c for c in ("volume", "image", "label") if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{csv_path}: missing column(s) {missing}; expected volume,image,label[,split]")
        jobs, seen = [], set()
        for i, row in enumerate(reader, start=2):
            name = (row["volume"] or "").strip()
            split = (row.get("split") or "").strip() or default_split
            try:
                safe_component(name, "volume name", f"{csv_path} line {i}")
                safe_component(split, "split", f"{csv_path} line {i}")
                if (split, name) in seen:
                    raise ValueError(f"{csv_path} line {i}: volume {name!r} listed twice in split {split!r}")
            except ValueError as e:
                if rejected is None:
                    raise
                rejected.append(RejectedRow(str(csv_path), i, split, name, str(e)))
                continue
            seen.add((split, name))
            try:
                scan = ctrate.parse_volume_name(name).scan_id
            except ValueError:
                scan = name
            img, lab = (Path(row[c].strip()) for c in ("image", "label"))
            img, lab = (p if p.is_absolute() else csv_path.parent / p for p in (img, lab))
            jobs.append(VolumeJob(split, name, scan, str(img), str(lab), "hu"))
    return jobs


# ----------------------------------------------------------------------------------------------- side files
def _copy_atomic(src: Path, dst: Path) -> None:
    with atomic_path(dst) as tmp:
        shutil.copy(src, tmp)  # keeps the source's permission bits (mkstemp files are private)


def copy_side_files(root: str | Path, out: str | Path, splits: Sequence[str]) -> list[str]:
    """Copy anatomy texts, label and report CSVs of ``splits`` into ``out`` (when present); returns what was copied."""
    root, out = Path(root), Path(out)
    copied = []
    for name in ("desc_info.json", "conc_info.json"):
        src = ctrate.anatomy_texts_dir(root) / name
        if src.exists():
            _copy_atomic(src, out / "texts" / name)
            copied.append(f"texts/{name}")
    for split in splits:
        for src, dst in ((ctrate.labels_path(root, split), out / "labels" / f"{split}_labels.csv"),
                         (ctrate.reports_path(root, split), out / "reports" / f"{split}_reports.csv")):
            if src.exists():
                _copy_atomic(src, dst)
                copied.append(str(dst.relative_to(out)))
    return copied


def write_store_config(out: str | Path, data_cfg: DataConfig, table: AnatomyTable) -> None:
    """Write ``preprocess_config.json``, or refuse (``ValueError``) if ``out`` was made with other settings."""
    data = json.loads(json.dumps(asdict(data_cfg)))
    stored = store.read_store_config(out)
    if stored is not None:
        diffs = store.config_mismatch(stored, data, table.to_dict())
        if diffs:
            raise ValueError(f"{out} was preprocessed with other settings ({'; '.join(diffs)}); mixing them in one "
                             f"store would silently break training: use another --out or the same config")
        return
    atomic_write_text(Path(out) / store.CONFIG,
                      json.dumps({"data": data, "anatomy_table": table.to_dict()}, indent=2) + "\n")


# ----------------------------------------------------------------------------------------------- runner
def run_preprocess(jobs: Sequence[VolumeJob], out: str | Path, data_cfg: DataConfig, table: AnatomyTable,
                   workers: int = 1, shard: tuple[int, int] = (0, 1), limit: int = 0,
                   verify: bool = False) -> RunSummary:
    """Process ``jobs`` (after ``limit``, then ``shard``) into ``out``; rebuilds manifest.csv and failures.csv.

    Complete outputs are skipped; damaged ones are redone; leftover temporary directories of this shard's
    volumes are removed first.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_store_config(out, data_cfg, table)
    jobs = list(jobs)
    if limit > 0:
        jobs = jobs[:limit]
    i, n = shard
    jobs = jobs[i::n]
    summary = RunSummary()
    for split in sorted({j.split for j in jobs}):
        removed = store.clean_temporaries(out, split, {j.volume for j in jobs if j.split == split})
        if removed:
            log.info("removed %d temporary directories left by an interrupted run in %s/%s", removed, out, split)
    todo = []
    for j in jobs:
        if store.is_complete(out, j.split, j.volume, verify=verify):  # verify: content hashes too
            store.clear_failure(out, j.split, j.volume)
            summary.results.append(VolumeResult(j.split, j.volume, "skipped"))
        else:
            if store.volume_dir(out, j.split, j.volume).exists():
                log.info("%s/%s is damaged (%s): redoing it", j.split, j.volume,
                         store.check_volume_dir(store.volume_dir(out, j.split, j.volume), verify=verify))
            todo.append(j)
    summary.skipped = len(jobs) - len(todo)
    log.info("preprocess: %d volumes in this shard, %d complete already, %d to do, %d worker(s)", len(jobs),
             summary.skipped, len(todo), workers)
    from tqdm import tqdm

    with tqdm(total=len(todo), desc="preprocess", unit="vol", disable=None) as bar:
        if workers <= 1 or len(todo) <= 1:
            for j in todo:
                r = process_volume(j, out, data_cfg, table)
                summary.results.append(r)
                bar.update()
        else:
            from fvlm.data.jobs import JobError, run_jobs

            # forkserver: workers fork from a clean server process (fork-safe, unlike forking a parent whose
            # OpenMP threads already ran) that imports torch once instead of once per worker. A worker that
            # dies (OOM killer) fails only the volume it held; a new one takes its place.
            args = [(j, str(out), data_cfg, table) for j in todo]
            for k, r in run_jobs(_worker, args, workers, context="forkserver",
                                 preload=["torch", "fvlm.data.preprocess"], initializer=_init_worker):
                if isinstance(r, JobError):
                    j = todo[k]
                    store.clean_temporaries(out, j.split, {j.volume})  # what the dead worker was writing
                    r = _record_failure(j, out, r.error, 0.0)
                summary.results.append(r)
                bar.update()
    for r in summary.results:
        if r.status == "failed":
            log.error("%s/%s failed: %s", r.split, r.volume, r.error)
    summary.ok = sum(r.status == "ok" for r in summary.results)
    summary.failed = sum(r.status == "failed" for r in summary.results)
    n_ok, n_failed = store.rebuild_manifest(out, list(table.names))
    log.info("preprocess: %d done, %d skipped (complete), %d failed; %s holds %d ok, %d failed volumes%s",
             summary.ok, summary.skipped, summary.failed, out, n_ok, n_failed,
             f" (see {out / store.FAILURES})" if n_failed else "")
    return summary


def run_preprocess_cli(args: argparse.Namespace) -> int:
    """``fvlm preprocess``: returns 0 when every volume of this run succeeded, 1 when some failed."""
    if bool(args.data) == bool(args.pairs):
        raise ValueError("give exactly one of --data (CT-RATE root) or --pairs (CSV of NIfTI image/label pairs)")
    cfg = load_config(args.config, args.overrides)
    table = load_anatomy_table(cfg.data.anatomy_table)
    shard = parse_shard(args.shard)
    if args.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")
    if args.data:
        splits = [args.split] if args.split else [s for s in ctrate.SPLITS
                                                  if (Path(args.data) / "dataset" / s).is_dir()
                                                  or (Path(args.data) / "dataset" / f"{s}_fixed").is_dir()]
        jobs = ctrate_jobs(args.data, splits, version=args.version,
                           reconstructions=parse_reconstructions(args.reconstructions),
                           exclude_no_chest=not args.include_no_chest)
    rejected: list[RejectedRow] = []
    if not args.data:
        jobs = pairs_jobs(args.pairs, default_split=args.split or "valid", rejected=rejected)
        splits = []
    if not jobs and not rejected:
        raise FileNotFoundError(f"no volumes found in {args.data or args.pairs}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_store_config(out, cfg.data, table)  # refuse a mixed store before touching anything
    if args.pairs:  # rows refused for their names: reported in failures.csv, nothing written for them
        store.write_rejected_rows(out, [r.record() for r in rejected])
        for r in rejected:
            log.error("%s line %d refused: %s", r.source, r.line, r.error)
    if args.data:
        copied = copy_side_files(args.data, out, splits)
        log.info("copied %s", ", ".join(copied) if copied else "no side files (texts, labels, reports absent)")
    # completion marker (fvlm.markers): cleared first, written last, only when every volume of this run is done
    from fvlm.markers import clear_marker, write_marker

    stage = "preprocess-" + ("-".join(splits) if args.data else "pairs") + (f"-shard{shard[0]}of{shard[1]}"
                                                                            if shard[1] > 1 else "")
    settings = {"data": json.loads(json.dumps(asdict(cfg.data))), "anatomy_table": table.to_dict(),
                "source": str(Path(args.data or args.pairs).resolve()), "limit": args.limit,
                "version": args.version, "reconstructions": str(args.reconstructions),
                "include_no_chest": bool(args.include_no_chest)}
    clear_marker(out, stage)
    summary = run_preprocess(jobs, out, cfg.data, table, workers=args.workers, shard=shard, limit=args.limit,
                             verify=getattr(args, "verify", False))
    if not summary.failed and not rejected:
        write_marker(out, stage, config=settings, volumes=len(summary.results), processed=summary.ok,
                     skipped=summary.skipped)
    return 1 if summary.failed or rejected else 0
