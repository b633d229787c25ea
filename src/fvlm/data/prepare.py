"""The in-memory pass of ``fvlm preprocess``: a CT and its TotalSegmentator label map -> the stored arrays.

::

    check the label map (grid, class ids) -> reorient to LPS -> merge TotalSegmentator classes into anatomies
    -> crop the anatomies' bounding box plus margin FIRST -> resample to data.spacing (trilinear image, nearest
    mask) -> crop bbox + margin in the target grid -> window (clip to data.hu_window) -> pad to >= data.crop_size

The released pipeline ran these as separate stages with a .nii.gz written between each and resampled whole
volumes; cropping before resampling and never writing intermediates is where the speed comes from
(benchmarks/preprocess.py). :func:`prepare_arrays` is used by batch preprocessing and by single-scan prediction.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from fvlm.anatomy import AnatomyTable
from fvlm.config import DataConfig
from fvlm.data.labelmap import align_label, class_ids
from fvlm.data.volume import SourceVolume, check_finite, from_sitk, reorient_lps

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------- boxes
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
    # torch imported here: the main process of a parallel run (and fvlm segment / check-data, which import this
    # module's neighbours) never resamples; torch costs about 1 s and several hundred MB of address space there
    # (measured: tests/test_jobs.py::test_forkserver_that_cannot_start_still_reports runs the main process
    # under a 600 MB address-space limit that torch does not fit in)
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
    label = align_label(image, label)  # same grid in another axis order/direction: reordered; else refused
    lab = class_ids(label.array)

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
