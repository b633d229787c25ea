"""CT-RATE metadata rows: scanner profiles, per-reconstruction geometry and the official 44 columns.

Values and their string formats copy the official ``validation_metadata.csv``: list fields are strings
("[0.68359375, 0.68359375]", "[-166, 9, 56.2998657]", "[1, 0, 0, 0, 1, 0]" or the six-decimal style of some
scanners), RescaleIntercept is -1024 or -8192 (SOMATOM go.All), RescaleSlope 1. Geometry is decided here
and parsed back from its own strings, so the rendered grid, the v2 affine and the CSV agree exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from fvlm.synth.case import Grid
from fvlm.synth.phantom import Anatomy

#: the official CT-RATE metadata columns, in order
METADATA_COLUMNS: tuple[str, ...] = (
    "VolumeName", "Manufacturer", "SeriesDescription", "ManufacturerModelName", "PatientSex", "PatientAge",
    "ReconstructionDiameter", "DistanceSourceToDetector", "DistanceSourceToPatient", "GantryDetectorTilt",
    "TableHeight", "RotationDirection", "ExposureTime", "XRayTubeCurrent", "Exposure", "FilterType",
    "GeneratorPower", "FocalSpots", "ConvolutionKernel", "PatientPosition", "RevolutionTime",
    "SingleCollimationWidth", "TotalCollimationWidth", "TableSpeed", "TableFeedPerRotation", "SpiralPitchFactor",
    "DataCollectionCenterPatient", "ReconstructionTargetCenterPatient", "ExposureModulationType", "CTDIvol",
    "ImagePositionPatient", "ImageOrientationPatient", "SliceLocation", "SamplesPerPixel",
    "PhotometricInterpretation", "Rows", "Columns", "XYSpacing", "RescaleIntercept", "RescaleSlope", "RescaleType",
    "NumberofSlices", "ZSpacing", "StudyDate",
)  # fmt: skip
assert len(METADATA_COLUMNS) == 44


@dataclass(frozen=True)
class Kernel:
    series: str
    kernel: str
    filter_type: str
    sharp: bool


@dataclass(frozen=True)
class Profile:
    """A scanner as it appears in CT-RATE: fixed column values, kernels, number formats, table coordinates."""

    manufacturer: str
    model: str
    weight: float
    intercept: int
    kernels: tuple[Kernel, ...]
    fixed: dict = field(default_factory=dict)
    style: str = "philips"  # number style: philips (7 significant digits), siemens (exact), pnms (6 decimals)
    center_y: tuple[float, float] = (-50.0, 50.0)  # range of the reconstruction centre's y (table coordinates)
    z0: tuple[float, float] = (-200.0, 200.0)  # range of the first slice's z
    z_full: tuple[float, ...] = (1.5,)  # z spacings (full size)
    exposure_mod: tuple[str, ...] = ("",)


_EMPTY_SPIRAL = {"RevolutionTime": "", "SingleCollimationWidth": "", "TotalCollimationWidth": "", "TableSpeed": "",
                 "TableFeedPerRotation": "", "SpiralPitchFactor": ""}

PROFILES: tuple[Profile, ...] = (
    Profile("Philips", "iCT 256", 0.53, -1024,
            (Kernel("HRCT", "YA", "YA", True), Kernel("", "B", "B", False)),
            {"DistanceSourceToDetector": "", "DistanceSourceToPatient": "", "RotationDirection": "CW",
             "ExposureTime": "622", "GeneratorPower": "", "FocalSpots": "", "RescaleType": "", **_EMPTY_SPIRAL},
            "philips", (120.0, 240.0), (-120.0, 120.0), (1.5, 0.75, 1.0), ("Z DOM",)),
    Profile("Siemens Healthineers", "SOMATOM go.All", 0.28, -8192,
            (Kernel("Thorax 1,50 Br40 S3", "['Br40f', '3']", "", False),
             Kernel("Thorax 1,50 Bl56 S3", "['Bl56f', '3']", "", True),
             Kernel("Thorax 1,50 Br60 S3", "['Br60f', '3']", "", True)),
            {"DistanceSourceToDetector": "983", "DistanceSourceToPatient": "535", "RotationDirection": "CW",
             "ExposureTime": "507", "GeneratorPower": "15", "FocalSpots": "[1.2, 1.2]", "RevolutionTime": "0.33",
             "SingleCollimationWidth": "0.7", "TotalCollimationWidth": "22.4", "TableSpeed": "43.9",
             "TableFeedPerRotation": "14.56", "SpiralPitchFactor": "0.65", "RescaleType": "HU"},
            "siemens", (-210.0, -110.0), (-1300.0, -1050.0), (1.0, 1.25), ("OFF_OFF", "ELLIP_ZEC")),
    Profile("Philips", "Brilliance Big Bore", 0.107, -1024,
            (Kernel("MEDIASTEN, iDose (4)", "A", "A", False), Kernel("MEDIASTEN, iDose (4)", "B", "B", False),
             Kernel("PARANKIM, iDose (4)", "L", "L", True), Kernel("PARANKIM, iDose (4)", "YB", "YB", True)),
            {"DistanceSourceToDetector": "1183.447998", "DistanceSourceToPatient": "645", "RotationDirection": "",
             "ExposureTime": "469", "GeneratorPower": "", "FocalSpots": "", "RevolutionTime": "0.5",
             "SingleCollimationWidth": "0.75", "TotalCollimationWidth": "12", "TableSpeed": "25.5",
             "TableFeedPerRotation": "17.008", "SpiralPitchFactor": "1.063", "RescaleType": ""},
            "philips", (-60.0, 60.0), (-150.0, 100.0), (1.5,), ("3D MODULATION",)),
    Profile("PNMS", "MX 16", 0.046, -1024,
            (Kernel("HRCT", "EA", "EA", True), Kernel("", "SA", "SA", False)),
            {"DistanceSourceToDetector": "1040", "DistanceSourceToPatient": "570", "RotationDirection": "CW",
             "ExposureTime": "15188", "GeneratorPower": "", "FocalSpots": "", "RevolutionTime": "0.75",
             "SingleCollimationWidth": "", "TotalCollimationWidth": "", "TableSpeed": "24.1664",
             "TableFeedPerRotation": "18.1248", "SpiralPitchFactor": "0.7552", "RescaleType": ""},
            "pnms", (-20.0, 20.0), (-800.0, -600.0), (1.5,), ("",)),
    Profile("SIEMENS", "SOMATOM Force", 0.04, -1024,
            (Kernel("Thorax  Lung 1.5  Bl57  3", "['Bl57d', '3']", "FLAT", True),
             Kernel("Thorax Mediasten 1.5  Br36  3", "['Br36d', '3']", "FLAT", False)),
            {"DistanceSourceToDetector": "1085.6", "DistanceSourceToPatient": "595", "RotationDirection": "CW",
             "ExposureTime": "500", "GeneratorPower": "39", "FocalSpots": "0.8", "RevolutionTime": "",
             "SingleCollimationWidth": "0.6", "TotalCollimationWidth": "57.6", "TableSpeed": "92",
             "TableFeedPerRotation": "46", "SpiralPitchFactor": "0.8", "RescaleType": "HU"},
            "siemens", (-200.0, -120.0), (-1300.0, -1150.0), (1.5, 2.0), ("XYZ_EC",)),
)
PROFILE_BY_MODEL = {p.model: p for p in PROFILES}


# ------------------------------------------------------------------------------------------- numbers
def fmt_number(v: float, style: str = "siemens") -> str:
    """A number as the scanner writes it: exact shortest (siemens), 7 significant digits (philips) or
    six decimals (pnms); integers without a decimal point (except in the six-decimal style)."""
    v = float(v)
    if style == "pnms":
        s = f"{v:.6f}"
        return "-0.000000" if s == "-0.000000" else s
    s = f"{v:.7g}" if style == "philips" else repr(v)
    if "e" in s:
        s = f"{v:.10f}".rstrip("0").rstrip(".")
    if s.endswith(".0"):
        s = s[:-2]
    return "0" if s == "-0" else s


def fmt_list(vals, style: str = "siemens") -> str:
    return "[" + ", ".join(fmt_number(v, style) for v in vals) + "]"


def parse_list(s: str) -> list[float]:
    return [float(v) for v in s.strip("[]").split(",")]


# ------------------------------------------------------------------------------------------- geometry
@dataclass(frozen=True)
class ScanPlan:
    """Per-scan choices shared by its reconstructions."""

    profile: Profile
    kernels: tuple[Kernel, ...]  # one per reconstruction
    fov: float
    center: tuple[float, float]  # reconstruction centre (x, y), world mm
    body_offset: tuple[float, float]  # body axis relative to the centre (x, y) mm
    z0: float  # world z of the first slice of reconstruction 1
    rows: tuple[int, ...]
    z_spacing: tuple[float, ...]
    table_height: float
    tube_current: int
    exposure: int
    ctdi: float
    exposure_mod: str


def draw_n_reconstructions(rng: np.random.Generator) -> int:
    """1-3 reconstructions per scan (CT-RATE averages about two per scan)."""
    return int(rng.choice([1, 2, 3], p=[0.35, 0.45, 0.2]))


def plan_scan(rng: np.random.Generator, an: Anatomy, size: str, n_recon: int) -> ScanPlan:
    """Scanner, kernels, field of view, table position and per-reconstruction matrix and slice spacing."""
    w = np.array([p.weight for p in PROFILES])
    prof = PROFILES[int(rng.choice(len(PROFILES), p=w / w.sum()))]
    # first reconstruction sharp (lung) or soft at random, then the others
    order = list(rng.permutation(len(prof.kernels)))
    kernels = tuple(prof.kernels[order[i % len(order)]] for i in range(n_recon))
    if size == "demo":
        fov = float(np.clip(round(2 * an.body_a + rng.uniform(25, 60)), 320, 440))
        rows = []
        for _ in range(n_recon):
            cand = [r for r in (128, 144, 160, 176, 192) if 1.8 <= fov / r <= 2.6]
            rows.append(int(rng.choice(cand)) if cand else 160)
        zs = tuple(float(rng.choice([4.0, 5.0, 5.0, 6.0])) for _ in range(n_recon))
    elif size == "full":
        fov = float(np.clip(round(2 * an.body_a + rng.uniform(20, 50)), 310, 409))
        rows = [512] * n_recon
        extent = an.z_top - an.z_bottom
        zs = []
        for _ in range(n_recon):
            z = float(rng.choice(prof.z_full))
            while extent / z < 200 and z > 0.75:
                z = {2.0: 1.5, 1.5: 1.25, 1.25: 1.0, 1.0: 0.75}[z]
            zs.append(z)
        zs = tuple(zs)
    else:
        raise ValueError(f"size must be 'demo' or 'full', got {size!r}")
    return ScanPlan(
        profile=prof, kernels=kernels, fov=fov,
        center=(round(float(rng.uniform(-15, 15)), 3), round(float(rng.uniform(*prof.center_y)), 3)),
        body_offset=(float(rng.normal(0, 6)), float(rng.normal(0, 6))),
        z0=round(float(rng.uniform(*prof.z0)), 3), rows=tuple(rows), z_spacing=zs,
        table_height=float(round(rng.uniform(70, 200), 1)), tube_current=int(rng.integers(90, 420)),
        exposure=int(rng.integers(60, 260)), ctdi=float(rng.uniform(3.0, 12.0)),
        exposure_mod=str(rng.choice(prof.exposure_mod)),
    )


def recon_grid(plan: ScanPlan, an: Anatomy, rec: int) -> tuple[Grid, dict[str, str]]:
    """Grid of reconstruction ``rec`` (0-based) and its geometry columns (strings parsed back exactly)."""
    style = plan.profile.style
    n = plan.rows[rec]
    sxy = float(fmt_number(plan.fov / n, style))
    sz = plan.z_spacing[rec]
    extent = an.z_top - an.z_bottom
    nz = int(math.ceil(extent / sz))
    cx, cy = plan.center
    ox = round(cx - (n - 1) / 2 * sxy, 4)
    oy = round(cy - (n - 1) / 2 * sxy, 4)
    # reconstructions of one scan start at slightly different table positions
    oz = plan.z0 + (0.0 if rec == 0 else -0.5 * sz * (rec % 2))
    ipp = fmt_list([ox, oy, oz], style)
    ox, oy, oz = parse_list(ipp)
    offset = (cx + plan.body_offset[0], cy + plan.body_offset[1], plan.z0 - an.z_bottom)
    grid = Grid((nz, n, n), (sxy, sxy, sz), (ox, oy, oz), offset)
    orient = ("[1.000000, 0.000000, 0.000000, 0.000000, 1.000000, -0.000000]" if style == "pnms"
              else "[1, 0, 0, 0, 1, 0]")
    cols = {
        "ReconstructionDiameter": fmt_number(plan.fov, style if style != "pnms" else "philips"),
        "ImagePositionPatient": ipp,
        "ImageOrientationPatient": orient,
        "SliceLocation": fmt_number(round(oz, 2), "philips"),
        "Rows": str(n),
        "Columns": str(n),
        "XYSpacing": fmt_list([sxy, sxy], style),
        "NumberofSlices": str(nz),
        "ZSpacing": fmt_number(sz, "philips"),
    }
    if plan.profile.manufacturer.startswith("Siemens") or plan.profile.manufacturer == "SIEMENS":
        # Siemens writes these with Python-style floats ("[0.0, -181.0, -1250.8]")
        cols["DataCollectionCenterPatient"] = f"[0.0, {round(cy, 3)!r}, {round(oz, 3)!r}]"
        cols["ReconstructionTargetCenterPatient"] = f"[{round(cx, 3)!r}, {round(cy, 3)!r}, {round(oz, 3)!r}]"
    else:
        cols["DataCollectionCenterPatient"] = ""
        cols["ReconstructionTargetCenterPatient"] = ""
    return grid, cols


def metadata_row(volume_name: str, plan: ScanPlan, rec: int, geometry: dict[str, str], sex: str, age: int,
                 study_date: str) -> dict[str, str]:
    """All 44 columns of one reconstruction, as strings (empty = missing)."""
    prof, k = plan.profile, plan.kernels[rec]
    row = {c: "" for c in METADATA_COLUMNS}
    row.update(prof.fixed)
    row.update(geometry)
    row.update({
        "VolumeName": volume_name, "Manufacturer": prof.manufacturer, "SeriesDescription": k.series,
        "ManufacturerModelName": prof.model, "PatientSex": sex, "PatientAge": f"{int(age):03d}Y",
        "GantryDetectorTilt": "0", "TableHeight": fmt_number(plan.table_height, "philips"),
        "XRayTubeCurrent": str(plan.tube_current), "Exposure": str(plan.exposure), "FilterType": k.filter_type,
        "ConvolutionKernel": k.kernel, "PatientPosition": "HFS", "ExposureModulationType": plan.exposure_mod,
        "CTDIvol": fmt_number(round(plan.ctdi, 9), "siemens"), "SamplesPerPixel": "1",
        "PhotometricInterpretation": "MONOCHROME2", "RescaleIntercept": str(prof.intercept), "RescaleSlope": "1",
        "StudyDate": study_date,
    })
    return {c: row[c] for c in METADATA_COLUMNS}


def study_date(rng: np.random.Generator, after: str | None = None) -> str:
    """A study date (YYYYMMDD) in 2018-2021, or 30-700 days after ``after`` (a follow-up scan)."""
    base = np.datetime64("2018-06-01")
    if after is None:
        d = base + np.timedelta64(int(rng.integers(0, 1200)), "D")
    else:
        d = np.datetime64(f"{after[:4]}-{after[4:6]}-{after[6:]}") + np.timedelta64(int(rng.integers(30, 700)), "D")
    return str(d).replace("-", "")
