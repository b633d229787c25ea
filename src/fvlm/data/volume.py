"""Volumes in memory and on disk: every NIfTI read and write, header reading, value checks, reorientation to LPS.

A :class:`SourceVolume` is a voxel array ``(z, y, x)`` with its :class:`~fvlm.data.store.Geometry` (LPS, the
SimpleITK/DICOM convention). Readers: :func:`read_nifti` (CRC-checked, the fast path of every batch command),
:func:`read_header` (header only), :func:`from_sitk` (any SimpleITK image; DICOM series and other formats are
read in :mod:`fvlm.data.dicom`). Writers: :func:`write_nifti` (a volume with its LPS geometry, through
SimpleITK) and :func:`write_nifti_ras` (a RAS affine, or CT-RATE v1's default header, through nibabel: the
synthetic data set). Geometry: :func:`lps_reorientation` / :func:`reorient_lps` (transposes and flips only),
:func:`orientation_code`, :func:`obliquity_degrees`, :func:`is_oblique` and :func:`resample_axis_aligned`
(the one resampling onto another grid, for oblique scans).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from fvlm.data.store import Geometry
from fvlm.io import atomic_path

try:  # ISA-L inflates gzip about 2x faster than zlib: reading dominates the pass
    from isal import isal_zlib as _zlib
except ImportError:  # pragma: no cover - optional speed-up
    import zlib as _zlib

_GZIP_MAGIC = b"\x1f\x8b"
#: an index axis further than this from every patient axis makes a scan oblique (resampled, with a warning)
OBLIQUE_TOLERANCE_DEG = 1.0
#: HU given to voxels outside the scan when an oblique scan is resampled (air)
OUTSIDE_HU = -1024.0
IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
# LPS axis letters: the direction an index axis points to, positive and negative
_AXIS_LETTERS = (("L", "R"), ("P", "A"), ("S", "I"))


# ----------------------------------------------------------------------------------------------- reading
@dataclass
class SourceVolume:
    """A voxel array ``(z, y, x)`` with its geometry (LPS; see :class:`fvlm.data.store.Geometry`)."""

    array: np.ndarray
    geometry: Geometry

    @property
    def shape_xyz(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape[::-1])  # type: ignore[return-value]


def _inflate(data: bytes, path: Path) -> bytes:
    """Decompress every gzip member, verifying CRC and length (a truncated file raises)."""
    parts = []
    while True:
        d = _zlib.decompressobj(wbits=31)
        try:
            parts.append(d.decompress(data))
        except Exception as e:  # zlib.error / isal IsalError: both plain Exception subclasses
            raise ValueError(f"corrupt .nii.gz {path}: {e}") from None
        if not d.eof:
            raise ValueError(f"corrupt or truncated .nii.gz {path}: compressed stream ends early")
        data = d.unused_data
        if not data or data.strip(b"\x00") == b"":
            break
    return parts[0] if len(parts) == 1 else b"".join(parts)


def read_nifti(path: str | Path) -> SourceVolume:
    """Read a 3D NIfTI (.nii or .nii.gz) -> array ``(z, y, x)`` as stored + LPS geometry.

    The array is the voxel data as stored (with the header's scl_slope/scl_inter applied when they are
    set), transposed to ``(z, y, x)`` without a copy; the geometry is the header's best affine (sform,
    else qform) converted from RAS to LPS, as SimpleITK reports it. Unlike SimpleITK, a truncated or
    corrupt .nii.gz raises ``ValueError`` (SimpleITK silently returns a partly filled array).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found")
    raw = path.read_bytes()
    if raw[:2] == _GZIP_MAGIC:
        raw = _inflate(raw, path)
    if len(raw) < 348:
        raise ValueError(f"{path}: {len(raw)} bytes is too short for a NIfTI header")
    sizeof_hdr = int.from_bytes(raw[:4], "little")
    if sizeof_hdr not in (348, 540):
        sizeof_hdr = int.from_bytes(raw[:4], "big")
    header_cls = nib.Nifti2Header if sizeof_hdr == 540 else nib.Nifti1Header
    try:
        hdr = header_cls.from_fileobj(io.BytesIO(raw), check=False)
        shape = tuple(int(s) for s in hdr.get_data_shape())
        dtype = hdr.get_data_dtype()
        offset = int(hdr["vox_offset"])
        affine = hdr.get_best_affine()
        slope, inter = hdr.get_slope_inter()
    except Exception as e:  # nibabel raises assorted types (HeaderDataError, ValueError) for bad headers
        raise ValueError(f"{path}: not a readable NIfTI header ({type(e).__name__}: {e})") from None
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) != 3:
        raise ValueError(f"{path}: expected a 3D volume, got shape {shape}")
    count = int(np.prod(shape))
    if len(raw) < offset + count * dtype.itemsize:
        raise ValueError(f"{path}: truncated: {len(raw) - offset} data bytes for {shape} {dtype}")
    arr = np.frombuffer(raw, dtype=dtype, count=count, offset=offset).reshape(shape[::-1])
    if not dtype.isnative:
        arr = arr.astype(dtype.newbyteorder("="))
    if slope is not None and np.isfinite(slope) and slope != 0 and (slope != 1 or (inter or 0) != 0):
        arr = arr.astype(np.float32) * np.float32(slope) + np.float32(inter or 0.0)
    return SourceVolume(arr, geometry_from_affine(affine))


