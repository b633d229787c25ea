"""Rad-ChestCT (Draelos et al., MedIA 2021) as an external test set: volumes, labels, CT-RATE label mappings.

**Volumes.** Each ``{NoteAcc_DEID}.npz`` (e.g. ``tst34780.npz``) holds one array under the key ``ct``: int16 HU
clipped to [-1000, 1000], resampled to 0.8 mm isotropic, axes ``(z, y, x)``, no affine. Orientation
assumption (stated, then checked): index ``z`` grows towards the patient's **inferior** (slice 0 is the most
superior), ``y`` towards **posterior**, ``x`` towards the patient's **left** ("IPL" = the directions of increasing
index). Evidence: the release's preprocessing stacks DICOM slices in descending position along the slice
normal (superior first) from axial scans with ImageOrientationPatient [1, 0, 0, 0, 1, 0] and then transposes
to (slices, rows, columns); the lung-extrema CSV of the release names its columns ``sup_axis0min``,
``ant_axis1min``, ``rig_axis2min``. As a SimpleITK/LPS geometry: spacing (0.8, 0.8, 0.8) mm, direction
diag(1, 1, -1), origin (0, 0, 0) at voxel (0, 0, 0) (the true patient position is not in the release).

Because a wrong z direction would make TotalSegmentator see an upside-down patient, every volume is checked
against anatomy before it is written (:func:`superior_end_from_hu`: the trachea lies above the lungs' centre;
without a visible trachea, the soft tissue of the lower chest and upper abdomen lies below it) and flipped with
a logged warning when the check confidently disagrees; label maps, when given, are checked again from their classes
(:func:`superior_end_from_labels`: lungs above the abdominal organs, upper lobes above lower lobes).

**Labels.** The label CSVs have the key column ``NoteAcc_DEID`` and one 0/1 column per abnormality
(:data:`ABNORMALITIES`, the 84 of the release); the per-location file (``imgtest_Abnormality_and_Location_
Labels.csv``, columns ``{abnormality}*{location}``) is accepted too and reduced to "anywhere".
:data:`MAPPINGS` holds the three mappings to CT-RATE's 18 labels in use (``standard``, ``fvlm``,
``extended``); a CT-RATE label without a source in a mapping is absent from the output (not 0).

**Conversion** (:func:`convert`, ``fvlm radchestct``): NIfTI images + a ``volume,image,label,split`` pairs CSV
for ``fvlm segment --pairs`` and ``fvlm preprocess --pairs``, and the mapped labels CSV for ``fvlm metrics``.
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
import time
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fvlm.io import atomic_path, atomic_write_text
from fvlm.labels import CT_RATE_LABELS
from fvlm.paths import component_problem, safe_component

log = logging.getLogger(__name__)

KEY = "NoteAcc_DEID"
NPZ_KEY = "ct"
SPACING_MM = 0.8
HU_RANGE = (-1000, 1000)
#: index axes (x, y, z) -> LPS directions: x to Left, y to Posterior, z to Inferior (slice 0 most superior)
DIRECTION = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
#: split of a volume from its NoteAcc_DEID prefix
SPLIT_PREFIXES = {"trn": "imgtrain", "val": "imgvalid", "tst": "imgtest"}

#: the 84 abnormality columns of the Rad-ChestCT label CSVs, in the release's (alphabetical) order
ABNORMALITIES: tuple[str, ...] = (
    "air_trapping", "airspace_disease", "aneurysm", "arthritis", "aspiration", "atelectasis", "atherosclerosis",
    "bandlike_or_linear", "breast_implant", "breast_surgery", "bronchial_wall_thickening", "bronchiectasis",
    "bronchiolectasis", "bronchiolitis", "bronchitis", "cabg", "calcification", "cancer", "cardiomegaly",
    "catheter_or_port", "cavitation", "chest_tube", "clip", "congestion", "consolidation", "coronary_artery_disease",
    "cyst", "debris", "deformity", "density", "dilation_or_ectasia", "distention", "emphysema", "fibrosis",
    "fracture", "gi_tube", "granuloma", "groundglass", "hardware", "heart_failure", "heart_valve_replacement",
    "hemothorax", "hernia", "honeycombing", "infection", "infiltrate", "inflammation", "interstitial_lung_disease",
    "lesion", "lucency", "lung_resection", "lymphadenopathy", "mass", "mucous_plugging", "nodule", "nodulegr1cm",
    "opacity", "other_path", "pacemaker_or_defib", "pericardial_effusion", "pericardial_thickening", "plaque",
    "pleural_effusion", "pleural_thickening", "pneumonia", "pneumonitis", "pneumothorax", "postsurgical",
    "pulmonary_edema", "reticulation", "scarring", "scattered_calc", "scattered_nod", "secretion",
    "septal_thickening", "soft_tissue", "staple", "stent", "sternotomy", "suture", "tracheal_tube", "transplant",
    "tree_in_bud", "tuberculosis",
)  # fmt: skip
assert len(ABNORMALITIES) == 84 and len(set(ABNORMALITIES)) == 84

#: abnormality columns that are medical material (devices, implants, wires, tubes) for "Medical material";
#: procedures without implied material (postsurgical, lung_resection, transplant, breast_surgery, cabg) are not
DEVICES: tuple[str, ...] = (
    "breast_implant", "catheter_or_port", "chest_tube", "clip", "gi_tube", "hardware", "heart_valve_replacement",
    "pacemaker_or_defib", "staple", "stent", "sternotomy", "suture", "tracheal_tube",
)  # fmt: skip

_ONE_TO_ONE = {
    "Cardiomegaly": ("cardiomegaly",),
    "Pericardial effusion": ("pericardial_effusion",),
    "Hiatal hernia": ("hernia",),
    "Lymphadenopathy": ("lymphadenopathy",),
    "Emphysema": ("emphysema",),
    "Atelectasis": ("atelectasis",),
    "Lung nodule": ("nodule", "nodulegr1cm"),
    "Lung opacity": ("opacity",),
    "Pleural effusion": ("pleural_effusion",),
    "Peribronchial thickening": ("bronchial_wall_thickening",),
    "Consolidation": ("consolidation",),
    "Bronchiectasis": ("bronchiectasis",),
    "Interlobular septal thickening": ("septal_thickening",),
}


def _ordered(m: Mapping[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
    return {label: m[label] for label in CT_RATE_LABELS if label in m}


#: CT-RATE label -> Rad-ChestCT columns (positive if any of them is 1). Labels missing from a mapping are unscored.
MAPPINGS: dict[str, dict[str, tuple[str, ...]]] = {
    # 16 classes: Mosaic has no source; the generic calcification column gives Arterial wall calcification, and
    # Coronary artery wall calcification is dropped (calcification is not coronary-specific)
    "standard": _ordered({**_ONE_TO_ONE, "Medical material": DEVICES, "Arterial wall calcification": ("calcification",),
                          "Pulmonary fibrotic sequela": ("scarring",)}),
    # 15 classes (fVLM's choice): no Medical material, Lymphadenopathy or Mosaic; calcification for both
    # calcification labels; fibrosis for Pulmonary fibrotic sequela
    "fvlm": _ordered({**{k: v for k, v in _ONE_TO_ONE.items() if k != "Lymphadenopathy"},
                      "Arterial wall calcification": ("calcification",),
                      "Coronary artery wall calcification": ("calcification",),
                      "Pulmonary fibrotic sequela": ("fibrosis",)}),
    # all 18: specific sources for the calcifications and Mosaic, wider groups for opacity, fibrosis, bronchiectasis
    "extended": _ordered({**_ONE_TO_ONE, "Medical material": DEVICES,
                          "Arterial wall calcification": ("atherosclerosis",),
                          "Coronary artery wall calcification": ("coronary_artery_disease",),
                          "Mosaic attenuation pattern": ("air_trapping",),
                          "Lung opacity": ("opacity", "groundglass", "infiltrate", "airspace_disease"),
                          "Pulmonary fibrotic sequela": ("fibrosis", "reticulation", "honeycombing", "scarring",
                                                         "interstitial_lung_disease"),
                          "Bronchiectasis": ("bronchiectasis", "bronchiolectasis")}),
}
assert [len(m) for m in MAPPINGS.values()] == [16, 15, 18]
assert all(c in ABNORMALITIES for m in MAPPINGS.values() for cols in m.values() for c in cols)


# ----------------------------------------------------------------------------------------------- labels
def read_labels(path: str | Path) -> dict[str, dict[str, int]]:
    """A Rad-ChestCT label CSV -> {NoteAcc_DEID: {abnormality: 0/1}}.

    Accepts the summary format (one column per abnormality) and the per-location format
    (``{abnormality}*{location}`` columns, reduced with "any location"). Columns that are no Rad-ChestCT
    abnormality are ignored with a warning; ``ValueError`` names the file and line of a value other than 0/1.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Rad-ChestCT labels CSV {path} not found")
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        cols = [c for c in (reader.fieldnames or []) if c is not None]
        if KEY not in cols:
            raise ValueError(f"{path}: no {KEY} column (is this a Rad-ChestCT label CSV?)")
        source: dict[str, list[str]] = {}
        unknown = []
        for c in cols:
            if c == KEY:
                continue
            abn = c.split("*", 1)[0].strip()
            if abn in ABNORMALITIES:
                source.setdefault(abn, []).append(c)
            else:
                unknown.append(c)
        if not source:
            raise ValueError(f"{path}: no Rad-ChestCT abnormality column (expected e.g. {ABNORMALITIES[:4]})")
        if unknown:
            log.warning("%s: ignoring %d column(s) that are no Rad-ChestCT abnormality: %s", path, len(unknown),
                        unknown[:8])
        out: dict[str, dict[str, int]] = {}
        for i, row in enumerate(reader, start=2):
            key = (row.get(KEY) or "").strip()
            if not key:
                continue
            if key in out:
                raise ValueError(f"{path} line {i}: {KEY} {key!r} appears twice")
            vals = {}
            for abn, src in source.items():
                v = 0
                for c in src:
                    text = (row.get(c) or "").strip()
                    try:
                        x = float(text)
                    except ValueError:
                        raise ValueError(f"{path} line {i}: {c} = {text!r} is not 0 or 1") from None
                    if x not in (0.0, 1.0):
                        raise ValueError(f"{path} line {i}: {c} = {text!r} is not 0 or 1")
                    v = max(v, int(x))
                vals[abn] = v
            out[key] = vals
    return out


