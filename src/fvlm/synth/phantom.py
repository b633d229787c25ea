"""The chest phantom: patient anatomy as parameters in millimetres, rendered into any voxel grid.

Patient frame (LPS, mm): x grows to the patient's Left, y to Posterior, z to Superior; x = 0 is the body
midline, y = 0 the body centre, z = 0 the top of the right hemidiaphragm dome. The scan covers the chest
from the upper abdomen (liver dome, stomach, spleen) to above the lung apices.

:func:`sample_anatomy` draws one patient (size, fat, positions and calibres of every structure); scan-level
changes (findings that alter anatomy, e.g. a larger heart) are applied with :func:`dataclasses.replace`.
:func:`fvlm.synth.render.render` paints the anatomy, and the findings at their stages, into a
:class:`~fvlm.synth.geometry.Slab`; :mod:`fvlm.synth.tree` plans the pulmonary vessel and bronchial tree.
Label values are TotalSegmentator v2 ``total`` ids (:mod:`fvlm.totalseg`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np

from fvlm.synth.geometry import (
    Ellipsoid,
    Tube,
    rotation_from,
    unit,
)
from fvlm.totalseg import class_id

#: lobe ids (TotalSegmentator v2) -> side ("left"/"right")
LOBES: dict[int, str] = {10: "left", 11: "left", 12: "right", 13: "right", 14: "right"}
UPPER_LOBES = (10, 12)
LOWER_LOBES = (11, 14)

HU_AIR = -1000.0
HU_BLOOD = 40.0


@dataclass(frozen=True)
class Rib:
    side: int  # +1 left, -1 right
    index: int  # 1..12
    z_post: float  # z of the rib centre at its vertebral end (mm)
    drop: float  # how far the rib descends from its vertebral to its anterior end (mm)
    phi_end: float  # angle (rad, 0 = posterior midline, pi = anterior midline) where the bone ends
    phi_cart: float  # where its costal cartilage ends (== phi_end: none)
    half_height: float
    half_depth: float

    @property
    def label(self) -> int:
        return class_id(f"rib_{'left' if self.side > 0 else 'right'}_{self.index}")


@dataclass(frozen=True)
class Tree:
    """Pulmonary vessel and bronchial branches, painted only on lung voxels.

    One row per branch: ``a, b (n, 3)`` mm end points, ``ra, rb (n,)`` mm radii, ``kind (n,)`` 0 = vessel
    (blood), 1 = bronchial wall, 2 = bronchial lumen (air), ``lobe (n,)`` lobe id. Kinds are painted in
    that order.
    """

    a: np.ndarray
    b: np.ndarray
    ra: np.ndarray
    rb: np.ndarray
    kind: np.ndarray
    lobe: np.ndarray

    def __len__(self) -> int:
        return len(self.a)


#: HU painted for each tree kind (vessel, bronchial wall, lumen)
TREE_HU = (HU_BLOOD, 30.0, HU_AIR)


@dataclass
class Anatomy:
    """One patient's chest, in patient millimetres (see the module docstring for the frame)."""

    sex: str
    age: int
    scale: float
    # body wall: superellipse |x/A|^p + |y/B|^p = 1 and layer thicknesses
    body_a: float
    body_b: float
    body_p: float
    fat_ant: float
    fat_post: float
    muscle: float
    band: float
    hu_fat: float
    hu_muscle: float
    # vertical landmarks
    z_bottom: float
    z_top: float
    z_apex: float
    z_car: float
    z_arch: float
    # spine: vertebral-body front y(z) = y_vf0 - kyphosis * ((z - z_mid) / 150)^2
    y_vf0: float
    kyphosis: float
    z_mid: float
    vb_rx: float
    vb_ry: float
    canal_r: float
    levels: tuple[tuple[int, float, float], ...]  # (class id, z0, z1) of vertebral bodies
    # diaphragm domes: (x, y, z) of each dome top and curvatures (lateral, anterior, posterior)
    dome_r: tuple[float, float, float]
    dome_l: tuple[float, float, float]
    dome_k: tuple[float, float, float]
    z_recess: float  # lowest point of the costophrenic recesses: the diaphragm never drops below it
    # lungs
    lung_hu: float
    lung_grad: float
    xm: float  # mediastinal midline
    w_med: float  # half width of the mediastinal column above the heart
    fissure_l: tuple[float, float, float]  # (z at y_p, y_p, slope dz/dy) of the left oblique fissure
    fissure_r: tuple[float, float, float]
    z_horizontal: float
    fissure_phase: float
    apex_c: tuple[float, float, float, float]  # (x offset, y centre, x radius, y radius) of the apices
    # heart
    heart_center: np.ndarray
    heart_axes: np.ndarray
    heart_rot: np.ndarray
    heart_squash: float
    heart_hu: float
    epi_fat: float
    # airways, oesophagus, vessels
    trachea: Tube
    trachea_wall: float
    bronchi: tuple[Tube, Tube]  # right, left main bronchus
    esophagus: Tube
    esophagus_air: float  # radius of an air-filled lumen (0: collapsed)
    aorta: Tube
    svc: Tube
    ivc: Tube
    pa: tuple[Tube, Tube, Tube]  # trunk, right, left pulmonary artery
    pulmonary_veins: tuple[Tube, ...]
    arch_branches: tuple[tuple[Tube, int], ...]
    # bones
    ribs: tuple[Rib, ...]
    sternum: tuple[float, float, float, float]  # (z0, z1, y centre, half width)
    clavicles: tuple[Tube, Tube]  # left, right
    # upper abdomen and neck
    liver_hu: float
    stomach: Ellipsoid
    spleen: Ellipsoid
    thyroid: tuple[Ellipsoid, Ellipsoid]
    nodes: tuple[tuple[np.ndarray, float], ...]  # normal small mediastinal lymph nodes (centre, radius)
    # scan-level state changed by findings
    heart_scale: float = 1.0
    pericardial_effusion: float = 0.0
    pericardial_hu: float = 12.0
    hernia: Ellipsoid | None = None
    airway: dict = field(default_factory=dict)  # lobe -> (lumen factor, wall factor, extend to periphery)
    tree: Tree | None = None

    # -- derived geometry ------------------------------------------------------------------------------
    @property
    def cavity_a(self) -> float:
        """Half width of the thoracic cavity (inner rib surface at the sides), mm."""
        return self.body_a - (2 + 0.5 * (self.fat_ant + self.fat_post) + self.muscle + self.band)

    @property
    def y_sternum_back(self) -> float:
        return -self.body_b + 2 + self.fat_ant + self.muscle + self.band

    def y_vf(self, z):
        return self.y_vf0 - self.kyphosis * ((np.asarray(z) - self.z_mid) / 150.0) ** 2

    @property
    def heart(self) -> Ellipsoid:
        """The heart; cardiomegaly (``heart_scale`` > 1) enlarges it mostly to the left, front and bottom."""
        f = self.heart_scale
        axes = self.heart_axes * np.array([f, f, 1 + 0.5 * (f - 1)])
        ell = Ellipsoid.make(self.heart_center, axes, self.heart_rot).scaled((1.0, self.heart_squash, 1.0))
        if f != 1.0:
            base = Ellipsoid.make(self.heart_center, self.heart_axes, self.heart_rot).scaled(
                (1.0, self.heart_squash, 1.0))
            e0, e1 = base.extent, ell.extent
            # keep the right border and the posterior surface; grow to the left, forwards and downwards
            shift = np.array([e1[0] - e0[0], -(e1[1] - e0[1]) * 0.7, -(e1[2] - e0[2]) * 0.6])
            ell = Ellipsoid(ell.center + shift, ell.matrix)
        return ell

    @property
    def laa(self) -> Ellipsoid:
        h = self.heart
        p = h.surface_point([0.8, -0.35, 0.5])
        d = unit([0.8, -0.35, 0.5])
        return Ellipsoid.make(p + 3 * d, np.array([13.0, 8.0, 9.0]) * self.scale, rotation_from(d))

    def diaphragm(self, x, y):
        """Height (mm) of the diaphragm under (x, y): the higher of the two domes (broadcasting)."""
        kl, ka, kp = self.dome_k
        out = None
        for xd, yd, zd in (self.dome_r, self.dome_l):
            dy = y - np.float32(yd)
            kap = np.where(dy > 0, np.float32(kp), np.float32(ka))
            z = np.float32(zd) - np.float32(kl) * (x - np.float32(xd)) ** 2 - kap * dy * dy
            out = z if out is None else np.maximum(out, z)
        return np.maximum(out, np.float32(self.z_recess))

    @property
    def cardiothoracic_ratio(self) -> float:
        """Widest heart diameter over widest inner thoracic diameter (left-right)."""
        return float(self.heart.extent[0] / self.cavity_a)

    def heart_scale_for(self, ctr: float) -> float:
        """The ``heart_scale`` that gives this cardiothoracic ratio (the ratio grows about linearly)."""
        f = 1.0
        for _ in range(3):
            got = replace(self, heart_scale=f).cardiothoracic_ratio
            f *= ctr / got
        return f


