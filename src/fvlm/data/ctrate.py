"""CT-RATE as a user meets it: volume names, paths, the metadata CSV, volume lists (``no_chest_{split}.txt``).

The report and label CSVs are read in :mod:`fvlm.data.ctrate_reports`, the v1 fix and v1/v2 detection live in
:mod:`fvlm.data.v1fix`, the choice of reconstructions per scan in
:mod:`fvlm.data.joblist`.

Names: ``valid_53_a_1`` = split ``valid``, patient 53, scan ``a``, reconstruction 1; its scan id is
``valid_53_a`` (the key of the anatomy texts). Layout under a CT-RATE root::

    dataset/{split}/{split}_{pid}/{split}_{pid}_{scan}/{volume}.nii.gz       v1 (raw) or v2 volumes
    dataset/{split}_fixed/...                                                 v2 downloads (already HU)
    dataset/{split}_mask/<same sub-path>                                      TotalSegmentator v2 ``total`` maps
    metadata/{train,validation}_metadata.csv                                  (file says "validation", split "valid")
    radiology_text_reports/{train,validation}_reports.csv
    multi_abnormality_labels/{train,valid}_predicted_labels.csv
    anatomy_texts/{desc,conc}_info.json

v1 volumes store raw values under a default header (identity affine); their true geometry and rescale
are only in the metadata CSV (:meth:`VolumeMetadata.fix_geometry`, :func:`~fvlm.data.v1fix.rescale`). v2 volumes
are HU with a correct header. :func:`~fvlm.data.v1fix.detect_version` decides per volume from header and value
evidence, so a volume is never rescaled twice.
"""

from __future__ import annotations

import ast
import csv
import dataclasses
import logging
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fvlm.data.store import Geometry

log = logging.getLogger(__name__)

SPLITS = ("train", "valid")
_NAME = re.compile(r"^(?P<split>[A-Za-z]+)_(?P<patient>\d+)_(?P<scan>[A-Za-z]+)_(?P<rec>\d+)$")
_FILE_NAME = {"train": "train", "valid": "validation"}  # metadata/reports CSV names say "validation"


# ----------------------------------------------------------------------------------------------- names
def strip_extension(name: str) -> str:
    """``dir/valid_1_a_1.nii.gz`` -> ``valid_1_a_1``."""
    base = os.path.basename(str(name))
    for ext in (".nii.gz", ".nii", ".npz", ".npy"):
        if base.endswith(ext):
            return base[: -len(ext)]
    return base


@dataclass(frozen=True, order=True)
class VolumeName:
    """A parsed CT-RATE volume name; orders naturally (patient 2 before patient 10)."""

    split: str
    patient: int
    scan: str
    reconstruction: int

    @property
    def name(self) -> str:
        return f"{self.split}_{self.patient}_{self.scan}_{self.reconstruction}"

    @property
    def scan_id(self) -> str:
        return f"{self.split}_{self.patient}_{self.scan}"

    @property
    def patient_id(self) -> str:
        return f"{self.split}_{self.patient}"

    @property
    def relpath(self) -> str:
        """Path below ``dataset/{split}/``: ``{split}_{pid}/{split}_{pid}_{scan}/{volume}.nii.gz``."""
        return f"{self.patient_id}/{self.scan_id}/{self.name}.nii.gz"

    def __str__(self) -> str:
        return self.name


def parse_volume_name(name: str) -> VolumeName:
    """Parse ``valid_53_a_1`` (a path or ``.nii.gz`` suffix is allowed); ``ValueError`` if it is not one."""
    m = _NAME.match(strip_extension(name))
    if not m:
        raise ValueError(f"not a CT-RATE volume name (split_patient_scan_reconstruction, e.g. valid_53_a_1): "
                         f"{name!r}")
    return VolumeName(m["split"], int(m["patient"]), m["scan"], int(m["rec"]))


def natural_key(name: str) -> tuple:
    """Sort key: CT-RATE names in natural order, anything else after them by string."""
    try:
        return (0, parse_volume_name(name), "")
    except ValueError:
        return (1, VolumeName("", 0, "", 0), name)


# ----------------------------------------------------------------------------------------------- paths
def volume_path(root: str | Path, name: str, fixed: bool | None = None) -> Path:
    """Path of a volume file. ``fixed=None``: the first of ``dataset/{split}/`` and ``dataset/{split}_fixed/``
    that exists (else the former); ``True``/``False`` pick one."""
    v = parse_volume_name(name)
    root = Path(root)
    plain = root / "dataset" / v.split / v.relpath
    fixed_path = root / "dataset" / f"{v.split}_fixed" / v.relpath
    if fixed is True:
        return fixed_path
    if fixed is False:
        return plain
    return plain if plain.exists() or not fixed_path.exists() else fixed_path


