"""Benchmark: training samples per second from our stored format vs the released float32 .nii.gz format.

One training sample = a random crop of ``data.crop_size`` (paper preset: 112 x 256 x 352 at 1 x 1 x 3 mm) of
the image and the anatomy mask of one processed volume, image windowed to float32 [0, 1].

- ours: ``image.npy`` int16 HU + ``mask.npy`` uint8, memory-mapped (fvlm.data.store): only the crop's pages
  are read, then windowed.
- released: ``image.nii.gz`` float32 already windowed + ``mask.nii.gz``, as written by the released stage order
  (benchmarks/preprocess.py: whole-volume resampling, unrounded float32 values): the whole volume is
  decompressed (nibabel, as MONAI's LoadImage does), then cropped.

A third variant measures an option that is not the store's format: the mask gzip-compressed and read whole
(``ours_mask_gz``; the image stays a memory-mapped .npy).

Warm: the files are in the page cache (the usual steady state of an epoch over a data set that fits in RAM).
Cold: before each read the files are evicted from the page cache with posix_fadvise(DONTNEED) (no root
needed; a virtual disk may still be cached by the host, hence "cold-ish").

Input: ``--data ROOT`` (a CT-RATE-format root with label maps), or by default ``fvlm synth --size full``
volumes generated into a temporary directory; both formats are produced here from the same volumes.

    python benchmarks/loader.py --volumes 3 --samples 24
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from preprocess import machine, released_order, synth_root  # noqa: E402  (sibling benchmark script)

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("bench.loader")


def evict(paths: list[Path]) -> None:
    """Drop the files' pages from the page cache (best effort, Linux)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def sample_ours(out: Path, split: str, volume: str, start, size, hu_window):
    from fvlm.data import store

    vol = store.open_volume(out, split, volume)
    image, mask = vol.crop(start, size)
    return store.window(image, hu_window)[None], mask


def sample_released(img_path: Path, mask_path: Path, start, size):
    import nibabel as nib

    image = np.asarray(nib.load(str(img_path)).get_fdata(dtype=np.float32))  # (x, y, z), whole volume
    mask = np.asarray(nib.load(str(mask_path)).dataobj)
    sl = tuple(slice(s, s + n) for s, n in zip(start[::-1], size[::-1], strict=True))
    return np.ascontiguousarray(image[sl].transpose(2, 1, 0))[None], np.ascontiguousarray(mask[sl].transpose(2, 1, 0))


def write_mask_gz(out: Path, split: str, volume: str) -> Path:
    """An alternative (not the store's format): the mask as a gzip-compressed .npy, read whole per sample."""
    import io

    from fvlm.data import store
    from fvlm.data.preprocess import _zlib

    buf = io.BytesIO()
    np.save(buf, np.load(store.volume_dir(out, split, volume) / store.MASK), allow_pickle=False)
    comp = _zlib.compressobj(1, wbits=31)
    path = out / "mask_gz" / f"{volume}.npy.gz"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(comp.compress(buf.getvalue()) + comp.flush())
    return path


def sample_ours_mask_gz(out: Path, split: str, volume: str, start, size, hu_window):
    import io

    from fvlm.data import store
    from fvlm.data.preprocess import _zlib

    image = np.load(store.volume_dir(out, split, volume) / store.IMAGE, mmap_mode="r")
    mask = np.load(io.BytesIO(_zlib.decompress((out / "mask_gz" / f"{volume}.npy.gz").read_bytes(), wbits=31)))
    sl = tuple(slice(s, s + n) for s, n in zip(start, size, strict=True))
    return store.window(np.array(image[sl]), hu_window)[None], np.ascontiguousarray(mask[sl])


