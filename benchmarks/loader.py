"""Benchmark: training samples per second from our stored format vs the released float32 .nii.gz format.

One training sample = a random crop of ``data.crop_size`` (paper preset: 112 x 256 x 352 at 1 x 1 x 3 mm) of
the image and the anatomy mask of one processed volume, image windowed to float32 [0, 1].

Variants, all but ``released`` written by ``fvlm.data.store.write_volume`` and read by ``store.open_volume`` ->
``ProcessedVolume.crop`` -> ``store.window`` (the store reads every format; only the compression differs):

- ``b2nd_lz4`` (the store's format 2, what ``fvlm preprocess`` writes): blosc2 ``.b2nd`` arrays in chunks of 16
  full slices (one-slice blocks), LZ4 (image byte-shuffled); a crop decompresses only the chunks it touches.
- ``b2nd_zstd``: the same layout, image zstd level 1 + shuffle + bytedelta (smaller, slower to decode).
- ``b2nd_lz4_cubes``: LZ4 as ``b2nd_lz4`` but 64 x 64 x 64 chunks (blocks chosen by blosc2): the chunk-shape
  alternative.
- ``npy``: format 1, uncompressed int16 ``image.npy`` + uint8 ``mask.npy``, memory-mapped.
- ``released``: float32 windowed ``image.nii.gz`` + ``mask.nii.gz`` as written by the released stage order
  (benchmarks/preprocess.py: whole-volume resampling, unrounded float32 values): the whole volume is
  decompressed (nibabel, as MONAI's LoadImage does), then cropped.

The variants are timed interleaved (sample by sample, rotating the order) so load from other jobs hits them
alike. Warm: the files are in the page cache (the usual steady state of an epoch over a data set that fits in
RAM). Cold: before each read the files are evicted from the page cache with posix_fadvise(DONTNEED) (no root
needed; a virtual disk may still be cached by the host, hence "cold-ish").

Scenario ``large``: the same volumes processed again with a larger margin (``--large-margin``), so that the
processed volumes exceed the crop and a crop reads part of each array (the synthetic phantoms at the paper
margin fit inside one crop); our variants only, warm.

Size on real CT texture: the real test CT in tests/data resampled to the preset spacing (released: float32
unrounded, windowed; ours: the same values rounded to int16 HU) with its TotalSegmentator map, each variant's
bytes per voxel.

Input: ``--data ROOT`` (a CT-RATE-format root with label maps), or by default ``fvlm synth --size full``
volumes generated into a temporary directory; every format is produced here from the same volumes.

    python benchmarks/loader.py --volumes 3 --samples 24
"""

from __future__ import annotations

import argparse
import dataclasses
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

ZSTD = {"codec": "zstd", "clevel": 1, "filters": ["shuffle", "bytedelta"]}
#: store variants: name -> write_volume keyword arguments (None = format 1 .npy)
STORE_VARIANTS: dict[str, dict | None] = {
    "b2nd_lz4": {},
    "b2nd_zstd": {"codecs": {"image": ZSTD}},
    "b2nd_lz4_cubes": {"chunks": (64, 64, 64)},
    "npy": None,
}


