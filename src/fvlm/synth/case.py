"""Scenes (a scan's anatomy + findings), voxel grids, rendering to HU volumes, and the in-memory API.

A *scene* is what all reconstructions of one scan share: the patient's anatomy with the scan's findings
applied, the findings, the 18 labels and the report. A *grid* is one reconstruction's voxel lattice (shape,
spacing, LPS origin) plus where the patient lies in it. :func:`render_volume` paints a scene into a grid
slab by slab (bounded memory at full CT-RATE size), adds the reconstruction kernel's blur and noise, and
returns int16 HU and the uint8 TotalSegmentator label map.

Seeds: every random choice comes from ``numpy.random.SeedSequence(seed, spawn_key=key)`` with a key built
from (split, patient, scan, reconstruction) and a component code, so each volume is reproducible on its
own, whatever the number of worker processes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from functools import lru_cache
from importlib import resources

import numpy as np

from fvlm.labels import CT_RATE_LABELS
from fvlm.synth.findings import Finding
from fvlm.synth.geometry import Slab
from fvlm.synth.lesions import sample_findings
from fvlm.synth.phantom import Anatomy, sample_anatomy
from fvlm.synth.render import render
from fvlm.synth.reports import anatomy_texts, build_report
from fvlm.synth.signatures import DEFAULT_DIFFICULTY

# component codes inside a seed key
_ANATOMY, _LABELS, _FINDINGS, _TREE, _REPORT, _GEOMETRY, _NOISE, _JITTER, _META = range(9)

#: in-plane noise (HU) of each kernel family at a reference voxel of 0.7 x 0.7 x 1.5 mm
KERNEL_NOISE = {"soft": 14.0, "sharp": 42.0}
_REF_VOXEL = 0.7 * 0.7 * 1.5


def rng_for(entropy: int, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(entropy, spawn_key=tuple(int(k) for k in key)))


# ------------------------------------------------------------------------------------------- labels
@lru_cache(maxsize=1)
def label_rows() -> tuple[np.ndarray, np.ndarray]:
    """The shipped real CT-RATE training label rows: ``(rows uint8 (R, 18), counts int64 (R,))``."""
    text = resources.files("fvlm.synth").joinpath("ctrate_train_label_rows.csv").read_text()
    lines = [ln for ln in text.splitlines() if ln and not ln.startswith("#")]
    header = lines[0].split(",")
    if header[:-1] != list(CT_RATE_LABELS) or header[-1] != "count":
        raise ValueError("ctrate_train_label_rows.csv: unexpected header (expected the 18 CT-RATE labels + count)")
    data = np.array([[int(v) for v in ln.split(",")] for ln in lines[1:]], dtype=np.int64)
    return data[:, :18].astype(np.uint8), data[:, 18]


def draw_labels(rng: np.random.Generator) -> dict[str, int]:
    """A whole real label row, drawn with probability proportional to how often it occurs in CT-RATE train."""
    rows, counts = label_rows()
    i = int(rng.choice(len(rows), p=counts / counts.sum()))
    return {name: int(v) for name, v in zip(CT_RATE_LABELS, rows[i])}


def normalize_labels(labels, rng: np.random.Generator | None = None) -> dict[str, int]:
    """``None`` (draw a real row), a dict (missing = 0), 18 numbers in official order, or positive label names."""
    if labels is None:
        return draw_labels(rng if rng is not None else np.random.default_rng())
    if isinstance(labels, dict):
        unknown = set(labels) - set(CT_RATE_LABELS)
        if unknown:
            raise KeyError(f"unknown CT-RATE labels {sorted(unknown)}")
        return {name: int(bool(labels.get(name, 0))) for name in CT_RATE_LABELS}
    seq = list(labels)
    if len(seq) == len(CT_RATE_LABELS) and all(not isinstance(v, str) for v in seq):
        return {name: int(bool(v)) for name, v in zip(CT_RATE_LABELS, seq)}
    unknown = [v for v in seq if v not in CT_RATE_LABELS]
    if unknown:
        raise KeyError(f"unknown CT-RATE labels {unknown}")
    return {name: int(name in seq) for name in CT_RATE_LABELS}


# ------------------------------------------------------------------------------------------- scenes
@dataclass
class Scene:
    """What all reconstructions of one scan share."""

    anatomy: Anatomy
    findings: list[Finding]
    labels: dict[str, int]

    @property
    def lesions(self) -> list:
        return [les for f in self.findings for les in f.lesions]


def patient_anatomy(entropy: int, key: tuple[int, ...]) -> Anatomy:
    return sample_anatomy(rng_for(entropy, *key, _ANATOMY))


def build_scene(entropy: int, key: tuple[int, ...], labels: dict[str, int], anatomy: Anatomy,
                difficulty: float = DEFAULT_DIFFICULTY) -> Scene:
    """Apply a scan's breath-hold variation and findings to the patient's anatomy."""
    rng = rng_for(entropy, *key, _JITTER)
    dz = float(rng.normal(0, 5))
    an = replace(anatomy, dome_r=(*anatomy.dome_r[:2], anatomy.dome_r[2] + dz),
                 dome_l=(*anatomy.dome_l[:2], anatomy.dome_l[2] + dz),
                 lung_hu=anatomy.lung_hu + float(rng.normal(0, 8)))
    an, findings = sample_findings(entropy, (*key, _FINDINGS), labels, an, difficulty,
                                   tree_rng=rng_for(entropy, *key, _TREE))
    return Scene(an, findings, dict(labels))


# ------------------------------------------------------------------------------------------- grids
@dataclass(frozen=True)
class Grid:
    """One reconstruction's voxel lattice.

    ``shape`` (D, H, W) = (z, y, x); ``spacing`` (sx, sy, sz) mm; ``origin`` LPS position (mm) of voxel
    (0, 0, 0) (= DICOM ImagePositionPatient of the first slice); direction is the identity (axial, LPS).
    The patient frame is shifted by ``offset``: world = patient + offset.
    """

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    offset: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def axes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Patient-frame voxel-centre coordinates along x (W,), y (H,), z (D,) in mm."""
        d, h, w = self.shape
        return tuple(self.origin[i] - self.offset[i] + np.arange(n) * self.spacing[i]
                     for i, n in enumerate((w, h, d)))

    @property
    def affine_ras(self) -> np.ndarray:
        """NIfTI affine of the (x, y, z)-ordered array: LPS -> RAS flips x and y."""
        sx, sy, sz = self.spacing
        ox, oy, oz = self.origin
        return np.array([[-sx, 0, 0, -ox], [0, -sy, 0, -oy], [0, 0, sz, oz], [0, 0, 0, 1]], dtype=np.float64)


