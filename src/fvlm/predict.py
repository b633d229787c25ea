"""``fvlm predict``: zero-shot findings for one chest CT (NIfTI file or DICOM series) from a trained run.

The scan goes through exactly the functions that built the training and evaluation data::

    read (NIfTI, DICOM series folder, or any SimpleITK format) -> label map (--mask, or TotalSegmentator)
    -> checks (values look like HU; the label map lies on the scan's grid; obliquity; coverage)
    -> [oblique scan: resample scan and label map onto an axis-aligned LPS grid, with a warning]
    -> fvlm.data.preprocess.prepare_arrays  (reorient to LPS, merge classes into anatomies, crop the anatomies'
       box + margin, resample to data.spacing, clip to data.hu_window, pad to data.crop_size)
    -> fvlm.zeroshot.volume_crop_specs + read_crop  (one crop of max(eval_crop_size, box) centred on each anatomy,
       the mask keeping only that anatomy: what ``fvlm eval`` does)
    -> FVLM.encode_image -> fvlm.zeroshot.prompt_probabilities  (softmax over the prompt pair / temperature)

Crops whose windows coincide (common: a processed chest is often no larger than the evaluation crop, so every
anatomy's window is the whole volume) share one forward pass with all their anatomies in the mask. The ViT
never sees the mask and each anatomy's query attends only to its own tokens, so this equals one pass per
anatomy (tested) at a fraction of the cost.

Input policies (also in docs/predict.md):

- orientation: any axis order and flips are reoriented to LPS (transposes and flips, no resampling);
- oblique scans (an index axis more than :data:`OBLIQUE_TOLERANCE_DEG` off every patient axis, or a sheared
  direction): scan and label map are resampled (linear / nearest) onto an axis-aligned LPS grid of the same
  voxel sizes, and a warning says so; smaller obliquities are treated as axis-aligned, as in preprocessing;
- few slices: the volume is padded (as in training); a warning when the scan's z extent is less than half the
  training crop's depth, when the lung or heart is cut by the scan's top or bottom, and when any anatomy is cut
  by the in-plane field of view (the aorta and oesophagus leave every chest CT at the top or bottom: reported
  in the JSON only);
- a missing anatomy: its labels get ``null`` with a warning (never a silent 0);
- non-chest content: no anatomy of the table at all -> refused (``ValueError``); some anatomies but no lung ->
  predicted for the anatomies present, with an explicit warning that the scan does not look like a chest CT;
- label map / scan geometry mismatch: refused, naming both files and the difference;
- values that do not look like HU (no voxel below -500): a warning (raw stored values need the DICOM rescale).

Modules: the result type :mod:`fvlm.prediction`, the warnings :mod:`fvlm.predict_checks`, TotalSegmentator and the
label-map check :mod:`fvlm.scan_labels`, the picture :func:`fvlm.plots.save_overlay`.

Probabilities are the model's zero-shot prompt scores (``softmax([sim(not X), sim(X)] / temperature)``), not
calibrated risks; thresholds come from ``fvlm metrics`` on labelled data.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fvlm.anatomy import Anatomy, AnatomyTable, alignment
from fvlm.checkpoint import load_model
from fvlm.config import Config
from fvlm.data.labelmap import align_label
from fvlm.data.preprocess import (
    SourceVolume,
    from_sitk,
    lps_reorientation,
    prepare_arrays,
    read_nifti,
    reorient_lps,
)
from fvlm.data.store import Geometry, ProcessedVolume
from fvlm.predict_checks import AIR_HU, MIN_Z_COVERAGE, WHOLE_IN_CHEST_CT, coverage_warnings, input_warnings
from fvlm.prediction import Prediction, finite_or_none
from fvlm.scan_labels import label_uint8 as _label_uint8
from fvlm.scan_labels import segment_scan
from fvlm.train import autocast_context, resolve_device
from fvlm.zeroshot import (
    CropSpec,
    prompt_probabilities,
    prompt_text_features,
    read_window,
    shared_windows,
    volume_crop_specs,
)

log = logging.getLogger(__name__)

#: an index axis further than this from every patient axis makes a scan oblique (resampled, with a warning)
OBLIQUE_TOLERANCE_DEG = 1.0
#: HU given to voxels outside the scan when an oblique scan is resampled (air)
OUTSIDE_HU = -1024.0
IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
_NIFTI_SUFFIXES = (".nii", ".nii.gz")
# LPS axis letters: the direction an index axis points to, positive and negative
_AXIS_LETTERS = (("L", "R"), ("P", "A"), ("S", "I"))
# the 6 faces of an LPS (z, y, x) array: (name, axis, index)
_FACES = (("inferior", 0, 0), ("superior", 0, -1), ("anterior", 1, 0), ("posterior", 1, -1),
          ("right", 2, 0), ("left", 2, -1))


# ----------------------------------------------------------------------------------------------- reading
@dataclass(frozen=True)
class DicomSeries:
    """One DICOM series found in a folder tree."""

    uid: str
    folder: str
    files: tuple[str, ...]
    description: str = ""
    modality: str = ""


def _dicom_tag(path: str, tag: str) -> str:
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    reader.LoadPrivateTagsOff()
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return ""
    return reader.GetMetaData(tag).strip() if reader.HasMetaDataKey(tag) else ""


def list_dicom_series(folder: str | Path) -> list[DicomSeries]:
    """Every DICOM series under ``folder`` (searched recursively), most slices first.

    A series whose files are spread over several folders is taken from the folder holding most of them.
    """
    import SimpleITK as sitk

    folder = Path(folder)
    found: dict[str, DicomSeries] = {}
    for d in [folder, *sorted(p for p in folder.rglob("*") if p.is_dir())]:
        for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(d)):
            files = tuple(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(d), uid))
            if uid in found:
                log.warning("DICOM series %s is split over %s and %s: using the folder with more files", uid,
                            found[uid].folder, d)
                if len(found[uid].files) >= len(files):
                    continue
            found[uid] = DicomSeries(uid, str(d), files)
    series = []
    for s in found.values():
        series.append(DicomSeries(s.uid, s.folder, s.files, _dicom_tag(s.files[0], "0008|103e"),
                                  _dicom_tag(s.files[0], "0008|0060")))
    return sorted(series, key=lambda s: (-len(s.files), s.uid))


def read_dicom_series(folder: str | Path, series: str | None = None) -> tuple[SourceVolume, dict[str, Any]]:
    """Read one DICOM series of a folder as HU (SimpleITK applies RescaleSlope/Intercept).

    Args:
        folder: a folder (searched recursively) holding one or several series.
        series: SeriesInstanceUID to read; ``None`` = the series with most slices (the choice is logged).
    Returns:
        the volume and a description (series UID, slices, description, modality, other series).
    """
    import SimpleITK as sitk

    folder = Path(folder)
    found = list_dicom_series(folder)
    if not found:
        raise ValueError(f"{folder}: no DICOM series found (folder of .dcm files expected)")
    listing = "; ".join(f"{s.uid} ({len(s.files)} slices{', ' + s.description if s.description else ''})"
                        for s in found)
    if series:
        chosen = [s for s in found if s.uid == series]
        if not chosen:
            raise ValueError(f"{folder}: no DICOM series {series!r}; found: {listing}")
        pick = chosen[0]
    else:
        pick = found[0]
        if len(found) > 1 and len(found[1].files) == len(pick.files):
            raise ValueError(f"{folder}: {len(found)} DICOM series, the largest two with {len(pick.files)} slices "
                             f"each: which one is the scan cannot be told; choose one with --series UID: {listing}")
        if len(found) > 1:
            log.info("%s holds %d DICOM series; using the one with most slices, %s (choose with --series): %s",
                     folder, len(found), pick.uid, listing)
    if len(pick.files) < 2:
        raise ValueError(f"{folder}: DICOM series {pick.uid} has {len(pick.files)} slice: a 3D CT series is needed")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(list(pick.files))
    reader.MetaDataDictionaryArrayUpdateOn()
    try:
        image = reader.Execute()
    except RuntimeError as e:
        raise ValueError(f"{folder}: cannot read DICOM series {pick.uid}: {' '.join(str(e).split())[:300]}") from None
    vol = from_sitk(image)
    positions = []
    for k in range(len(pick.files)):
        try:
            positions.append([float(x) for x in reader.GetMetaData(k, "0020|0032").split("\\")])
        except (RuntimeError, ValueError):
            positions = []
            break
    if positions:
        check_slice_positions(np.asarray(positions), vol.geometry.matrix[:, 2], f"{folder}: DICOM series {pick.uid}")
    if vol.array.dtype.kind == "f" and vol.array.dtype != np.float32:
        vol = SourceVolume(vol.array.astype(np.float32), vol.geometry)
    info = {"format": "dicom", "path": str(folder), "series_uid": pick.uid, "series_folder": pick.folder,
            "slices": len(pick.files), "description": pick.description, "modality": pick.modality,
            "other_series": [{"uid": s.uid, "slices": len(s.files), "description": s.description}
                             for s in found if s.uid != pick.uid]}
    return vol, info


#: slice distances up to this factor of the median distance are one slice step; larger ones are gaps
SLICE_GAP_FACTOR = 1.5


def check_slice_positions(positions: np.ndarray, normal: np.ndarray, what: str) -> None:
    """Refuse a series whose slices are not evenly spaced: a gap (missing slice), a repeated position.

    The rule: distances between consecutive slice positions (ImagePositionPatient projected on the slice
    normal) must agree within a factor :data:`SLICE_GAP_FACTOR` of their median. A series with a missing
    slice is refused with an error naming the gap, never resampled: an interpolated slice would be invented
    anatomy, and SimpleITK would silently stretch the whole volume to an average spacing. Re-export the
    complete series. Smaller irregularities (up to the factor) are logged as a warning.
    """
    z = np.sort(np.asarray(positions, dtype=np.float64) @ np.asarray(normal, dtype=np.float64))
    if len(z) < 2:
        return
    d = np.diff(z)
    step = float(np.median(d))
    if step <= 1e-6 or np.any(d <= 1e-6 * max(1.0, step)):
        k = int(np.argmin(d))
        raise ValueError(f"{what}: two slices at the same position ({z[k]:.2f} mm along the slice normal): "
                         f"duplicate or mixed series; choose one with --series or clean the folder")
    gaps = np.flatnonzero(d > SLICE_GAP_FACTOR * step)
    if gaps.size:
        missing = int(sum(round(d[g] / step) - 1 for g in gaps))
        where = "; ".join(f"{z[g]:.2f} -> {z[g + 1]:.2f} mm" for g in gaps[:3])
        raise ValueError(f"{what}: {max(1, missing)} slice(s) missing ({where}; {step:.3g} mm between the other "
                         f"{len(z)} slices): series with missing slices are refused, not resampled (an interpolated "
                         f"slice would be invented anatomy); re-export the complete series")
    if np.ptp(d) > 0.01 * step + 1e-3:
        log.warning("%s: slice distances vary from %.3g to %.3g mm (median %.3g mm): the median is used", what,
                    float(d.min()), float(d.max()), step)


def read_image(path: str | Path, series: str | None = None, what: str = "scan") -> tuple[SourceVolume, dict[str, Any]]:
    """A scan or label map: NIfTI (CRC-checked reader), a DICOM series folder, or any 3D SimpleITK format."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} {path} not found")
    if path.is_dir():
        return read_dicom_series(path, series)
    if path.name.lower().endswith(_NIFTI_SUFFIXES):
        return read_nifti(path), {"format": "nifti", "path": str(path)}
    import SimpleITK as sitk

    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as e:
        raise ValueError(f"{what} {path}: not a readable image ({' '.join(str(e).split())[:200]})") from None
    if image.GetDimension() != 3 or min(image.GetSize()) < 2:
        raise ValueError(f"{what} {path}: size {image.GetSize()} is not a 3D volume (for DICOM, give the folder of "
                         f"the series, not one file)")
    return from_sitk(image), {"format": path.name.split(".", 1)[-1].lower(), "path": str(path)}