def real_ct_bytes_per_voxel(tmp: Path, spacing, hu_window) -> dict:
    """Bytes per voxel of the released image format on real CT texture (the TotalSegmentator test CT in
    tests/data, 3 mm, resampled trilinearly to ``spacing`` without rounding, windowed, float32 .nii.gz), next to
    ours (int16 image + uint8 mask, uncompressed: 3 bytes per voxel whatever the content)."""
    import nibabel as nib
    import torch
    import torch.nn.functional as F

    from fvlm.data import store

    src = REPO / "tests" / "data" / "real_ct" / "ct.nii.gz"
    nii = nib.load(str(src))
    hu = torch.from_numpy(np.asarray(nii.dataobj, dtype=np.float32).transpose(2, 1, 0).copy())[None, None]
    scale = tuple(z / t for z, t in zip(nii.header.get_zooms()[::-1], spacing[::-1], strict=True))
    r = F.interpolate(hu, scale_factor=scale, mode="trilinear", recompute_scale_factor=False)[0, 0].numpy()
    w = store.window(r, hu_window)
    path = tmp / "real_ct_released.nii.gz"
    nib.save(nib.Nifti1Image(np.ascontiguousarray(w.transpose(2, 1, 0)), nii.affine), str(path))
    return {"source": "tests/data/real_ct/ct.nii.gz (real CT, 3 mm) resampled to the preset spacing",
            "released_image_bytes_per_voxel": round(path.stat().st_size / w.size, 2),
            "ours_bytes_per_voxel": 3.0, "ours_mask_gz_bytes_per_voxel_about": 2.0}