def default_grid(an: Anatomy, size: str = "demo", spacing: tuple[float, float, float] | None = None,
                 shape: tuple[int, int, int] | None = None) -> Grid:
    """A grid centred on the patient covering the whole scan range (for the in-memory API)."""
    if spacing is None:
        spacing = (2.2, 2.2, 5.0) if size == "demo" else (0.7, 0.7, 1.25)
    sx, sy, sz = (float(v) for v in spacing)
    fov = float(np.clip(2 * an.body_a + 30, 300, 460))
    if shape is None:
        n = int(math.ceil(fov / sx))
        d = int(math.ceil((an.z_top - an.z_bottom) / sz))
        shape = (d, int(math.ceil(fov / sy)), n)
    d, h, w = shape
    origin = (-(w - 1) / 2 * sx, -(h - 1) / 2 * sy, an.z_bottom)
    return Grid((d, h, w), (sx, sy, sz), origin, (0.0, 0.0, 0.0))


# ------------------------------------------------------------------------------------------- rendering
def _blur_inplane(a: np.ndarray) -> None:
    """[1, 2, 1] / 4 along x and y, in place (soft reconstruction kernels)."""
    for ax in (1, 2):
        lo = [slice(None)] * 3
        mid = [slice(None)] * 3
        hi = [slice(None)] * 3
        lo[ax], mid[ax], hi[ax] = slice(0, -2), slice(1, -1), slice(2, None)
        tmp = a[tuple(lo)] + a[tuple(hi)]
        tmp += 2 * a[tuple(mid)]
        tmp *= 0.25
        a[tuple(mid)] = tmp


def noise_sigma(kernel: str, spacing) -> float:
    """Noise SD (HU) of a kernel at this voxel size (larger voxels average more photons)."""
    v = float(np.prod(spacing))
    return KERNEL_NOISE[kernel] * (_REF_VOXEL / v) ** 0.25


