"""The samplers of the labels that add lesions (placed on the coarse map of the patient, painted by
:mod:`fvlm.synth.lesion_shapes`): effusion, lung findings, calcifications, lymph nodes, devices. See
:mod:`fvlm.synth.lesions`."""

from __future__ import annotations

import math

import numpy as np

from fvlm.synth.findings import Finding, draw_count, pick_lobes, pick_points
from fvlm.synth.geometry import Ellipsoid, Tube, rotation_from, unit
from fvlm.synth.lesion_shapes import Blob, Effusion, LobeShift, Mosaic, Segments, Septal
from fvlm.synth.phantom import UPPER_LOBES, Anatomy
from fvlm.synth.render import body_scale, wall_fields
from fvlm.synth.signatures import lerp


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
    n = draw_count(sig.count, s * 0.7, rng)
    largest = lerp(sig.size, s ** 1.3)
    sizes = [largest] + [float(rng.uniform(4, max(4.5, largest * 0.7))) for _ in range(n - 1)]
    f = Finding("Lung nodule", s)
    a, rr, lobes = [], [], []
    for d in sizes:
        pts, lob = ctx.lung_points(min_depth=d / 2 + 3, margin=d)
        p, lo = pick_points(rng, pts, lob)
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
    n = draw_count(sig.count, s, rng)
    f = Finding("Consolidation", s)
    lobes = []
    radius = lerp(sig.size, s)
    for _ in range(n):
        lobe = int(rng.choice([10, 11, 12, 13, 14], p=[0.15, 0.27, 0.15, 0.13, 0.30]))
        pts, lob = ctx.lung_points((lobe,), min_depth=4, margin=5)
        p, _ = pick_points(rng, pts, lob)
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
    n = draw_count(sig.count, s, rng)
    f = Finding("Lung opacity", s)
    pts, lob = ctx.lung_points(max_depth=25, margin=5)
    p, lo = pick_points(rng, pts, lob, n)
    if len(p):
        r = np.array([lerp(sig.size, s) * rng.uniform(0.6, 1.0) for _ in range(len(p))])
        f.lesions.append(Segments("parenchyma", p, p, r, r, lerp(sig.hu, s), mask="lung", add=True,
                                  edge=float(0.5 * r.mean())))
    f.lobes = tuple(sorted({int(v) for v in lo}))
    f.details = {"count": len(p)}
    return f


def _emphysema(rng, s, sig, ctx):
    n = draw_count(sig.count, s, rng)
    lobes = (10, 12) + ((11, 14) if rng.random() < 0.5 else ())
    pts, lob = ctx.lung_points(lobes, margin=3)
    if len(pts):  # upper zones
        zcut = np.percentile(pts[:, 2], 35)
        sel = pts[:, 2] > zcut
        pts, lob = pts[sel], lob[sel]
    p, lo = pick_points(rng, pts, lob, n)
    f = Finding("Emphysema", s, details={"kind": str(rng.choice(["centrilobular", "paraseptal", "panlobular"]))})
    if len(p):  # mostly small holes, a few large ones (bullae)
        r = lerp(sig.size, s) * rng.uniform(0.35, 1.0, len(p)) ** 1.5
        f.lesions.append(Segments("parenchyma", p, p, r, r, lerp(sig.hu, s), mask="lung"))
    f.lesions.append(LobeShift("parenchyma", tuple(sorted({int(v) for v in lo})) or UPPER_LOBES,
                               lerp(sig.extra["lobe_shift"], s)))
    f.lobes = tuple(sorted({int(v) for v in lo})) or UPPER_LOBES
    return f


def _fibrosis(rng, s, sig, ctx):
    n = draw_count(sig.count, s, rng)
    lobes = pick_lobes(rng, int(rng.integers(1, 4)), lower_weight=0.7, upper_weight=1.6)
    pts, lob = ctx.lung_points(lobes, max_depth=22, margin=4)
    p, lo = pick_points(rng, pts, lob, n)
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
    n = draw_count(sig.count, s, rng)
    lobes = pick_lobes(rng, n, lower_weight=2.0)
    f = Finding("Interlobular septal thickening", s, lobes=lobes)
    f.lesions.append(Septal("lung", lobes, lerp(sig.extra["cell"], s), lerp(sig.size, s), lerp(sig.hu, s),
                            lerp(sig.extra["zone"], s), int(rng.integers(1 << 30))))
    return f


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
    n = draw_count(sig.count, s, rng)
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
    n = draw_count(sig.count, s, rng)
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
    n = draw_count(sig.count, s, rng)
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
        n = draw_count(sig.count, s, rng)
        segs_a, segs_b = [], []
        for zc in np.linspace(z0 + 15, z1 - 10, n):
            ang = np.linspace(0, 2 * math.pi, 13)
            ring = np.stack([1.3 * hw * np.cos(ang), yst + 9 * np.sin(ang), np.full_like(ang, zc)], 1)
            segs_a.append(ring[:-1])
            segs_b.append(ring[1:])
        f.lesions.append(Segments("device", np.concatenate(segs_a), np.concatenate(segs_b), 0.9, 0.9, metal))
    else:
        n = draw_count(sig.count, s, rng)
        centre = an.trachea.points[-1] + np.array([0, -20, -10])
        c = centre + rng.normal(0, 18, (n, 3))
        d = np.stack([unit(v) for v in rng.normal(0, 1, (n, 3))]) * 3
        f.lesions.append(Segments("device", c - d, c + d, 1.2, 1.2, metal))
    return f


#: label -> sampler, for the labels that add lesions (they run on the coarse map)
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
