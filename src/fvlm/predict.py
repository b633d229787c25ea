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

Probabilities are the model's zero-shot prompt scores (``softmax([sim(not X), sim(X)] / temperature)``), not
calibrated risks; thresholds come from ``fvlm metrics`` on labelled data.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fvlm.anatomy import AnatomyTable
from fvlm.config import Config
from fvlm.data.dicom import DicomSeries, check_slice_positions, list_dicom_series, read_dicom_series, read_image
from fvlm.data.prepare import prepare_arrays
from fvlm.data.store import Geometry, ProcessedVolume
from fvlm.data.volume import (
    IDENTITY,
    SourceVolume,
    is_oblique,
    obliquity_degrees,
    orientation_code,
    read_nifti,
    reorient_lps,
    resample_axis_aligned,
)
from fvlm.io import atomic_path, atomic_write_text
from fvlm.zeroshot import (
    CropSpec,
    prompt_probabilities,
    prompt_text_features,
    read_window,
    shared_windows,
    volume_crop_specs,
)

log = logging.getLogger(__name__)

#: warn when the scan's z extent is less than this fraction of the training crop's depth in mm
MIN_Z_COVERAGE = 0.5
#: a CT in HU has air (about -1000) around the body; no voxel below this suggests values that are not HU
AIR_HU = -500.0
#: anatomies a complete chest CT images whole: cut by the scan's top or bottom -> a warning
WHOLE_IN_CHEST_CT = ("lung", "heart")
# the 6 faces of an LPS (z, y, x) array: (name, axis, index)
_FACES = (("inferior", 0, 0), ("superior", 0, -1), ("anterior", 1, 0), ("posterior", 1, -1),
          ("right", 2, 0), ("left", 2, -1))


# ----------------------------------------------------------------------------------------------- geometry
def _border_anatomies(label: SourceVolume, table: AnatomyTable) -> dict[str, list[str]]:
    """{anatomy: [faces of the scan it touches]} for anatomies cut by the scan's border (LPS face names)."""
    lab = reorient_lps(label).array
    out: dict[str, list[str]] = {}
    for face, axis, index in _FACES:
        values = np.unique(table.lut[np.take(lab, index, axis=axis)])
        for v in values[values > 0]:
            out.setdefault(table.names[int(v) - 1], []).append(face)
    return out