def geometry_from_affine(affine: np.ndarray) -> Geometry:
    """NIfTI (RAS) 4 x 4 affine -> LPS :class:`Geometry` (the SimpleITK view of the same file)."""
    a = np.diag([-1.0, -1.0, 1.0]) @ np.asarray(affine, dtype=np.float64)[:3]
    spacing = np.linalg.norm(a[:, :3], axis=0)
    if np.any(spacing <= 0) or not np.all(np.isfinite(a)):
        raise ValueError(f"degenerate affine {np.asarray(affine).tolist()}")
    direction = a[:, :3] / spacing
    return Geometry(tuple(float(s) for s in spacing), tuple(float(o) + 0.0 for o in a[:, 3]),
                    tuple(float(d) + 0.0 for d in direction.ravel()))


@dataclass(frozen=True)
class HeaderInfo:
    """What a NIfTI header says, without reading the voxel data."""

    shape_xyz: tuple[int, ...]
    geometry: Geometry  # LPS
    dtype: str


def read_header(path: str | Path) -> HeaderInfo:
    """Header of a .nii / .nii.gz (nibabel reads only the header bytes); ``ValueError`` if it is not one."""
    try:
        img = nib.load(str(path))
        hdr = img.header
        shape = tuple(int(s) for s in hdr.get_data_shape())
        return HeaderInfo(shape, geometry_from_affine(hdr.get_best_affine()), str(hdr.get_data_dtype()))
    except FileNotFoundError:
        raise
    except Exception as e:  # nibabel raises assorted types (ImageFileError, EOFError, zlib errors) on bad files
        raise ValueError(f"{path}: unreadable NIfTI header ({type(e).__name__}: {e})") from None


def from_sitk(image: Any) -> SourceVolume:
    """A SimpleITK image -> :class:`SourceVolume` (array copied, so it does not depend on the image's life)."""
    return SourceVolume(sitk.GetArrayFromImage(image),
                        Geometry(tuple(image.GetSpacing()), tuple(image.GetOrigin()), tuple(image.GetDirection())))


def to_sitk(vol: SourceVolume) -> Any:
    """A :class:`SourceVolume` -> SimpleITK image with the same array and geometry."""
    img = sitk.GetImageFromArray(np.ascontiguousarray(vol.array))
    img.SetSpacing([float(s) for s in vol.geometry.spacing])
    img.SetOrigin([float(o) for o in vol.geometry.origin])
    img.SetDirection([float(d) for d in vol.geometry.direction])
    return img


# ----------------------------------------------------------------------------------------------- writing
def write_nifti(path: str | Path, array_zyx: np.ndarray, geometry: Geometry) -> None:
    """Write a ``(z, y, x)`` array with an LPS :class:`~fvlm.data.store.Geometry` as NIfTI (SimpleITK)."""
    sitk.WriteImage(to_sitk(SourceVolume(array_zyx, geometry)), str(path))


def write_nifti_ras(path: Path, zyx: np.ndarray, affine: np.ndarray | None) -> int:
    """Write a (z, y, x) array as a NIfTI (x, y, z) file with a RAS ``affine`` atomically (nibabel); returns
    the file size in bytes.

    ``affine=None`` writes CT-RATE v1's default header (identity affine, sform "aligned", no qform), which
    :func:`write_nifti` cannot: SimpleITK always writes the geometry it is given into both qform and sform.
    """
    data = zyx.T  # (x, y, z) view of the C-ordered array: nibabel writes it without a copy
    if affine is None:
        img = nib.Nifti1Image(data, np.eye(4))
    else:
        img = nib.Nifti1Image(data, affine)
        img.set_qform(affine, code=1)
        img.set_sform(affine, code=1)
        img.header.set_xyzt_units("mm")
    img.header.set_data_dtype(zyx.dtype)
    with atomic_path(path, suffix=".nii.gz") as tmp:
        nib.save(img, tmp)
    return path.stat().st_size