def map_labels(labels: Mapping[str, Mapping[str, int]], mapping: str) -> dict[str, dict[str, int]]:
    """Rad-ChestCT labels -> CT-RATE labels with ``mapping`` (``standard``, ``fvlm``, ``extended``).

    Returns {NoteAcc_DEID: {CT-RATE label: 0/1}} with only the labels the mapping defines, in CT-RATE order.
    ``ValueError`` if a column the mapping needs is absent from the labels.
    """
    if mapping not in MAPPINGS:
        raise ValueError(f"unknown Rad-ChestCT label mapping {mapping!r}; choose one of {sorted(MAPPINGS)}")
    m = MAPPINGS[mapping]
    if labels:
        have = set(next(iter(labels.values())))
        need = sorted({c for cols in m.values() for c in cols if c not in have})
        if need:
            raise ValueError(f"mapping {mapping!r} needs Rad-ChestCT column(s) absent from the labels: {need}")
    return {k: {label: int(any(v[c] for c in cols)) for label, cols in m.items()} for k, v in labels.items()}


def write_ctrate_labels(path: str | Path, mapped: Mapping[str, Mapping[str, int]], mapping: str,
                        volumes: Sequence[str] | None = None) -> None:
    """A CT-RATE-format labels CSV: ``VolumeName`` (``{id}.nii.gz``) + the mapping's CT-RATE label columns."""
    labels = list(MAPPINGS[mapping])
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["VolumeName", *labels])
    for k in (volumes if volumes is not None else sorted(mapped)):
        w.writerow([f"{k}.nii.gz", *(mapped[k][label] for label in labels)])
    atomic_write_text(path, buf.getvalue())


