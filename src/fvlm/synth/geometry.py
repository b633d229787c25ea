"""Vectorised geometry for the phantom: voxel slabs, tubes, ellipsoids and soft (partial-volume) painting.

Everything here works in the *patient frame* (LPS, millimetres): x grows to the patient's Left, y to
Posterior, z to Superior. A :class:`Slab` is a block of consecutive slices of the output grid; it holds the
HU image (float32, ``(d, H, W)`` = ``(z, y, x)``) and the TotalSegmentator label map (uint8) being painted.
Shapes are painted with a soft coverage ``c = clip(0.5 - sd / h, 0, 1)`` of their signed distance ``sd`` (mm)
so that edges get partial-volume values whatever the voxel size; ``h`` is the geometric mean voxel size.
Each shape is evaluated only inside its bounding box, which keeps the cost proportional to its size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

Window = tuple[slice, slice, slice]


def unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


@dataclass(frozen=True)
class Tube:
    """A polyline with a radius per vertex: ``points (n, 3)`` mm, ``radii (n,)`` mm (n >= 2)."""

    points: np.ndarray
    radii: np.ndarray

    @staticmethod
    def make(points, radii) -> Tube:
        p = np.asarray(points, dtype=np.float64).reshape(-1, 3)
        r = np.broadcast_to(np.asarray(radii, dtype=np.float64), (len(p),)).copy()
        if len(p) < 2:
            raise ValueError("a tube needs at least two points")
        return Tube(p, r)

    def bbox(self, pad: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
        r = self.radii[:, None] + pad
        return (self.points - r).min(0), (self.points + r).max(0)

    def point_at(self, t: float) -> tuple[np.ndarray, float]:
        """Point and radius at arc-length fraction ``t`` in [0, 1]."""
        seg = np.linalg.norm(np.diff(self.points, axis=0), axis=1)
        cum = np.concatenate([[0.0], np.cumsum(seg)])
        s = float(np.clip(t, 0.0, 1.0)) * cum[-1]
        i = int(np.clip(np.searchsorted(cum, s, side="right") - 1, 0, len(seg) - 1))
        f = (s - cum[i]) / max(seg[i], 1e-9)
        return self.points[i] + f * (self.points[i + 1] - self.points[i]), float(
            self.radii[i] + f * (self.radii[i + 1] - self.radii[i]))

    def direction_at(self, t: float) -> np.ndarray:
        a, _ = self.point_at(max(0.0, t - 0.02))
        b, _ = self.point_at(min(1.0, t + 0.02))
        return unit(b - a)

    def resampled(self, step: float = 8.0) -> Tube:
        """A smooth (Catmull-Rom) version through the same vertices, sampled about every ``step`` mm."""
        p, r = self.points, self.radii
        if len(p) < 3:
            return self
        ext = np.vstack([2 * p[0] - p[1], p, 2 * p[-1] - p[-2]])
        out_p, out_r = [], []
        for i in range(len(p) - 1):
            p0, p1, p2, p3 = ext[i], ext[i + 1], ext[i + 2], ext[i + 3]
            n = max(1, int(math.ceil(np.linalg.norm(p2 - p1) / step)))
            for k in range(n):
                t = k / n
                t2, t3 = t * t, t * t * t
                out_p.append(0.5 * ((2 * p1) + (-p0 + p2) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t2
                                    + (-p0 + 3 * p1 - 3 * p2 + p3) * t3))
                out_r.append(r[i] + t * (r[i + 1] - r[i]))
        out_p.append(p[-1])
        out_r.append(r[-1])
        return Tube(np.asarray(out_p), np.asarray(out_r))


@dataclass(frozen=True)
class Ellipsoid:
    """``{p : |M (p - c)| <= 1}``: ``center (3,)`` mm, ``matrix (3, 3)`` 1/mm."""

    center: np.ndarray
    matrix: np.ndarray

    @staticmethod
    def make(center, axes, rotation=None) -> Ellipsoid:
        """Semi-axes ``axes`` (mm) along the columns of ``rotation`` (identity: along x, y, z)."""
        rot = np.eye(3) if rotation is None else np.asarray(rotation, dtype=np.float64)
        m = np.diag(1.0 / np.asarray(axes, dtype=np.float64)) @ rot.T
        return Ellipsoid(np.asarray(center, dtype=np.float64), m)

    @property
    def extent(self) -> np.ndarray:
        """Half extent along x, y, z (mm)."""
        return np.linalg.norm(np.linalg.inv(self.matrix), axis=1)

    @property
    def r_min(self) -> float:
        return 1.0 / float(np.linalg.norm(self.matrix, 2))

    @property
    def r_mean(self) -> float:
        return float(np.cbrt(1.0 / abs(np.linalg.det(self.matrix))))

    def grown(self, mm: float) -> Ellipsoid:
        """Approximately offset outwards by ``mm`` (a uniform scale about the centre)."""
        return Ellipsoid(self.center, self.matrix / (1.0 + mm / self.r_mean))

    def scaled(self, factors) -> Ellipsoid:
        """Stretched by ``factors`` along world x, y, z about the centre."""
        return Ellipsoid(self.center, self.matrix @ np.diag(1.0 / np.asarray(factors, dtype=np.float64)))

    def surface_point(self, direction) -> np.ndarray:
        d = unit(direction)
        return self.center + d / np.linalg.norm(self.matrix @ d)

    def contains(self, points: np.ndarray) -> np.ndarray:
        q = (np.asarray(points) - self.center) @ self.matrix.T
        return (q * q).sum(-1) <= 1.0

    def bbox(self, pad: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
        e = self.extent + pad
        return self.center - e, self.center + e


class Slab:
    """A block of slices of an output grid, in patient millimetres, with the image being painted.

    Attributes:
        xv, yv, zv: float32 voxel-centre coordinates along x (W,), y (H,), z (d,) in mm (ascending).
        spacing: (sx, sy, sz) mm. h: geometric-mean voxel size (mm), the width of soft edges.
        hu: float32 ``(d, H, W)`` HU. lab: uint8 ``(d, H, W)`` TotalSegmentator v2 ids.
        cache: per-slab fields shared between painting steps (e.g. body depth).
    """

    def __init__(self, xv: np.ndarray, yv: np.ndarray, zv: np.ndarray, spacing: tuple[float, float, float]):
        self.xv = np.asarray(xv, dtype=np.float32)
        self.yv = np.asarray(yv, dtype=np.float32)
        self.zv = np.asarray(zv, dtype=np.float32)
        self.spacing = tuple(float(s) for s in spacing)
        self.h = float(np.cbrt(self.spacing[0] * self.spacing[1] * self.spacing[2]))
        self.shape = (len(self.zv), len(self.yv), len(self.xv))
        self.hu = np.full(self.shape, -1000.0, dtype=np.float32)
        self.lab = np.zeros(self.shape, dtype=np.uint8)
        self.cache: dict = {}

    # -- index windows ---------------------------------------------------------------------------------
    @staticmethod
    def _axis(v: np.ndarray, step: float, lo: float, hi: float) -> tuple[int, int]:
        i0 = int(math.ceil((lo - float(v[0])) / step - 1e-6))
        i1 = int(math.floor((hi - float(v[0])) / step + 1e-6)) + 1
        return max(0, i0), min(len(v), i1)

    def window(self, lo, hi) -> Window | None:
        """Index window covering the box ``[lo, hi]`` (x, y, z mm), or None if it misses the slab."""
        x0, x1 = self._axis(self.xv, self.spacing[0], lo[0], hi[0])
        y0, y1 = self._axis(self.yv, self.spacing[1], lo[1], hi[1])
        z0, z1 = self._axis(self.zv, self.spacing[2], lo[2], hi[2])
        if x0 >= x1 or y0 >= y1 or z0 >= z1:
            return None
        return slice(z0, z1), slice(y0, y1), slice(x0, x1)

    def coords(self, win: Window) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Broadcastable coordinates of a window: x (1, 1, w), y (1, h, 1), z (d, 1, 1)."""
        zs, ys, xs = win
        return self.xv[xs][None, None, :], self.yv[ys][None, :, None], self.zv[zs][:, None, None]

    # -- painting --------------------------------------------------------------------------------------
    def coverage(self, sd: np.ndarray, thin: float = 1.0) -> np.ndarray:
        """Soft coverage in [0, 1] from a signed distance (mm, negative inside); modifies ``sd`` in place."""
        sd *= -1.0 / self.h
        sd += 0.5
        np.clip(sd, 0.0, 1.0, out=sd)
        if thin < 1.0:
            sd *= thin
        return sd

    def thin_factor(self, radius: float) -> float:
        """Contrast kept by a structure of this radius: thin structures fill only part of a voxel."""
        return min(1.0, 2.0 * radius / self.h)

    def paint(self, win: Window, c: np.ndarray, value, label: int | None = None,
              mask: np.ndarray | None = None, add: bool = False) -> None:
        """Blend ``value`` (HU, scalar or array) into the window with coverage ``c``; label where c > 0.5.

        ``mask`` (bool, broadcastable) restricts the change; ``add`` adds ``value * c`` instead of blending.
        """
        if mask is not None:
            c = c * mask
        hu = self.hu[win]
        if add:
            hu += c * value
        else:
            hu += c * (value - hu)
        if label is not None:
            self.lab[win][c > 0.5] = label

    def lobe_mask(self, win: Window) -> np.ndarray:
        lab = self.lab[win]
        return (lab >= 10) & (lab <= 14)