def dir_mb(paths: list[Path]) -> float:
    return sum(p.stat().st_size for p in paths) / 1e6


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", help="CT-RATE-format root (default: generate with fvlm synth --size full)")
    p.add_argument("--split", default=None)
    p.add_argument("--volumes", type=int, default=3)
    p.add_argument("--samples", type=int, default=24, help="random crops per variant and cache state")
    p.add_argument("--config", default="paper_vitb")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "loader.json"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)

    import nibabel as nib

    from fvlm.anatomy import load_anatomy_table
    from fvlm.config import load_config
    from fvlm.data import preprocess, store

    cfg = load_config(args.config)
    size = tuple(cfg.data.crop_size)
    hu_window = cfg.data.hu_window
    tmp = Path(tempfile.mkdtemp(prefix="fvlm_bench_loader_"))
    try:
        root = Path(args.data) if args.data else synth_root(args.volumes, tmp, args.seed)
        source = str(args.data) if args.data else (f"fvlm synth --size full --train {max(1, (args.volumes + 1) // 2)} "
                                                   f"--valid 0 --seed {args.seed}")
        out = tmp / "processed"
        splits = [args.split] if args.split else ["train", "valid"]
        splits = [s for s in splits if any((root / "dataset" / d).is_dir() for d in (s, f"{s}_fixed"))]
        jobs = [j for j in preprocess.ctrate_jobs(root, splits) if Path(j.label).exists()][: args.volumes]
        table = load_anatomy_table(cfg.data.anatomy_table)
        summary = preprocess.run_preprocess(jobs, out, cfg.data, table)
        if summary.failed:
            raise SystemExit(f"preprocessing failed: {[r.error for r in summary.results if r.error]}")
        vols, released, sizes, shapes = [], {}, [], {}
        for job in jobs:
            s, v = job.split, job.volume
            vol = store.open_volume(out, s, v)
            work = tmp / "released" / v
            work.mkdir(parents=True)
            released_order(job, work, cfg.data, table)
            for f in work.iterdir():
                if f.name not in ("image.nii.gz", "mask.nii.gz"):
                    f.unlink()
            released[v] = (work / "image.nii.gz", work / "mask.nii.gz")
            rel_shape = tuple(int(n) for n in nib.load(str(released[v][0])).shape[::-1])
            for name, shp in (("ours", vol.image.shape), ("released", rel_shape)):
                if any(n < c for n, c in zip(shp, size, strict=True)):
                    raise SystemExit(f"{v}: {name} shape {shp} smaller than the crop {size}")
            ours_files = [store.volume_dir(out, s, v) / f for f in (store.IMAGE, store.MASK, store.META)]
            alt_files = [ours_files[0], ours_files[2], write_mask_gz(out, s, v)]
            sizes.append({"volume": v, "ours_shape_zyx": list(vol.image.shape), "released_shape_zyx": list(rel_shape),
                          "ours_mb": round(dir_mb(ours_files), 1), "released_mb": round(dir_mb(list(released[v])), 1),
                          "ours_mask_gz_mb": round(dir_mb(alt_files), 1)})
            shapes[v] = {"ours": vol.image.shape, "released": rel_shape}
            vols.append((s, v))
        rng = np.random.default_rng(args.seed)
        plan = []  # (split, volume, start in our array, start in the released array)
        for i in range(args.samples):
            s, v = vols[i % len(vols)]
            starts = [tuple(int(rng.integers(0, n - c + 1)) for n, c in zip(shapes[v][k], size, strict=True))
                      for k in ("ours", "released")]
            plan.append((s, v, *starts))

        def run(variant: str, cold: bool) -> list[float]:
            ts = []
            for s, v, start, rel_start in plan:
                files = {"ours": [store.volume_dir(out, s, v) / store.IMAGE, store.volume_dir(out, s, v) / store.MASK],
                         "ours_mask_gz": [store.volume_dir(out, s, v) / store.IMAGE, out / "mask_gz" / f"{v}.npy.gz"],
                         "released": list(released[v])}[variant]
                if cold:
                    evict(files)
                t = time.perf_counter()
                if variant == "ours":
                    image, mask = sample_ours(out, s, v, start, size, hu_window)
                elif variant == "ours_mask_gz":
                    image, mask = sample_ours_mask_gz(out, s, v, start, size, hu_window)
                else:
                    image, mask = sample_released(*released[v], rel_start, size)
                ts.append(time.perf_counter() - t)
                assert image.shape == (1, *size) and image.dtype == np.float32 and mask.shape == size
                assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
            return ts

        results = {}
        for cold in (False, True):
            for variant in ("ours", "ours_mask_gz", "released"):
                if not cold:
                    run(variant, False)  # warm the page cache
                ts = run(variant, cold)
                key = f"{variant}_{'cold' if cold else 'warm'}"
                results[key] = {"s_per_sample_min": round(min(ts), 4), "s_per_sample_median": round(
                    statistics.median(ts), 4), "samples_per_s": round(1 / statistics.median(ts), 1)}
                log.info("%s: %s", key, results[key])
        summary = {
            "speedup_warm": round(results["released_warm"]["s_per_sample_median"]
                                  / results["ours_warm"]["s_per_sample_median"], 1),
            "speedup_cold": round(results["released_cold"]["s_per_sample_median"]
                                  / results["ours_cold"]["s_per_sample_median"], 1),
            "ours_mb_per_volume_median": statistics.median(x["ours_mb"] for x in sizes),
            "released_mb_per_volume_median": statistics.median(x["released_mb"] for x in sizes),
            "option_mask_gz_speedup_warm": round(results["released_warm"]["s_per_sample_median"]
                                                 / results["ours_mask_gz_warm"]["s_per_sample_median"], 1),
            "option_mask_gz_mb_per_volume_median": statistics.median(x["ours_mask_gz_mb"] for x in sizes),
        }
        real = real_ct_bytes_per_voxel(tmp, cfg.data.spacing, hu_window)
        log.info("real CT texture: %s", real)
        result = {"benchmark": "loader", "machine": machine(), "data": source, "crop_size_zyx": list(size),
                  "spacing_xyz": list(cfg.data.spacing), "samples": args.samples, "volumes": sizes,
                  "results": results, "summary": summary, "size_on_real_ct_texture": real,
                  "note": "one process, one thread per read; warm = page cache; cold = files evicted with "
                          "posix_fadvise(DONTNEED) before each sample (a virtual disk may still be cached by the "
                          "host)"}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        log.info("summary: %s", summary)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
