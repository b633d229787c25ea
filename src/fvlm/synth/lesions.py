"""Abnormalities: one visible signature per CT-RATE label, with a severity drawn per finding.

All signature parameters live in one table, :data:`SIGNATURES` (one :class:`Signature` per label). Every
range is written ``(subtle, strong)``: a finding's severity ``s`` in [0, 1] interpolates between the two
ends, so a subtle finding is small and faint and a strong one large and dense. Severities are drawn from
``Beta(1 + 2 (1 - d), 1 + 2 d)`` where ``d`` is the single ``difficulty`` knob (0 = mostly strong findings,
1 = mostly subtle; default :data:`DEFAULT_DIFFICULTY`).

:func:`sample_findings` turns a scan's 18-label vector into :class:`Finding` objects: anatomy changes
(a larger heart, a pericardial rim, a hiatal hernia, elevated diaphragm, thick or dilated bronchi) and
lesions (objects with a painting ``stage`` and ``render(slab, anatomy)``) placed in the right anatomy
using a coarse label map of the patient. Each finding also records what the report says about it
(``details``) and which lobes or structures it involves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np

from fvlm.labels import CT_RATE_LABELS
from fvlm.synth.geometry import Ellipsoid, Slab, Tube, paint_ellipsoid, paint_segments, rotation_from, unit
from fvlm.synth.phantom import LOBES, UPPER_LOBES, Anatomy
from fvlm.synth.render import body_scale, wall_fields
from fvlm.synth.tree import CoarseMap, build_tree, coarse_map

#: default of the one difficulty knob (0 = mostly strong findings, 1 = mostly subtle)
DEFAULT_DIFFICULTY = 0.4


@dataclass(frozen=True)
class Signature:
    """Signature parameters of one label; each range is ``(subtle, strong)`` (see the module docstring).

    ``size`` and ``hu`` mean what the label's entry says (e.g. a nodule diameter, a wall-thickness factor,
    an HU value or an HU change); ``count`` is how many lesions (or lobes) one finding has.
    """

    size: tuple[float, float]
    hu: tuple[float, float]
    count: tuple[float, float] = (1, 1)
    extra: dict = field(default_factory=dict)
    note: str = ""


SIGNATURES: dict[str, Signature] = {
    "Medical material": Signature((0.8, 1.1), (2200, 3000), (3, 8),
                                  note="size: device scale; hu: metal HU; count: clips or sternal wires"),
    "Arterial wall calcification": Signature((1.2, 3.0), (400, 1200), (3, 30), extra={"length": (3, 10)},
                                             note="size: plaque radius mm in the aortic wall; count: plaques; "
                                                  "length: plaque length mm along the wall"),
    "Cardiomegaly": Signature((0.55, 0.70), (0, 0), note="size: cardiothoracic ratio (normal hearts: 0.38-0.48)"),
    "Pericardial effusion": Signature((5, 22), (15, 5), note="size: fluid rim thickness mm; hu: fluid HU"),
    "Coronary artery wall calcification": Signature((1.6, 3.5), (500, 1200), (2, 16), extra={"length": (3, 10)},
                                                    note="size: plaque radius mm on the coronary course; "
                                                         "length: plaque length mm along the artery"),
    "Hiatal hernia": Signature((14, 36), (30, 15), note="size: radius mm of the bulge above the hiatus"),
    "Lymphadenopathy": Signature((12, 28), (48, 38), (1, 5), note="size: node short axis mm; count: nodes"),
    "Emphysema": Signature((6.0, 12.0), (-980, -1000), (80, 400), extra={"lobe_shift": (-15, -50)},
                           note="size: hole radius mm; hu: hole HU; count: holes; lobe_shift: HU change of lobes"),
    "Atelectasis": Signature((6, 30), (-320, 25), (1, 2), extra={"dome_raise": (0, 14), "plate_length": (25, 55)},
                             note="size: basal band thickness mm; hu: collapsed lung HU; dome_raise: volume loss mm; "
                                  "plate_length: half length mm of linear (plate) atelectasis"),
    "Lung nodule": Signature((5, 25), (10, 45), (1, 4), note="size: largest diameter mm; count: nodules"),
    "Lung opacity": Signature((11, 40), (150, 430), (1, 6),
                              note="size: ground-glass patch radius mm; hu: HU added; count: patches"),
    "Pulmonary fibrotic sequela": Signature((1.2, 2.6), (-250, 40), (3, 16), extra={"length": (15, 45)},
                                            note="size: strand radius mm; count: strands; length mm"),
    "Pleural effusion": Signature((8, 65), (16, 4), note="size: fluid depth mm at the base; hu: fluid HU"),
    "Mosaic attenuation pattern": Signature((60, 35), (45, 140),
                                            note="size: patch wavelength mm; hu: +- HU of the patches"),
    "Peribronchial thickening": Signature((1.8, 3.8), (10, 40), (2, 5),
                                          note="size: bronchial wall factor; hu: wall HU; count: lobes"),
    "Consolidation": Signature((16, 50), (-250, 35), (1, 2), note="size: radius mm; hu: HU; count: foci"),
    "Bronchiectasis": Signature((1.6, 3.2), (-1000, -1000), (1, 4), extra={"cysts": (0, 8)},
                                note="size: bronchial lumen factor; count: lobes; cysts: cystic dilatations"),
    "Interlobular septal thickening": Signature((0.8, 1.6), (-250, 20), (2, 5),
                                                extra={"cell": (18, 12), "zone": (12, 32)},
                                                note="size: septal half thickness mm; cell: lobule size mm; "
                                                     "zone: subpleural depth mm; count: lobes"),
}
assert set(SIGNATURES) == set(CT_RATE_LABELS)


def draw_severity(rng: np.random.Generator, difficulty: float = DEFAULT_DIFFICULTY) -> float:
    d = float(np.clip(difficulty, 0.0, 1.0))
    return float(rng.beta(1 + 2 * (1 - d), 1 + 2 * d))


def lerp(rng_pair: tuple[float, float], s: float) -> float:
    return float(rng_pair[0] + (rng_pair[1] - rng_pair[0]) * s)


def _count(sig_range: tuple[float, float], s: float, rng: np.random.Generator) -> int:
    return max(1, int(round(lerp(sig_range, s) + rng.uniform(-0.5, 0.5))))


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


# ------------------------------------------------------------------------------------------- findings
@dataclass
class Finding:
    """One positive label of a scan: how severe, where, what the report says, and what gets painted.

    ``lobes`` are the involved lung lobes (TotalSegmentator ids) for lung findings; ``details`` holds the
    numbers and words the report uses (sizes in mm, sides, device kind, ...).
    """

    label: str
    severity: float
    lobes: tuple[int, ...] = ()
    details: dict = field(default_factory=dict)
    lesions: list = field(default_factory=list)


@dataclass
class _Ctx:
    an: Anatomy
    cmap: CoarseMap | None
    difficulty: float
    effusion: dict = field(default_factory=dict)  # side -> (y_level, z_ref, slope)

    def lung_points(self, lobes=None, min_depth: float = 0.0, max_depth: float = np.inf, margin: float = 0.0):
        """Coarse lung voxel centres (n, 3) in ``lobes`` with a pleural distance in [min, max] mm, outside
        any effusion (by ``margin`` mm)."""
        cm = self.cmap
        lab = cm.lab
        m = (lab >= 10) & (lab <= 14) if lobes is None else np.isin(lab, lobes)
        m &= (cm.pleura_mm >= min_depth) & (cm.pleura_mm <= max_depth)
        pts = cm.points(m)
        lob = lab[m]
        keep = np.ones(len(pts), dtype=bool)
        left = (lob == 10) | (lob == 11)
        for side, (yl, zr, sl) in self.effusion.items():
            on = left if side == "left" else ~left
            level = yl + sl * np.maximum(pts[:, 2] - zr, 0)
            keep &= ~(on & (pts[:, 1] > level - margin))
        return pts[keep], lob[keep]


def _pick(rng: np.random.Generator, pts: np.ndarray, lob: np.ndarray, n: int = 1):
    if len(pts) == 0:
        return np.zeros((0, 3)), np.zeros(0, dtype=np.uint8)
    idx = rng.choice(len(pts), size=min(n, len(pts)), replace=False)
    jitter = rng.uniform(-2.0, 2.0, (len(idx), 3))
    return pts[idx] + jitter, lob[idx]


def _pick_lobes(rng: np.random.Generator, n: int, lower_weight: float = 1.0, upper_weight: float = 1.0):
    w = np.array([upper_weight, lower_weight, upper_weight, 0.7, lower_weight], dtype=np.float64)
    ids = np.array([10, 11, 12, 13, 14])
    n = int(np.clip(n, 1, 5))
    return tuple(sorted(int(v) for v in rng.choice(ids, size=n, replace=False, p=w / w.sum())))


def _sides(lobes) -> str:
    s = {LOBES[v] for v in lobes}
    return "bilateral" if len(s) == 2 else next(iter(s))


# -- anatomy-changing findings (applied before the coarse map) -----------------------------------------
def _cardiomegaly(rng, s, sig, ctx):
    ctx.an = replace(ctx.an, heart_scale=ctx.an.heart_scale_for(lerp(sig.size, s)))
    return Finding("Cardiomegaly", s, details={"ctr": ctx.an.cardiothoracic_ratio})


def _pericardial(rng, s, sig, ctx):
    t = lerp(sig.size, s)
    ctx.an = replace(ctx.an, pericardial_effusion=t, pericardial_hu=lerp(sig.hu, s))
    return Finding("Pericardial effusion", s, details={"thickness_mm": t})


def _hernia(rng, s, sig, ctx):
    an = ctx.an
    r = lerp(sig.size, s)
    hiatus = an.esophagus.points[np.argmin(np.abs(an.esophagus.points[:, 2] - (an.dome_l[2] - 6)))]
    centre = hiatus + np.array([-4.0, 3.0, 0.75 * r + 4])
    ell = Ellipsoid.make(centre, np.array([r, 0.85 * r, 0.8 * r]))
    ctx.an = replace(an, hernia=ell)
    return Finding("Hiatal hernia", s, details={"size_mm": 2 * r})


def _atelectasis(rng, s, sig, ctx):
    sides = ["right", "left"] if rng.random() < 0.4 else [str(rng.choice(["right", "left"]))]
    raise_mm = lerp(sig.extra["dome_raise"], s)
    an = ctx.an
    if "right" in sides:
        an = replace(an, dome_r=(an.dome_r[0], an.dome_r[1], an.dome_r[2] + raise_mm))
    if "left" in sides:
        an = replace(an, dome_l=(an.dome_l[0], an.dome_l[1], an.dome_l[2] + raise_mm))
    ctx.an = an
    kind = "basal" if rng.random() < 0.6 else "linear"
    lobes = tuple(sorted((11 if sd == "left" else 14) for sd in sides))
    if kind == "linear" and rng.random() < 0.4:
        lobes = (13,) if "right" in sides else (10,)  # middle lobe / lingula
    return Finding("Atelectasis", s, lobes=lobes, details={"sides": sides, "kind": kind,
                                                          "thickness_mm": lerp(sig.size, s)})


def _airways(label):
    def make(rng, s, sig, ctx):
        n = _count(sig.count, s, rng)
        lobes = _pick_lobes(rng, n, lower_weight=2.5 if label == "Bronchiectasis" else 1.5)
        airway = dict(ctx.an.airway)
        for lobe in lobes:
            lum, wall, ext = airway.get(lobe, (1.0, 1.0, False))
            if label == "Bronchiectasis":
                lum, wall, ext = max(lum, lerp(sig.size, s)), max(wall, 1.4), True
            else:
                wall = max(wall, lerp(sig.size, s))
            airway[lobe] = (lum, wall, ext)
        ctx.an = replace(ctx.an, airway=airway)
        return Finding(label, s, lobes=lobes, details={"kind": str(rng.choice(["cylindrical", "varicose"]))})
    return make


def _effusion(rng, s, sig, ctx):
    u = rng.random()
    sides = ["right", "left"] if u < 0.45 else (["right"] if u < 0.75 else ["left"])
    cm = ctx.cmap
    depth = {}
    f = Finding("Pleural effusion", s, details={})
    for i, side in enumerate(sides):
        t = lerp(sig.size, s) * (1.0 if i == 0 else rng.uniform(0.5, 1.0))
        lob = (11,) if side == "left" else (14,)
        pts = cm.points(np.isin(cm.lab, lob))
        if len(pts) == 0:
            continue
        y_back = float(np.percentile(pts[:, 1], 99))
        z_ref = float(np.percentile(pts[:, 2], 5))
        level = y_back - t
        slope = 0.25
        ctx.effusion[side] = (level, z_ref, slope)
        f.lesions.append(Effusion("pleura", side, level, z_ref, slope, lerp(sig.hu, s)))
        depth[side] = t
    f.lobes = tuple(sorted(v for side in depth for v in (LOBES_OF[side])))
    f.details = {"sides": sorted(depth), "depth_mm": depth}
    return f


LOBES_OF = {"left": (10, 11), "right": (12, 13, 14)}


# -- lesions placed in the lungs ---------------------------------------------------------------------
def _nodule(rng, s, sig, ctx):
    n = _count(sig.count, s * 0.7, rng)
    largest = lerp(sig.size, s ** 1.3)
    sizes = [largest] + [float(rng.uniform(4, max(4.5, largest * 0.7))) for _ in range(n - 1)]
    f = Finding("Lung nodule", s)
    a, rr, lobes = [], [], []
    for d in sizes:
        pts, lob = ctx.lung_points(min_depth=d / 2 + 3, margin=d)
        p, lo = _pick(rng, pts, lob)
        if len(p) == 0:
            continue
        r = d / 2
        a.append(p[0])
        rr.append(r)
        # larger nodules are lobulated: a few overlapping spheres
        for _ in range(int(d > 10) + int(d > 18)):
            a.append(p[0] + rng.normal(0, r * 0.3, 3))
            rr.append(r * rng.uniform(0.6, 0.85))
        lobes.append(int(lo[0]))
    if a:
        a = np.array(a)
        f.lesions.append(Segments("lung", a, a, np.array(rr), np.array(rr), lerp(sig.hu, s), mask="lung"))
    f.lobes = tuple(sorted(set(lobes)))
    f.details = {"sizes_mm": [round(v) for v in sizes[: len(lobes)]], "lobes": lobes}
    return f


def _consolidation(rng, s, sig, ctx):
    n = _count(sig.count, s, rng)
    f = Finding("Consolidation", s)
    lobes = []
    radius = lerp(sig.size, s)
    for _ in range(n):
        lobe = int(rng.choice([10, 11, 12, 13, 14], p=[0.15, 0.27, 0.15, 0.13, 0.30]))
        pts, lob = ctx.lung_points((lobe,), min_depth=4, margin=5)
        p, _ = _pick(rng, pts, lob)
        if len(p) == 0:
            continue
        c = p[0]
        a = c + rng.normal(0, radius * 0.3, (3, 3))
        r = radius * rng.uniform(0.6, 1.0, 3)
        f.lesions.append(Segments("parenchyma", a, a, r, r, lerp(sig.hu, s), lobes=(lobe,), edge=4.0))
        lobes.append(lobe)
    f.lobes = tuple(sorted(set(lobes)))
    f.details = {"size_mm": round(2 * radius), "lobes": lobes}
    return f


def _opacity(rng, s, sig, ctx):
    n = _count(sig.count, s, rng)
    f = Finding("Lung opacity", s)
    pts, lob = ctx.lung_points(max_depth=25, margin=5)
    p, lo = _pick(rng, pts, lob, n)
    if len(p):
        r = np.array([lerp(sig.size, s) * rng.uniform(0.6, 1.0) for _ in range(len(p))])
        f.lesions.append(Segments("parenchyma", p, p, r, r, lerp(sig.hu, s), mask="lung", add=True,
                                  edge=float(0.5 * r.mean())))
    f.lobes = tuple(sorted({int(v) for v in lo}))
    f.details = {"count": len(p)}
    return f


def _emphysema(rng, s, sig, ctx):
    n = _count(sig.count, s, rng)
    lobes = (10, 12) + ((11, 14) if rng.random() < 0.5 else ())
    pts, lob = ctx.lung_points(lobes, margin=3)
    if len(pts):  # upper zones
        zcut = np.percentile(pts[:, 2], 35)
        sel = pts[:, 2] > zcut
        pts, lob = pts[sel], lob[sel]
    p, lo = _pick(rng, pts, lob, n)
    f = Finding("Emphysema", s, details={"kind": str(rng.choice(["centrilobular", "paraseptal", "panlobular"]))})
    if len(p):  # mostly small holes, a few large ones (bullae)
        r = lerp(sig.size, s) * rng.uniform(0.35, 1.0, len(p)) ** 1.5
        f.lesions.append(Segments("parenchyma", p, p, r, r, lerp(sig.hu, s), mask="lung"))
    f.lesions.append(LobeShift("parenchyma", tuple(sorted({int(v) for v in lo})) or UPPER_LOBES,
                               lerp(sig.extra["lobe_shift"], s)))
    f.lobes = tuple(sorted({int(v) for v in lo})) or UPPER_LOBES
    return f


def _atelectasis_lesions(f: Finding, rng, sig, ctx):
    s = f.severity
    value = lerp(sig.hu, s)
    if f.details["kind"] == "basal":
        for side in f.details["sides"]:
            f.lesions.append(BasalBand("parenchyma", side, f.details["thickness_mm"], value))
    else:
        for lobe in f.lobes:
            pts, lob = ctx.lung_points((lobe,), min_depth=4, margin=5)
            p, _ = _pick(rng, pts, lob)
            if len(p) == 0:
                continue
            L = lerp(sig.extra["plate_length"], s)
            ell = Ellipsoid.make(p[0], [L, 0.6 * L, max(2.5, 0.12 * f.details["thickness_mm"])],
                                 rotation_from(unit([1.0, rng.normal(0, 0.3), rng.normal(0, 0.2)])))
            f.lesions.append(Blob("parenchyma", ell, value, lobes=(lobe,)))


def _fibrosis(rng, s, sig, ctx):
    n = _count(sig.count, s, rng)
    lobes = _pick_lobes(rng, int(rng.integers(1, 4)), lower_weight=0.7, upper_weight=1.6)
    pts, lob = ctx.lung_points(lobes, max_depth=22, margin=4)
    p, lo = _pick(rng, pts, lob, n)
    a, b = [], []
    for q in p:
        length = lerp(sig.extra["length"], s) * rng.uniform(0.6, 1.0)
        d = unit(rng.normal(0, 1, 3) * np.array([1.0, 1.0, 0.6]))
        a.append(q - d * length / 2)
        b.append(q + d * length / 2)
    f = Finding("Pulmonary fibrotic sequela", s)
    if a:
        r = lerp(sig.size, s)
        f.lesions.append(Segments("lung", np.array(a), np.array(b), r, r * 0.7, lerp(sig.hu, s), mask="lung"))
    f.lobes = tuple(sorted({int(v) for v in lo}))
    return f


def _mosaic(rng, s, sig, ctx):
    lobes = (10, 11, 12, 13, 14) if rng.random() < 0.6 else (11, 13, 14)
    wl = lerp(sig.size, s)
    waves = np.stack([unit(rng.normal(0, 1, 3)) * (2 * math.pi / (wl * rng.uniform(0.8, 1.25))) for _ in range(3)])
    f = Finding("Mosaic attenuation pattern", s, lobes=lobes)
    f.lesions.append(Mosaic("parenchyma", lobes, waves, rng.uniform(0, 2 * math.pi, 3), lerp(sig.hu, s)))
    return f


def _septal(rng, s, sig, ctx):
    n = _count(sig.count, s, rng)
    lobes = _pick_lobes(rng, n, lower_weight=2.0)
    f = Finding("Interlobular septal thickening", s, lobes=lobes)
    f.lesions.append(Septal("lung", lobes, lerp(sig.extra["cell"], s), lerp(sig.size, s), lerp(sig.hu, s),
                            lerp(sig.extra["zone"], s), int(rng.integers(1 << 30))))
    return f


def _bronchiectasis_cysts(f: Finding, rng, sig, ctx):
    n = int(round(lerp(sig.extra["cysts"], f.severity)))
    if n <= 0 or ctx.an.tree is None:
        return
    tree = ctx.an.tree
    ends = tree.b[(tree.kind == 2) & np.isin(tree.lobe, f.lobes)]
    if len(ends) == 0:
        return
    c = ends[rng.choice(len(ends), size=min(n, len(ends)), replace=False)] + rng.normal(0, 3, (min(n, len(ends)), 3))
    r = rng.uniform(3.0, 6.0, len(c))
    f.lesions.append(Segments("lung", c, c, r + 1.3, r + 1.3, 35.0, mask="lung"))
    f.lesions.append(Segments("lung", c, c, r, r, -1000.0, mask="lung"))


# -- mediastinum, heart, vessels, devices --------------------------------------------------------------
def coronary_course(an: Anatomy, n: int = 40) -> dict[str, np.ndarray]:
    """Points (n, 3) along the coronary arteries on the heart surface (LAD, circumflex, RCA)."""
    h = an.heart
    u1 = unit(an.heart_rot[:, 0])  # long axis, base -> apex

    def perp(v):
        v = np.asarray(v, dtype=np.float64)
        return unit(v - (v @ u1) * u1)

    ant, left, right, post = perp([0, -1, 0]), perp([1, 0, 0]), perp([-1, 0, 0]), perp([0, 1, -0.3])
    t = np.linspace(0, 1, n)[:, None]

    def path(d0, d1, d2=None):
        if d2 is None:
            ds = (1 - t) * d0 + t * d1
        else:
            ds = np.where(t < 0.5, (1 - 2 * t) * d0 + 2 * t * d1, (2 - 2 * t) * d1 + (2 * t - 1) * d2)
        return np.stack([h.surface_point(d) + 1.5 * unit(d) for d in ds])

    return {
        "LAD": path(-0.55 * u1 + ant, 0.9 * u1 + 0.35 * ant),
        "LCx": path(-0.55 * u1 + ant + left, -0.55 * u1 + left, -0.5 * u1 + post),
        "RCA": path(-0.5 * u1 + ant + right, -0.5 * u1 + right, -0.3 * u1 + post),
    }


def _coronary(rng, s, sig, ctx):
    n = _count(sig.count, s, rng)
    course = coronary_course(ctx.an)
    names = list(course)
    pick = rng.choice(names, size=n, p=[0.5, 0.25, 0.25])
    a, b = [], []
    for v in pick:
        path = course[v]
        i = min(len(path) - 2, int(rng.beta(1.2, 2.5) * (len(path) - 1)))  # proximal segments more often
        d = unit(path[i + 1] - path[i])
        half = lerp(sig.extra["length"], s) * rng.uniform(0.5, 1.0) / 2
        a.append(path[i] - d * half)
        b.append(path[i] + d * half)
    r = lerp(sig.size, s) * rng.uniform(0.6, 1.0, n)
    f = Finding("Coronary artery wall calcification", s,
                details={"vessels": sorted({str(v) for v in pick}), "count": n})
    f.lesions.append(Segments("heart", np.array(a), np.array(b), r, r, lerp(sig.hu, s)))
    return f


def _aortic(rng, s, sig, ctx):
    n = _count(sig.count, s, rng)
    aorta = ctx.an.aorta
    a, b, parts = [], [], set()
    for _ in range(n):
        t = float(rng.uniform(0.25, 1.0))
        c, r = aorta.point_at(t)
        d = aorta.direction_at(t)
        nrm = unit(np.cross(d, rng.normal(0, 1, 3)))
        p = c + nrm * (r - 0.5)
        length = lerp(sig.extra["length"], s) * float(rng.uniform(0.4, 1.0))
        a.append(p - d * length / 2)
        b.append(p + d * length / 2)
        parts.add("arch" if t < 0.5 else "descending")
    rr = lerp(sig.size, s)
    f = Finding("Arterial wall calcification", s, details={"parts": sorted(parts), "count": n})
    f.lesions.append(Segments("vessels", np.array(a), np.array(b), rr, rr, lerp(sig.hu, s)))
    return f


def _lymph(rng, s, sig, ctx):
    an = ctx.an
    n = _count(sig.count, s, rng)
    tr = an.trachea.points[-1]
    stations = {
        "right paratracheal": tr + [-20, -4, 25],
        "left paratracheal": tr + [16, 2, 18],
        "subcarinal": tr + [2, 12, -25],
        "prevascular": tr + [-4, -48, 35],
        "aortopulmonary window": tr + [24, -10, 2],
        "right hilar": an.pa[1].points[-1] + [-4, 10, -6],
        "left hilar": an.pa[2].points[-1] + [4, 10, -6],
    }
    names = list(stations)
    chosen = [str(v) for v in rng.choice(names, size=min(n, len(names)), replace=False)]
    size = lerp(sig.size, s)
    f = Finding("Lymphadenopathy", s, details={"stations": chosen, "size_mm": round(size)})
    for i, st in enumerate(chosen):
        d = size * (1.0 if i == 0 else rng.uniform(0.7, 0.95))
        ell = Ellipsoid.make(stations[st] + rng.normal(0, 2, 3), [d / 2, d / 2 * 0.9, d / 2 * 1.3])
        f.lesions.append(Blob("mediastinum", ell, lerp(sig.hu, s), mask="soft", label=0))
    return f


def _device(rng, s, sig, ctx):
    an = ctx.an
    kinds = ["pacemaker", "port catheter", "sternotomy wires", "surgical clips"]
    kind = str(rng.choice(kinds, p=[0.45, 0.2, 0.2, 0.15]))
    f = Finding("Medical material", s, details={"kind": kind})
    metal, scale = lerp(sig.hu, s), lerp(sig.size, s)
    svc_top, _ = an.svc.point_at(0.35)
    if kind in ("pacemaker", "port catheter"):
        side = 1 if (kind == "pacemaker") == (rng.random() < 0.85) else -1
        f.details["side"] = "left" if side > 0 else "right"
        z = an.z_top - rng.uniform(40, 60)
        # in the subcutaneous fat below the clavicle: along a ray from the body axis, under the skin
        u = unit([side * 0.5, -0.85, 0.0])
        _, rb, fat, _, _ = wall_fields(an, np.float32(u[0] * 100), np.float32(u[1] * 100))
        depth = 2 + 0.5 * float(fat)
        box = u * (float(rb) * float(body_scale(an, z)) - depth) + np.array([0.0, 0.0, z])
        y = float(box[1])
        if kind == "pacemaker":
            axes = [max(4.0, an.fat_ant * 0.3), 24 * scale, 20 * scale]
            f.lesions.append(Blob("device", Ellipsoid.make(box, axes, rotation_from(u)), metal))
            tip = an.heart.center + 0.6 * (an.heart.surface_point(an.heart_rot[:, 0]) - an.heart.center)
            lead = Tube.make([box, [side * 40, y + 25, z + 10], svc_top, an.svc.points[-1], tip], 1.2).resampled(8)
            v = 2500.0
        else:
            axes = [max(4.0, an.fat_ant * 0.3), 13 * scale, 13 * scale]
            f.lesions.append(Blob("device", Ellipsoid.make(box, axes, rotation_from(u)), metal))
            lead = Tube.make([box, [side * 30, y + 30, z + 25], svc_top, an.svc.points[-1]], 1.1).resampled(8)
            v = 700.0
        p = lead.points
        f.lesions.append(Segments("device", p[:-1], p[1:], lead.radii[:-1], lead.radii[1:], v))
    elif kind == "sternotomy wires":
        z0, z1, yst, hw = an.sternum
        n = _count(sig.count, s, rng)
        segs_a, segs_b = [], []
        for zc in np.linspace(z0 + 15, z1 - 10, n):
            ang = np.linspace(0, 2 * math.pi, 13)
            ring = np.stack([1.3 * hw * np.cos(ang), yst + 9 * np.sin(ang), np.full_like(ang, zc)], 1)
            segs_a.append(ring[:-1])
            segs_b.append(ring[1:])
        f.lesions.append(Segments("device", np.concatenate(segs_a), np.concatenate(segs_b), 0.9, 0.9, metal))
    else:
        n = _count(sig.count, s, rng)
        centre = an.trachea.points[-1] + np.array([0, -20, -10])
        c = centre + rng.normal(0, 18, (n, 3))
        d = np.stack([unit(v) for v in rng.normal(0, 1, (n, 3))]) * 3
        f.lesions.append(Segments("device", c - d, c + d, 1.2, 1.2, metal))
    return f


#: label -> sampler; anatomy-changing ones first (they run before the coarse map is drawn)
ANATOMY_SAMPLERS = {
    "Cardiomegaly": _cardiomegaly,
    "Pericardial effusion": _pericardial,
    "Hiatal hernia": _hernia,
    "Atelectasis": _atelectasis,
    "Peribronchial thickening": _airways("Peribronchial thickening"),
    "Bronchiectasis": _airways("Bronchiectasis"),
}
LESION_SAMPLERS = {
    "Pleural effusion": _effusion,
    "Medical material": _device,
    "Arterial wall calcification": _aortic,
    "Coronary artery wall calcification": _coronary,
    "Lymphadenopathy": _lymph,
    "Emphysema": _emphysema,
    "Lung nodule": _nodule,
    "Lung opacity": _opacity,
    "Pulmonary fibrotic sequela": _fibrosis,
    "Mosaic attenuation pattern": _mosaic,
    "Consolidation": _consolidation,
    "Interlobular septal thickening": _septal,
}
assert set(ANATOMY_SAMPLERS) | set(LESION_SAMPLERS) == set(CT_RATE_LABELS)


def label_rng(entropy, key: tuple[int, ...], label: str) -> np.random.Generator:
    """An independent stream per label, so adding one finding leaves the others unchanged."""
    return np.random.default_rng(np.random.SeedSequence(entropy, spawn_key=(*key, CT_RATE_LABELS.index(label))))


def sample_findings(entropy, key: tuple[int, ...], labels: dict[str, int], an: Anatomy,
                    difficulty: float = DEFAULT_DIFFICULTY, tree_rng: np.random.Generator | None = None,
                    coarse_step: float = 6.0) -> tuple[Anatomy, list[Finding]]:
    """Findings for the positive labels; returns the (changed) anatomy, with its vessel tree, and findings.

    ``entropy`` and ``key`` seed one stream per label (see :func:`label_rng`).
    """
    ctx = _Ctx(an, None, difficulty)
    findings: dict[str, Finding] = {}
    sev: dict[str, float] = {}
    rngs: dict[str, np.random.Generator] = {}
    for label in CT_RATE_LABELS:
        if labels.get(label):
            rngs[label] = label_rng(entropy, key, label)
            sev[label] = draw_severity(rngs[label], difficulty)
    for label, fn in ANATOMY_SAMPLERS.items():
        if label in rngs:
            findings[label] = fn(rngs[label], sev[label], SIGNATURES[label], ctx)
    ctx.cmap = coarse_map(ctx.an, coarse_step)
    tree = build_tree(tree_rng if tree_rng is not None else np.random.default_rng(0), ctx.an, ctx.cmap)
    ctx.an = replace(ctx.an, tree=tree)
    if "Atelectasis" in findings:
        _atelectasis_lesions(findings["Atelectasis"], rngs["Atelectasis"], SIGNATURES["Atelectasis"], ctx)
    if "Bronchiectasis" in findings:
        _bronchiectasis_cysts(findings["Bronchiectasis"], rngs["Bronchiectasis"], SIGNATURES["Bronchiectasis"], ctx)
    for label, fn in LESION_SAMPLERS.items():
        if label in rngs:
            findings[label] = fn(rngs[label], sev[label], SIGNATURES[label], ctx)
    ordered = [findings[label] for label in CT_RATE_LABELS if label in findings]
    return ctx.an, ordered