def capsule_sd(xs, ys, zs, a, b, ra: float, rb: float) -> np.ndarray:
    """Signed distance (mm) to a segment a-b with radius varying linearly from ra to rb (approximate)."""
    d = b - a
    l2 = float(d @ d)
    dx, dy, dz = xs - np.float32(a[0]), ys - np.float32(a[1]), zs - np.float32(a[2])
    if l2 < 1e-9:
        return np.sqrt(dx * dx + dy * dy + dz * dz) - np.float32(ra)
    d0, d1, d2 = (np.float32(v / l2) for v in d)
    t = dz * d2 + dy * d1
    t = t + dx * d0
    np.clip(t, 0.0, 1.0, out=t)
    px = dx - t * np.float32(d[0])
    py = dy - t * np.float32(d[1])
    pz = dz - t * np.float32(d[2])
    px *= px
    py *= py
    pz *= pz
    px += py
    px += pz
    np.sqrt(px, out=px)
    if ra == rb:
        px -= np.float32(ra)
    else:
        t *= np.float32(rb - ra)
        t += np.float32(ra)
        px -= t
    return px


def paint_tube(slab: Slab, tube: Tube, value: float, label: int | None = None, grow: float = 0.0,
               lung_only: bool = False, mask_fn=None) -> None:
    """Paint a tube (radii + ``grow`` mm) with ``value`` HU and ``label`` (see :func:`paint_segments`)."""
    r = tube.radii + grow
    paint_segments(slab, tube.points[:-1], tube.points[1:], r[:-1], r[1:], value, label, lung_only=lung_only,
                   mask_fn=mask_fn)


