"""Benchmark: our fused preprocessing pass vs the released stage order, on full-size CT-RATE-format volumes.

Ours (fvlm.data.preprocess.process_volume, one volume at a time, one process):
    read .nii.gz -> fix v1 in memory -> check/merge label -> crop -> resample the crop -> window -> pad
    -> store (blosc2 .b2nd)
Baseline (the released stage order; every stage writes a file the next one reads), written lean (int16 and
float32 arrays, never float64) so that the ratio is conservative:
    fix (nibabel read, rescale, SimpleITK image with metadata geometry) -> write .nii.gz -> read ->
    merge + resample the WHOLE volume (MONAI Spacing, bilinear / nearest) -> write .nii.gz -> read ->
    crop / window to [0, 1] / pad -> write float32 .nii.gz (+ mask .nii.gz)
Segmentation (TotalSegmentator) is excluded from both: the label maps are given.

Input: ``--data ROOT`` (a CT-RATE-format root with label maps), or by default ``fvlm synth --size full`` volumes
generated into a temporary directory. Also times reading one input .nii.gz with SimpleITK, nibabel and our
CRC-checked reader. Writes benchmarks/results/preprocess.json (min and median of ``--repeats`` runs).

    python benchmarks/preprocess.py --volumes 3 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from machine import machine as describe_machine  # noqa: E402  (sibling module of the benchmarks)

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("bench.preprocess")


def machine() -> dict:
    import SimpleITK as sitk

    try:
        import isal

        isal_version = isal.__version__
    except ImportError:
        isal_version = None
    return describe_machine(numpy=np.__version__, SimpleITK=sitk.Version_VersionString(), isal=isal_version)


def stats(xs: list[float]) -> dict:
    return {"min": round(min(xs), 3), "median": round(statistics.median(xs), 3), "runs": [round(x, 3) for x in xs]}


# ------------------------------------------------------------------------------------------- baseline
def released_order(job, work: Path, data_cfg, table) -> float:
    """The released stage order with files between stages; returns seconds (segmentation excluded)."""
    import nibabel as nib
    import SimpleITK as sitk
    import torch
    from monai.data import MetaTensor
    from monai.transforms import Spacing

    from fvlm.data import ctrate
    from fvlm.data.preprocess import geometry_from_affine

    t0 = time.perf_counter()
    # 1. fix (v1 only: a v2 volume is already HU): voxel array as stored, geometry and rescale from the
    #    metadata, int16, written as .nii.gz
    md = job.metadata
    nii = nib.load(job.image)
    stored = np.asarray(nii.dataobj).transpose(2, 1, 0)  # as stored (int16), not get_fdata's float64: a lean baseline
    header = geometry_from_affine(nii.affine)
    v1 = ctrate.detect_version(header, ctrate.value_statistics(stored), md).version == "v1"
    hu = ctrate.rescale(stored, md.slope, md.intercept) if v1 else stored.astype(np.int16)
    img = sitk.GetImageFromArray(hu)
    geo = md.fix_geometry() if v1 else header
    img.SetSpacing(geo.spacing)
    img.SetOrigin(geo.origin)
    img.SetDirection(geo.direction)
    fixed = work / "fixed.nii.gz"
    sitk.WriteImage(img, str(fixed), useCompression=True)
    del stored, hu, img
    # 2. merge labels + resample the whole volume to data.spacing (MONAI), written as .nii.gz
    image_nii = nib.load(str(fixed))
    label_nii = nib.load(job.label)
    image = MetaTensor(torch.from_numpy(np.asarray(image_nii.get_fdata(dtype=np.float32)))[None],
                       affine=torch.from_numpy(image_nii.affine))
    merged = table.lut[np.asarray(label_nii.dataobj).astype(np.uint8)]
    mask = MetaTensor(torch.from_numpy(merged.astype(np.float32))[None], affine=torch.from_numpy(label_nii.affine))
    image_r = Spacing(pixdim=data_cfg.spacing, mode="bilinear", dtype=np.float32)(image)
    mask_r = Spacing(pixdim=data_cfg.spacing, mode="nearest", dtype=np.float32)(mask)
    nib.save(nib.Nifti1Image(image_r[0].numpy(), image_r.affine.numpy()), str(work / "resampled.nii.gz"))
    nib.save(nib.Nifti1Image(mask_r[0].numpy().astype(np.uint8), mask_r.affine.numpy()), str(work / "mask_r.nii.gz"))
    del image, mask, image_r, mask_r, merged
    # 3. crop to the anatomies' box + margin, window to [0, 1], pad, written as float32 .nii.gz
    im = nib.load(str(work / "resampled.nii.gz"))
    mk = nib.load(str(work / "mask_r.nii.gz"))
    a = np.asarray(im.get_fdata(dtype=np.float32))  # (x, y, z)
    m = np.asarray(mk.dataobj)
    nz = np.nonzero(m)
    margin_xyz = data_cfg.margin[::-1]
    sl = tuple(slice(max(0, int(c.min()) - g), min(n, int(c.max()) + 1 + g)) for c, g, n in
               zip(nz, margin_xyz, a.shape, strict=True))
    low, high = data_cfg.hu_window
    a = np.clip((a[sl] - low) / (high - low), 0, 1).astype(np.float32)
    m = m[sl]
    need = [max(0, c - n) for c, n in zip(data_cfg.crop_size[::-1], a.shape, strict=True)]
    pad = [(k // 2, k - k // 2) for k in need]
    a = np.pad(a, pad)
    m = np.pad(m, pad)
    nib.save(nib.Nifti1Image(a, im.affine), str(work / "image.nii.gz"))
    nib.save(nib.Nifti1Image(m, mk.affine), str(work / "mask.nii.gz"))
    return time.perf_counter() - t0


# ------------------------------------------------------------------------------------------- inputs
def synth_root(n_volumes: int, tmp: Path, seed: int) -> Path:
    from fvlm.synth import synthesize

    root = tmp / "ctrate_full"
    # a patient has 1-3 reconstructions: (n + 1) // 2 patients give at least n volumes in practice
    synthesize(str(root), n_train=max(1, (n_volumes + 1) // 2), n_valid=0, seed=seed, size="full", v2=False,
               anatomy_table="released", workers=1)
    return root


def pick_jobs(root: Path, n: int, split: str | None):
    from fvlm.data import preprocess

    splits = [split] if split else ["train", "valid"]
    splits = [s for s in splits if (root / "dataset" / s).is_dir() or (root / "dataset" / f"{s}_fixed").is_dir()]
    jobs = [j for j in preprocess.ctrate_jobs(root, splits) if Path(j.label).exists() and j.metadata is not None]
    if len(jobs) < n:
        log.warning("only %d usable volumes in %s", len(jobs), root)
    return jobs[:n]


def time_reads(path: str, repeats: int) -> dict:
    import nibabel as nib
    import SimpleITK as sitk

    from fvlm.data.preprocess import read_nifti

    out = {}
    for name, fn in (("simpleitk", lambda: sitk.GetArrayViewFromImage(sitk.ReadImage(path)).shape),
                     ("nibabel", lambda: np.asarray(nib.load(path).dataobj).shape),
                     ("fvlm_read_nifti", lambda: read_nifti(path).array.shape)):
        ts = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        out[name] = stats(ts)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", help="CT-RATE-format root with label maps (default: generate with fvlm synth --size full)")
    p.add_argument("--split", default=None)
    p.add_argument("--volumes", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--config", default="paper_vitb", help="config preset whose data section is used")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-baseline", action="store_true")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "preprocess.json"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)

    import torch

    from fvlm.anatomy import load_anatomy_table
    from fvlm.config import load_config
    from fvlm.data import preprocess

    cfg = load_config(args.config)
    table = load_anatomy_table(cfg.data.anatomy_table)
    tmp = Path(tempfile.mkdtemp(prefix="fvlm_bench_pre_"))
    try:
        t = time.perf_counter()
        root = Path(args.data) if args.data else synth_root(args.volumes, tmp, args.seed)
        gen_s = time.perf_counter() - t
        jobs = pick_jobs(root, args.volumes, args.split)
        if not jobs:
            raise SystemExit(f"no volumes with label maps and metadata in {root}")
        import monai  # noqa: F401  (import cost, 3-5 s, excluded from the baseline's timings)

        volumes = []
        ours_all, base_all = [], []
        for job in jobs:
            info = {"volume": job.volume, "input_mb": round(Path(job.image).stat().st_size / 1e6, 1)}
            ours, base = [], []
            for r in range(args.repeats):
                out = tmp / f"ours_{r}"
                res = preprocess.process_volume(job, out, cfg.data, table)
                if res.status != "ok":
                    raise SystemExit(f"{job.volume}: {res.error}")
                ours.append(res.seconds)
                meta = json.loads((out / job.split / job.volume / "meta.json").read_text())
                shutil.rmtree(out)
                if not args.skip_baseline:
                    work = tmp / "baseline"
                    work.mkdir(exist_ok=True)
                    base.append(released_order(job, work, cfg.data, table))
                    shutil.rmtree(work)
                log.info("%s repeat %d: ours %.2f s%s", job.volume, r, ours[-1],
                         f", released order {base[-1]:.2f} s" if base else "")
            info["source_shape_zyx"] = meta["source"]["shape"]
            info["source_spacing_xyz"] = meta["source"]["spacing"]
            info["version"] = meta["source"]["version"]
            info["output_shape_zyx"] = meta["shape"]
            info["ours_s"] = stats(ours)
            if base:
                info["released_order_s"] = stats(base)
                info["speedup_median"] = round(statistics.median(base) / statistics.median(ours), 2)
            info["read_input_s"] = time_reads(job.image, args.repeats)
            volumes.append(info)
            ours_all.append(statistics.median(ours))
            if base:
                base_all.append(statistics.median(base))
        summary = {"ours_s_per_volume_median": round(statistics.median(ours_all), 3),
                   "ours_volumes_per_minute": round(60 / statistics.median(ours_all), 1)}
        if base_all:
            summary.update({"released_order_s_per_volume_median": round(statistics.median(base_all), 3),
                            "released_order_volumes_per_minute": round(60 / statistics.median(base_all), 1),
                            "speedup": round(statistics.median(base_all) / statistics.median(ours_all), 2)})
        n_patients = max(1, (args.volumes + 1) // 2)
        result = {
            "benchmark": "preprocess", "machine": machine(),
            "data": str(args.data) if args.data else (f"fvlm synth --size full --train {n_patients} --valid 0 "
                                                      f"--seed {args.seed} (generated in {gen_s:.0f} s)"),
            "data_config": {k: list(v) if isinstance(v, tuple) else v for k, v in vars(cfg.data).items()},
            "torch_threads": torch.get_num_threads(), "repeats": args.repeats,
            "volumes": volumes, "summary": summary,
            "note": "per-volume wall time in one process; warm page cache (inputs were just written or read)",
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        log.info("summary: %s", summary)
        log.info("wrote %s", args.out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
