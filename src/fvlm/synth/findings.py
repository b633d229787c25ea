"""What a positive label becomes (:class:`Finding`), the context samplers place findings with, and the samplers
of the labels that change the anatomy itself (run before the coarse map is drawn). See :mod:`fvlm.synth.lesions`."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from fvlm.synth.geometry import Ellipsoid, rotation_from, unit
from fvlm.synth.lesion_shapes import BasalBand, Blob, Segments
from fvlm.synth.phantom import LOBES, Anatomy
from fvlm.synth.signatures import lerp
from fvlm.synth.tree import CoarseMap


def draw_count(sig_range: tuple[float, float], s: float, rng: np.random.Generator) -> int:
    return max(1, int(round(lerp(sig_range, s) + rng.uniform(-0.5, 0.5))))




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
class FindingContext:
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


def pick_points(rng: np.random.Generator, pts: np.ndarray, lob: np.ndarray, n: int = 1):
    if len(pts) == 0:
        return np.zeros((0, 3)), np.zeros(0, dtype=np.uint8)
    idx = rng.choice(len(pts), size=min(n, len(pts)), replace=False)
    jitter = rng.uniform(-2.0, 2.0, (len(idx), 3))
    return pts[idx] + jitter, lob[idx]


def pick_lobes(rng: np.random.Generator, n: int, lower_weight: float = 1.0, upper_weight: float = 1.0):
    w = np.array([upper_weight, lower_weight, upper_weight, 0.7, lower_weight], dtype=np.float64)
    ids = np.array([10, 11, 12, 13, 14])
    n = int(np.clip(n, 1, 5))
    return tuple(sorted(int(v) for v in rng.choice(ids, size=n, replace=False, p=w / w.sum())))


def sides_of(lobes) -> str:
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
        n = draw_count(sig.count, s, rng)
        lobes = pick_lobes(rng, n, lower_weight=2.5 if label == "Bronchiectasis" else 1.5)
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


def atelectasis_lesions(f: Finding, rng, sig, ctx):
    s = f.severity
    value = lerp(sig.hu, s)
    if f.details["kind"] == "basal":
        for side in f.details["sides"]:
            f.lesions.append(BasalBand("parenchyma", side, f.details["thickness_mm"], value))
    else:
        for lobe in f.lobes:
            pts, lob = ctx.lung_points((lobe,), min_depth=4, margin=5)
            p, _ = pick_points(rng, pts, lob)
            if len(p) == 0:
                continue
            L = lerp(sig.extra["plate_length"], s)
            ell = Ellipsoid.make(p[0], [L, 0.6 * L, max(2.5, 0.12 * f.details["thickness_mm"])],
                                 rotation_from(unit([1.0, rng.normal(0, 0.3), rng.normal(0, 0.2)])))
            f.lesions.append(Blob("parenchyma", ell, value, lobes=(lobe,)))


def bronchiectasis_cysts(f: Finding, rng, sig, ctx):
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


#: label -> sampler, for the labels that change the anatomy (they run before the coarse map is drawn)
ANATOMY_SAMPLERS = {
    "Cardiomegaly": _cardiomegaly,
    "Pericardial effusion": _pericardial,
    "Hiatal hernia": _hernia,
    "Atelectasis": _atelectasis,
    "Peribronchial thickening": _airways("Peribronchial thickening"),
    "Bronchiectasis": _airways("Bronchiectasis"),
}