def ellipsoid_sd(slab: Slab, ell: Ellipsoid, pad: float = 0.0) -> tuple[Window, np.ndarray] | None:
    """Approximate signed distance (mm) to an ellipsoid inside its bounding window, or None."""
    lo, hi = ell.bbox(pad + slab.h)
    win = slab.window(lo, hi)
    if win is None:
        return None
    xs, ys, zs = slab.coords(win)
    m = ell.matrix.astype(np.float32)
    dx, dy, dz = xs - np.float32(ell.center[0]), ys - np.float32(ell.center[1]), zs - np.float32(ell.center[2])
    q = None
    for row in m:
        u = dz * row[2] + dy * row[1]
        u = u + dx * row[0]
        u *= u
        q = u if q is None else q + u
    np.sqrt(q, out=q)
    q -= 1.0
    q *= np.float32(ell.r_min)
    return win, q


def paint_ellipsoid(slab: Slab, ell: Ellipsoid, value, label: int | None = None, mask_fn=None,
                    add: bool = False) -> tuple[Window, np.ndarray] | None:
    """Paint an ellipsoid; ``mask_fn(win) -> bool array`` restricts it. Returns (window, coverage)."""
    res = ellipsoid_sd(slab, ell)
    if res is None:
        return None
    win, sd = res
    c = slab.coverage(sd, slab.thin_factor(ell.r_min))
    slab.paint(win, c, value, label, mask=None if mask_fn is None else mask_fn(win), add=add)
    return win, c


