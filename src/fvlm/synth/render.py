"""Rendering of the chest phantom (:class:`~fvlm.synth.phantom.Anatomy`) into a voxel slab.

:func:`render` paints the anatomy, and the findings at their stages, into a :class:`~fvlm.synth.geometry.Slab`.
Label values are TotalSegmentator v2 ``total`` ids (:mod:`fvlm.totalseg`).

Painting order (later steps override earlier ones): body wall -> lungs and lobes (stage ``parenchyma``) ->
upper abdomen -> paraspinal muscles -> heart (stage ``heart``) -> great vessels (stage ``vessels``) ->
oesophagus, trachea, bronchi (stage ``mediastinum``) -> spine -> ribs, sternum, clavicles -> pulmonary vessel
and bronchial tree -> stages ``lung``, ``pleura``, ``device``.
"""

from __future__ import annotations

import math

import numpy as np

from fvlm.synth.geometry import (
    Ellipsoid,
    Slab,
    Tube,
    capsule_sd,
    paint_ellipsoid,
    paint_segments,
    paint_tube,
)
from fvlm.synth.phantom import HU_AIR, HU_BLOOD, TREE_HU, Anatomy, Rib
from fvlm.totalseg import class_id


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
