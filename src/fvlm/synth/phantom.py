"""The chest phantom: patient anatomy as parameters in millimetres, rendered into any voxel grid.

Patient frame (LPS, mm): x grows to the patient's Left, y to Posterior, z to Superior; x = 0 is the body
midline, y = 0 the body centre, z = 0 the top of the right hemidiaphragm dome. The scan covers the chest
from the upper abdomen (liver dome, stomach, spleen) to above the lung apices.

:func:`sample_anatomy` draws one patient (size, fat, positions and calibres of every structure); scan-level
changes (findings that alter anatomy, e.g. a larger heart) are applied with :func:`dataclasses.replace`.
:func:`render` paints the anatomy, and the findings at their stages, into a :class:`~fvlm.synth.geometry.Slab`.
Label values are TotalSegmentator v2 ``total`` ids (:mod:`fvlm.totalseg`).

Painting order (later steps override earlier ones): body wall -> lungs and lobes (stage ``parenchyma``) ->
upper abdomen -> paraspinal muscles -> heart (stage ``heart``) -> great vessels (stage ``vessels``) ->
oesophagus, trachea, bronchi (stage ``mediastinum``) -> spine -> ribs, sternum, clavicles -> pulmonary vessel
and bronchial tree -> stages ``lung``, ``pleura``, ``device``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np

from fvlm.synth.geometry import (
    Ellipsoid,
    Slab,
    Tube,
    capsule_sd,
    paint_ellipsoid,
    paint_segments,
    paint_tube,
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


# ------------------------------------------------------------------------------------------- rendering
def _smoothstep(a: float, b: float, x):
    t = np.clip((np.asarray(x, dtype=np.float32) - a) / (b - a), 0, 1)
    return t * t * (3 - 2 * t)


def wall_fields(an: Anatomy, x, y):
    """Body-wall geometry at (x, y) (broadcasting, mm).

    Returns ``(r, rb, fat, m_in, dc)``: distance from the body axis, the body boundary's distance along the
    same ray (at scale 1), subcutaneous fat thickness, the depth where muscle ends, and the depth where the
    thoracic cavity starts (deeper behind the spine). Depth = ``rb * body_scale(z) - r``.
    """
    x = np.asarray(x, dtype=np.float32)
    y = np.asarray(y, dtype=np.float32)
    p = np.float32(an.body_p)
    r = np.hypot(x, y)
    rho = (np.abs(x / np.float32(an.body_a)) ** p + np.abs(y / np.float32(an.body_b)) ** p) ** (1 / p)
    rb = np.where(rho > 1e-6, r / np.maximum(rho, 1e-6), np.float32(min(an.body_a, an.body_b)))
    sin_t = np.where(r > 0, y / np.maximum(r, 1e-6), 0)
    fat = an.fat_post + (an.fat_ant - an.fat_post) * 0.5 * (1 - sin_t)
    m_in = 2 + fat + an.muscle
    # behind the spine the cavity ends deeper: paraspinal muscles and the vertebral arch
    d_spine = an.body_b - an.y_vf0
    post = np.clip(y / (0.35 * an.body_b), 0, 1) * np.exp(-((x / (52 * an.scale)) ** 2))
    dc = m_in + an.band + np.maximum(0, d_spine - 22 - (m_in + an.band)) * post
    f32 = np.float32
    return r, rb.astype(f32), fat.astype(f32), m_in.astype(f32), dc.astype(f32)


def body_scale(an: Anatomy, z):
    """The upper chest (shoulder girdle, neck base) is a little narrower."""
    return 1 - 0.1 * _smoothstep(an.z_apex - 30, an.z_top + 60, z)


def render_body(slab: Slab, an: Anatomy) -> None:
    """Air, skin, subcutaneous fat, muscle, intercostal band; caches body depth and the cavity.

    The cross-section only changes with z through the body scale, which is 1 for most slices: each
    distinct scale is computed once in 2D and the slices are filled from it.
    """
    r, rb, fat, m_in, dc = wall_fields(an, slab.xv[None, :], slab.yv[:, None])
    s = np.round(body_scale(an, slab.zv), 4)
    uniq, inv = np.unique(s, return_inverse=True)
    hu2, dep2, cav2 = [], [], []
    for sc in uniq:
        depth = rb * np.float32(sc) - r
        hu = np.where(depth < 2 + fat, np.float32(an.hu_fat), np.float32(an.hu_muscle))
        hu[depth < 2] = 25.0
        c = np.clip(depth / np.float32(slab.h) + np.float32(0.5), 0, 1)
        hu = hu * c + (c - 1) * np.float32(1000.0)
        cav = depth > dc
        hu[cav] = -85.0
        hu2.append(hu)
        dep2.append(depth)
        cav2.append(cav)
    inv = inv.reshape(-1)
    slab.hu = np.stack(hu2)[inv]
    slab.cache.update(depth=np.stack(dep2)[inv], dc=dc, cavity=np.stack(cav2)[inv])


def mediastinal_half_width(an: Anatomy, y):
    """Half width (mm) of the mediastinal column between the lungs: narrow in front (the lungs nearly meet
    behind the sternum), full width from the great vessels backwards."""
    y_sb = an.y_sternum_back
    y_front = float(an.trachea.points[-1][1]) - 45
    t = np.clip((y - np.float32(y_sb)) / np.float32(max(y_front - y_sb, 1.0)), 0, 1)
    return np.float32(an.w_med) * (0.3 + 0.7 * t)


def lung_region(an: Anatomy, x, y, z, cavity, heart_env_fn=None):
    """Boolean lung region and lobe ids (broadcasting arrays of x, y, z in mm; ``cavity`` bool)."""
    zd = an.diaphragm(x, y)
    lung = cavity & (z > zd)
    lung &= np.abs(x - np.float32(an.xm)) >= mediastinal_half_width(an, y)
    lung &= z < an.z_apex
    # apices: above z_sh each lung narrows to a dome
    z_sh = an.z_apex - 90
    top = np.nonzero(np.ravel(z) > z_sh)[0] if np.ndim(z) else np.array([], int)
    if np.size(z) > 1 and len(top):
        zt = z[top[0]:]
        ox, oy, ax, ay = an.apex_c
        k = np.sqrt(np.clip(1 - ((zt - z_sh) / (an.z_apex - z_sh)) ** 2, 1e-6, 1))
        dxl = np.minimum(np.abs(x - np.float32(ox)), np.abs(x + np.float32(ox)))
        ok = (dxl / (ax * k)) ** 2 + ((y - np.float32(oy)) / (ay * k)) ** 2 <= 1
        lung[top[0]:] &= ok
    if heart_env_fn is not None:
        lung = heart_env_fn(lung)
    left = x > np.float32(an.xm)
    wob = 5 * np.sin(x / np.float32(31.0) + np.float32(an.fissure_phase))
    zl, ypl, kl = an.fissure_l
    zr, ypr, kr = an.fissure_r
    lower_l = z < (zl + kl * (y - np.float32(ypl)) + wob)
    lower_r = z < (zr + kr * (y - np.float32(ypr)) + wob)
    middle = z < (an.z_horizontal - 0.08 * y + wob * 0.5)
    lobe = np.where(left, np.where(lower_l, np.uint8(11), np.uint8(10)),
                    np.where(lower_r, np.uint8(14), np.where(middle, np.uint8(13), np.uint8(12))))
    return lung, lobe


def render_lungs(slab: Slab, an: Anatomy) -> None:
    """Lungs (five lobes, parenchyma with a dependent density gradient, fissures); upper abdomen floor."""
    x = slab.xv[None, None, :]
    y = slab.yv[None, :, None]
    z = slab.zv[:, None, None]
    cavity = slab.cache["cavity"]
    env = an.heart.grown(an.epi_fat + an.pericardial_effusion + 6.0)

    def cut_heart(lung):
        win = slab.window(*env.bbox(2.0))
        if win is not None:
            xs, ys, zs = slab.coords(win)
            q = None
            for row in env.matrix.astype(np.float32):
                u = (zs - np.float32(env.center[2])) * row[2] + (ys - np.float32(env.center[1])) * row[1]
                u = u + (xs - np.float32(env.center[0])) * row[0]
                q = u * u if q is None else q + u * u
            lung[win] &= q > 1
        return lung

    lung, lobe = lung_region(an, x, y, z, cavity, cut_heart)
    lobe = np.where(lung, lobe, np.uint8(0))
    # fissures: thin denser planes where neighbouring lung voxels belong to different lobes
    fis = np.zeros(lobe.shape, dtype=bool)
    for ax in (0, 1):
        lo = [slice(None)] * 3
        hi = [slice(None)] * 3
        lo[ax], hi[ax] = slice(0, -1), slice(1, None)
        lo, hi = tuple(lo), tuple(hi)
        diff = (lobe[lo] != lobe[hi]) & lung[lo] & lung[hi]
        fis[lo] |= diff
    slab.lab = lobe
    hu2d = (an.lung_hu + an.lung_grad * (slab.yv[:, None] / an.body_b)) + 0 * slab.xv[None, :]
    slab.hu = np.where(lung, hu2d.astype(np.float32)[None], slab.hu)
    slab.hu[fis] += np.float32(min(1.0, 1.2 / slab.h) * 0.8) * (np.float32(-600) - slab.hu[fis])
    # below the diaphragm inside the cavity: upper abdomen (organs painted later)
    zd = an.diaphragm(slab.xv[None, :], slab.yv[:, None])
    below = cavity & (z <= zd[None])
    slab.hu[below] = -40.0
    # thoracic inlet around the apices: mixed soft tissue
    inlet = cavity & ~lung & ~below & (z > an.z_apex - 90) & (np.abs(x - np.float32(an.xm)) >= an.w_med)
    slab.hu[inlet] = -30.0
    slab.cache.update(lung=lung, below=below, zd=zd)


def render_abdomen(slab: Slab, an: Anatomy) -> None:
    """Liver under the right dome (crossing the midline in front), stomach with a gas cap, spleen, IVC."""
    below = slab.cache["below"]
    if not below.any():
        return
    x = slab.xv[None, None, :]
    y = slab.yv[None, :, None]
    z = slab.zv[:, None, None]
    # the liver's left lobe reaches across the midline in front; lower down the liver narrows
    edge = 15 * an.scale + 45 * (0.5 - 0.5 * np.tanh(y / 45.0)) + 0.3 * np.minimum(z - an.dome_l[2], 0)
    liver = below & (x < edge)
    slab.hu[liver] = an.liver_hu
    slab.lab[liver] = class_id("liver")

    def below_mask(win):
        return below[win]

    res = paint_ellipsoid(slab, an.stomach, 25.0, class_id("stomach"), mask_fn=below_mask)
    if res is not None:  # a small gas cap at the front (the patient lies supine)
        win, c = res
        _, ys, _ = slab.coords(win)
        gas = ys < an.stomach.center[1] - 0.72 * an.stomach.extent[1]
        slab.paint(win, c * gas, HU_AIR, mask=below[win] & (slab.lab[win] == class_id("stomach")))
    paint_ellipsoid(slab, an.spleen, 48.0, class_id("spleen"), mask_fn=below_mask)
    paint_tube(slab, an.ivc, HU_BLOOD, class_id("inferior_vena_cava"))


def render_paraspinal(slab: Slab, an: Anatomy) -> None:
    """Autochthonous back muscles on both sides of the spinous processes."""
    depth = slab.cache["depth"]
    zc = (an.z_bottom + an.z_top) / 2
    yc = float(an.y_vf(an.z_mid)) + 2 * an.vb_ry + 2 * an.canal_r + 18 * an.scale
    for sx, name in ((1, "autochthon_left"), (-1, "autochthon_right")):
        ell = Ellipsoid.make([sx * 27 * an.scale, yc, zc], [22 * an.scale, 23 * an.scale, 1e4])
        paint_ellipsoid(slab, ell, an.hu_muscle + 4, class_id(name),
                        mask_fn=lambda win: depth[win] > (2 + an.fat_post))


def render_heart(slab: Slab, an: Anatomy) -> None:
    heart = an.heart
    paint_ellipsoid(slab, heart.grown(an.epi_fat + an.pericardial_effusion + 1.5), 30.0, 0)
    if an.pericardial_effusion > 0:
        paint_ellipsoid(slab, heart.grown(an.epi_fat + an.pericardial_effusion), an.pericardial_hu, 0)
    paint_ellipsoid(slab, heart.grown(an.epi_fat), an.hu_fat, 0)
    paint_ellipsoid(slab, heart, an.heart_hu, class_id("heart"))
    paint_ellipsoid(slab, an.laa, an.heart_hu, class_id("atrial_appendage_left"))


def render_vessels(slab: Slab, an: Anatomy) -> None:
    for t in an.pa:
        paint_tube(slab, t, HU_BLOOD, 0)
    for t in an.pulmonary_veins:
        paint_tube(slab, t, HU_BLOOD, class_id("pulmonary_vein"))
    paint_tube(slab, an.svc, HU_BLOOD, class_id("superior_vena_cava"))
    for t, lab in an.arch_branches:
        paint_tube(slab, t, HU_BLOOD, lab)
    paint_tube(slab, an.aorta, HU_BLOOD, class_id("aorta"))
    for e in an.thyroid:
        paint_ellipsoid(slab, e, 95.0, class_id("thyroid_gland"))


def render_airways(slab: Slab, an: Anatomy) -> None:
    es = class_id("esophagus")
    if an.hernia is not None:
        res = paint_ellipsoid(slab, an.hernia, 25.0, es)
        if res is not None:  # gas rises to the front of the herniated stomach (patient supine)
            win, c = res
            _, ys, _ = slab.coords(win)
            gas = ys < an.hernia.center[1] - 0.3 * an.hernia.extent[1]
            slab.paint(win, c * gas * 0.9, HU_AIR)
    paint_tube(slab, an.esophagus, 42.0, es)
    if an.esophagus_air > 0:
        top = an.esophagus.points[an.esophagus.points[:, 2] > an.z_car - 40]
        if len(top) >= 2:
            paint_tube(slab, Tube.make(top, an.esophagus_air), HU_AIR, es)
    tr = class_id("trachea")
    for t in (an.trachea, *an.bronchi):
        paint_tube(slab, t, 60.0, tr)
    for t in (an.trachea, *an.bronchi):
        paint_tube(slab, Tube(t.points, np.maximum(t.radii - an.trachea_wall, 1.0)), HU_AIR, tr)
    if an.nodes:
        c = np.array([p for p, _ in an.nodes])
        paint_segments(slab, c, c, np.array([r for _, r in an.nodes]), np.array([r for _, r in an.nodes]), 38.0, 0)


def _bone(sd: np.ndarray, cortex_mm: float, cortical: float, marrow: float) -> np.ndarray:
    return np.where(sd > -cortex_mm, np.float32(cortical), np.float32(marrow))


def render_spine(slab: Slab, an: Anatomy) -> None:
    """Vertebral bodies with cortex, discs, posterior arches, spinous and transverse processes, cord."""
    trab = 190.0 - 1.5 * max(0, an.age - 40)
    levels = an.levels
    rx, ry, rc = an.vb_rx, an.vb_ry, an.canal_r
    for i, (cid, z0, z1) in enumerate(levels):
        zc = 0.5 * (z0 + z1)
        yvc = float(an.y_vf(zc)) + ry
        ycc = yvc + ry + 2 + rc
        lo = np.array([-45 * an.scale, yvc - ry - 2, z0 - 12])
        hi = np.array([45 * an.scale, ycc + rc + 38 * an.scale, z1 + 4])
        win = slab.window(lo, hi)
        if win is None:
            continue
        xs, ys, zs = slab.coords(win)
        # vertebral body: elliptic cylinder between z0 and z1
        q = np.sqrt((xs / np.float32(rx)) ** 2 + ((ys - np.float32(yvc)) / np.float32(ry)) ** 2)
        sd = np.maximum((q - 1) * np.float32(min(rx, ry)), np.abs(zs - np.float32(zc)) - np.float32((z1 - z0) / 2))
        val = _bone(sd, 1.6, 700.0, trab)
        slab.paint(win, slab.coverage(sd), val, cid)
        # disc below
        zd0 = levels[i - 1][2] if i > 0 else z0 - 0.25 * (z1 - z0)
        sdd = np.maximum((q - 1) * np.float32(min(rx, ry)), np.abs(zs - np.float32((zd0 + z0) / 2))
                         - np.float32(max(z0 - zd0, 0.5) / 2))
        slab.paint(win, slab.coverage(sdd), 90.0, 0)
        # posterior arch: a half ring around the canal, with pedicles reaching the body
        rr = np.sqrt(xs * xs + (ys - np.float32(ycc)) ** 2)
        sd_ring = np.maximum(np.maximum(rr - np.float32(rc + 5.5), np.float32(rc) - rr),
                             np.float32(ycc - rc - ry * 0.6) - ys)
        sd_ring = np.maximum(sd_ring, np.abs(zs - np.float32(zc + 2)) - np.float32((z1 - z0) / 2))
        slab.paint(win, slab.coverage(sd_ring), 450.0, cid)
        for a, b, r in (((0, ycc + rc + 3, zc + 2), (0, ycc + rc + 30 * an.scale, zc - 14), 4.0),
                        ((8, ycc, zc + 3), (36 * an.scale, ycc + 8, zc + 5), 5.0),
                        ((-8, ycc, zc + 3), (-36 * an.scale, ycc + 8, zc + 5), 5.0)):
            sdp = capsule_sd(xs, ys, zs, np.asarray(a, float), np.asarray(b, float), r, r * 0.8)
            val = _bone(sdp, 1.5, 600.0, trab)
            slab.paint(win, slab.coverage(sdp), val, cid)
    # canal (CSF) and spinal cord
    zz = np.linspace(an.z_bottom - 30, an.z_top + 30, 9)
    ycc = an.y_vf(zz) + 2 * ry + 2 + rc
    pts = np.stack([np.zeros_like(zz), ycc, zz], 1)
    paint_tube(slab, Tube.make(pts, rc), 12.0, 0)
    paint_tube(slab, Tube.make(pts, 4.5 * an.scale), 35.0, class_id("spinal_cord"))


def rib_paths(an: Anatomy, n: int = 16) -> list[tuple[Rib, np.ndarray, np.ndarray]]:
    """Centre lines of each rib's bone and costal cartilage: ``(rib, bone (n, 3), cartilage (m, 3))``.

    A rib runs at mid depth of the intercostal band, from its vertebra (angle phi0 from the posterior
    midline) round the chest wall towards the sternum (phi = pi), descending by ``rib.drop``.
    """
    phi0 = 0.55
    out = []
    for rib in an.ribs:
        phi = np.linspace(phi0, rib.phi_cart, n)
        t = (phi - phi0) / (math.pi - phi0)
        z = rib.z_post - rib.drop * t ** 1.4
        ux, uy = rib.side * np.sin(phi), np.cos(phi)
        _, rb, _, m_in, _ = wall_fields(an, ux * 100, uy * 100)
        rb_z = rb * body_scale(an, z)
        rad = rb_z - (m_in + an.band * 0.5)
        for _ in range(2):  # the cavity depth depends on position (deeper near the spine): iterate
            dc = wall_fields(an, ux * rad, uy * rad)[4]
            rad = rb_z - (dc - an.band * 0.5)
        pts = np.stack([ux * rad, uy * rad, z], 1).astype(np.float64)
        k = int(np.searchsorted(phi, rib.phi_end, side="right"))
        k = max(2, min(k, n))
        out.append((rib, pts[:k], pts[k - 1:] if rib.phi_cart > rib.phi_end else pts[:0]))
    return out


def render_ribs(slab: Slab, an: Anatomy) -> None:
    """Ribs (cortex and marrow) and costal cartilages; sternum; clavicles."""
    cart_hu = 140.0 + 4.0 * max(0, an.age - 40)
    bone_a, bone_b, bone_l, cart_a, cart_b = [], [], [], [], []
    for rib, bone, cart in rib_paths(an):
        bone_a.append(bone[:-1])
        bone_b.append(bone[1:])
        bone_l.append(np.full(len(bone) - 1, rib.label))
        if len(cart) >= 2:
            cart_a.append(cart[:-1])
            cart_b.append(cart[1:])
    if cart_a:
        paint_segments(slab, np.concatenate(cart_a), np.concatenate(cart_b), 4.2 * an.scale, 4.2 * an.scale,
                       cart_hu, class_id("costal_cartilages"))
    a, b, lab = np.concatenate(bone_a), np.concatenate(bone_b), np.concatenate(bone_l)
    r = 5.0 * an.scale
    paint_segments(slab, a, b, r, r, 800.0, lab, core=(0.55, 260.0))
    # sternum: manubrium wider at the top
    z0, z1, yst, hw = an.sternum
    win = slab.window([-2 * hw - 5, yst - 12, z0 - 5], [2 * hw + 5, yst + 12, z1 + 5])
    if win is not None:
        xs, ys, zs = slab.coords(win)
        w = np.float32(hw) * (1 + 0.7 * _smoothstep(z1 - 55, z1 - 35, zs))
        q = np.sqrt((xs / w) ** 2 + ((ys - np.float32(yst)) / np.float32(6.5)) ** 2)
        sd = np.maximum((q - 1) * np.float32(6.5), np.abs(zs - np.float32((z0 + z1) / 2)) - np.float32((z1 - z0) / 2))
        val = _bone(sd, 1.5, 650.0, 240.0)
        slab.paint(win, slab.coverage(sd), val, class_id("sternum"))
    depth = slab.cache["depth"]
    for tube, name in zip(an.clavicles, ("clavicula_left", "clavicula_right")):
        p = tube.points
        paint_segments(slab, p[:-1], p[1:], tube.radii[:-1], tube.radii[1:], 800.0, class_id(name),
                       mask_fn=lambda idx: depth.reshape(-1)[idx] > 3, core=(0.55, 300.0))


def render_tree(slab: Slab, an: Anatomy) -> None:
    """Pulmonary vessels, then bronchial walls, then lumens, painted on lung voxels only."""
    tree = an.tree
    if tree is None or len(tree) == 0:
        return
    keep = np.maximum(tree.ra, tree.rb) >= 0.22 * slab.h  # invisible at this voxel size
    for kind, value in enumerate(TREE_HU):
        sel = keep & (tree.kind == kind)
        if sel.any():
            paint_segments(slab, tree.a[sel], tree.b[sel], tree.ra[sel], tree.rb[sel], value, lung_only=True)


def render(slab: Slab, an: Anatomy, lesions=(), detail: bool = True) -> None:
    """Paint the anatomy and the lesions (objects with ``stage`` and ``render(slab, anatomy)``) into a slab.

    ``detail=False`` paints only what decides the lung lobes' extent (used for the coarse planning map):
    no vessel tree, lesions, upper-abdominal organs, back muscles or ribs.
    """

    def stage(name: str) -> None:
        if detail:
            for les in lesions:
                if les.stage == name:
                    les.render(slab, an)

    render_body(slab, an)
    render_lungs(slab, an)
    stage("parenchyma")
    if detail:
        render_abdomen(slab, an)
        render_paraspinal(slab, an)
    render_heart(slab, an)
    stage("heart")
    render_vessels(slab, an)
    stage("vessels")
    render_airways(slab, an)
    stage("mediastinum")
    render_spine(slab, an)
    if detail:
        render_ribs(slab, an)
        render_tree(slab, an)
    stage("lung")
    stage("pleura")
    stage("device")


# ------------------------------------------------------------------------------------------- planning
@dataclass(frozen=True)
class CoarseMap:
    """A low-resolution label map of the anatomy (for placing lesions and the vessel tree).

    ``lab`` uint8 ``(D, H, W)``, voxel centres ``x0 + i * step`` etc.; ``pleura_mm`` float32: distance (mm)
    from each lung voxel to the nearest non-lung voxel.
    """

    lab: np.ndarray
    origin: np.ndarray  # (x0, y0, z0)
    step: float
    pleura_mm: np.ndarray

    def points(self, mask: np.ndarray) -> np.ndarray:
        """Centres (n, 3) (x, y, z mm) of the voxels in ``mask``."""
        k, j, i = np.nonzero(mask)
        return np.stack([i, j, k], 1) * self.step + self.origin

    def lobe_at(self, pts: np.ndarray) -> np.ndarray:
        idx = np.rint((np.asarray(pts) - self.origin) / self.step).astype(int)
        d, h, w = self.lab.shape
        ok = np.all((idx >= 0) & (idx < np.array([w, h, d])), axis=1)
        out = np.zeros(len(idx), dtype=np.uint8)
        out[ok] = self.lab[idx[ok, 2], idx[ok, 1], idx[ok, 0]]
        return out


def coarse_map(an: Anatomy, step: float = 6.0) -> CoarseMap:
    """Render the anatomy's label map (no noise, no tree, no lesions) on a ``step`` mm grid."""
    from scipy.ndimage import distance_transform_edt

    xv = np.arange(-an.body_a - 5, an.body_a + 5, step)
    yv = np.arange(-an.body_b - 5, an.body_b + 5, step)
    zv = np.arange(an.z_bottom, an.z_top, step)
    slab = Slab(xv, yv, zv, (step, step, step))
    render(slab, an, detail=False)
    lung = (slab.lab >= 10) & (slab.lab <= 14)
    dist = distance_transform_edt(lung, sampling=step).astype(np.float32)
    return CoarseMap(slab.lab.copy(), np.array([xv[0], yv[0], zv[0]]), step, dist)