def render_volume(scene: Scene, grid: Grid, kernel: str = "soft", rng: np.random.Generator | None = None,
                  slab_voxels: int = 6_000_000) -> tuple[np.ndarray, np.ndarray]:
    """Paint a scene into a grid: returns (int16 HU ``(D, H, W)``, uint8 label map ``(D, H, W)``).

    Rendering runs in slabs of about ``slab_voxels`` voxels, so memory stays bounded (a 512 x 512 x 400
    volume needs about 200 MB for the int16 result plus one slab's work arrays).
    """
    if kernel not in KERNEL_NOISE:
        raise ValueError(f"unknown kernel {kernel!r}; expected one of {sorted(KERNEL_NOISE)}")
    rng = rng if rng is not None else np.random.default_rng(0)
    xv, yv, zv = grid.axes()
    d, h, w = grid.shape
    hu_out = np.empty(grid.shape, dtype=np.int16)
    lab_out = np.empty(grid.shape, dtype=np.uint8)
    step = max(1, slab_voxels // (h * w))
    sigma = noise_sigma(kernel, grid.spacing)
    lesions = scene.lesions
    for z0 in range(0, d, step):
        z1 = min(d, z0 + step)
        slab = Slab(xv, yv, zv[z0:z1], grid.spacing)
        render(slab, scene.anatomy, lesions)
        hu = slab.hu
        if kernel == "soft" and min(grid.spacing[:2]) < 1.2:
            # soft kernels smooth; at large voxels (demo) the painted partial-volume edges already do
            _blur_inplane(hu)
        hu += rng.standard_normal(hu.shape, dtype=np.float32) * np.float32(sigma)
        np.rint(hu, out=hu)
        np.clip(hu, -1024, 3071, out=hu)
        hu_out[z0:z1] = hu
        lab_out[z0:z1] = slab.lab
    return hu_out, lab_out


# ------------------------------------------------------------------------------------------- in-memory API
@dataclass
class Case:
    """One synthetic volume in memory.

    Attributes:
        hu: int16 ``(D, H, W)`` = (z, y, x) Hounsfield units, LPS (x to the patient's left, y posterior,
            z superior; index 0 is the most inferior slice).
        label_map: uint8 ``(D, H, W)`` TotalSegmentator v2 ``total`` ids.
        spacing: (sx, sy, sz) mm. origin: LPS position (mm) of voxel (0, 0, 0).
        labels: the 18 CT-RATE labels (0/1). findings: the positive labels' findings (severity, lobes, details).
        report: the report (sections and per-sentence truth). scene: anatomy + findings (for re-rendering).
    """

    hu: np.ndarray
    label_map: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    labels: dict[str, int]
    findings: list[Finding]
    report: object
    scene: Scene
    grid: Grid | None = field(repr=False, default=None)

    @property
    def spacing_xyz(self) -> tuple[float, float, float]:
        return self.spacing

    @property
    def affine_ras(self) -> np.ndarray:
        return self.grid.affine_ras

    def anatomy_texts(self, table="released") -> tuple[dict[str, str], dict[str, str]]:
        """(desc, conc): findings and impression texts per anatomy of an anatomy table (name or object)."""
        return anatomy_texts(self.report, table)


def generate_case(seed=0, labels=None, *, size: str = "demo", spacing: tuple[float, float, float] | None = None,
                  shape: tuple[int, int, int] | None = None, kernel: str = "soft",
                  difficulty: float = DEFAULT_DIFFICULTY, anatomy: Anatomy | None = None) -> Case:
    """Generate one synthetic chest CT in memory.

    Args:
        seed: int or ``numpy.random.Generator`` (an int entropy is drawn from it).
        labels: None (draw a real CT-RATE label row), a dict {label: 0/1}, 18 numbers in official order,
            or a list of positive label names.
        size: "demo" (2.2 x 2.2 x 5 mm) or "full" (0.7 x 0.7 x 1.25 mm) default grid; ``spacing`` (x, y, z)
            mm and ``shape`` (D, H, W) override it.
        kernel: "soft" (blurred, low noise) or "sharp" (lung kernel: crisp, noisier).
        anatomy: use this patient (an :class:`~fvlm.synth.phantom.Anatomy` without findings) instead of the
            one drawn from ``seed``. The same seed with different labels already gives the same patient.
        difficulty: the lesion-severity knob (see :mod:`fvlm.synth.lesions`).
    """
    if isinstance(seed, np.random.Generator):
        seed = int(seed.integers(0, 2**63 - 1))
    key = (9, 0, 1, 0)
    labels = normalize_labels(labels, rng_for(seed, *key, _LABELS))
    an = anatomy if anatomy is not None else patient_anatomy(seed, (9, 0))
    scene = build_scene(seed, key, labels, an, difficulty)
    grid = default_grid(scene.anatomy, size, spacing, shape)
    hu, lab = render_volume(scene, grid, kernel, rng_for(seed, *key, _NOISE, 0))
    report = build_report(rng_for(seed, *key, _REPORT), scene, slice_thickness=grid.spacing[2])
    return Case(hu, lab, grid.spacing, grid.origin, labels, scene.findings, report, scene, grid)