# ----------------------------------------------------------------------------------------------- geometry
def orientation_code(direction: Any) -> str:
    """Letters of the patient directions the index axes (x, y, z) point to, e.g. ``LPS`` (SimpleITK identity),
    ``RAS``, ``LPI``; oblique axes get the letter of their nearest patient axis."""
    m = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    letters = []
    for a in range(3):
        p = int(np.argmax(np.abs(m[:, a])))
        letters.append(_AXIS_LETTERS[p][0 if m[p, a] > 0 else 1])
    return "".join(letters)


def obliquity_degrees(direction: Any) -> float:
    """Largest angle (degrees) between an index axis and its nearest patient axis (0 for axis-aligned)."""
    m = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    m = m / np.linalg.norm(m, axis=0, keepdims=True)
    cos = np.clip(np.max(np.abs(m), axis=0), -1.0, 1.0)
    return float(np.degrees(np.arccos(cos.min())))


def is_oblique(direction: Any, tolerance_deg: float = OBLIQUE_TOLERANCE_DEG) -> bool:
    """Oblique beyond ``tolerance_deg``, or sheared (index axes not orthogonal, e.g. gantry tilt)."""
    m = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    m = m / np.linalg.norm(m, axis=0, keepdims=True)
    sheared = not np.allclose(m.T @ m, np.eye(3), atol=1e-3)
    return sheared or obliquity_degrees(m) > tolerance_deg


