"""Label maps on a scan's grid, in any axis order and direction: the one rule every command uses.

A TotalSegmentator label map is only usable when each of its voxels is a voxel of the scan. Converters
(dcm2niix, other DICOM readers, TotalSegmentator's own output after a reorientation) often store the SAME
grid with an axis flipped or the axes permuted: different header (origin, direction, shape order), same
voxel centres. :func:`grid_mapping` recognises that case (the label's index axes are a signed permutation of
the scan's, spacings equal per matched axis, and the label's first voxel sits on a corner voxel of the scan,
within ``tolerance`` of a voxel), and :func:`align_label` reorders the label's array onto the scan's index
order (transposes and flips only, no resampling) with one log line. Any other difference (shifted, rotated,
other spacing or extent) is a different grid and raises :class:`GridMismatch` (a ``ValueError``) saying how
the grids differ and what to do.

:func:`class_ids` is the other half of checking a label map: its values must be TotalSegmentator v2 ``total``
class ids (integers 0..117).

Used by ``fvlm preprocess`` (label reading), ``fvlm segment`` (TotalSegmentator outputs), ``fvlm predict``
and ``fvlm radchestct`` (existing label maps).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fvlm.data.volume import SourceVolume, check_finite
from fvlm.totalseg import MAX_CLASS_ID

log = logging.getLogger(__name__)

#: default tolerance: voxel centres may differ by this fraction of a voxel (float32 headers, rounding)
TOLERANCE_VOXELS = 0.01
#: largest angle (radians) between matched index axes still taken as parallel
ANGLE_TOLERANCE = 1e-3
_AXES = "xyz"

ADVICE = ("use the label map TotalSegmentator wrote for this very scan (TotalSegmentator -i SCAN -o labels.nii.gz "
          "--ml), or resample the label map onto the scan's grid with nearest-neighbour interpolation (e.g. "
          "SimpleITK.Resample(label, scan, sitk.Transform(), sitk.sitkNearestNeighbor))")


class GridMismatch(ValueError):
    """The label map's voxels are not the scan's voxels (not even after reordering axes)."""


@dataclass(frozen=True)
class GridMapping:
    """How a label array is reordered onto the scan's index axes.

    ``source[p]`` is the label index axis (0 = x, 1 = y, 2 = z) that becomes the scan's index axis ``p``,
    reversed when ``flip[p]``.
    """

    source: tuple[int, int, int]
    flip: tuple[bool, bool, bool]

    @property
    def identity(self) -> bool:
        return self.source == (0, 1, 2) and not any(self.flip)

    def describe(self) -> str:
        parts = []
        for p in range(3):
            a = self.source[p]
            s = f"{'-' if self.flip[p] else ''}{_AXES[a]}"
            if s != _AXES[p]:
                parts.append(f"scan {_AXES[p]} = label {s}")
        return ", ".join(parts) or "identity"

    def apply(self, array_zyx: np.ndarray) -> np.ndarray:
        """The label array ``(z, y, x)`` in the scan's index order (a view: transposes and flips only)."""
        if self.identity:
            return array_zyx
        # numpy axis of index axis a is 2 - a; new numpy axis 2 - p comes from label numpy axis 2 - source[p]
        out = np.transpose(array_zyx, [2 - self.source[p] for p in (2, 1, 0)])
        flips = tuple(2 - p for p in range(3) if self.flip[p])
        return np.flip(out, axis=flips) if flips else out


def _fmt(v: Sequence[float], digits: int = 4) -> str:
    return "(" + ", ".join(f"{float(x):.{digits}g}" for x in v) + ")"