def evict(paths: list[Path]) -> None:
    """Drop the files' pages from the page cache (best effort, Linux)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def write_format1(out: Path, split: str, volume: str, image: np.ndarray, mask: np.ndarray, meta: dict) -> Path:
    """A format-1 volume directory (plain .npy arrays), as fvlm wrote before format 2."""
    from fvlm.data import store

    d = store.volume_dir(out, split, volume)
    d.mkdir(parents=True, exist_ok=True)
    np.save(d / store.IMAGE_V1, image, allow_pickle=False)
    np.save(d / store.MASK_V1, mask, allow_pickle=False)
    meta = {k: v for k, v in meta.items() if k != "storage"}
    meta.update(format=1, shape=list(image.shape), image_dtype="int16", mask_dtype="uint8")
    (d / store.META).write_text(json.dumps(meta) + "\n")
    return d


def write_variant(name: str, out: Path, split: str, volume: str, image, mask, meta) -> Path:
    from fvlm.data import store

    kw = STORE_VARIANTS[name]
    if kw is None:
        return write_format1(out, split, volume, image, mask, meta)
    return store.write_volume(out, split, volume, image, mask, meta, **kw)


def volume_files(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.is_file())


def sample_store(out: Path, split: str, volume: str, start, size, hu_window):
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


def real_ct_bytes_per_voxel(tmp: Path, spacing, hu_window, table) -> dict:
    """Bytes per voxel of every format on real CT texture: the TotalSegmentator test CT in tests/data (3 mm),
    resampled trilinearly to ``spacing`` (label map: nearest), no crop or padding. Released: windowed float32
    image (unrounded) + uint8 mask .nii.gz; ours: the same image rounded to int16 HU + the mask, per variant."""
    import nibabel as nib
    import torch
    import torch.nn.functional as F

    from fvlm.data import store

    src = REPO / "tests" / "data" / "real_ct"
    nii = nib.load(str(src / "ct.nii.gz"))
    hu = torch.from_numpy(np.asarray(nii.dataobj, dtype=np.float32).transpose(2, 1, 0).copy())[None, None]
    scale = tuple(z / t for z, t in zip(nii.header.get_zooms()[::-1], spacing[::-1], strict=True))
    r = F.interpolate(hu, scale_factor=scale, mode="trilinear", recompute_scale_factor=False)[0, 0].numpy()
    label = np.asarray(nib.load(str(src / "totalseg_v2.nii.gz")).dataobj).astype(np.uint8).transpose(2, 1, 0)
    lab = torch.from_numpy(table.lut[label].astype(np.float32))[None, None]
    mask = F.interpolate(lab, size=r.shape, mode="nearest")[0, 0].numpy().astype(np.uint8)
    w = store.window(r, hu_window)
    rel_img, rel_mask = tmp / "real_ct_released_image.nii.gz", tmp / "real_ct_released_mask.nii.gz"
    nib.save(nib.Nifti1Image(np.ascontiguousarray(w.transpose(2, 1, 0)), nii.affine), str(rel_img))
    nib.save(nib.Nifti1Image(np.ascontiguousarray(mask.transpose(2, 1, 0)), nii.affine), str(rel_mask))
    n = w.size
    res = {"source": "tests/data/real_ct (real CT, 3 mm, + TotalSegmentator v2 map) resampled to the preset spacing, "
                     "whole volume (no crop or padding)",
           "shape_zyx": list(r.shape),
           "released": {"image": round(rel_img.stat().st_size / n, 3), "mask": round(rel_mask.stat().st_size / n, 4)}}
    image = np.clip(np.rint(r), hu_window[0], hu_window[1]).astype(np.int16)
    for name in STORE_VARIANTS:
        d = write_variant(name, tmp / "real" / name, "valid", "real_ct", image, mask, {"volume": "real_ct"})
        arrays = [p for p in volume_files(d) if p.name != store.META]
        res[name] = {p.name.split(".")[0]: round(p.stat().st_size / n, 4 if "mask" in p.name else 3) for p in arrays}
    for v in res.values():
        if isinstance(v, dict):
            v["total"] = round(v["image"] + v["mask"], 3)
    return res


def time_variants(variants: dict, plan: list, size, hu_window, cold: bool, check: bool = True) -> dict[str, list]:
    """Interleaved timing: for each planned sample, every variant once (order rotated per sample).

    ``variants``: name -> (read function (split, volume, start) -> (image, mask), files function (split, volume)).
    """
    names = list(variants)
    ts: dict[str, list[float]] = {n: [] for n in names}
    for i, (s, v, starts) in enumerate(plan):
        for name in names[i % len(names):] + names[: i % len(names)]:
            read, files = variants[name]
            if cold:
                evict(files(s, v))
            t = time.perf_counter()
            image, mask = read(s, v, starts[name])
            ts[name].append(time.perf_counter() - t)
            if check:
                assert image.shape == (1, *size) and image.dtype == np.float32 and mask.shape == tuple(size)
                assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    return ts


def summarise(ts: list[float]) -> dict:
    med = statistics.median(ts)
    return {"s_per_sample_min": round(min(ts), 4), "s_per_sample_median": round(med, 4),
            "samples_per_s": round(1 / med, 1)}


def make_plan(vols, shapes, size, n, rng) -> list:
    plan = []
    for i in range(n):
        s, v = vols[i % len(vols)]
        plan.append((s, v, {k: tuple(int(rng.integers(0, a - c + 1)) for a, c in zip(shp, size, strict=True))
                            for k, shp in shapes[v].items()}))
    return plan


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", help="CT-RATE-format root (default: generate with fvlm synth --size full)")
    p.add_argument("--split", default=None)
    p.add_argument("--volumes", type=int, default=3)
    p.add_argument("--samples", type=int, default=24, help="random crops per variant and cache state")
    p.add_argument("--config", default="paper_vitb")
    p.add_argument("--large-margin", type=int, nargs=3, default=[12, 80, 80], metavar=("Z", "Y", "X"),
                   help="data.margin (target voxels) of the 'large' scenario")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "loader.json"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)

    import nibabel as nib

    from fvlm.anatomy import load_anatomy_table
    from fvlm.config import load_config
    from fvlm.data import b2nd, joblist, preprocess, store

    cfg = load_config(args.config)
    size = tuple(cfg.data.crop_size)
    hu_window = cfg.data.hu_window
    mach = machine()
    tmp = Path(tempfile.mkdtemp(prefix="fvlm_bench_loader_"))
    try:
        root = Path(args.data) if args.data else synth_root(args.volumes, tmp, args.seed)
        source = str(args.data) if args.data else (f"fvlm synth --size full --train {max(1, (args.volumes + 1) // 2)} "
                                                   f"--valid 0 --seed {args.seed}")
        splits = [args.split] if args.split else ["train", "valid"]
        splits = [s for s in splits if any((root / "dataset" / d).is_dir() for d in (s, f"{s}_fixed"))]
        jobs = [j for j in joblist.ctrate_jobs(root, splits) if Path(j.label).exists()][: args.volumes]
        table = load_anatomy_table(cfg.data.anatomy_table)
        large_cfg = dataclasses.replace(cfg.data, margin=tuple(args.large_margin))
        scen = {"paper": (tmp / "processed", cfg.data), "large": (tmp / "processed_large", large_cfg)}
        for out, data_cfg in scen.values():
            summary = preprocess.run_preprocess(jobs, out, data_cfg, table)
            if summary.failed:
                raise SystemExit(f"preprocessing failed: {[r.error for r in summary.results if r.error]}")

        # every variant of every volume, written from the stored arrays; write time per volume
        roots = {sc: {n: tmp / f"{sc}_{n}" for n in STORE_VARIANTS} for sc in scen}
        sizes, write_s = [], {n: [] for n in STORE_VARIANTS}
        shapes = {sc: {} for sc in scen}
        released = {}
        for job in jobs:
            s, v = job.split, job.volume
            for sc, (out, _) in scen.items():
                vol = store.open_volume(out, s, v, mmap=False)
                row = {"scenario": sc, "volume": v, "shape_zyx": list(vol.image.shape)}
                for name in STORE_VARIANTS:
                    t = time.perf_counter()
                    d = write_variant(name, roots[sc][name], s, v, vol.image, vol.mask, vol.meta)
                    if sc == "paper":
                        write_s[name].append(time.perf_counter() - t)
                    row[f"{name}_mb"] = round(sum(f.stat().st_size for f in volume_files(d)) / 1e6, 2)
                shapes[sc][v] = {name: vol.image.shape for name in STORE_VARIANTS}
                if any(n < c for n, c in zip(vol.image.shape, size, strict=True)):
                    raise SystemExit(f"{v}: {sc} shape {vol.image.shape} smaller than the crop {size}")
                if sc == "paper":
                    work = tmp / "released" / v
                    work.mkdir(parents=True)
                    released_order(job, work, cfg.data, table)
                    for f in work.iterdir():
                        if f.name not in ("image.nii.gz", "mask.nii.gz"):
                            f.unlink()
                    released[v] = (work / "image.nii.gz", work / "mask.nii.gz")
                    rel_shape = tuple(int(n) for n in nib.load(str(released[v][0])).shape[::-1])
                    if any(n < c for n, c in zip(rel_shape, size, strict=True)):
                        raise SystemExit(f"{v}: released shape {rel_shape} smaller than the crop {size}")
                    shapes[sc][v]["released"] = rel_shape
                    row["released_shape_zyx"] = list(rel_shape)
                    row["released_mb"] = round(sum(f.stat().st_size for f in released[v]) / 1e6, 2)
                sizes.append(row)
                log.info("sizes: %s", row)

        def store_variant(sc: str, name: str):
            r = roots[sc][name]
            return (lambda s, v, st: sample_store(r, s, v, st, size, hu_window),
                    lambda s, v: [f for f in volume_files(store.volume_dir(r, s, v)) if f.name != store.META])

        rng = np.random.default_rng(args.seed)
        vols = [(j.split, j.volume) for j in jobs]
        results: dict[str, dict] = {}
        for sc in scen:
            variants = {name: store_variant(sc, name) for name in STORE_VARIANTS}
            if sc == "paper":
                variants["released"] = (lambda s, v, st: sample_released(*released[v], st, size),
                                        lambda s, v: list(released[v]))
            plan = make_plan(vols, shapes[sc], size, args.samples, rng)
            for cold in ((False, True) if sc == "paper" else (False,)):
                if not cold:
                    time_variants(variants, plan[: len(vols)], size, hu_window, False)  # page cache, imports
                ts = time_variants(variants, plan, size, hu_window, cold)
                for name, t in ts.items():
                    key = f"{sc}/{name}/{'cold' if cold else 'warm'}"
                    results[key] = summarise(t)
                    log.info("%s: %s", key, results[key])

        def med(key):
            return results[key]["s_per_sample_median"]

        def mb(sc, name):
            return statistics.median(x[f"{name}_mb"] for x in sizes if x["scenario"] == sc)

        real = real_ct_bytes_per_voxel(tmp, cfg.data.spacing, hu_window, table)
        log.info("real CT texture: %s", real)
        summary = {"paper": {}, "large": {}}
        for name in [*STORE_VARIANTS, "released"]:
            row = {"mb_per_volume_median": mb("paper", name),
                   "real_ct_bytes_per_voxel": real[name]["total"] if name in real else None}
            for c in ("warm", "cold"):
                row[f"speedup_{c}"] = round(med(f"paper/released/{c}") / med(f"paper/{name}/{c}"), 1)
            summary["paper"][name] = row
        for name in STORE_VARIANTS:
            summary["large"][name] = {"mb_per_volume_median": mb("large", name),
                                      "vs_npy_warm": round(med(f"large/{name}/warm") / med("large/npy/warm"), 2)}
        ours = summary["paper"]["b2nd_lz4"]
        summary["goal_met"] = {
            "speed_warm_>=5x": ours["speedup_warm"] >= 5,
            "size_<=released_synthetic": ours["mb_per_volume_median"] <= summary["paper"]["released"][
                "mb_per_volume_median"],
            "size_<=released_real_ct": real["b2nd_lz4"]["total"] <= real["released"]["total"]}
        summary["write_s_per_volume_median"] = {n: round(statistics.median(t), 3) for n, t in write_s.items()}
        result = {"benchmark": "loader", "machine": mach, "data": source, "crop_size_zyx": list(size),
                  "spacing_xyz": list(cfg.data.spacing), "margin_zyx": {"paper": list(cfg.data.margin),
                                                                        "large": list(args.large_margin)},
                  "samples": args.samples, "store_format_version": store.FORMAT_VERSION,
                  "store_codecs": store.CODECS, "store_chunk_slices": b2nd.CHUNK_SLICES, "variants": {
                      "b2nd_lz4": "store format 2 (default)", "b2nd_zstd": f"format 2, image {ZSTD}",
                      "b2nd_lz4_cubes": "format 2, 64^3 chunks", "npy": "format 1 (uncompressed .npy, memmap)",
                      "released": "float32 windowed .nii.gz + mask .nii.gz, read whole (nibabel)"},
                  "volumes": sizes, "results": results, "summary": summary, "size_on_real_ct_texture": real,
                  "note": "one process, one thread per read; variants interleaved sample by sample; warm = page "
                          "cache; cold = files evicted with posix_fadvise(DONTNEED) before each sample (a virtual "
                          "disk may still be cached by the host)"}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        log.info("summary: %s", json.dumps(summary))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
