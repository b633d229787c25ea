"""The paintable lesions of :mod:`fvlm.synth.lesions`: objects with a painting ``stage`` and
``render(slab, anatomy)`` (tubes, blobs, lobe shifts, basal bands, effusions, mosaic and septal patterns)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fvlm.synth.geometry import Ellipsoid, Slab, paint_ellipsoid, paint_segments
from fvlm.synth.phantom import Anatomy


# ------------------------------------------------------------------------------------------- lesions
def _label_ok(mode: str, lobes: tuple[int, ...]):
    """Which label values a lesion may paint over (None: any)."""
    if lobes:
        return lambda lab: np.isin(lab, lobes)
    if mode == "lung":
        return lambda lab: (lab >= 10) & (lab <= 14)
    if mode == "soft":  # background or lung only: never over labelled organs or bone
        return lambda lab: (lab == 0) | ((lab >= 10) & (lab <= 14))
    return None


def _mask_fn(slab: Slab, mode: str, lobes: tuple[int, ...]):
    """Window mask function (for ellipsoids)."""
    ok = _label_ok(mode, lobes)
    return None if ok is None else (lambda win: ok(slab.lab[win]))


def _idx_mask_fn(slab: Slab, mode: str, lobes: tuple[int, ...]):
    """Flat-index mask function (for segments)."""
    ok = _label_ok(mode, lobes)
    return None if ok is None else (lambda idx: ok(slab.lab.reshape(-1)[idx]))


@dataclass(frozen=True)
class Segments:
    """Union of capsules (spheres when a == b) painted with one HU value (set, or ``add``-ed)."""

    stage: str
    a: np.ndarray
    b: np.ndarray
    ra: np.ndarray
    rb: np.ndarray
    value: float
    mask: str = ""  # "", "lung", "soft"
    lobes: tuple[int, ...] = ()
    label: int | None = None
    add: bool = False
    edge: float = 0.0

    def render(self, slab: Slab, an: Anatomy) -> None:
        fn = _idx_mask_fn(slab, self.mask, self.lobes)
        paint_segments(slab, self.a, self.b, self.ra, self.rb, self.value, self.label, mask_fn=fn, add=self.add,
                       edge=self.edge)


@dataclass(frozen=True)
class Blob:
    """An ellipsoid painted with one HU value (e.g. a lymph node, a plate of atelectasis)."""

    stage: str
    ell: Ellipsoid
    value: float
    mask: str = ""
    lobes: tuple[int, ...] = ()
    label: int | None = None

    def render(self, slab: Slab, an: Anatomy) -> None:
        fn = _mask_fn(slab, self.mask, self.lobes)
        paint_ellipsoid(slab, self.ell, self.value, self.label, mask_fn=fn)


def _lung_side(slab: Slab, an: Anatomy, side: str) -> np.ndarray:
    x = slab.xv[None, None, :]
    return (x > an.xm) if side == "left" else (x <= an.xm)


@dataclass(frozen=True)
class LobeShift:
    """Add ``delta`` HU to every voxel of some lobes (e.g. diffuse low attenuation in emphysema)."""

    stage: str
    lobes: tuple[int, ...]
    delta: float

    def render(self, slab: Slab, an: Anatomy) -> None:
        m = np.isin(slab.lab, self.lobes)
        slab.hu[m] += np.float32(self.delta)


@dataclass(frozen=True)
class BasalBand:
    """Dependent atelectasis: a dense band of lung just above the diaphragm, at the back of one side."""

    stage: str
    side: str
    thickness: float
    value: float

    def render(self, slab: Slab, an: Anatomy) -> None:
        zd = slab.cache["zd"][None]
        z = slab.zv[:, None, None]
        y = slab.yv[None, :, None]
        height = z - zd
        # thickest at the back, fading towards the front
        t = np.float32(self.thickness) * np.clip((y + 0.1 * an.body_b) / (0.5 * an.body_b), 0, 1)
        c = np.clip(0.5 + (t - height) / np.float32(slab.h), 0, 1)
        c *= slab.lobe_mask((slice(None),) * 3) & _lung_side(slab, an, self.side)
        slab.hu += c * (np.float32(self.value) - slab.hu)


@dataclass(frozen=True)
class Effusion:
    """Pleural fluid layering at the back (patient supine): lung behind the level y(z) becomes fluid.

    The fluid keeps no lung label (TotalSegmentator's lobes exclude pleural fluid); the lung just in front
    of it is compressed (denser).
    """

    stage: str
    side: str
    y_level: float  # fluid level at z = z_ref (mm)
    z_ref: float
    slope: float  # the level moves back by ``slope`` mm per mm upwards: deepest at the base
    value: float

    def render(self, slab: Slab, an: Anatomy) -> None:
        z = slab.zv[:, None, None]
        y = slab.yv[None, :, None]
        level = np.float32(self.y_level) + np.float32(self.slope) * np.maximum(z - np.float32(self.z_ref), 0)
        inside = slab.lobe_mask((slice(None),) * 3) & _lung_side(slab, an, self.side)
        c = np.clip(0.5 + (y - level) / np.float32(slab.h), 0, 1) * inside
        slab.hu += c * (np.float32(self.value) - slab.hu)
        slab.lab[c > 0.5] = 0
        comp = np.clip(1 - (level - y) / np.float32(12.0), 0, 1) * (y < level) * inside
        slab.hu += comp * np.float32(200.0)


@dataclass(frozen=True)
class Mosaic:
    """Geographic patches of lower and higher lung density (a smooth random field, thresholded softly)."""

    stage: str
    lobes: tuple[int, ...]
    waves: np.ndarray  # (k, 3) wave vectors (rad/mm)
    phases: np.ndarray  # (k,)
    delta: float

    def render(self, slab: Slab, an: Anatomy) -> None:
        k, j, i = np.nonzero(np.isin(slab.lab, self.lobes))
        if len(k) == 0:
            return
        x, y, z = slab.xv[i], slab.yv[j], slab.zv[k]
        f = np.zeros(len(k), dtype=np.float32)
        for w, ph in zip(self.waves.astype(np.float32), self.phases.astype(np.float32)):
            f += np.sin(x * w[0] + y * w[1] + z * w[2] + ph)
        slab.hu[k, j, i] += np.float32(self.delta) * np.tanh(np.float32(2.5) * f)


@dataclass(frozen=True)
class Septal:
    """Interlobular septal thickening: polygonal lines (Voronoi cell walls of ~1-2 cm lobules) near the pleura."""

    stage: str
    lobes: tuple[int, ...]
    cell: float  # lobule size mm
    half_thickness: float
    value: float
    zone: float  # subpleural depth mm
    seed: int

    def render(self, slab: Slab, an: Anatomy) -> None:
        depth, dc, zd = slab.cache["depth"], slab.cache["dc"], slab.cache["zd"]
        z = slab.zv[:, None, None]
        zone = np.isin(slab.lab, self.lobes) & (((depth - dc[None]) < self.zone) | ((z - zd[None]) < self.zone))
        k, j, i = np.nonzero(zone)
        if len(k) == 0:
            return
        # one jittered seed point per lattice cell; the lattice is fixed in the patient frame (so every slab
        # and every voxel size sees the same lobules)
        lo = np.floor(np.array([-300.0, -300.0, -400.0]) / self.cell).astype(np.int64)
        n = np.ceil(np.array([600.0, 600.0, 900.0]) / self.cell).astype(np.int64) + 2
        jit = np.random.default_rng(self.seed).random((3, n[0] * n[1] * n[2]), dtype=np.float32)
        inv = np.float32(1.0 / self.cell)
        rel, flat = [], None
        for ax, (v, ix) in enumerate(((slab.xv, i), (slab.yv, j), (slab.zv, k))):
            q = v * inv  # lattice units along this axis, per grid line
            b = np.clip(np.floor(q - 0.5).astype(np.int64) - lo[ax], 0, n[ax] - 2)
            rel.append((q - (b + lo[ax]).astype(np.float32))[ix])  # position relative to the base cell
            bi = b[ix]
            flat = bi if flat is None else flat * n[ax] + bi
        d1 = np.full(len(k), np.inf, dtype=np.float32)
        d2 = np.full(len(k), np.inf, dtype=np.float32)
        for o in range(8):
            off = ((o >> 0) & 1, (o >> 1) & 1, (o >> 2) & 1)
            fi = flat + int((off[0] * n[1] + off[1]) * n[2] + off[2])
            d = None
            for ax in range(3):
                t = rel[ax] - np.float32(off[ax]) - jit[ax][fi]
                t *= t
                d = t if d is None else d + t
            d2 = np.where(d < d1, d1, np.minimum(d2, d))
            np.minimum(d1, d, out=d1)
        d1, d2 = np.sqrt(d1), np.sqrt(d2)
        sd = (d2 - d1) * (self.cell / 2) - self.half_thickness  # ~ distance (mm) to the cell wall
        cov = np.clip(0.5 - sd / slab.h, 0, 1) * slab.thin_factor(self.half_thickness)
        hu = slab.hu[k, j, i]
        slab.hu[k, j, i] = hu + cov.astype(np.float32) * (np.float32(self.value) - hu)