def paint_segments(slab: Slab, a, b, ra, rb, value, label=None, lung_only: bool = False, mask_fn=None,
                   add: bool = False, edge: float = 0.0, core: tuple[float, float] | None = None) -> None:
    """Paint the union of many capsules (or spheres: a == b) with ``value`` HU, touching only covered voxels.

    ``label`` (scalar or one per segment) is written where coverage > 0.5. ``lung_only`` restricts painting
    and labels to lung-lobe voxels; ``mask_fn(flat_indices) -> bool`` (indices into the slab's flattened
    arrays) gives any other restriction. ``edge`` (mm) widens the soft edge (fuzzy lesions, ground glass).
    ``core = (fraction, value)`` also paints the inner ``fraction`` of the radius with another value (bone
    marrow inside a cortex) from the same distance computation.
    """
    a = np.asarray(a, dtype=np.float64).reshape(-1, 3)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 3)
    if len(a) == 0:
        return
    r = np.maximum(np.broadcast_to(np.asarray(ra, float), (len(a),)), np.broadcast_to(np.asarray(rb, float), (len(a),)))
    pad = max(slab.h, edge)
    win = slab.window((np.minimum(a, b) - r[:, None]).min(0) - pad, (np.maximum(a, b) + r[:, None]).max(0) + pad)
    if win is None:
        return
    c, lab, cc = segments_coverage(slab, a, b, ra, rb, win=win, labels=label, edge=edge,
                                   core=None if core is None else core[0])
    nz = np.flatnonzero(c)
    if nz.size == 0:
        return
    cv = c.reshape(-1)[nz]
    k, j, i = np.unravel_index(nz, c.shape)
    idx = ((k + win[0].start) * slab.shape[1] + (j + win[1].start)) * slab.shape[2] + (i + win[2].start)
    hu = slab.hu.reshape(-1)
    labs = slab.lab.reshape(-1)
    keep = None
    if lung_only:
        lv = labs[idx]
        keep = (lv >= 10) & (lv <= 14)
    if mask_fn is not None:
        m = mask_fn(idx)
        keep = m if keep is None else keep & m
    if keep is not None:
        idx, cv, nz = idx[keep], cv[keep], nz[keep]
    if add:
        hu[idx] += cv * np.float32(value)
    else:
        hu[idx] += cv * (np.float32(value) - hu[idx])
    if cc is not None:
        cv2 = cc.reshape(-1)[nz]
        hu[idx] += cv2 * (np.float32(core[1]) - hu[idx])
    if lab is not None:
        sel = cv > 0.5
        labs[idx[sel]] = lab.reshape(-1)[nz[sel]]


