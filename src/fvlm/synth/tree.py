"""Planning on a coarse map of the phantom: where the lobes are (for placing lesions) and the pulmonary vessel
and bronchial tree branching into them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import distance_transform_edt

from fvlm.synth.geometry import (
    Slab,
    unit,
)
from fvlm.synth.phantom import LOBES, Anatomy, Tree, _u
from fvlm.synth.render import render


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