def grid_mapping(image_geometry, image_shape_zyx: Sequence[int], label_geometry, label_shape_zyx: Sequence[int],
                 tolerance: float = TOLERANCE_VOXELS) -> GridMapping:
    """The :class:`GridMapping` that puts the label's voxels onto the scan's, or :class:`GridMismatch`.

    Geometries are :class:`fvlm.data.store.Geometry` (LPS; direction columns = index axes x, y, z); shapes
    are numpy ``(z, y, x)``. ``tolerance`` is in voxels (voxel centres, spacings and directions).
    """
    ni = np.asarray(tuple(image_shape_zyx)[::-1], dtype=np.int64)  # (x, y, z)
    nl = np.asarray(tuple(label_shape_zyx)[::-1], dtype=np.int64)
    if len(ni) != 3 or len(nl) != 3:
        raise GridMismatch(f"shape mismatch: image {tuple(image_shape_zyx)}, label {tuple(label_shape_zyx)} "
                           f"(3D volumes expected)")
    si, sl = np.asarray(image_geometry.spacing, dtype=np.float64), np.asarray(label_geometry.spacing, np.float64)
    di, dl = image_geometry.matrix, label_geometry.matrix
    if sorted(ni.tolist()) != sorted(nl.tolist()):
        raise GridMismatch(f"shape mismatch: image (x, y, z) {tuple(ni.tolist())}, label {tuple(nl.tolist())} "
                           f"voxels (a different extent, not just another axis order)")
    # which label axis runs along which scan axis: the cosines between index directions
    cos = di.T @ dl  # [p, a] = <scan axis p, label axis a>
    source = tuple(int(np.argmax(np.abs(cos[p]))) for p in range(3))
    # axes further apart than ANGLE_TOLERANCE (the tolerance the earlier exact-grid check had) are a rotation
    angles = [float(np.arccos(np.clip(abs(cos[p, source[p]]), 0.0, 1.0))) for p in range(3)]
    if sorted(source) != [0, 1, 2] or max(angles) > ANGLE_TOLERANCE:
        worst = float(np.degrees(max(angles)))
        raise GridMismatch(f"direction mismatch: the label's axes are rotated by up to {worst:.3g} degrees against "
                           f"the scan's (image direction {_fmt(image_geometry.direction)}, label "
                           f"{_fmt(label_geometry.direction)}): not the same grid in another axis order")
    flip = tuple(bool(cos[p, source[p]] < 0) for p in range(3))
    src = np.asarray(source)
    if not np.array_equal(ni, nl[src]):
        raise GridMismatch(f"shape mismatch: image (x, y, z) {tuple(ni.tolist())}, label {tuple(nl.tolist())} "
                           f"voxels with its axes matched to the scan's ({tuple(nl[src].tolist())})")
    if not np.allclose(si, sl[src], rtol=1e-3, atol=1e-5):
        raise GridMismatch(f"spacing mismatch: image {_fmt(si)} mm, label {_fmt(sl[src])} mm (axes matched)")
    # the label's voxel (0, 0, 0) must be the scan's corner voxel: index 0, or n - 1 along a flipped axis
    corner = np.where(flip, ni - 1, 0).astype(np.float64)
    steps = di * si  # columns: LPS step per scan index
    offset = np.linalg.solve(steps, np.asarray(label_geometry.origin, np.float64)
                             - np.asarray(image_geometry.origin, np.float64))  # in scan voxels
    shift_vox = offset - corner
    if np.any(np.abs(shift_vox) > tolerance):
        shift_mm = steps @ shift_vox
        raise GridMismatch(f"origin mismatch: image {_fmt(image_geometry.origin)} mm, label "
                           f"{_fmt(label_geometry.origin)} mm: the label grid is shifted by {_fmt(shift_mm, 3)} mm "
                           f"= {_fmt(shift_vox, 3)} voxels (x, y, z) against the scan's"
                           + (f" (after matching axes: {GridMapping(source, flip).describe()})"  # type: ignore[arg-type]
                              if source != (0, 1, 2) or any(flip) else ""))
    return GridMapping(source, flip)  # type: ignore[arg-type]


def align_label(image, label, *, label_name: str = "label map", image_name: str = "scan",
                tolerance: float = TOLERANCE_VOXELS):
    """``label`` (:class:`fvlm.data.volume.SourceVolume`) on ``image``'s grid: reordered (one log line)
    when it is the same grid in another axis order or direction, returned as is when identical.

    Raises :class:`GridMismatch` naming both files, how the grids differ and what to do.
    """
    try:
        m = grid_mapping(image.geometry, image.array.shape, label.geometry, label.array.shape, tolerance)
    except GridMismatch as e:
        raise GridMismatch(f"{label_name} does not lie on the grid of {image_name}: {e}; {ADVICE}") from None
    if m.identity:
        if label.geometry == image.geometry:
            return label
        return SourceVolume(label.array, image.geometry)
    log.info("%s: same voxel grid as %s in another axis order/direction (%s): reoriented", label_name, image_name,
             m.describe())
    return SourceVolume(m.apply(label.array), image.geometry)


def class_ids(array: np.ndarray, name: str = "label map") -> np.ndarray:
    """The label map's values as uint8 TotalSegmentator v2 ``total`` class ids (the array itself when it already
    is one); ``ValueError`` for NaN, non-integer values or ids outside 0..117."""
    if array.dtype.kind == "f":
        check_finite(array, name)
        if np.any(array != np.round(array)):
            raise ValueError(f"{name} holds non-integer values")
    lo, hi = (int(array.min()), int(array.max())) if array.size else (0, 0)
    if lo < 0 or hi > MAX_CLASS_ID:
        bad = np.unique(array[(array < 0) | (array > MAX_CLASS_ID)])[:10]
        raise ValueError(f"{name} holds unknown class ids {bad.astype(np.int64).tolist()} (TotalSegmentator v2 "
                         f"'total' ids are 0..{MAX_CLASS_ID})")
    return array if array.dtype == np.uint8 else array.astype(np.uint8)


__all__ = ["ADVICE", "GridMapping", "GridMismatch", "TOLERANCE_VOXELS", "align_label", "class_ids", "grid_mapping"]
