"""What ``fvlm predict`` tells the user about an input (the policies in :mod:`fvlm.predict` and docs/predict.md):
values that do not look like HU, a scan too short, missing anatomies, no lung, anatomies cut by the scan's border.

Each function returns the warnings in the order they are reported; nothing here refuses an input.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fvlm.anatomy import Alignment
from fvlm.config import Config
from fvlm.data.volume import SourceVolume

#: warn when the scan's z extent is less than this fraction of the training crop's depth in mm
MIN_Z_COVERAGE = 0.5
#: a CT in HU has air (about -1000) around the body; no voxel below this suggests values that are not HU
AIR_HU = -500.0
#: anatomies a complete chest CT images whole: cut by the scan's top or bottom -> a warning
WHOLE_IN_CHEST_CT = ("lung", "heart")


def input_warnings(image: SourceVolume, source: dict[str, Any]) -> list[str]:
    """A constant scan, a DICOM modality other than CT, values that do not look like HU."""
    warnings = []
    if image.array.size and image.array.min() == image.array.max():
        warnings.append(f"the scan {source.get('path') or ''} is constant (every voxel {image.array.flat[0]}): not a "
                        f"CT scan, or an empty export; the findings mean nothing")
    if source.get("format") == "dicom" and source.get("modality") and source["modality"] != "CT":
        warnings.append(f"DICOM modality is {source['modality']!r}, not CT: the model was trained on CT")
    lowest = float(np.min(image.array)) if image.array.size else 0.0
    if lowest > AIR_HU:
        warnings.append(f"no voxel below {AIR_HU:g} (minimum {lowest:g}): the values do not look like Hounsfield "
                        f"units (air is about -1000); raw stored values need RescaleSlope/RescaleIntercept applied")
    return warnings


def coverage_warnings(reoriented: SourceVolume, cfg: Config, info: dict[str, Any], aligned: Alignment,
                      border: dict[str, list[str]]) -> list[str]:
    """The scan's z extent against the training crop, missing anatomies, no lung, anatomies cut by the border.

    Args:
        reoriented: the scan (LPS) that was preprocessed; info: what :func:`fvlm.data.preprocess.prepare_arrays`
            reported; border: {anatomy: faces of the scan it touches}.
    """
    warnings = []
    table = aligned.data_table
    z_mm = reoriented.array.shape[0] * reoriented.geometry.spacing[2]
    crop_mm = cfg.data.crop_size[0] * cfg.data.spacing[2]
    if z_mm < MIN_Z_COVERAGE * crop_mm:
        warnings.append(f"the scan covers only {z_mm:.0f} mm from inferior to superior (the model was trained on "
                        f"{crop_mm:.0f} mm crops of whole chests): it was padded, and scores may be unreliable")
    missing = [n for n in table.names if info["anatomies"][n]["voxels"] == 0]
    for name in missing:
        labels = [p.label for p in table.prompts if p.anatomy == name]
        why = "not in the label map" if info["source"]["voxels"][name] == 0 else "lost when resampling"
        if aligned.whole_crop:
            what = (f"this global model still scores {labels} from the whole volume, which may not show it"
                    if labels else "no label depends on it")
        else:
            what = f"its labels {labels} are null" if labels else "no label depends on it"
        warnings.append(f"anatomy {name!r} {why}: {what}")
    if "lung" in table.names and "lung" in missing:
        warnings.append("no lung in the label map: this does not look like a chest CT (the model was trained on chest "
                        "CT); the scores of the other anatomies are given but may be meaningless")
    for name, faces in border.items():
        # a chest CT images the lung and heart whole; the aorta and oesophagus always leave it at the top or
        # bottom, so only an in-plane cut (field of view too small) is worth a warning for them
        shown = faces if name in WHOLE_IN_CHEST_CT else [f for f in faces if f not in ("inferior", "superior")]
        if shown and name not in missing:
            warnings.append(f"anatomy {name!r} is cut by the scan's {'/'.join(shown)} border (only partly imaged)")
    return warnings


__all__ = ["AIR_HU", "MIN_Z_COVERAGE", "WHOLE_IN_CHEST_CT", "coverage_warnings", "input_warnings"]
