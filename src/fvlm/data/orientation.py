"""Which end of a chest CT's slice axis (array axis 0 of ``(z, y, x)``) is the patient's superior end, from HU
alone (:func:`superior_end_from_hu`) or from a TotalSegmentator ``total`` map (:func:`superior_end_from_labels`).

Used by ``fvlm radchestct`` (:mod:`fvlm.data.radchestct`), whose release stores volumes without an affine: a wrong
z direction would make TotalSegmentator see an upside-down patient.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

from fvlm.totalseg import CLASS_IDS


@dataclass(frozen=True)
class OrientationCheck:
    """Where the patient's superior end lies along array axis 0: ``"start"`` (index 0), ``"end"`` or ``None``
    (inconclusive), with the evidence (mm along axis 0, or class centroids)."""

    superior: str | None
    evidence: dict[str, Any] = field(default_factory=dict)


def _airway_area(slice_hu: np.ndarray, body: np.ndarray, voxel_mm: float) -> float:
    """mm² of trachea-like air in one axial slice: compact air components of 40-700 mm² inside the body,
    within 12 % of the body's width of its left-right centre and in the middle of its front-back extent."""
    ys, xs = np.nonzero(body)
    if ys.size < 100:
        return 0.0
    y0, y1, x0, x1 = ys.min(), ys.max(), xs.min(), xs.max()
    air = body & (slice_hu <= -500)
    lab, n = ndimage.label(air)
    if n == 0:
        return 0.0
    idx = np.arange(1, n + 1)
    count = np.bincount(lab.ravel(), minlength=n + 1)[1:]
    com = ndimage.center_of_mass(air, lab, idx)
    total = 0.0
    for i, sl in enumerate(ndimage.find_objects(lab)):
        area = float(count[i]) * voxel_mm**2
        cy, cx = com[i]
        if not 40.0 <= area <= 700.0 or abs(cx - (x0 + x1) / 2) > 0.12 * (x1 - x0):
            continue
        if not 0.2 <= (cy - y0) / max(1, y1 - y0) <= 0.7:
            continue
        if count[i] < 0.45 * (sl[0].stop - sl[0].start) * (sl[1].stop - sl[1].start):  # round-ish, not a crescent
            continue
        total += area
    return total


def superior_end_from_hu(ct: np.ndarray, spacing_mm: float = 0.8, min_shift: float = 0.05,
                         step: int = 2) -> OrientationCheck:
    """Which end of axis 0 is superior, from HU alone (two anatomical cues, the first preferred).

    Inside the body (each axial slice's tissue with its holes filled):

    1. airway: the trachea and main bronchi (compact air tubes at the body's midline, between sternum and
       spine) run from the top of a chest scan down to the middle of the lungs, so their centroid lies
       above the lungs' centroid. Used when at least 1.5 cm³ of such air is found.
    2. soft tissue: soft tissue and bone (> -200 HU) dominate the lower chest and the upper abdomen (heart,
       liver, diaphragm, the widening chest wall) and extend below the lung bases, so their centroid lies
       below that of the lung-density voxels (-950 to -500 HU; the core of bowel gas is denser air).

    A centroid distance below ``min_shift`` (a fraction of the number of slices) is inconclusive.

    Args:
        ct: ``(z, y, x)`` HU, any integer or float dtype.
        spacing_mm: voxel size (isotropic), for the airway size limits (default: Rad-ChestCT's 0.8 mm).
        min_shift: smallest centroid distance taken as evidence, as a fraction of the number of slices.
        step: subsampling stride on every axis (speed; 2 keeps 1.6 mm voxels at the release's 0.8 mm).
    """
    a = np.asarray(ct)[::step, ::step, ::step]
    voxel = spacing_mm * step
    tissue = a > -500
    body = np.zeros_like(tissue)
    airway = np.zeros(a.shape[0])
    for k in range(a.shape[0]):
        body[k] = ndimage.binary_fill_holes(tissue[k])
        airway[k] = _airway_area(a[k], body[k], voxel)
    lung = body & (a >= -950) & ~tissue
    dense = body & (a > -200)
    z = np.arange(a.shape[0], dtype=np.float64)
    n_lung, n_dense = lung.sum(axis=(1, 2)).astype(np.float64), dense.sum(axis=(1, 2)).astype(np.float64)
    if n_lung.sum() < 50 or n_dense.sum() < 50:
        return OrientationCheck(None, {"reason": "too little lung or soft tissue inside the body"})
    c_lung = float((z * n_lung).sum() / n_lung.sum())
    ev: dict[str, Any] = {"lung_centroid_slice": round(c_lung * step, 1)}
    airway_mm3 = float(airway.sum()) * voxel
    if airway_mm3 >= 1500.0:
        c_air = float((z * airway).sum() / airway.sum())
        shift = (c_lung - c_air) / a.shape[0]  # > 0: airway at smaller index -> superior is the start
        ev.update(cue="airway", airway_centroid_slice=round(c_air * step, 1), airway_mm3=round(airway_mm3),
                  shift_fraction=round(shift, 3))
    else:
        c_dense = float((z * n_dense).sum() / n_dense.sum())
        shift = (c_dense - c_lung) / a.shape[0]  # > 0: soft tissue at larger index -> inferior is the end
        ev.update(cue="soft tissue", soft_tissue_centroid_slice=round(c_dense * step, 1), airway_mm3=round(airway_mm3),
                  shift_fraction=round(shift, 3))
    if abs(shift) < min_shift:
        return OrientationCheck(None, ev)
    return OrientationCheck("start" if shift > 0 else "end", ev)