# ----------------------------------------------------------------------------------------------- volumes
def split_of(volume: str) -> str:
    """``tst34780`` -> ``imgtest`` (``trn`` imgtrain, ``val`` imgvalid); ``""`` for another prefix."""
    return SPLIT_PREFIXES.get(volume[:3].lower(), "")


def load_npz(path: str | Path) -> np.ndarray:
    """The ``ct`` array of a Rad-ChestCT .npz: int16 ``(z, y, x)`` HU. ``ValueError`` names what is wrong."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            if NPZ_KEY not in z.files:
                raise ValueError(f"{path}: no {NPZ_KEY!r} array (keys {z.files})")
            ct = z[NPZ_KEY]
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise ValueError(f"{path}: unreadable .npz ({type(e).__name__}: {e})") from None
    if ct.ndim != 3 or min(ct.shape) < 2:
        raise ValueError(f"{path}: expected a 3D (z, y, x) volume, got shape {ct.shape}")
    if ct.dtype.kind not in "iu":
        if not np.all(np.isfinite(ct)):
            raise ValueError(f"{path}: non-finite values in {ct.dtype} volume")
        ct = np.rint(ct)
    lo, hi = float(ct.min()), float(ct.max())
    if lo < HU_RANGE[0] - 24 or hi > HU_RANGE[1] + 24 or hi <= lo:
        log.warning("%s: values %g..%g outside the release's HU clip %s: not a Rad-ChestCT volume?", path, lo, hi,
                    HU_RANGE)
    return np.clip(ct, -32768, 32767).astype(np.int16, copy=False)


def geometry(flip_z: bool = False) -> Any:
    """The assumed LPS :class:`~fvlm.data.store.Geometry` (module doc); ``flip_z`` = z grows to superior."""
    from fvlm.data.store import Geometry

    d = list(DIRECTION)
    if flip_z:
        d[8] = -d[8]
    return Geometry((SPACING_MM,) * 3, (0.0, 0.0, 0.0), tuple(d))


@dataclass(frozen=True)
class OrientationCheck:
    """Where the patient's superior end lies along array axis 0: ``"start"`` (index 0), ``"end"`` or ``None``
    (inconclusive), with the evidence (mm along axis 0, or class centroids)."""

    superior: str | None
    evidence: dict[str, Any] = field(default_factory=dict)


def _airway_area(slice_hu: np.ndarray, body: np.ndarray, voxel_mm: float) -> float:
    """mm² of trachea-like air in one axial slice: compact air components of 40-700 mm² inside the body,
    within 12 % of the body's width of its left-right centre and in the middle of its front-back extent."""
    from scipy import ndimage

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