def mask_path(root: str | Path, name: str) -> Path:
    """TotalSegmentator label map of a volume: ``dataset/{split}_mask/<same sub-path>``."""
    v = parse_volume_name(name)
    return Path(root) / "dataset" / f"{v.split}_mask" / v.relpath


def metadata_path(root: str | Path, split: str) -> Path:
    """``metadata/train_metadata.csv`` or ``metadata/validation_metadata.csv`` (``valid_metadata.csv`` tolerated)."""
    d = Path(root) / "metadata"
    p = d / f"{_FILE_NAME.get(split, split)}_metadata.csv"
    alt = d / f"{split}_metadata.csv"
    return p if p.exists() or not alt.exists() else alt


def reports_path(root: str | Path, split: str) -> Path:
    d = Path(root) / "radiology_text_reports"
    p = d / f"{_FILE_NAME.get(split, split)}_reports.csv"
    alt = d / f"{split}_reports.csv"
    return p if p.exists() or not alt.exists() else alt


def labels_path(root: str | Path, split: str) -> Path:
    return Path(root) / "multi_abnormality_labels" / f"{split}_predicted_labels.csv"


def anatomy_texts_dir(root: str | Path) -> Path:
    return Path(root) / "anatomy_texts"


def find_volumes(root: str | Path, split: str) -> dict[str, Path]:
    """Volume files of a split on disk: name -> path, from ``dataset/{split}/`` and ``dataset/{split}_fixed/``.

    A volume present in both is taken from ``_fixed`` (the v2 download supersedes v1). Files whose names
    are not CT-RATE volume names are ignored with a warning.
    """
    found: dict[str, Path] = {}
    for sub in (split, f"{split}_fixed"):  # _fixed second: it overrides
        base = Path(root) / "dataset" / sub
        if not base.is_dir():
            continue
        for dirpath, _dirs, files in os.walk(base):
            for f in files:
                if not (f.endswith(".nii.gz") or f.endswith(".nii")):
                    continue
                try:
                    v = parse_volume_name(f)
                except ValueError:
                    log.warning("ignoring %s: not a CT-RATE volume name", os.path.join(dirpath, f))
                    continue
                if v.split != split:
                    log.warning("ignoring %s: split %r in a %r folder", os.path.join(dirpath, f), v.split, split)
                    continue
                found[v.name] = Path(dirpath) / f
    return dict(sorted(found.items(), key=lambda kv: natural_key(kv[0])))


# ----------------------------------------------------------------------------------------------- metadata
def _clean(value: Any) -> str | None:
    if value is None:
        return None
    s = str(value).strip()
    return None if s == "" or s.lower() in ("nan", "none", "null") else s


def parse_number_list(text: str) -> tuple[float, ...]:
    """``"[0.34, 0.34]"`` / ``"[1.000000, -0.000000]"`` / ``"0.5\\0.5"`` -> floats (``-0.0`` becomes 0.0)."""
    s = text.strip().strip("[]()")
    parts = [p for p in re.split(r"[,\\\s]+", s) if p]
    if not parts:
        raise ValueError(f"empty list {text!r}")
    vals = tuple(float(p) + 0.0 for p in parts)  # + 0.0 turns -0.0 into 0.0
    if not all(math.isfinite(v) for v in vals):
        raise ValueError(f"non-finite value in {text!r}")
    return vals


def _first_of_list(text: str) -> str:
    """``"['Br40f', '3']"`` -> ``"Br40f"``; a plain string is returned as is."""
    if text.startswith("["):
        try:
            v = ast.literal_eval(text)
            if isinstance(v, (list, tuple)) and v:
                return str(v[0]).strip()
        except (ValueError, SyntaxError):
            pass
    return text


def direction_from_orientation(orientation: tuple[float, ...]) -> tuple[float, ...]:
    """DICOM ImageOrientationPatient (row cosine, column cosine) -> 3 x 3 direction, row-major.

    The columns are the row cosine (array x), the column cosine (array y) and their cross product (slices).
    """
    if len(orientation) != 6:
        raise ValueError(f"ImageOrientationPatient needs 6 values, got {len(orientation)}")
    row = np.asarray(orientation[:3], dtype=np.float64)
    col = np.asarray(orientation[3:], dtype=np.float64)
    nr, nc = np.linalg.norm(row), np.linalg.norm(col)
    if not (0.9 < nr < 1.1 and 0.9 < nc < 1.1) or abs(float(row @ col)) > 1e-3:
        raise ValueError(f"ImageOrientationPatient {list(orientation)} is not two orthonormal cosines")
    row, col = row / nr, col / nc
    m = np.stack([row, col, np.cross(row, col)], axis=1)
    return tuple(float(x) + 0.0 for x in m.ravel())