_LUNG_UPPER = ("lung_upper_lobe_left", "lung_upper_lobe_right")
_LUNG_LOWER = ("lung_lower_lobe_left", "lung_lower_lobe_right")
_LUNG = (*_LUNG_UPPER, "lung_middle_lobe_right", *_LUNG_LOWER)
_ABDOMEN = ("liver", "spleen", "stomach", "kidney_left", "kidney_right", "gallbladder", "pancreas")


def superior_end_from_labels(label_map: np.ndarray) -> OrientationCheck:
    """Which end of axis 0 is superior, from a TotalSegmentator ``total`` map ``(z, y, x)``.

    Two anatomical facts vote: the lungs' centroid lies above the abdominal organs' (holds for partial scans
    too), and, when the lungs are complete (touching neither end slice), the upper lobes' centroid lies above
    the lower lobes' (in a scan cut through the lungs the lingula can reach lower than the lower lobes). Where
    both vote they must agree.
    """
    lab = np.asarray(label_map)
    counts = np.zeros((lab.shape[0], 256), dtype=np.int64)
    for k in range(lab.shape[0]):  # per-slice histograms: the centroid of every class in one pass
        counts[k] = np.bincount(lab[k].astype(np.intp, copy=False).ravel(), minlength=256)[:256]
    z = np.arange(lab.shape[0], dtype=np.float64)

    def weights(names: Sequence[str]) -> np.ndarray:
        return counts[:, [CLASS_IDS[n] for n in names]].sum(axis=1).astype(np.float64)

    def centroid(names: Sequence[str]) -> float | None:
        w = weights(names)
        return float((z * w).sum() / w.sum()) if w.sum() >= 20 else None

    lung_w = weights(_LUNG)
    complete = bool(lung_w.sum() > 0 and lung_w[0] == 0 and lung_w[-1] == 0)
    ev: dict[str, Any] = {"lungs_complete": complete}
    votes = []
    pairs = [("lungs above abdomen", _LUNG, _ABDOMEN)]
    if complete:
        pairs.append(("upper above lower lobes", _LUNG_UPPER, _LUNG_LOWER))
    for what, upper, lower in pairs:
        cu, cl = centroid(upper), centroid(lower)
        if cu is None or cl is None or abs(cu - cl) < 1:
            continue
        ev[what] = {"upper_centroid_slice": round(cu, 1), "lower_centroid_slice": round(cl, 1)}
        votes.append("start" if cu < cl else "end")
    if not votes:
        return OrientationCheck(None, {**ev, "reason": "neither lungs with abdominal organs nor complete lungs"})
    if len(set(votes)) > 1:
        return OrientationCheck(None, {**ev, "reason": "the comparisons disagree"})
    return OrientationCheck(votes[0], ev)
