"""DICOM series and the any-format scan reader of ``fvlm predict``: a folder of DICOM files, a NIfTI file or any
3D format SimpleITK reads -> :class:`~fvlm.data.volume.SourceVolume`.

Kept apart from :mod:`fvlm.data.volume` (NIfTI, headers, geometry), which would pass 450 lines with it: this is
the one place that finds, chooses and checks DICOM series (slice positions), used by prediction only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from fvlm.data.volume import SourceVolume, from_sitk, read_nifti

log = logging.getLogger(__name__)

_NIFTI_SUFFIXES = (".nii", ".nii.gz")


@dataclass(frozen=True)
class DicomSeries:
    """One DICOM series found in a folder tree."""

    uid: str
    folder: str
    files: tuple[str, ...]
    description: str = ""
    modality: str = ""


def _dicom_tag(path: str, tag: str) -> str:
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
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as e:
        raise ValueError(f"{what} {path}: not a readable image ({' '.join(str(e).split())[:200]})") from None
    if image.GetDimension() != 3 or min(image.GetSize()) < 2:
        raise ValueError(f"{what} {path}: size {image.GetSize()} is not a 3D volume (for DICOM, give the folder of "
                         f"the series, not one file)")
    return from_sitk(image), {"format": path.name.split(".", 1)[-1].lower(), "path": str(path)}