@dataclass(frozen=True)
class VolumeMetadata:
    """One row of a CT-RATE metadata CSV, typed. A missing or unparsable value is ``None``.

    ``problems`` lists the values that were present but could not be parsed; ``raw`` keeps every column.
    """

    volume: str
    xy_spacing: tuple[float, float] | None = None
    z_spacing: float | None = None
    position: tuple[float, float, float] | None = None  # ImagePositionPatient, LPS mm
    orientation: tuple[float, ...] | None = None  # ImageOrientationPatient (6 cosines)
    intercept: float | None = None
    slope: float | None = None
    kernel: str | None = None
    series_description: str | None = None
    manufacturer: str | None = None
    rows: int | None = None
    columns: int | None = None
    slices: int | None = None
    problems: tuple[str, ...] = ()
    raw: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)
    #: non-empty when the CSV lists this volume twice with different values (the volume must be refused)
    conflict: str = field(default="", compare=False)

    @property
    def spacing(self) -> tuple[float, float, float] | None:
        """(x, y, z) mm, or ``None`` if XYSpacing or ZSpacing is missing."""
        if self.xy_spacing is None or self.z_spacing is None:
            return None
        return (self.xy_spacing[0], self.xy_spacing[1], self.z_spacing)

    @property
    def direction(self) -> tuple[float, ...] | None:
        if self.orientation is None:
            return None
        try:
            return direction_from_orientation(self.orientation)
        except ValueError:
            return None

    @property
    def n_voxels(self) -> int:
        """Rows x Columns x NumberofSlices (0 when unknown): ranks reconstructions by size."""
        if self.rows and self.columns and self.slices:
            return self.rows * self.columns * self.slices
        return 0

    def fix_geometry(self) -> Geometry:
        """The true geometry of a v1 volume (released fix): spacing from XYSpacing/ZSpacing, origin =
        ImagePositionPatient, direction from ImageOrientationPatient. ``ValueError`` names what is missing."""
        missing = []
        if self.xy_spacing is None:
            missing.append("XYSpacing")
        if self.z_spacing is None:
            missing.append("ZSpacing")
        if self.position is None:
            missing.append("ImagePositionPatient")
        if self.orientation is None:
            missing.append("ImageOrientationPatient")
        if missing:
            bad = [p for p in self.problems if p.split(":")[0] in missing]
            raise ValueError(f"metadata of {self.volume} has empty or invalid {', '.join(missing)}"
                             + (f" ({'; '.join(bad)})" if bad else "") + ": cannot fix the v1 header")
        spacing = self.spacing
        assert spacing is not None and self.position is not None and self.orientation is not None
        if min(spacing) <= 0:
            raise ValueError(f"metadata of {self.volume}: non-positive spacing {spacing}")
        return Geometry(spacing, self.position, direction_from_orientation(self.orientation))


def parse_metadata_row(row: Mapping[str, Any]) -> VolumeMetadata:
    """Type one metadata CSV row; never raises for bad values (they become ``None`` + a ``problems`` entry)."""
    name = _clean(row.get("VolumeName"))
    if name is None:
        raise ValueError("metadata row without VolumeName")
    problems: list[str] = []

    def get(col: str, parse, n: int | None = None):
        text = _clean(row.get(col))
        if text is None:
            return None
        try:
            v = parse(text)
            if n is not None and len(v) != n:
                raise ValueError(f"expected {n} values")
            return v
        except (ValueError, TypeError, OverflowError) as e:
            problems.append(f"{col}: {text!r} ({e})")
            return None

    def positive(text: str) -> float:
        v = float(text)
        if not v > 0 or not math.isfinite(v):
            raise ValueError("not a positive number")
        return v

    def finite(text: str) -> float:
        v = float(text)
        if not math.isfinite(v):
            raise ValueError("not finite")
        return v

    def integer(text: str) -> int:
        return int(float(text))

    def pos_list(text: str) -> tuple[float, ...]:
        v = parse_number_list(text)
        if any(x <= 0 for x in v):
            raise ValueError("non-positive spacing")
        return v

    orientation = get("ImageOrientationPatient", parse_number_list, 6)
    if orientation is not None:
        try:
            direction_from_orientation(orientation)
        except ValueError as e:
            problems.append(f"ImageOrientationPatient: {e}")
            orientation = None
    kernel = get("ConvolutionKernel", _first_of_list)
    return VolumeMetadata(
        volume=strip_extension(name),
        xy_spacing=get("XYSpacing", pos_list, 2),
        z_spacing=get("ZSpacing", positive),
        position=get("ImagePositionPatient", parse_number_list, 3),
        orientation=orientation,
        intercept=get("RescaleIntercept", finite),
        slope=get("RescaleSlope", finite),
        kernel=kernel,
        series_description=_clean(row.get("SeriesDescription")),
        manufacturer=_clean(row.get("Manufacturer")),
        rows=get("Rows", integer),
        columns=get("Columns", integer),
        slices=get("NumberofSlices", integer),
        problems=tuple(problems),
        raw={k: v for k, v in row.items() if k is not None},
    )