def _to_sitk(vol: SourceVolume) -> Any:
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(np.ascontiguousarray(vol.array))
    img.SetSpacing([float(s) for s in vol.geometry.spacing])
    img.SetOrigin([float(o) for o in vol.geometry.origin])
    img.SetDirection([float(d) for d in vol.geometry.direction])
    return img


def resample_axis_aligned(image: SourceVolume, label: SourceVolume) -> tuple[SourceVolume, SourceVolume]:
    """Resample an oblique scan (linear) and its label map (nearest) onto an axis-aligned LPS grid.

    The grid covers the scan's whole physical extent; each LPS axis keeps the voxel size of the index axis
    nearest to it. Voxels outside the scan get :data:`OUTSIDE_HU` (air) and label 0.
    """
    import SimpleITK as sitk

    g = image.geometry
    source, _ = lps_reorientation(g)
    spacing = np.array([g.spacing[source[p]] for p in range(3)], dtype=np.float64)
    n = np.array(image.shape_xyz, dtype=np.float64)
    # physical extent of the voxel boxes (corners at -0.5 and n - 0.5 in index space)
    corners = np.array([[i, j, k] for i in (-0.5, n[0] - 0.5) for j in (-0.5, n[1] - 0.5) for k in (-0.5, n[2] - 0.5)])
    world = np.asarray(g.origin) + (corners * np.asarray(g.spacing)) @ g.matrix.T
    lo, hi = world.min(axis=0), world.max(axis=0)
    size = np.maximum(1, np.ceil((hi - lo) / spacing - 1e-6)).astype(int)
    origin = lo + spacing / 2
    ref = sitk.Image([int(s) for s in size], sitk.sitkUInt8)
    ref.SetSpacing([float(s) for s in spacing])
    ref.SetOrigin([float(o) for o in origin])
    ref.SetDirection(IDENTITY)
    identity = sitk.Transform()
    img = sitk.Resample(sitk.Cast(_to_sitk(image), sitk.sitkFloat32), ref, identity, sitk.sitkLinear, OUTSIDE_HU,
                        sitk.sitkFloat32)
    lab = sitk.Resample(_to_sitk(SourceVolume(_label_uint8(label.array), label.geometry)), ref,
                        identity, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return from_sitk(img), from_sitk(lab)


def _border_anatomies(label: SourceVolume, table: AnatomyTable) -> dict[str, list[str]]:
    """{anatomy: [faces of the scan it touches]} for anatomies cut by the scan's border (LPS face names)."""
    lab = reorient_lps(label).array
    out: dict[str, list[str]] = {}
    for face, axis, index in _FACES:
        values = np.unique(table.lut[np.take(lab, index, axis=axis)])
        for v in values[values > 0]:
            out.setdefault(table.names[int(v) - 1], []).append(face)
    return out


# ----------------------------------------------------------------------------------------------- the model
#: how prediction JSONs name the whole-crop entry (the global baseline's one anatomy, fvlm.anatomy.GLOBAL_ANATOMY;
#: kept as written since the first release)
WHOLE_VOLUME = "whole volume"


def _shown(entry: Anatomy) -> str:
    """The name of an entry of the model's table in a prediction."""
    return WHOLE_VOLUME if entry.whole_crop else entry.name


class Predictor:
    """A trained model ready to score scans. Build with :func:`load`.

    Example::

        import fvlm
        predictor = fvlm.load("runs/paper", device="cuda")
        result = predictor.predict("scan.nii.gz", mask="scan_totalseg.nii.gz")
        result.probabilities["Emphysema"], result.warnings
    """

    def __init__(self, model: torch.nn.Module, cfg: Config, table: AnatomyTable, device: torch.device,
                 checkpoint: str = ""):
        self.model, self.cfg, self.table, self.device = model, cfg, table, device
        self.checkpoint = checkpoint
        self.alignment = alignment(cfg, table)  # what the model aligns: the table's anatomies, or the whole crop
        self._prompt_features: torch.Tensor | None = None

    # ------------------------------------------------------------------ entry points
    def predict(self, scan: str | Path, mask: str | Path | None = None, *, series: str | None = None,
                totalseg_cmd: str = "", totalseg_fast: bool = False, totalseg_device: str | None = None,
                save_mask: str | Path | None = None) -> Prediction:
        """Score one scan.

        Args:
            scan: NIfTI file, DICOM series folder (``series`` picks one when it holds several; default the one
                with most slices), or another 3D format SimpleITK reads (.mha, .nrrd, ...). Values in HU.
            mask: TotalSegmentator v2 ``total`` multilabel map (``--ml``) on the scan's grid; ``None`` runs
                TotalSegmentator (``totalseg_*`` as in ``fvlm segment``), or refuses with instructions when it is
                not installed.
            save_mask: where to keep the label map TotalSegmentator made (reuse it with ``mask=``).
        """
        timing: dict[str, float] = {}
        t0 = time.perf_counter()
        image, info = read_image(scan, series, "scan")
        timing["read"] = time.perf_counter() - t0
        if mask is not None:
            t0 = time.perf_counter()
            label, label_info = read_image(mask, None, "label map")
            timing["read"] += time.perf_counter() - t0
            segmentation = {"method": "given", "label_map": label_info["path"]}
        else:
            t0 = time.perf_counter()
            label = segment_scan(image, scan, info, self.table, totalseg_cmd, totalseg_fast, totalseg_device, save_mask)
            timing["segment"] = time.perf_counter() - t0
            segmentation = {"method": "TotalSegmentator", "label_map": str(save_mask) if save_mask else None}
        label = align_label(image, label, label_name=f"label map {mask or '(TotalSegmentator output)'}",
                            image_name=f"scan {scan}")
        try:
            label = SourceVolume(_label_uint8(label.array), label.geometry)
        except ValueError as e:
            raise ValueError(f"label map {mask or '(TotalSegmentator output)'}: {e}") from None
        try:
            return self._predict(image, label, {**info, "segmentation": segmentation}, timing)
        except ValueError as e:  # a problem of these inputs: name the files
            if str(scan) in str(e):
                raise
            raise ValueError(f"scan {scan}" + (f" with label map {mask}" if mask else "") + f": {e}") from None

    def predict_arrays(self, hu: np.ndarray, label_map: np.ndarray, spacing: tuple[float, float, float],
                       origin: tuple[float, float, float] = (0.0, 0.0, 0.0),
                       direction: tuple[float, ...] = IDENTITY) -> Prediction:
        """Score a volume held in memory (notebooks).

        Args:
            hu: (z, y, x) = (D, H, W) array in Hounsfield units (any numeric dtype).
            label_map: (D, H, W) TotalSegmentator v2 ``total`` ids on the same grid.
            spacing: (x, y, z) voxel size in mm.
            origin: LPS position (mm) of voxel (0, 0, 0); direction: 3 x 3 row-major, column a = the LPS unit
                vector of index axis a (SimpleITK conventions; the identity = x to the patient's left, y
                posterior, z superior). From a NIfTI affine: :func:`fvlm.data.preprocess.geometry_from_affine`.
        """
        hu, label_map = np.asarray(hu), np.asarray(label_map)
        if hu.ndim != 3 or hu.shape != label_map.shape:
            raise ValueError(f"hu {hu.shape} and label_map {label_map.shape} must be 3D arrays of the same shape")
        geometry = Geometry(tuple(float(s) for s in spacing), tuple(float(o) for o in origin),
                            tuple(float(d) for d in np.asarray(direction, dtype=np.float64).ravel()))
        if len(geometry.spacing) != 3 or len(geometry.origin) != 3 or len(geometry.direction) != 9:
            raise ValueError("spacing and origin need 3 values, direction 9 (3 x 3 row-major)")
        info = {"format": "array", "path": None, "segmentation": {"method": "given", "label_map": None}}
        return self._predict(SourceVolume(hu, geometry), SourceVolume(label_map, geometry), info, {})

    # ------------------------------------------------------------------ the pass
    def _predict(self, image: SourceVolume, label: SourceVolume, source: dict[str, Any],
                 timing: dict[str, float]) -> Prediction:
        cfg, table = self.cfg, self.table
        warnings: list[str] = []

        def warn(msg: str) -> None:
            warnings.append(msg)
            log.warning("%s", msg)

        for msg in input_warnings(image, source):
            warn(msg)

        t0 = time.perf_counter()
        g = image.geometry
        shape_zyx = [int(s) for s in image.array.shape]
        input_info = {"shape": shape_zyx, "shape_xyz": list(image.shape_xyz), **g.to_dict(),
                      "orientation": orientation_code(g.direction),
                      "oblique_degrees": round(obliquity_degrees(g.direction), 3)}
        label = SourceVolume(_label_uint8(label.array), label.geometry)
        border = _border_anatomies(label, table)  # on the scan's own grid: its faces are the scan's border
        oblique = is_oblique(g.direction)
        if oblique:
            warn(f"oblique scan (an axis {input_info['oblique_degrees']:.1f} degrees off the patient axes): scan and "
                 f"label map resampled onto an axis-aligned LPS grid (linear / nearest)")
            image, label = resample_axis_aligned(image, label)
        try:
            img, msk, info = prepare_arrays(image, label, cfg.data, table)
        except ValueError as e:
            if "no voxel of any configured anatomy" in str(e):
                raise ValueError(f"none of the anatomies {list(table.names)} is in the label map: not a chest CT, or "
                                 f"not a TotalSegmentator v2 'total' multilabel map (--ml)") from None
            raise
        timing["preprocess"] = time.perf_counter() - t0

        # coverage and missing anatomies
        for msg in coverage_warnings(reorient_lps(image), cfg, info, self.alignment, border):
            warn(msg)

        # encode and score
        t0 = time.perf_counter()
        meta = {**info, "shape": list(img.shape)}
        features, crops = self.anatomy_features(img, msk, meta)
        timing["encode"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        if self._prompt_features is None:  # the prompts do not depend on the scan: encoded once per predictor
            self._prompt_features = prompt_text_features(self.model, cfg, table, self.device)
        probs = prompt_probabilities(self.model, cfg, table, features[None], self.device, self._prompt_features)
        temperature = float(self.model.temperature().detach())
        timing["score"] = time.perf_counter() - t0
        timing["total"] = sum(v for k, v in timing.items() if k != "total")

        probabilities = {lab: finite_or_none(float(p[0])) for lab, p in probs.items()}
        labels = {}
        model_table = self.alignment.table
        for p, q in zip(table.prompts, model_table.prompts):  # q: the prompt as the model's table scores it
            value = probabilities[p.label]
            labels[p.label] = {"anatomy": _shown(model_table.anatomies[model_table.index(q.anatomy)]),
                               "probability": value, "status": "scored" if value is not None else "anatomy missing"}
        anatomies = {}
        for n in table.names:
            a = info["anatomies"][n]
            anatomies[n] = {"found": a["voxels"] > 0, "voxels": int(info["source"]["voxels"][n]),
                            "voxels_processed": int(a["voxels"]), "cut_by_scan_border": border.get(n, []),
                            "bbox_processed": a["bbox"]}
        preprocessing = {
            "input": input_info,
            "reoriented_to": "LPS",
            "oblique_resampled": oblique,
            "target_spacing": info["spacing"],
            "hu_window": info["hu_window"],
            "anatomy_crop_input_voxels": info["source"]["crop"],
            "padding": info["source"]["pad"],
            "processed_shape": list(img.shape),
            "processed_origin": info["origin"],
            "eval_crop_size": [int(s) for s in cfg.data.eval_crop_size],
            "crops": crops,
        }
        model_info = {"checkpoint": self.checkpoint, "mode": cfg.loss.mode, "anatomy_table": table.name,
                      "temperature": temperature, "device": str(self.device)}
        return Prediction(probabilities, labels, anatomies, warnings, preprocessing,
                          {k: v for k, v in source.items()}, model_info, timing, list(table.unscored), img, msk)

    @torch.no_grad()
    def anatomy_features(self, image: np.ndarray, mask: np.ndarray, meta: dict[str, Any],
                         share_windows: bool = True) -> tuple[np.ndarray, list[dict[str, Any]]]:
        """Anatomy embeddings of one processed volume, cropped exactly as ``fvlm eval`` crops.

        Args:
            image: int16 (D, H, W) HU as :func:`~fvlm.data.preprocess.prepare_arrays` returns it; mask: uint8.
            meta: ``shape`` and ``anatomies`` {name: {voxels, bbox}}.
            share_windows: encode crops with identical windows once (exact; see the module docstring).
        Returns:
            features float32 (A, E), one row per entry of the model's table (A = 1 in global mode), NaN where the
            anatomy is absent; the crops as [{"anatomies", "start", "size"}].
        """
        cfg = self.cfg
        model_table = self.alignment.table
        vol = ProcessedVolume(Path("."), image, mask, meta)
        specs = volume_crop_specs("scan", meta, cfg, model_table)
        features = np.full((len(model_table), cfg.model.embed_dim), np.nan, dtype=np.float32)
        windows = shared_windows(specs) if share_windows else [[s] for s in specs]
        crops = []
        for group in windows:
            names = [_shown(model_table.anatomies[s.row]) for s in group]
            crops.append({"anatomies": names, "start": list(group[0].start), "size": list(group[0].size)})
        # windows of equal size share a batch, as in evaluation
        by_size: dict[tuple, list[list[CropSpec]]] = {}
        for group in windows:
            by_size.setdefault(group[0].size, []).append(group)
        batch = max(1, cfg.eval.batch_size)
        for same in by_size.values():
            for j in range(0, len(same), batch):
                chunk = same[j : j + batch]
                images, masks = [], []
                for group in chunk:
                    crop_img, crop_mask = read_window(vol, group, cfg.data.hu_window)
                    images.append(crop_img)
                    masks.append(crop_mask)
                x = torch.from_numpy(np.stack(images)).to(self.device)
                m = torch.from_numpy(np.stack(masks)).to(self.device)
                with autocast_context(cfg, self.device):
                    feats, present = self.model.encode_image(x, m)
                feats, present = feats.float().cpu().numpy(), present.cpu().numpy()
                for i, group in enumerate(chunk):
                    for s in group:
                        if present[i, s.row]:
                            features[s.row] = feats[i, s.row]
        return features, crops


# ----------------------------------------------------------------------------------------------- loading
def load(checkpoint: str | Path, device: str = "cpu") -> Predictor:
    """Load a model folder (run, checkpoint, ``fvlm export`` output) or a Hub id (``org/name``, from the local
    cache) for prediction (``device``: cpu, cuda, cuda:1, auto)."""
    dev = resolve_device(device)
    model, cfg, table = load_model(checkpoint, dev)
    return Predictor(model, cfg, table, dev, model.source)


def predict(scan: str | Path, checkpoint: str | Path, mask: str | Path | None = None, *, device: str = "auto",
            series: str | None = None, totalseg_cmd: str = "", totalseg_fast: bool = False,
            totalseg_device: str | None = None, save_mask: str | Path | None = None, out: str | Path | None = None,
            png: str | Path | None = None) -> Prediction:
    """``fvlm predict``: score one scan with the model in ``checkpoint``; the JSON goes to ``out`` and the picture
    to ``png`` when given (see :meth:`Predictor.predict` for the other arguments)."""
    predictor = load(checkpoint, device=device)
    pred = predictor.predict(scan, mask=mask, series=series, totalseg_cmd=totalseg_cmd, totalseg_fast=totalseg_fast,
                             totalseg_device=totalseg_device, save_mask=save_mask)
    if out:
        pred.to_json(out)
    if png:
        pred.save_png(png)
    top = ", ".join(f"{label} {p:.2f}" for label, _, p in pred.top(5))
    log.info("%s: anatomies found %s%s; top: %s; %d warning(s)%s%s", scan, pred.found,
             f", missing {pred.missing}" if pred.missing else "", top, len(pred.warnings),
             f"; JSON {out}" if out else "", f"; PNG {png}" if png else "")
    return pred


__all__ = ["AIR_HU", "MIN_Z_COVERAGE", "WHOLE_IN_CHEST_CT", "WHOLE_VOLUME", "DicomSeries", "Prediction", "Predictor",
           "check_slice_positions", "list_dicom_series", "load", "obliquity_degrees", "orientation_code", "predict",
           "read_dicom_series", "read_image", "resample_axis_aligned", "segment_scan"]
