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
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fvlm.anatomy import Anatomy, AnatomyTable, alignment
from fvlm.checkpoint import load_model
from fvlm.config import Config
from fvlm.data.dicom import read_image
from fvlm.data.labelmap import align_label, class_ids
from fvlm.data.prepare import prepare_arrays
from fvlm.data.store import Geometry, ProcessedVolume
from fvlm.data.volume import (
    IDENTITY,
    SourceVolume,
    is_oblique,
    obliquity_degrees,
    orientation_code,
    reorient_lps,
    resample_axis_aligned,
)
from fvlm.predict_checks import coverage_warnings, input_warnings
from fvlm.prediction import Prediction, finite_or_none
from fvlm.runtime import autocast_context, resolve_device
from fvlm.scan_labels import segment_scan
from fvlm.zeroshot import (
    CropSpec,
    prompt_probabilities,
    prompt_text_features,
    read_window,
    shared_windows,
    volume_crop_specs,
)

log = logging.getLogger(__name__)

# the 6 faces of an LPS (z, y, x) array: (name, axis, index)
_FACES = (("inferior", 0, 0), ("superior", 0, -1), ("anterior", 1, 0), ("posterior", 1, -1),
          ("right", 2, 0), ("left", 2, -1))


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
            label = SourceVolume(class_ids(label.array), label.geometry)
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
                posterior, z superior). From a NIfTI affine: :func:`fvlm.data.volume.geometry_from_affine`.
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
        label = SourceVolume(class_ids(label.array), label.geometry)
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


__all__ = ["WHOLE_VOLUME", "Prediction", "Predictor", "load", "predict"]