#: metadata columns the v1 fix needs
FIX_COLUMNS = ("XYSpacing", "ZSpacing", "ImagePositionPatient", "ImageOrientationPatient", "RescaleSlope",
               "RescaleIntercept")


def _same_row(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    """Columns whose values differ between two rows (whitespace and empty/NaN spellings ignored)."""
    return [k for k in dict.fromkeys([*a, *b]) if k != "VolumeName" and _clean(a.get(k)) != _clean(b.get(k))]


def read_metadata(path: str | Path, duplicates: list[dict[str, Any]] | None = None) -> dict[str, VolumeMetadata]:
    """A CT-RATE metadata CSV -> {volume name (no extension): VolumeMetadata}, in file order.

    Bad values never raise (see :func:`parse_metadata_row`); rows without a VolumeName are skipped with a
    warning. ``FileNotFoundError`` names the file when it is absent; ``ValueError`` when it is not a readable
    CSV. A volume listed twice with the same values keeps one row; listed with different values it gets
    :attr:`VolumeMetadata.conflict` set (which row is right cannot be known: the volume is refused by its
    users). Every duplicate is appended to ``duplicates`` (``{"volume", "lines", "conflicting", "columns"}``).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"metadata CSV {path} not found")
    out: dict[str, VolumeMetadata] = {}
    lines: dict[str, list[int]] = {}
    dups: dict[str, dict[str, Any]] = {}
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or "VolumeName" not in reader.fieldnames:
                raise ValueError(f"{path}: no VolumeName column (is this a CT-RATE metadata CSV?)")
            absent = [c for c in FIX_COLUMNS if c not in reader.fieldnames]
            if absent:
                log.warning("metadata CSV %s has no column(s) %s: v1 volumes cannot be fixed from it", path, absent)
            for i, row in enumerate(reader, start=2):
                try:
                    m = parse_metadata_row(row)
                except ValueError as e:
                    log.warning("%s line %d: %s; row skipped", path, i, e)
                    continue
                if m.volume in out:
                    lines[m.volume].append(i)
                    first = out[m.volume]
                    cols = _same_row(first.raw, m.raw)
                    rec = dups.setdefault(m.volume, {"volume": m.volume, "lines": lines[m.volume],
                                                     "conflicting": False, "columns": []})
                    if cols:
                        rec["conflicting"] = True
                        rec["columns"] = sorted(set(rec["columns"]) | set(cols))
                        why = (f"listed {len(lines[m.volume])} times in metadata CSV {path} with different values "
                               f"(lines {', '.join(map(str, lines[m.volume]))}; columns {', '.join(rec['columns'])})"
                               f": keep one row per volume")
                        out[m.volume] = dataclasses.replace(first, conflict=why)
                    continue
                lines[m.volume] = [i]
                out[m.volume] = m
    except UnicodeDecodeError as e:
        raise ValueError(f"metadata CSV {path}: not a UTF-8 text file ({e.reason} at byte {e.start})") from None
    except csv.Error as e:
        raise ValueError(f"metadata CSV {path}: not a readable CSV ({e})") from None
    if dups:
        n_conf = sum(r["conflicting"] for r in dups.values())
        if n_conf:
            log.warning("%s: %d volume(s) listed twice with different values (refused), e.g. %s", path, n_conf,
                        next(r for r in dups.values() if r["conflicting"])["volume"])
        if len(dups) > n_conf:
            log.info("%s: %d volume(s) listed twice with identical values (one row kept)", path, len(dups) - n_conf)
        if duplicates is not None:
            duplicates.extend(dups.values())
    n_bad = sum(bool(m.problems) for m in out.values())
    if n_bad:
        log.info("%s: %d of %d rows have unparsable values (kept as missing)", path, n_bad, len(out))
    return out


# ----------------------------------------------------------------------------------------------- volume lists
def no_chest_path(root: str | Path, split: str) -> Path:
    """``metadata/no_chest_{split}.txt`` (the CT-RATE list of non-chest volumes of a split)."""
    return Path(root) / "metadata" / f"no_chest_{split}.txt"


def read_volume_list(path: str | Path) -> list[str]:
    """Volume names of a text list such as ``no_chest_valid.txt``: one per line (commas, spaces and a
    ``.nii.gz`` suffix tolerated), blank lines and ``#`` comments skipped; order kept, duplicates dropped."""
    names: dict[str, None] = {}
    with open(path, encoding="utf-8-sig") as f:
        for line in f:
            line = line.split("#", 1)[0]
            for token in line.replace(",", " ").split():
                token = token.strip().strip("'\"")
                if token and token.lower() != "volumename":
                    names[strip_extension(token)] = None
    return list(names)