def superior_end_from_hu(ct: np.ndarray, spacing_mm: float = SPACING_MM, min_shift: float = 0.05,
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
        spacing_mm: voxel size (isotropic), for the airway size limits.
        min_shift: smallest centroid distance taken as evidence, as a fraction of the number of slices.
        step: subsampling stride on every axis (speed; 2 keeps 1.6 mm voxels at the release's 0.8 mm).
    """
    from scipy import ndimage

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
    from fvlm.totalseg import CLASS_IDS

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


def orient(ct: np.ndarray, mode: str = "check", volume: str = "") -> tuple[np.ndarray, bool, OrientationCheck | None]:
    """Apply the orientation policy to a release array ``(z, y, x)``.

    ``mode``: ``"check"`` (default) keeps the documented convention unless :func:`superior_end_from_hu`
    confidently finds the superior end at the end of axis 0, then flips axis 0 with a warning;
    ``"documented"`` trusts the convention; ``"flip"`` always flips axis 0.
    Returns (array with slice 0 superior, flipped, check or None).
    """
    if mode == "documented":
        return ct, False, None
    if mode == "flip":
        return ct[::-1], True, None
    if mode != "check":
        raise ValueError(f"orientation mode must be check, documented or flip, got {mode!r}")
    chk = superior_end_from_hu(ct)
    if chk.superior == "end":
        log.warning("%s: anatomy says slice 0 is INFERIOR (%s), against the Rad-ChestCT convention: flipping axis 0",
                    volume or "volume", chk.evidence)
        return ct[::-1], True, chk
    if chk.superior is None:
        log.debug("%s: orientation check inconclusive (%s): keeping the documented convention", volume, chk.evidence)
    return ct, False, chk


# ----------------------------------------------------------------------------------------------- conversion
@dataclass
class ConvertResult:
    volume: str
    status: str  # ok | skipped | failed
    error: str = ""
    flipped: bool = False
    orientation: str = ""  # superior end from HU: start | end | unknown | not checked
    shape: tuple[int, ...] = ()


MANIFEST_FIELDS = ("volume", "split", "status", "shape", "flipped", "orientation", "error")


def verify_mask(image: Path, mask: Path) -> OrientationCheck:
    """``ValueError`` unless the label map ``mask`` lies on the grid of the converted ``image`` and shows the
    patient upright (:func:`superior_end_from_labels`; the image's slice 0 is superior)."""
    from fvlm.data.labelmap import align_label
    from fvlm.data.volume import SourceVolume, read_header, read_nifti

    h = read_header(image)
    lab = align_label(SourceVolume(np.empty(h.shape_xyz[:3][::-1], dtype=np.uint8), h.geometry), read_nifti(mask),
                      label_name=f"label map {mask}", image_name=f"image {image}")
    chk = superior_end_from_labels(lab.array)
    if chk.superior == "end":
        raise ValueError(f"label map {mask} shows the patient upside down (superior at the last slice: "
                         f"{chk.evidence}); convert with --orientation flip and segment again")
    return chk


def convert_volume(npz: Path, image_out: Path, orientation: str = "check") -> ConvertResult:
    """One .npz -> NIfTI at ``image_out`` (atomic). Never raises: a problem becomes a failed result."""
    from fvlm.data.volume import write_nifti

    name = npz.stem
    try:
        ct = load_npz(npz)
        arr, flipped, chk = orient(ct, orientation, name)
        with atomic_path(image_out, suffix=".nii.gz") as tmp:
            write_nifti(tmp, arr, geometry())
        return ConvertResult(name, "ok", flipped=flipped,
                             orientation="not checked" if chk is None else (chk.superior or "unknown"),
                             shape=tuple(int(s) for s in arr.shape))
    except Exception as e:  # a batch job records every per-volume failure and goes on
        if not isinstance(e, (ValueError, FileNotFoundError, OSError)):
            log.warning("%s: unexpected %s", name, type(e).__name__, exc_info=True)
        return ConvertResult(name, "failed", error=" ".join(str(e).split()))


def _read_manifest(path: Path) -> dict[str, dict[str, str]]:
    if not path.exists():
        return {}
    with open(path, newline="") as f:
        return {r["volume"]: r for r in csv.DictReader(f)}


def convert(npz_dir: str | Path, labels_csv: str | Path, out: str | Path, mapping: str = "standard",
            masks: str | Path | None = None, split: str = "", orientation: str = "check", limit: int = 0,
            workers: int = 1) -> list[ConvertResult]:
    """Rad-ChestCT -> files for ``fvlm segment --pairs`` / ``fvlm preprocess --pairs`` / ``fvlm metrics``.

    Writes (``out`` = OUT)::

        OUT/images/{id}.nii.gz        int16 HU, LPS geometry of :func:`geometry` (after the orientation check)
        OUT/pairs.csv                 volume,image,label,split (label = MASKS/{id}.nii.gz, default OUT/masks/)
        OUT/labels_{mapping}.csv      VolumeName + the mapping's CT-RATE labels, volumes converted OK only
        OUT/conversion.csv            volume, split, status, shape, flipped, orientation, error
        OUT/failures.csv              volume, error (only when some failed)

    Volumes are the .npz files of ``npz_dir`` that have a label row (the others are reported). A rerun
    skips images that exist. ``split`` names the split of every pair (default: from the id prefix: trn ->
    imgtrain, val -> imgvalid, tst -> imgtest).
    """
    from tqdm import tqdm

    npz_dir, out = Path(npz_dir), Path(out)
    if split:  # becomes a folder of fvlm preprocess --out
        safe_component(split, "--split")
    if not npz_dir.is_dir():
        raise FileNotFoundError(f"--npz-dir {npz_dir}: no such directory")
    labels = read_labels(labels_csv)
    mapped = map_labels(labels, mapping)  # fail on a bad mapping before any work
    files = {p.stem: p for p in sorted(npz_dir.glob("*.npz")) if component_problem(p.stem) is None}
    if not files:
        raise FileNotFoundError(f"no .npz volumes in {npz_dir}")
    without_labels = sorted(set(files) - set(labels))
    if without_labels:
        log.warning("%d .npz volume(s) have no row in %s and are skipped: %s", len(without_labels), labels_csv,
                    without_labels[:5])
    not_on_disk = len(set(labels) - set(files))
    if not_on_disk:
        log.info("%d labelled volume(s) of %s are not in %s", not_on_disk, labels_csv, npz_dir)
    names = [n for n in files if n in labels]
    if limit > 0:
        names = names[:limit]
    if not names:
        raise FileNotFoundError(f"no .npz volume of {npz_dir} has a row in {labels_csv}")
    mask_dir = Path(masks) if masks else out / "masks"
    images = out / "images"
    previous = _read_manifest(out / "conversion.csv")
    results: dict[str, ConvertResult] = {}
    todo = []
    for n in names:
        img = images / f"{n}.nii.gz"
        prev = previous.get(n)
        if img.exists() and prev is not None and prev.get("status") in ("ok", "skipped"):
            results[n] = ConvertResult(n, "skipped", flipped=prev.get("flipped") == "True",
                                       orientation=prev.get("orientation", ""),
                                       shape=tuple(int(s) for s in prev.get("shape", "").split("x") if s))
        else:
            todo.append(n)
    log.info("radchestct: %d volumes, %d converted already, %d to do; mapping %r (%d CT-RATE labels)", len(names),
             len(names) - len(todo), len(todo), mapping, len(MAPPINGS[mapping]))
    t0 = time.perf_counter()
    args = [(files[n], images / f"{n}.nii.gz", orientation) for n in todo]
    with tqdm(total=len(todo), desc="radchestct", unit="vol", disable=None) as bar:
        if workers <= 1 or len(todo) <= 1:
            for a in args:
                r = convert_volume(*a)
                results[r.volume] = r
                bar.update()
        else:
            from fvlm.data.jobs import JobError, run_jobs

            # a worker that dies (out of memory) fails only the volume it held
            for k, r in run_jobs(convert_volume, args, workers, context="forkserver"):
                if isinstance(r, JobError):
                    r = ConvertResult(todo[k], "failed", error=r.error)
                results[r.volume] = r
                bar.update()
    ordered = [results[n] for n in names]
    n_masks = 0
    for r in ordered:  # label maps made since (fvlm segment --pairs): same grid, patient upright
        mask = mask_dir / f"{r.volume}.nii.gz"
        if r.status != "failed" and mask.exists():
            n_masks += 1
            try:
                verify_mask(images / f"{r.volume}.nii.gz", mask)
            except (ValueError, OSError) as e:
                r.status, r.error = "failed", " ".join(str(e).split())
    if n_masks:
        log.info("checked %d label map(s) in %s against their images", n_masks, mask_dir)
    ok = [r.volume for r in ordered if r.status != "failed"]
    failed = [r for r in ordered if r.status == "failed"]

    def split_name(n: str) -> str:
        return split or split_of(n) or "radchestct"

    # pairs CSV: paths relative to OUT where possible (preprocess resolves them against the CSV's folder)
    def rel(p: Path) -> str:
        try:
            return str(p.resolve().relative_to(out.resolve()))
        except ValueError:
            return str(p.resolve())

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["volume", "image", "label", "split"])
    for n in ok:
        w.writerow([n, rel(images / f"{n}.nii.gz"), rel(mask_dir / f"{n}.nii.gz"), split_name(n)])
    atomic_write_text(out / "pairs.csv", buf.getvalue())
    write_ctrate_labels(out / f"labels_{mapping}.csv", mapped, mapping, volumes=ok)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(MANIFEST_FIELDS)
    for r in ordered:
        w.writerow([r.volume, split_name(r.volume), r.status, "x".join(map(str, r.shape)),
                    r.flipped, r.orientation, r.error])
    atomic_write_text(out / "conversion.csv", buf.getvalue())
    if failed:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["volume", "error"])
        for r in failed:
            w.writerow([r.volume, r.error])
            log.error("%s failed: %s", r.volume, r.error)
        atomic_write_text(out / "failures.csv", buf.getvalue())
    elif (out / "failures.csv").exists():
        (out / "failures.csv").unlink()
    flipped = [r.volume for r in ordered if r.flipped]
    log.info("radchestct: %d converted, %d skipped (done before), %d failed in %.1f s; %d flipped%s; next: fvlm "
             "segment --pairs %s, then fvlm preprocess --pairs %s", sum(r.status == "ok" for r in ordered),
             sum(r.status == "skipped" for r in ordered), len(failed), time.perf_counter() - t0, len(flipped),
             f" ({', '.join(flipped[:5])})" if flipped else "", out / "pairs.csv", out / "pairs.csv")
    return ordered


def run_radchestct_cli(args: argparse.Namespace) -> int:
    """``fvlm radchestct``: 0 when every volume converted, 1 when some failed."""
    if args.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")
    results = convert(args.npz_dir, args.labels, args.out, mapping=args.mapping, masks=args.masks or None,
                      split=args.split, orientation=args.orientation, limit=args.limit, workers=args.workers)
    return 1 if any(r.status == "failed" for r in results) else 0
