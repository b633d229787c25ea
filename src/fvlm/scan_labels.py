"""The label map of a scan to predict: TotalSegmentator run on it (:func:`segment_scan`) when none is given (its ids
are checked by :func:`fvlm.data.labelmap.class_ids`, like those of a given label map)."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from fvlm.anatomy import AnatomyTable
from fvlm.data.volume import SourceVolume, read_nifti, write_nifti
from fvlm.io import atomic_path
from fvlm.segment import find_totalsegmentator, roi_subset

log = logging.getLogger(__name__)


def segment_scan(image: SourceVolume, scan: str | Path, info: dict[str, Any], table: AnatomyTable,
                 totalseg_cmd: str = "", fast: bool = False, device: str | None = None,
                 save_mask: str | Path | None = None) -> SourceVolume:
    """TotalSegmentator v2 label map of a scan (``roi_subset`` = the table's classes), or a ``FileNotFoundError``
    that explains how to pass ``--mask`` when TotalSegmentator is not available."""
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


__all__ = ["segment_scan"]