def segments_coverage(slab: Slab, a: np.ndarray, b: np.ndarray, ra: np.ndarray, rb: np.ndarray,
                      win: Window | None = None, labels=None, edge: float = 0.0, core: float | None = None,
                      max_pairs: int = 3_000_000) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Soft coverage of the union of many capsules (segments a-b with radii ra..rb), batched.

    Long segments are split so that their bounding boxes stay tight; all (voxel, segment) pairs are then
    evaluated in a few vectorised operations and reduced with a per-voxel maximum. Cost grows with the
    number of pairs, not with the number of segments (hundreds of small branches cost a few ms).

    Args:
        a, b: (n, 3) end points (mm); ra, rb: (n,) radii (mm). Equal a and b give spheres.
        win: evaluate only inside this window of the slab (default: the whole slab).
        labels: optional label (scalar or (n,)): also return a uint8 map of the label of a segment that
            covers each voxel by more than 0.5 (0 elsewhere).
        edge: soft-edge width (mm); at least the voxel size.
        core: also return the coverage of the same capsules with radii scaled by this fraction.
    Returns:
        (coverage float32 in [0, 1], label map uint8 or None, core coverage or None), window-shaped.
    """
    if win is None:
        win = (slice(0, slab.shape[0]), slice(0, slab.shape[1]), slice(0, slab.shape[2]))
    xv, yv, zv = slab.xv[win[2]], slab.yv[win[1]], slab.zv[win[0]]
    out = np.zeros((len(zv), len(yv), len(xv)), dtype=np.float32)
    a = np.asarray(a, dtype=np.float64).reshape(-1, 3)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 3)
    ra = np.broadcast_to(np.asarray(ra, dtype=np.float64), (len(a),))
    rb = np.broadcast_to(np.asarray(rb, dtype=np.float64), (len(a),))
    lab_w = None
    if labels is not None:
        labels = np.broadcast_to(np.asarray(labels, dtype=np.uint8), (len(a),))
        lab_w = np.zeros(out.shape, dtype=np.uint8)
    out_core = None if core is None else np.zeros(out.shape, dtype=np.float32)
    if len(a) == 0 or out.size == 0:
        return out, lab_w, out_core
    # split long segments into pieces no longer than ~3 radii (at least 2 voxels) so boxes stay tight
    length = np.linalg.norm(b - a, axis=1)
    npiece = np.maximum(1, np.ceil(length / np.maximum(3.0 * np.maximum(ra, rb), max(2.0 * slab.h, 4.0)))).astype(int)
    owner = np.repeat(np.arange(len(a)), npiece)
    k = np.arange(len(owner)) - np.repeat(np.cumsum(npiece) - npiece, npiece)
    t0, t1 = k / npiece[owner], (k + 1) / npiece[owner]
    a, b = a[owner] + t0[:, None] * (b - a)[owner], a[owner] + t1[:, None] * (b - a)[owner]
    ra, rb = ra[owner] + t0 * (rb - ra)[owner], ra[owner] + t1 * (rb - ra)[owner]
    if labels is not None:
        labels = labels[owner]
    d, h, w = out.shape
    flat = out.reshape(-1)
    sp = np.asarray(slab.spacing)
    origin = np.array([xv[0], yv[0], zv[0]], dtype=np.float64)
    size = np.array([w, h, d])
    width = max(slab.h, edge)
    rmax = np.maximum(ra, rb)[:, None] + width
    lo = np.ceil((np.minimum(a, b) - rmax - origin) / sp - 1e-6).astype(np.int64)
    hi = np.floor((np.maximum(a, b) + rmax - origin) / sp + 1e-6).astype(np.int64) + 1
    lo = np.clip(lo, 0, size)
    hi = np.clip(hi, 0, size)
    ext = np.clip(hi - lo, 0, None)
    counts = ext.prod(1)
    keep = np.nonzero(counts > 0)[0]
    a32, d32 = a.astype(np.float32), (b - a).astype(np.float32)
    l2 = np.maximum((d32 * d32).sum(1), np.float32(1e-9))
    ra32, dr32 = ra.astype(np.float32), (rb - ra).astype(np.float32)
    start = 0
    while start < len(keep):
        # a batch of pieces with at most max_pairs (voxel, piece) pairs
        csum = np.cumsum(counts[keep[start:]])
        stop = start + max(1, int(np.searchsorted(csum, max_pairs, side="right")))
        seg = keep[start:stop]
        start = stop
        cnt = counts[seg]
        sid = np.repeat(seg, cnt)
        o = np.arange(int(cnt.sum()), dtype=np.int64) - np.repeat(np.cumsum(cnt) - cnt, cnt)
        ex, exy = ext[sid, 0], ext[sid, 0] * ext[sid, 1]
        iz, rem = np.divmod(o, exy)
        iy, ix = np.divmod(rem, ex)
        iz += lo[sid, 2]
        iy += lo[sid, 1]
        ix += lo[sid, 0]
        idx = (iz * h + iy) * w + ix
        dx, dy, dz = xv[ix] - a32[sid, 0], yv[iy] - a32[sid, 1], zv[iz] - a32[sid, 2]
        vx, vy, vz = d32[sid, 0], d32[sid, 1], d32[sid, 2]
        t = (dx * vx + dy * vy + dz * vz) / l2[sid]
        np.clip(t, 0, 1, out=t)
        dx -= t * vx
        dy -= t * vy
        dz -= t * vz
        dist = np.sqrt(dx * dx + dy * dy + dz * dz)
        r = ra32[sid] + t * dr32[sid]
        if core is not None:
            rc = r * np.float32(core)
            cc = (rc - dist) / np.float32(width) + np.float32(0.5)
            np.clip(cc, 0, 1, out=cc)
            cc *= np.minimum(np.float32(1), 2 * rc / np.float32(slab.h))
            np.maximum.at(out_core.reshape(-1), idx, cc)
        c = (r - dist) / np.float32(width) + np.float32(0.5)
        np.clip(c, 0, 1, out=c)
        c *= np.minimum(np.float32(1), 2 * r / np.float32(slab.h))
        np.maximum.at(flat, idx, c)
        if labels is not None:
            sel = c > 0.5
            lab_w.reshape(-1)[idx[sel]] = labels[sid[sel]]
    return out, lab_w, out_core


def rotation_from(u1) -> np.ndarray:
    """A rotation matrix whose first column is ``u1`` (the other two complete a right-handed frame)."""
    u1 = unit(u1)
    ref = np.array([0.0, 0.0, 1.0]) if abs(u1[2]) < 0.9 else np.array([1.0, 0.0, 0.0])
    u2 = unit(np.cross(ref, u1))
    u3 = np.cross(u1, u2)
    return np.stack([u1, u2, u3], axis=1)
