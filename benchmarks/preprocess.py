"""Benchmark: our fused preprocessing pass vs the released stage order, on full-size CT-RATE-format volumes.

Ours (fvlm.data.preprocess.process_volume, one volume at a time, one process):
    read .nii.gz -> fix v1 in memory -> check/merge label -> crop -> resample the crop -> window -> pad
    -> store (blosc2 .b2nd); timed as a whole, store write included.
Baseline = the released stage order with the release's own library calls (the authors' data/fix_data.py,
data/resize.py, data/preprocess.py; every stage writes a file the next one reads):
    fix: SimpleITK read, metadata geometry, image * slope + intercept, cast int16 -> write .nii.gz;
    merge: SimpleITK read of the label map, one comparison per merged class id -> write .nii.gz;
    resize: MONAI LoadImaged, Resized (plain trilinear / nearest interpolation of the whole volume to
    int(n * spacing / target) voxels) -> SaveImaged;
    crop/window/pad: LoadImaged, Transposed, ScaleIntensityRanged to [0, 1], crop to the anatomies' box
    + margin, label-set check, SpatialPadd -> SaveImaged (image and mask).
Both sides report seconds per stage (read / fix / merge / resample / window = crop + window + pad + checks /
write), so each part of the speedup can be credited to what causes it.
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
class Stages:
    """Seconds per stage (read / fix / merge / resample / window / write / other), accumulated."""

    NAMES = ("read", "fix", "merge", "resample", "window", "write")

    def __init__(self):
        self.t = dict.fromkeys(self.NAMES, 0.0)
        self._last = time.perf_counter()

    def mark(self, stage: str) -> None:
        """Charge the time since the previous mark to ``stage``."""
        now = time.perf_counter()
        self.t[stage] += now - self._last
        self._last = now


def released_order(job, work: Path, data_cfg, table) -> tuple[float, dict[str, float]]:
    """The released stage order (data/fix_data.py, data/resize.py, data/preprocess.py of the authors' release),
    with the same library calls, a file between stages; returns (seconds, seconds per stage).

    fix: SimpleITK read, spacing / origin / direction from the metadata, ``image * slope + intercept``, cast to
    int16, write .nii.gz. resize: SimpleITK read of the label map, merge the anatomies' class ids (one comparison
    per id), write; MONAI ``LoadImaged`` of image and merged mask, ``Resized`` to ``int(n * spacing / target)``
    voxels (trilinear / nearest: plain interpolation on the voxel grid, no resampling in physical space),
    ``SaveImaged``. preprocess: ``LoadImaged``, ``Transposed`` (0, 3, 2, 1), ``ScaleIntensityRanged`` to [0, 1],
    crop to the anatomies' box + margin, the label-set check, ``SpatialPadd`` to the crop size, ``SaveImaged``.
    Segmentation is excluded (the label map is given).
    """
    import SimpleITK as sitk
    import torch
    from monai import transforms

    md = job.metadata
    st = Stages()
    # 1. fix (release: data/fix_data.py)
    image = sitk.ReadImage(job.image)
    st.mark("read")
    geo = md.fix_geometry()
    image.SetSpacing(geo.spacing)
    image.SetOrigin(geo.origin)
    image.SetDirection(geo.direction)
    fixed = sitk.Cast(image * md.slope + md.intercept, sitk.sitkInt16)
    del image
    st.mark("fix")
    fixed_path = work / "fixed" / "vol.nii.gz"
    fixed_path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(fixed, str(fixed_path))
    del fixed
    st.mark("write")
    # 2. merge + resize (release: data/resize.py)
    mask_img = sitk.ReadImage(job.label)
    mask = sitk.GetArrayFromImage(mask_img)
    st.mark("read")
    fused = np.zeros_like(mask)
    for k, anatomy in enumerate(table.anatomies):
        for class_id in anatomy.class_ids:
            fused[mask == class_id] = k + 1
    fused_img = sitk.GetImageFromArray(fused)
    fused_img.CopyInformation(mask_img)
    del mask, fused
    st.mark("merge")
    merged_path = work / "merged" / "vol.nii.gz"
    merged_path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(fused_img, str(merged_path))
    del fused_img, mask_img
    st.mark("write")
    res = transforms.LoadImaged(keys=["image", "label"], image_only=False, ensure_channel_first=True)(
        {"image": str(fixed_path), "label": str(merged_path)})
    st.mark("read")
    affine = res["image_meta_dict"]["affine"]
    spacing = (abs(affine[0, 0].item()), abs(affine[1, 1].item()), abs(affine[2, 2].item()))
    _, h, w, d = res["image"].shape
    ref = tuple(float(x) for x in data_cfg.spacing)
    scale = [spacing[i] / ref[i] for i in range(3)]
    target = [int(h * scale[1]), int(w * scale[0]), int(d * scale[2])]  # as released (x and y spacing equal)
    res = transforms.Resized(spatial_size=target, keys=["image"], mode="trilinear")(res)
    res = transforms.Resized(spatial_size=target, keys=["label"], mode="nearest")(res)
    st.mark("resample")
    for key, sub in (("image", "resized_images"), ("label", "resized_masks")):
        transforms.SaveImaged(keys=[key], output_dir=str(work / sub), output_postfix="", separate_folder=False,
                              resample=False, print_log=False)(res)
    del res
    st.mark("write")
    # 3. crop / window / pad (release: data/preprocess.py)
    resized_img = next((work / "resized_images").glob("*.nii.gz"))
    resized_msk = next((work / "resized_masks").glob("*.nii.gz"))
    data = transforms.LoadImaged(keys=["image", "label"], image_only=True, ensure_channel_first=True)(
        {"image": str(resized_img), "label": str(resized_msk)})
    st.mark("read")
    data = transforms.Transposed(keys=["image", "label"], indices=(0, 3, 2, 1))(data)
    low, high = data_cfg.hu_window
    data = transforms.ScaleIntensityRanged(keys=["image"], a_min=low, a_max=high, b_min=0.0, b_max=1.0,
                                           clip=True)(data)
    image, label = data["image"], data["label"]
    before = label.unique()
    coords = np.nonzero(np.asarray(label[0]))
    lo = torch.from_numpy(np.min(coords, axis=1))
    hi = torch.from_numpy(np.max(coords, axis=1))
    ext = torch.tensor(list(data_cfg.margin))
    lo = torch.maximum(lo - ext, torch.zeros(3, dtype=lo.dtype))
    hi = torch.minimum(hi + ext, torch.tensor(image.shape[1:]))
    data["image"] = image[:, lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    data["label"] = label[:, lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    assert torch.all(before == data["label"].unique())
    for key in ("image", "label"):
        data = transforms.SpatialPadd(keys=[key], spatial_size=tuple(data_cfg.crop_size), mode="constant",
                                      constant_values=0)(data)
    st.mark("window")
    for key, sub in (("image", "processed_images"), ("label", "processed_masks")):
        transforms.SaveImaged(keys=[key], output_dir=str(work / sub), output_postfix="", separate_folder=False,
                              resample=False, print_log=False)(data)
    st.mark("write")
    return sum(st.t.values()), {k: round(v, 3) for k, v in st.t.items()}


def ours_with_stages(job, out: Path, data_cfg, table):
    """Our pass (``process_volume``) with its own functions timed: read (read_nifti), fix (version detection),
    merge (anatomies' box from the label map), resample (_resample), write (store.write_volume); the rest of
    the in-memory pass (crop, merge look-up, window, pad, checks) is ``window``."""
    from fvlm.data import prepare, store, v1fix
    from fvlm.data import preprocess as pre

    acc = dict.fromkeys(Stages.NAMES, 0.0)
    patches = [(pre, "read_nifti", "read"), (v1fix, "value_statistics", "fix"), (v1fix, "detect_version", "fix"),
               (prepare, "class_bounding_box", "merge"), (prepare, "_resample", "resample"),
               (store, "write_volume", "write")]
    saved = []
    for mod, name, stage in patches:
        fn = getattr(mod, name)
        saved.append((mod, name, fn))

        def timed(*a, _fn=fn, _stage=stage, **k):
            t = time.perf_counter()
            try:
                return _fn(*a, **k)
            finally:
                acc[_stage] += time.perf_counter() - t

        setattr(mod, name, timed)
    try:
        t0 = time.perf_counter()
        res = pre.process_volume(job, out, data_cfg, table)
        total = time.perf_counter() - t0  # includes the store write (res.seconds does not)
    finally:
        for mod, name, fn in saved:
            setattr(mod, name, fn)
    acc["window"] = total - sum(acc.values())
    return res, total, {k: round(v, 3) for k, v in acc.items()}


# ------------------------------------------------------------------------------------------- inputs
def synth_root(n_volumes: int, tmp: Path, seed: int) -> Path:
    from fvlm.synth import synthesize

    root = tmp / "ctrate_full"
    # a patient has 1-3 reconstructions: (n + 1) // 2 patients give at least n volumes in practice
    synthesize(str(root), n_train=max(1, (n_volumes + 1) // 2), n_valid=0, seed=seed, size="full", v2=False,
               anatomy_table="released", workers=1)
    return root


def pick_jobs(root: Path, n: int, split: str | None):
    from fvlm.data import joblist

    splits = [split] if split else ["train", "valid"]
    splits = [s for s in splits if (root / "dataset" / s).is_dir() or (root / "dataset" / f"{s}_fixed").is_dir()]
    jobs = [j for j in joblist.ctrate_jobs(root, splits) if Path(j.label).exists() and j.metadata is not None]
    if len(jobs) < n:
        log.warning("only %d usable volumes in %s", len(jobs), root)
    return jobs[:n]


def time_reads(path: str, repeats: int) -> dict:
    import nibabel as nib
    import SimpleITK as sitk

    from fvlm.data.volume import read_nifti

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

        # warm-up, untimed: first-call costs (lazy imports, codec set-up) are paid by neither side's numbers
        ours_with_stages(jobs[0], tmp / "warm", cfg.data, table)
        if not args.skip_baseline:
            (tmp / "warm_base").mkdir()
            released_order(jobs[0], tmp / "warm_base", cfg.data, table)
        shutil.rmtree(tmp / "warm", ignore_errors=True)
        shutil.rmtree(tmp / "warm_base", ignore_errors=True)
        volumes = []
        ours_all, base_all = [], []
        for job in jobs:
            info = {"volume": job.volume, "input_mb": round(Path(job.image).stat().st_size / 1e6, 1)}
            ours, base, ours_st, base_st = [], [], [], []
            for r in range(args.repeats):
                out = tmp / f"ours_{r}"
                res, seconds, st = ours_with_stages(job, out, cfg.data, table)
                if res.status != "ok":
                    raise SystemExit(f"{job.volume}: {res.error}")
                ours.append(seconds)
                ours_st.append(st)
                meta = json.loads((out / job.split / job.volume / "meta.json").read_text())
                shutil.rmtree(out)
                if not args.skip_baseline:
                    work = tmp / "baseline"
                    work.mkdir(exist_ok=True)
                    seconds, st = released_order(job, work, cfg.data, table)
                    base.append(seconds)
                    base_st.append(st)
                    shutil.rmtree(work)
                log.info("%s repeat %d: ours %.2f s%s", job.volume, r, ours[-1],
                         f", released order {base[-1]:.2f} s" if base else "")
            info["source_shape_zyx"] = meta["source"]["shape"]
            info["source_spacing_xyz"] = meta["source"]["spacing"]
            info["version"] = meta["source"]["version"]
            info["output_shape_zyx"] = meta["shape"]
            info["ours_s"] = stats(ours)
            info["ours_stages_s_median"] = {k: round(statistics.median(x[k] for x in ours_st), 3) for k in Stages.NAMES}
            if base:
                info["released_order_s"] = stats(base)
                info["released_order_stages_s_median"] = {k: round(statistics.median(x[k] for x in base_st), 3)
                                                          for k in Stages.NAMES}
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