# ----------------------------------------------------------------------------------------------- result
def _finite(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


@dataclass
class Prediction:
    """The result for one scan.

    Attributes:
        probabilities: {label: probability of the positive prompt, or None when its anatomy is missing}, in the
            anatomy table's prompt order.
        labels: {label: {"anatomy", "probability", "status" ("scored" | "anatomy missing")}}.
        anatomies: {anatomy: {"found", "voxels" (input grid), "voxels_processed", "cut_by_scan_border" [faces],
            "bbox_processed" [z0, z1, y0, y1, x0, x1]}}.
        warnings: everything the user should know about this input (also logged).
        preprocessing: input geometry and orientation, what was applied (reorientation, oblique resampling,
            target spacing, window, crop, padding) and the evaluation crops.
        source, model, timing: what was read, which checkpoint scored it, seconds per stage.
        image, mask: the processed volume (int16 HU (D, H, W), LPS, ``data.spacing``) and anatomy mask (uint8),
            for plotting; not part of :meth:`to_dict`.
    """

    probabilities: dict[str, float | None]
    labels: dict[str, dict[str, Any]]
    anatomies: dict[str, dict[str, Any]]
    warnings: list[str]
    preprocessing: dict[str, Any]
    source: dict[str, Any]
    model: dict[str, Any]
    timing: dict[str, float] = field(default_factory=dict)
    unscored: list[str] = field(default_factory=list)
    image: np.ndarray | None = field(default=None, repr=False)
    mask: np.ndarray | None = field(default=None, repr=False)

    @property
    def found(self) -> list[str]:
        return [a for a, v in self.anatomies.items() if v["found"]]

    @property
    def missing(self) -> list[str]:
        return [a for a, v in self.anatomies.items() if not v["found"]]

    def top(self, n: int = 5) -> list[tuple[str, str, float]]:
        """The ``n`` highest-scoring labels as (label, anatomy, probability)."""
        scored = [(k, v["anatomy"], v["probability"]) for k, v in self.labels.items() if v["probability"] is not None]
        return sorted(scored, key=lambda t: -t[2])[:n]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary (no NaN: a missing value is ``null``)."""
        from fvlm import __version__

        return {
            "fvlm_version": __version__,
            "source": self.source,
            "model": self.model,
            "probabilities": self.probabilities,
            "labels": self.labels,
            "unscored": self.unscored,
            "anatomies": self.anatomies,
            "found": self.found,
            "missing": self.missing,
            "warnings": self.warnings,
            "preprocessing": self.preprocessing,
            "timing": {k: round(v, 4) for k, v in self.timing.items()},
            "note": "zero-shot prompt scores of a research model (softmax over 'Not X.' / 'X.'), not calibrated "
                    "risks and not a diagnosis",
        }

    def to_json(self, path: str | Path | None = None) -> str:
        """The JSON text; written atomically to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n"
        if path is not None:
            atomic_write_text(path, text)
        return text

    def save_png(self, path: str | Path, top: int = 6) -> None:
        """Axial and coronal slices through the anatomies' centre with anatomy contours, and the top findings."""
        save_overlay(self, path, top=top)


# ----------------------------------------------------------------------------------------------- the model
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
        self.global_mode = cfg.loss.mode == "global"
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
        from fvlm.data.labelmap import align_label

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

        if image.array.size and image.array.min() == image.array.max():
            warn(f"the scan {source.get('path') or ''} is constant (every voxel {image.array.flat[0]}): not a CT "
                 f"scan, or an empty export; the findings mean nothing")

        t0 = time.perf_counter()
        g = image.geometry
        shape_zyx = [int(s) for s in image.array.shape]
        input_info = {"shape": shape_zyx, "shape_xyz": list(image.shape_xyz), **g.to_dict(),
                      "orientation": orientation_code(g.direction),
                      "oblique_degrees": round(obliquity_degrees(g.direction), 3)}
        if source.get("format") == "dicom" and source.get("modality") and source["modality"] != "CT":
            warn(f"DICOM modality is {source['modality']!r}, not CT: the model was trained on CT")
        lowest = float(np.min(image.array)) if image.array.size else 0.0
        if lowest > AIR_HU:
            warn(f"no voxel below {AIR_HU:g} (minimum {lowest:g}): the values do not look like Hounsfield units "
                 f"(air is about -1000); raw stored values need RescaleSlope/RescaleIntercept applied")

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
        reoriented = reorient_lps(image)
        z_mm = reoriented.array.shape[0] * reoriented.geometry.spacing[2]
        crop_mm = cfg.data.crop_size[0] * cfg.data.spacing[2]
        if z_mm < MIN_Z_COVERAGE * crop_mm:
            warn(f"the scan covers only {z_mm:.0f} mm from inferior to superior (the model was trained on "
                 f"{crop_mm:.0f} mm crops of whole chests): it was padded, and scores may be unreliable")
        missing = [n for n in table.names if info["anatomies"][n]["voxels"] == 0]
        for name in missing:
            labels = [p.label for p in table.prompts if p.anatomy == name]
            why = "not in the label map" if info["source"]["voxels"][name] == 0 else "lost when resampling"
            if self.global_mode:
                what = (f"this global model still scores {labels} from the whole volume, which may not show it"
                        if labels else "no label depends on it")
            else:
                what = f"its labels {labels} are null" if labels else "no label depends on it"
            warn(f"anatomy {name!r} {why}: {what}")
        if "lung" in table.names and "lung" in missing:
            warn("no lung in the label map: this does not look like a chest CT (the model was trained on chest CT); "
                 "the scores of the other anatomies are given but may be meaningless")
        for name, faces in border.items():
            # a chest CT images the lung and heart whole; the aorta and oesophagus always leave it at the top or
            # bottom, so only an in-plane cut (field of view too small) is worth a warning for them
            shown = faces if name in WHOLE_IN_CHEST_CT else [f for f in faces if f not in ("inferior", "superior")]
            if shown and name not in missing:
                warn(f"anatomy {name!r} is cut by the scan's {'/'.join(shown)} border (only partly imaged)")

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

        probabilities = {lab: _finite(float(p[0])) for lab, p in probs.items()}
        labels = {}
        for p in table.prompts:
            value = probabilities[p.label]
            labels[p.label] = {"anatomy": "whole volume" if self.global_mode else p.anatomy, "probability": value,
                               "status": "scored" if value is not None else "anatomy missing"}
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
            features float32 (A, E) (A = 1 in global mode), NaN where the anatomy is absent; the crops as
            [{"anatomies", "start", "size"}].
        """
        from fvlm.runtime import autocast_context

        cfg = self.cfg
        vol = ProcessedVolume(Path("."), image, mask, meta)
        specs = volume_crop_specs("scan", meta, cfg, self.table, self.global_mode)
        a = 1 if self.global_mode else len(self.table)
        features = np.full((a, cfg.model.embed_dim), np.nan, dtype=np.float32)
        windows = shared_windows(specs) if share_windows else [[s] for s in specs]
        crops = []
        for group in windows:
            names = ["whole volume" if s.anatomy < 0 else self.table.names[s.anatomy] for s in group]
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
                        k = max(s.anatomy, 0)
                        if present[i, k]:
                            features[k] = feats[i, k]
        return features, crops


def _label_uint8(array: np.ndarray) -> np.ndarray:
    """A label map as uint8, refusing values that are not TotalSegmentator v2 ``total`` ids (0..117)."""
    from fvlm.totalseg import MAX_CLASS_ID

    if array.dtype == np.uint8 and (not array.size or array.max() <= MAX_CLASS_ID):
        return array
    if array.dtype.kind == "f" and (not np.all(np.isfinite(array)) or np.any(array != np.round(array))):
        raise ValueError("label map holds non-integer values: not a label map")
    if array.size and (array.min() < 0 or array.max() > MAX_CLASS_ID):
        bad = np.unique(array[(array < 0) | (array > MAX_CLASS_ID)])[:10]
        raise ValueError(f"label map holds class ids {bad.astype(np.int64).tolist()} outside 0..{MAX_CLASS_ID}: not a "
                         f"TotalSegmentator v2 'total' map")
    return array.astype(np.uint8)


def segment_scan(image: SourceVolume, scan: str | Path, info: dict[str, Any], table: AnatomyTable,
                 totalseg_cmd: str = "", fast: bool = False, device: str | None = None,
                 save_mask: str | Path | None = None) -> SourceVolume:
    """TotalSegmentator v2 label map of a scan (``roi_subset`` = the table's classes), or a ``FileNotFoundError``
    that explains how to pass ``--mask`` when TotalSegmentator is not available."""
    from fvlm.data.volume import write_nifti
    from fvlm.segment import find_totalsegmentator, roi_subset

    try:
        runner = find_totalsegmentator(totalseg_cmd or None, roi_subset(table), fast=fast, device=device)
    except FileNotFoundError as e:
        raise FileNotFoundError(
            f"no --mask given and TotalSegmentator is not available ({e}). Segment the scan yourself with "
            f"TotalSegmentator v2 (multilabel output): `TotalSegmentator -i {scan} -o labels.nii.gz --ml --task total` "
            f"and pass --mask labels.nii.gz (Python: predictor.predict(scan, mask=...)), or install TotalSegmentator "
            f"(pip install 'fvlm[segment]', or in its own environment with --totalseg-cmd PATH)") from None
    log.info("segmenting %s with TotalSegmentator (%s)", scan, runner.describe())
    with tempfile.TemporaryDirectory(prefix="fvlm_predict_") as td:
        if info.get("format") == "nifti":
            src = Path(scan)
        else:
            src = Path(td) / "scan.nii"
            write_nifti(src, image.array, image.geometry)
        out = Path(td) / "labels.nii.gz"
        try:
            runner.run(src, out)
        except RuntimeError as e:
            raise ValueError(f"TotalSegmentator failed on {scan}: {e}") from None
        if not out.exists():
            raise ValueError(f"TotalSegmentator reported success on {scan} but wrote no label map")
        label = read_nifti(out)  # its grid and ids are checked like those of a given --mask
        if save_mask:
            with atomic_path(save_mask, suffix=".nii.gz") as tmp:
                tmp.write_bytes(out.read_bytes())
            log.info("label map saved to %s", save_mask)
    return SourceVolume(np.array(label.array), label.geometry)


# ----------------------------------------------------------------------------------------------- loading
def load(checkpoint: str | Path, device: str = "cpu") -> Predictor:
    """Load a model folder (run, checkpoint, ``fvlm export`` output) or a Hub id (``org/name``, from the local
    cache) for prediction (``device``: cpu, cuda, cuda:1, auto)."""
    from fvlm.checkpoint import load_model
    from fvlm.runtime import resolve_device

    dev = resolve_device(device)
    model, cfg, table = load_model(checkpoint, dev)
    return Predictor(model, cfg, table, dev, model.source)


# ----------------------------------------------------------------------------------------------- the picture
def _centre(pred: Prediction) -> tuple[int, int, int]:
    boxes = [v["bbox_processed"] for v in pred.anatomies.values() if v["found"] and v["bbox_processed"]]
    assert pred.image is not None
    if not boxes:
        return tuple(s // 2 for s in pred.image.shape)  # type: ignore[return-value]
    lo = [min(b[2 * a] for b in boxes) for a in range(3)]
    hi = [max(b[2 * a + 1] for b in boxes) for a in range(3)]
    return tuple((lo[a] + hi[a] - 1) // 2 for a in range(3))  # type: ignore[return-value]


def save_overlay(pred: Prediction, path: str | Path, top: int = 6) -> None:
    """PNG: axial and coronal slices of the processed volume (radiological view: patient's right on the image's
    left) through the centre of the anatomies found, anatomy contours with a legend, and the top findings."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    if pred.image is None or pred.mask is None:
        raise ValueError("this prediction holds no processed volume to draw")
    sx, sy, sz = pred.preprocessing["target_spacing"]
    low, high = pred.preprocessing["hu_window"]
    zc, yc, _ = _centre(pred)
    names = list(pred.anatomies)
    colours = [f"C{k % 10}" for k in range(len(names))]
    fig = Figure(figsize=(12, 7), dpi=100)
    FigureCanvasAgg(fig)
    gs = fig.add_gridspec(2, 2, height_ratios=[5, 1.5], top=0.9, bottom=0.03, left=0.03, right=0.97, hspace=0.08)
    views = [("axial", pred.image[zc], pred.mask[zc], sy / sx, "upper", f"axial z={zc}", ("R", "L"), ("A", "P")),
             ("coronal", pred.image[:, yc], pred.mask[:, yc], sz / sx, "lower", f"coronal y={yc}", ("R", "L"),
              ("I", "S"))]
    for col, (_, img, msk, aspect, origin, title, (left, right), (bottom_or_top, other)) in enumerate(views):
        ax = fig.add_subplot(gs[0, col])
        ax.imshow(img, cmap="gray", vmin=low, vmax=high, aspect=aspect, origin=origin, interpolation="nearest")
        for k in range(len(names)):
            sel = msk == k + 1
            if sel.any() and sel.shape[0] > 1 and sel.shape[1] > 1:
                ax.contour(sel.astype(np.float32), levels=[0.5], colors=[colours[k]], linewidths=1.2)
        ax.set_title(title, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
        kw = {"transform": ax.transAxes, "color": "yellow", "fontsize": 11, "fontweight": "bold"}
        ax.text(0.01, 0.5, left, ha="left", va="center", **kw)
        ax.text(0.99, 0.5, right, ha="right", va="center", **kw)
        # axial: anterior at the top; coronal: superior at the top
        top_letter, bottom_letter = (bottom_or_top, other) if origin == "upper" else (other, bottom_or_top)
        ax.text(0.5, 0.99, top_letter, ha="center", va="top", **kw)
        ax.text(0.5, 0.01, bottom_letter, ha="center", va="bottom", **kw)
    handles = [Line2D([0], [0], color=colours[k], lw=2,
                      label=f"{n}" + ("" if pred.anatomies[n]["found"] else " (missing)"))
               for k, n in enumerate(names)]
    fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.96), ncol=len(names), fontsize=9,
               frameon=False)
    lines = [f"{label} ({anatomy}): {p:.3f}" for label, anatomy, p in pred.top(top)]
    text = "Top findings (zero-shot prompt scores, not calibrated risks):\n" + "\n".join(lines or ["(none scored)"])
    if pred.missing:
        text += f"\nMissing anatomies (labels not scored): {', '.join(pred.missing)}"
    ax = fig.add_subplot(gs[1, :])
    ax.axis("off")
    ax.text(0.0, 1.0, text, ha="left", va="top", fontsize=9, family="monospace", transform=ax.transAxes)
    if pred.warnings:
        ax.text(1.0, 1.0, f"{len(pred.warnings)} warning(s): see the JSON", ha="right", va="top", fontsize=9,
                color="darkred", transform=ax.transAxes)
    src = pred.source.get("path") or "array"
    fig.suptitle(f"fvlm predict: {Path(src).name if src != 'array' else src}", fontsize=11, y=0.995)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")


# ----------------------------------------------------------------------------------------------- CLI
def run_predict_cli(args: argparse.Namespace) -> int:
    """``fvlm predict``: the JSON goes to ``--out`` (or stdout), the picture to ``--png``; 0 on success."""
    predictor = load(args.checkpoint, device=args.device)
    pred = predictor.predict(args.scan, mask=args.mask, series=args.series or None, totalseg_cmd=args.totalseg_cmd,
                             totalseg_fast=args.fast, totalseg_device=args.totalseg_device or None,
                             save_mask=args.save_mask or None)
    text = pred.to_json(args.out or None)
    if args.png:
        pred.save_png(args.png)
    if not args.out:
        sys.stdout.write(text)
    top = ", ".join(f"{label} {p:.2f}" for label, _, p in pred.top(5))
    log.info("%s: anatomies found %s%s; top: %s; %d warning(s)%s%s", args.scan, pred.found,
             f", missing {pred.missing}" if pred.missing else "", top, len(pred.warnings),
             f"; JSON {args.out}" if args.out else "", f"; PNG {args.png}" if args.png else "")
    return 0


__all__ = ["DicomSeries", "Prediction", "Predictor", "list_dicom_series", "load", "obliquity_degrees",
           "orientation_code", "check_slice_positions", "read_dicom_series", "read_image", "resample_axis_aligned",
           "save_overlay", "segment_scan"]