# ----------------------------------------------------------------------------------------------- checks
def check_finite(array: np.ndarray, what: str = "image") -> None:
    """``ValueError`` if a float array holds NaN or infinite voxels (integer arrays cannot)."""
    if array.dtype.kind == "f":
        n_bad = int(array.size - np.count_nonzero(np.isfinite(array)))
        if n_bad:
            n_nan = int(np.count_nonzero(np.isnan(array)))
            raise ValueError(f"{what} holds {n_nan} NaN and {n_bad - n_nan} infinite voxels")


# ----------------------------------------------------------------------------------------------- geometry
def lps_reorientation(geometry: Geometry) -> tuple[tuple[int, int, int], tuple[bool, bool, bool]]:
    """How to make a volume's index axes run along L, P, S.

    Returns ``(source, flip)``: new index axis ``p`` (x, y, z) is source index axis ``source[p]``, reversed
    when ``flip[p]``. Oblique directions map to the closest axes (as SimpleITK's DICOMOrient does).
    """
    m = geometry.matrix
    source = [int(np.argmax(np.abs(m[p, :]))) for p in range(3)]
    if sorted(source) != [0, 1, 2]:
        # ambiguous 45-degree obliques: assign greedily by the largest remaining component
        source, used = [-1, -1, -1], set()
        for p, a in sorted(((p, a) for p in range(3) for a in range(3)), key=lambda pa: -abs(m[pa[0], pa[1]])):
            if source[p] < 0 and a not in used:
                source[p] = a
                used.add(a)
    flip = tuple(bool(m[p, source[p]] < 0) for p in range(3))
    return tuple(source), flip  # type: ignore[return-value]


def reorient_lps(vol: SourceVolume) -> SourceVolume:
    """The same volume with index axes along L, P, S (a view: transposes and flips only, no resampling)."""
    g = vol.geometry
    source, flip = lps_reorientation(g)
    if source == (0, 1, 2) and not any(flip):
        return vol
    m = g.matrix
    n_xyz = vol.shape_xyz
    arr = vol.array
    # numpy axis of index axis a (x=0, y=1, z=2) is 2 - a; new array order is (z, y, x) = p = 2, 1, 0
    arr = np.transpose(arr, [2 - source[p] for p in (2, 1, 0)])
    origin = np.asarray(g.origin, dtype=np.float64)
    new_m = np.zeros((3, 3))
    spacing = []
    for p in range(3):
        a = source[p]
        col = m[:, a]
        if flip[p]:
            origin = origin + col * g.spacing[a] * (n_xyz[a] - 1)
            col = -col
            arr = np.flip(arr, axis=2 - p)
        new_m[:, p] = col
        spacing.append(g.spacing[a])
    return SourceVolume(arr, Geometry(tuple(spacing), tuple(float(o) for o in origin),
                                      tuple(float(x) + 0.0 for x in new_m.ravel())))


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


def resample_axis_aligned(image: SourceVolume, label: SourceVolume) -> tuple[SourceVolume, SourceVolume]:
    """Resample an oblique scan (linear) and its label map (nearest) onto an axis-aligned LPS grid.

    The grid covers the scan's whole physical extent; each LPS axis keeps the voxel size of the index axis
    nearest to it. Voxels outside the scan get :data:`OUTSIDE_HU` (air) and label 0. ``label`` holds uint8
    class ids (checked first with :func:`fvlm.data.labelmap.class_ids`).
    """
    if label.array.dtype != np.uint8:
        raise TypeError(f"label map must hold uint8 class ids (fvlm.data.labelmap.class_ids), got {label.array.dtype}")
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
    img = sitk.Resample(sitk.Cast(to_sitk(image), sitk.sitkFloat32), ref, identity, sitk.sitkLinear, OUTSIDE_HU,
                        sitk.sitkFloat32)
    lab = sitk.Resample(to_sitk(label), ref, identity, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return from_sitk(img), from_sitk(lab)