# ------------------------------------------------------------------------------------------- sampling
def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def sample_anatomy(rng: np.random.Generator, sex: str | None = None, age: int | None = None) -> Anatomy:
    """Draw one patient's chest anatomy (every size, position and calibre varies between patients)."""
    if sex is None:
        sex = "M" if rng.random() < 0.58 else "F"
    if age is None:
        age = int(np.clip(rng.normal(52, 15), 20, 90))
    male = sex == "M"
    s = float(np.clip(rng.normal(1.0 if male else 0.93, 0.045), 0.82, 1.12))
    ob = float(rng.beta(2.0, 3.0))
    body_a = min(185.0, 158 * s * (1 + 0.12 * ob) * _u(rng, 0.95, 1.05))
    body_b = min(150.0, 121 * s * (1 + 0.12 * ob) * _u(rng, 0.95, 1.05))
    fat_ant = 5 + 30 * ob * _u(rng, 0.7, 1.2)
    fat_post = 0.55 * fat_ant + 3
    muscle = _u(rng, 8, 13) * s
    band = 10 * s
    d_spine = fat_post + 2 + 84 * s
    y_vf0 = body_b - d_spine
    cav_a = body_a - (2 + fat_ant + muscle + band)
    cav_b = body_b - (2 + fat_ant + muscle + band)

    # vertical landmarks, from the diaphragm upwards
    z_dome_l = -_u(rng, 8, 24)
    heart_bottom = -_u(rng, 10, 22)
    # heart: long axis towards the left, front and bottom
    u1 = unit(np.array([0.62, -0.55, -0.48]) + rng.normal(0, 0.06, 3))
    rot = rotation_from(u1)
    axes = np.array([_u(rng, 58, 66), _u(rng, 44, 50), _u(rng, 38, 43)]) * s
    y_sb = -body_b + 2 + fat_ant + muscle + band
    r_es = _u(rng, 7, 9) * s
    # a normal heart: cardiothoracic ratio 0.38-0.48
    cav_side = body_a - (2 + 0.5 * (fat_ant + fat_post) + muscle + band)
    axes = axes * (_u(rng, 0.38, 0.48) / (Ellipsoid.make(np.zeros(3), axes, rot).extent[0] / cav_side))
    ext0 = Ellipsoid.make(np.zeros(3), axes, rot).extent
    z_mid = 80.0
    y_vf_heart = y_vf0  # close enough at heart level (kyphosis is smallest in the mid chest)
    ey_max = (y_vf_heart - 2 * r_es - 8 - (y_sb + 6)) / 2
    squash = min(1.0, ey_max / ext0[1])
    ext = ext0 * np.array([1.0, squash, 1.0])
    heart_center = np.array([_u(rng, 8, 20) * s + ext[0] * 0.25, y_sb + 6 + ext[1], heart_bottom + ext[2]])
    heart_top = heart_center[2] + ext[2]

    z_car = heart_top + _u(rng, 0, 12)
    z_arch = z_car + _u(rng, 26, 38)
    z_apex = z_arch + _u(rng, 58, 78)
    z_top = z_apex + _u(rng, 8, 32)
    # the posterior costophrenic recesses lie 4-7 cm below the domes; a chest scan ends 2-5 cm lower
    # (upper abdomen), so the lung bases are inside the scan, as in real chest CTs
    z_recess = min(0.0, z_dome_l) - _u(rng, 40, 65)
    z_bottom = z_recess - _u(rng, 20, 50)
    kyphosis = _u(rng, 8, 22)

    def yvf(z):
        return y_vf0 - kyphosis * ((z - z_mid) / 150.0) ** 2

    # vertebrae: T10 body near the right dome, levels spaced by pitch; L1 .. C7
    pitch = _u(rng, 22, 26) * s
    disc = 0.2 * pitch
    z_t10 = _u(rng, -22, 0)
    levels = []
    for name_i, name in enumerate(["L1", "T12", "T11", "T10", "T9", "T8", "T7", "T6", "T5", "T4", "T3", "T2",
                                   "T1", "C7", "C6"]):
        zc = z_t10 + (name_i - 3) * pitch
        z0, z1 = zc - (pitch - disc) / 2, zc + (pitch - disc) / 2
        if z1 > z_bottom - 30 and z0 < z_top + 30:
            levels.append((class_id(f"vertebrae_{name}"), z0, z1))
    zc_of = {f"T{k}": z_t10 + (10 - k) * pitch for k in range(1, 13)}

    # ribs: rib k leaves vertebra Tk and descends towards the front
    drops = [22, 40, 55, 66, 74, 80, 84, 84, 80, 74, 40, 28]
    ribs = []
    for k in range(1, 13):
        phi_end = {11: 0.52 * math.pi, 12: 0.42 * math.pi}.get(k, (0.76 if k <= 7 else 0.70) * math.pi)
        phi_cart = phi_end if k >= 11 else (0.97 * math.pi if k <= 7 else 0.84 * math.pi)
        for side in (+1, -1):
            z_post = zc_of[f"T{k}"] + 0.25 * pitch + _u(rng, -2, 2)
            ribs.append(Rib(side, k, z_post, drops[k - 1] * s * _u(rng, 0.9, 1.1),
                            phi_end, phi_cart, (7.0 if k <= 2 else 6.0) * s, 4.5 * s))

    # airways and oesophagus: oesophagus just in front of the spine, trachea in front of it
    r_tr = _u(rng, 9, 11) * (s if male else 0.92 * s)
    y_tr = yvf(z_car) - 3 - 2 * r_es - 2 - r_tr
    trachea = Tube.make([[-1, y_tr - 8, z_top + 25], [-1.5, y_tr - 3, (z_top + z_car) / 2], [-2, y_tr + 2, z_car]],
                        [r_tr, r_tr, r_tr * 0.95])
    rb_r = 7.5 * s
    bronchi = (Tube.make([[-2, y_tr + 2, z_car + 2], [-30 * s, y_tr + 8, z_car - 20], [-46 * s, y_tr + 12, z_car - 32]],
                         [rb_r, rb_r * 0.9, rb_r * 0.8]).resampled(6),
               Tube.make([[-2, y_tr + 2, z_car + 2], [28 * s, y_tr + 10, z_car - 24], [50 * s, y_tr + 14, z_car - 42]],
                         [rb_r * 0.9, rb_r * 0.8, rb_r * 0.72]).resampled(6))
    hiatus = np.array([22 * s, yvf(z_dome_l) - 30, z_dome_l - 6])
    es = Tube.make([
        [4, yvf(z_top) - 3 - r_es, z_top + 25],
        [5, yvf(z_car) - 3 - r_es, z_car],
        [6, yvf(heart_center[2]) - 3 - r_es, heart_center[2]],
        [13 * s, yvf(z_dome_l + 25) - 8 - r_es, z_dome_l + 25],
        hiatus,
        [48 * s, yvf(z_dome_l) - 36, z_dome_l - 32],
    ], r_es).resampled(8)

    # aorta: root in the heart base, ascending to the right of the trachea, arch to the left of it,
    # descending on the left of the spine, abdominal in front of it
    age_f = 1 + 0.004 * (age - 50)
    root = heart_center + np.array([-0.25 * ext[0], -0.05 * ext[1], 0.55 * ext[2]])
    ra = _u(rng, 14, 16) * s * age_f
    aorta = Tube.make([
        root,
        [-22 * s, y_tr - 34, z_car + 2],
        [-10 * s, y_tr - 30, z_arch - 6],
        [24 * s, y_tr - 8, z_arch],
        [32 * s, y_tr + 14, z_arch - 12],
        [28 * s, yvf(z_car - 25) + 4, z_car - 25],
        [22 * s, yvf(z_dome_l - 10) - 2, z_dome_l - 10],
        [8, yvf(z_bottom - 20) - 10, z_bottom - 25],
    ], np.array([1.0, 1.0, 0.92, 0.88, 0.84, 0.8, 0.76, 0.72]) * ra).resampled(9)
    asc = aorta.points[np.argmin(np.abs(aorta.points[:, 2] - (z_car + 2)) + 100 * (aorta.points[:, 0] > 0))]
    r_svc = _u(rng, 8.5, 10.5) * s
    x_svc = asc[0] - ra - 3 - r_svc
    svc = Tube.make([[x_svc, asc[1] + 6, z_top + 25], [x_svc, asc[1] + 8, z_arch],
                     [x_svc + 4, asc[1] + 10, heart_center[2] + 0.45 * ext[2]]], r_svc).resampled(10)
    ivc = Tube.make([[-18 * s, yvf(z_bottom) - 16, z_bottom - 25], [-16 * s, yvf(0) - 20, -5],
                     [-14 * s, heart_center[1] + 0.3 * ext[1], heart_center[2] - 0.55 * ext[2]]],
                    _u(rng, 10, 13) * s).resampled(10)
    heart0 = Ellipsoid(heart_center, Ellipsoid.make(heart_center, axes, rot).scaled((1, squash, 1)).matrix)
    rvot = heart0.surface_point([0.25, -0.75, 0.6])
    bif = np.array([8.0, y_tr - 10, z_car - 12])
    r_pa = _u(rng, 12, 14) * s
    pa = (Tube.make([rvot - np.array([0, 0, 8]), rvot + np.array([0, 5, 10]), bif], r_pa).resampled(8),
          Tube.make([bif, [-30 * s, y_tr - 14, z_car - 20], [-52 * s, y_tr - 6, z_car - 28]], r_pa * 0.78).resampled(8),
          Tube.make([bif, [30 * s, y_tr - 4, z_car - 6], [52 * s, y_tr + 4, z_car - 16]], r_pa * 0.75).resampled(8))
    la = heart0.center + np.array([-0.05 * ext[0], 0.75 * ext[1], 0.35 * ext[2]])
    pvs = []
    for sx in (-1, 1):
        for dz in (10, -12):
            end = np.array([sx * 48 * s, la[1] + 6, la[2] + dz])
            pvs.append(Tube.make([la + np.array([sx * 10, 0, dz * 0.5]), end], 6.0 * s))
    p_arch = aorta.points[np.argmax(aorta.points[:, 2])]
    arch_branches = (
        (Tube.make([p_arch + [-18 * s, -6, 0], [-12 * s, y_tr - 20, z_arch + 30], [-14 * s, y_tr - 18, z_top + 25]],
                   6.5 * s).resampled(10), class_id("brachiocephalic_trunk")),
        (Tube.make([p_arch + [-2, -2, 0], [8 * s, y_tr - 14, z_arch + 35], [12 * s, y_tr - 12, z_top + 25]],
                   4.5 * s).resampled(10), class_id("common_carotid_artery_left")),
        (Tube.make([p_arch + [10 * s, 6, 0], [26 * s, y_tr - 4, z_arch + 32], [60 * s, y_tr - 8, z_top + 20]],
                   5.5 * s).resampled(10), class_id("subclavian_artery_left")),
        (Tube.make([[60 * s, y_tr - 36, z_arch + 24], [10, y_tr - 42, z_arch + 20],
                    [x_svc + 2, asc[1] + 7, z_arch + 12]], 6.5 * s).resampled(10),
         class_id("brachiocephalic_vein_left")),
    )

    # sternum and clavicles
    z_xiph = heart_center[2] - 0.35 * ext[2]
    z_man = z_arch + _u(rng, 25, 40)
    y_st = -body_b + 2 + fat_ant + muscle + band * 0.5
    clav = tuple(
        Tube.make([[sx * 18 * s, y_st - 4, z_man - 4], [sx * 70 * s, -0.72 * body_b, z_man + 6],
                   [sx * 0.78 * body_a, -0.1 * body_b, z_man + 14]], 7.0 * s).resampled(10)
        for sx in (1, -1))

    # diaphragm domes: right higher than left; posterior recesses deeper than anterior
    dome_k = (44 / (0.55 * cav_a) ** 2, 28 / (0.9 * cav_b) ** 2, 60 / (0.9 * cav_b) ** 2)
    dome_r = (-0.42 * cav_a, -0.1 * cav_b, 0.0)
    dome_l = (0.45 * cav_a, -0.05 * cav_b, z_dome_l)

    # lobes: oblique fissures from the back (near the carina level) to the front of the diaphragm
    yp = 0.6 * cav_b
    zl = z_car + _u(rng, 18, 32)
    zr = z_car + _u(rng, 8, 22)
    fl = (zl, yp, (zl - (z_dome_l - 5)) / (yp + 0.55 * cav_b))
    fr = (zr, yp, (zr - (-5.0)) / (yp + 0.55 * cav_b))

    stomach = Ellipsoid.make([0.45 * cav_a, -0.05 * cav_b, z_dome_l - 50 * s], np.array([48, 52, 58]) * s,
                             rotation_from(unit([0.3, 0.4, 1.0])))
    spleen = Ellipsoid.make([0.72 * cav_a, 0.5 * cav_b, z_dome_l - 48 * s], np.array([22, 48, 52]) * s,
                            rotation_from(unit([0.6, 1.0, 0.15])))
    thyroid = tuple(Ellipsoid.make([sx * (r_tr + 8), y_tr - 2, z_apex + 30], np.array([8, 12, 22]) * s)
                    for sx in (1, -1))
    nodes = []
    for p in ([-r_tr - 8, y_tr - 6, z_car + 18], [0, y_tr + 14, z_car - 22], [-12, y_tr - 40, z_arch - 2]):
        if rng.random() < 0.8:
            nodes.append((np.asarray(p, dtype=np.float64) + rng.normal(0, 2, 3), _u(rng, 2.5, 4.0)))

    return Anatomy(
        sex=sex, age=age, scale=s,
        body_a=body_a, body_b=body_b, body_p=_u(rng, 2.2, 2.6), fat_ant=fat_ant, fat_post=fat_post,
        muscle=muscle, band=band, hu_fat=_u(rng, -112, -88), hu_muscle=_u(rng, 38, 52),
        z_bottom=z_bottom, z_recess=z_recess, z_top=z_top, z_apex=z_apex, z_car=z_car, z_arch=z_arch,
        y_vf0=y_vf0, kyphosis=kyphosis, z_mid=z_mid, vb_rx=_u(rng, 19, 23) * s, vb_ry=_u(rng, 15, 17) * s,
        canal_r=_u(rng, 7, 8.5) * s, levels=tuple(levels),
        dome_r=dome_r, dome_l=dome_l, dome_k=dome_k,
        lung_hu=_u(rng, -885, -840), lung_grad=_u(rng, 25, 60), xm=_u(rng, 2, 8), w_med=_u(rng, 17, 22) * s,
        fissure_l=fl, fissure_r=fr, z_horizontal=z_car - _u(rng, 22, 36), fissure_phase=_u(rng, 0, 2 * math.pi),
        apex_c=(0.45 * cav_a, 0.15 * cav_b, 0.62 * cav_a, 1.0 * cav_b),
        heart_center=heart_center, heart_axes=axes, heart_rot=rot, heart_squash=squash,
        heart_hu=_u(rng, 34, 46), epi_fat=_u(rng, 2.5, 5.0),
        trachea=trachea, trachea_wall=2.0 * s, bronchi=bronchi, esophagus=es,
        esophagus_air=_u(rng, 2, 4) if rng.random() < 0.35 else 0.0,
        aorta=aorta, svc=svc, ivc=ivc, pa=pa, pulmonary_veins=tuple(pvs), arch_branches=arch_branches,
        ribs=tuple(ribs), sternum=(z_xiph, z_man, y_st, 14 * s), clavicles=clav,
        liver_hu=_u(rng, 50, 66), stomach=stomach, spleen=spleen, thyroid=thyroid, nodes=tuple(nodes),
    )