def build_tree(rng: np.random.Generator, an: Anatomy, cmap: CoarseMap) -> Tree:
    """Pulmonary arteries with their bronchi, and veins, branching from the hila into every lobe.

    Per lobe: a lobar branch towards the lobe's centre, 3-5 segmental branches towards far-apart points
    of the lobe, 2-3 subsegmental branches each towards the periphery, and small twigs. Bronchi run beside
    the arteries; their lumen/wall follow ``an.airway[lobe] = (lumen factor, wall factor, extend)``.
    """
    rows: list[tuple] = []  # (a, b, ra, rb, lobe, kind) kind 0 vessel, 1 wall, 2 lumen
    s = an.scale
    hila = {"right": (an.pa[1].points[-1], an.bronchi[0].points[-1], an.pulmonary_veins[0].points[-1]),
            "left": (an.pa[2].points[-1], an.bronchi[1].points[-1], an.pulmonary_veins[2].points[-1])}
    for lobe, side in LOBES.items():
        pts = cmap.points(cmap.lab == lobe)
        if len(pts) < 10:
            continue
        depth = cmap.pleura_mm[cmap.lab == lobe]
        pts = pts + rng.uniform(-cmap.step / 2, cmap.step / 2, pts.shape)
        art0, br0, vein0 = hila[side]
        centre = pts.mean(0)
        lumen_f, wall_f, extend = an.airway.get(lobe, (1.0, 1.0, False))
        # lobar
        lob_end = art0 + 0.5 * (centre - art0)
        n_seg = int(np.clip(len(pts) * cmap.step ** 3 / 1.6e5, 2, 5))
        # segmental targets: farthest-point sampling on the lobe's points
        far = [int(np.argmax(np.linalg.norm(pts - centre, axis=1)))]
        dmin = np.linalg.norm(pts - pts[far[0]], axis=1)
        for _ in range(n_seg - 1):
            far.append(int(np.argmax(dmin)))
            dmin = np.minimum(dmin, np.linalg.norm(pts - pts[far[-1]], axis=1))
        branches = [(art0, lob_end, 5.0 * s, 4.2 * s, 0)]
        for fi in far:
            tgt = pts[fi]
            seg_end = lob_end + 0.5 * (tgt - lob_end)
            branches.append((lob_end, seg_end, 3.4 * s, 2.6 * s, 1))
            near = np.nonzero(np.linalg.norm(pts - tgt, axis=1) < 45)[0]
            if len(near) == 0:
                continue
            # subsegmental branches end in the periphery (small distance to the pleura)
            order = near[np.argsort(depth[near])]
            ends = rng.choice(order[: max(3, len(order) // 3)], size=min(3, len(order)), replace=False)
            for e in ends:
                sub_end = pts[e]
                branches.append((seg_end, sub_end, 2.0 * s, 1.0 * s, 2))
                mid = seg_end + 0.55 * (sub_end - seg_end)
                for _ in range(2):
                    twig = mid + unit(rng.normal(0, 1, 3)) * _u(rng, 12, 22)
                    if cmap.lobe_at(twig[None])[0] == lobe:
                        branches.append((mid, twig, 1.0 * s, 0.5 * s, 3))
        for a, b, ra, rb, _gen in branches:
            rows.append((a, b, ra, rb, lobe, 0))
        # bronchi beside the arteries (lobar .. subsegmental), offset sideways
        offs = {}
        for a, b, ra, _rb, gen in branches:
            if gen > 2:
                continue
            lum_a = (4.2 * s, 2.6 * s, 1.5 * s)[gen] * lumen_f
            lum_b = (3.6 * s, 2.0 * s, 0.7 * s)[gen] * (lumen_f if not extend else lumen_f * 1.15)
            if extend and gen == 2:
                lum_b = max(lum_b, 2.2 * lumen_f * s)
            wall = (1.3 * s, 1.0 * s, 0.7 * s)[gen] * wall_f
            key = tuple(np.round(a, 3))
            off = offs.get(key)
            if off is None:
                off = unit(np.cross(b - a, rng.normal(0, 1, 3))) * (ra + lum_a + wall + 0.5)
                offs[key] = off
            ba, bb = a + off, b + off
            offs[tuple(np.round(b, 3))] = off
            if gen == 0:
                ba = br0
            rows.append((ba, bb, lum_a + wall, lum_b + wall, lobe, 1))
            rows.append((ba, bb, lum_a, lum_b, lobe, 2))
        # veins: from the lower hilum to points between the segments
        v_tg = pts[rng.choice(len(pts), size=min(len(pts), n_seg + 1), replace=False)]
        vhub = vein0 + 0.4 * (centre - vein0)
        rows.append((vein0, vhub, 4.5 * s, 3.8 * s, lobe, 0))
        for t in v_tg:
            vmid = vhub + 0.6 * (t - vhub)
            rows.append((vhub, vmid, 2.8 * s, 1.8 * s, lobe, 0))
            rows.append((vmid, t + unit(t - vmid) * 10, 1.8 * s, 0.7 * s, lobe, 0))
    cols = list(zip(*rows)) if rows else [[]] * 6
    return Tree(np.array(cols[0], dtype=np.float64).reshape(-1, 3), np.array(cols[1], dtype=np.float64).reshape(-1, 3),
                np.array(cols[2], dtype=np.float64), np.array(cols[3], dtype=np.float64),
                np.array(cols[5], dtype=np.uint8), np.array(cols[4], dtype=np.uint8))
