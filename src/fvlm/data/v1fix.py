"""CT-RATE's v1 fix and the per-volume v1/v2 decision, shared by ``fvlm preprocess`` and ``fvlm segment``.

v1 volumes store raw values under a default header (identity affine); their true geometry and rescale are only
in the metadata CSV (:meth:`fvlm.data.ctrate.VolumeMetadata.fix_geometry`, :func:`rescale`). v2 volumes are HU
with a correct header. :func:`detect_version` decides per volume from header and value evidence, so a volume
is never rescaled twice; :func:`require_metadata` and :func:`fix_version` are the one v1 header fix every
command applies (preprocessing keeps the stored values and rescales while resampling, segmentation rescales
with :func:`rescale` before handing the volume to TotalSegmentator).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from fvlm.data.ctrate import VolumeMetadata
from fvlm.data.store import Geometry
from fvlm.data.volume import SourceVolume


def rescale(stored: np.ndarray, slope: float, intercept: float) -> np.ndarray:
    """Stored values -> HU = stored * slope + intercept, rounded and clipped to int16 (the v1 fix)."""
    hu = stored.astype(np.float32) * np.float32(slope) + np.float32(intercept)
    np.rint(hu, out=hu)
    return np.clip(hu, -32768, 32767, out=hu).astype(np.int16)


@dataclass(frozen=True)
class VersionDecision:
    """Whether a volume is v1 (raw, needs the fix) or v2 (HU, correct header), and why."""

    version: str  # "v1" or "v2"
    reason: str  # "forced" or "auto"
    evidence: dict[str, Any]


def value_statistics(stored: np.ndarray, max_samples: int = 1_000_000) -> dict[str, float]:
    """Cheap statistics of a (D, H, W) array on a strided subsample: minimum and the 1st percentile of the
    voxels above the minimum (the minimum is usually the constant outside the scanner's field of view)."""
    step = max(1, int(math.ceil((stored.size / max_samples) ** (1 / 3))))
    sample = np.asarray(stored[::step, ::step, ::step])
    lo = float(sample.min())
    above = sample[sample > lo]
    p1 = float(np.percentile(above, 1)) if above.size else lo
    return {"min": lo, "p1_above_min": p1, "sample_step": step}


def detect_version(header: Geometry, stats: Mapping[str, float], meta: VolumeMetadata | None,
                   forced: str = "auto") -> VersionDecision:
    """Decide v1 vs v2 for one volume from two independent kinds of evidence.

    - header: a v1 header has the default 1 mm spacing where the metadata says otherwise; a v2 header
      carries the metadata spacing.
    - values: HU data hold air (1st percentile above the padding value < -500); raw v1 data do not
      (air is stored near ``-intercept - 1000`` >= 0, e.g. 24 for intercept -1024 or 7192 for -8192).

    ``forced`` ("v1"/"v2") skips detection. Raises ``ValueError`` when the evidence conflicts or is
    inconclusive, so a volume is never silently rescaled twice (or not at all): pass ``--version``.
    """
    evidence: dict[str, Any] = {"header_spacing": [round(s, 6) for s in header.spacing],
                                "header_origin": [round(o, 4) for o in header.origin], **stats}
    if forced in ("v1", "v2"):
        return VersionDecision(forced, "forced", evidence)
    if forced != "auto":
        raise ValueError(f"version must be auto, v1 or v2, got {forced!r}")
    header_says = None
    meta_spacing = meta.spacing if meta is not None else None
    if meta_spacing is not None:
        evidence["metadata_spacing"] = list(meta_spacing)
        # the default header has 1 mm voxels (its origin depends on the writer: 0, or the volume centre when
        # neither sform nor qform is set), so only the spacing is compared
        identity = np.allclose(header.spacing, 1.0, atol=1e-4)
        matches = np.allclose(header.spacing, meta_spacing, rtol=1e-3, atol=1e-4)
        if matches and not identity:
            header_says = "v2"
        elif identity and not matches:
            header_says = "v1"
    p1 = stats["p1_above_min"]
    values_say = "v2" if p1 < -500 else "v1" if p1 > -200 else None
    evidence["header_says"], evidence["values_say"] = header_says, values_say
    if header_says and values_say and header_says != values_say:
        raise ValueError(f"conflicting v1/v2 evidence: header {header_says} (spacing {evidence['header_spacing']}, "
                         f"metadata {evidence.get('metadata_spacing')}), values {values_say} (1st percentile "
                         f"{p1:g}); pass --version v1 or v2")
    version = header_says or values_say
    if version is None:
        raise ValueError(f"cannot tell v1 from v2 (header spacing {evidence['header_spacing']}, metadata "
                         f"{evidence.get('metadata_spacing')}, 1st percentile {p1:g}); pass --version v1 or v2")
    return VersionDecision(version, "auto", evidence)


# ----------------------------------------------------------------------------------------------- the v1 fix
def require_metadata(metadata: VolumeMetadata | None, version: str, volume: str, metadata_file: str = "") -> None:
    """``ValueError`` when a volume cannot be fixed or checked: no metadata row (``version`` auto or v1), or a
    row listed twice with different values (checked before anything is read)."""
    if version in ("auto", "v1") and metadata is None:
        raise ValueError(f"missing from the metadata CSV {metadata_file or '(none found)'}")
    if metadata is not None and metadata.conflict:
        raise ValueError(f"{volume} is {metadata.conflict}")


@dataclass(frozen=True)
class FixedVolume:
    """A volume with its true geometry: ``volume.array`` holds the stored values; HU = stored * slope + intercept
    (1 and 0 unless v1)."""

    volume: SourceVolume
    decision: VersionDecision
    slope: float = 1.0
    intercept: float = 0.0

    @property
    def version(self) -> str:
        return self.decision.version


def fix_version(vol: SourceVolume, metadata: VolumeMetadata | None, version: str, volume: str,
                metadata_file: str = "") -> FixedVolume:
    """The released v1 fix, decided per volume: ``version`` ``hu`` (NIfTI pairs: header trusted), ``v2`` or a v2
    decision return the volume as read; v1 gets the metadata geometry and its RescaleSlope/Intercept.

    ``ValueError`` names what the metadata lacks (and ``metadata_file`` when given).
    """
    if version == "hu":
        return FixedVolume(vol, VersionDecision("hu", "pairs", {}))
    decision = detect_version(vol.geometry, value_statistics(vol.array), metadata, version)
    if decision.version != "v1":
        return FixedVolume(vol, decision)
    assert metadata is not None
    where = f" (metadata CSV {metadata_file})" if metadata_file else ""
    try:
        geometry = metadata.fix_geometry()
    except ValueError as e:
        raise ValueError(f"{e}{where}") from None
    if metadata.slope is None or metadata.intercept is None:
        raise ValueError(f"metadata of {volume} has empty RescaleSlope/RescaleIntercept: cannot fix the v1 "
                         f"values{where}")
    # voxel array as stored, geometry from the metadata
    return FixedVolume(SourceVolume(vol.array, geometry), decision, metadata.slope, metadata.intercept)
