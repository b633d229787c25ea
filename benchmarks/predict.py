"""Benchmark: seconds per scan for ``fvlm predict`` (segmentation excluded: the label map is given).

Input: one full-size synthetic chest CT (``generate_case(0, size="full", shape=(300, 512, 512))``: 512 x 512 x 300
at 0.7 x 0.7 x 1.0 mm, int16 HU) and its TotalSegmentator-format label map, written as .nii.gz. Model: the paper
preset's dimensions (ViT-B 3D, patch 16 x 16 x 32, eval crop 112 x 288 x 352; a BERT-base-sized text encoder:
CXR-BERT when its directory exists, else randomly initialised with the same size). Random weights: only time
matters here.

Two variants, interleaved, on the same files in the same run, broken into read / preprocess / encode / score:

- **ours**: ``fvlm.predict.Predictor.predict`` (CRC-checked NIfTI reader, the fused in-memory preprocessing pass
  that crops before resampling, anatomy crops with identical windows encoded once, batched; prompt text
  features encoded once per loaded model);
- **baseline** (straightforward): SimpleITK reads scan and label map, reorients them (``DICOMOrient``), resamples
  the *whole* volume to 1 x 1 x 3 mm, merges, crops, windows and pads, then encodes one crop per anatomy as
  ``fvlm eval`` does (crops of equal size batched, no window sharing) and scores with the same prompts, whose
  text features are encoded once per checkpoint (as the release does), not per scan. Its preprocessing is an
  in-memory whole-volume resample (multi-threaded ITK), faster than the release's file-based stage order
  (benchmarks/preprocess.py): the comparison isolates the model side.

Reported: min and median over ``--repeats`` (after one warm-up each, reported separately for ours: the first
scan of a loaded model also encodes the prompt texts, which later scans reuse), the number of ViT forward
passes, and the largest probability difference between the variants (not 0: two resampling implementations).
CT-CLIP reports about 1.5 s per volume on a GPU for comparison.

    python benchmarks/predict.py                      # CPU
    python benchmarks/predict.py --device cuda        # GPU (bf16 autocast, as fvlm predict does on CUDA)
    python benchmarks/predict.py --dry-run            # the code path with tiny dims on a demo-size case
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from machine import machine as describe_machine  # noqa: E402  (sibling module of the benchmarks)

from fvlm.anatomy import load_anatomy_table
from fvlm.config import load_config
from fvlm.io import atomic_write_text
from fvlm.model import FVLM
from fvlm.predict import Predictor

log = logging.getLogger("benchmarks.predict")
ROOT = Path(__file__).resolve().parent
STAGES = ("read", "preprocess", "encode", "score", "total")
CT_CLIP_GPU_SECONDS = 1.5
BERT_BASE = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
             "max_position_embeddings": 512}


def machine(device: torch.device) -> dict:
    return describe_machine(device)


def write_case(folder: Path, size: str) -> tuple[Path, Path, dict]:
    """A synthetic chest CT and its label map as .nii.gz; returns the paths and a description."""
    import nibabel as nib

    from fvlm.synth import generate_case

    t0 = time.perf_counter()
    if size == "full":
        case = generate_case(0, size="full", spacing=(0.7, 0.7, 1.0), shape=(300, 512, 512))
    else:
        case = generate_case(0, size="demo")
    log.info("synthetic case %s at %s mm in %.1f s", case.hu.shape, case.spacing, time.perf_counter() - t0)
    paths = []
    for name, arr in (("ct.nii.gz", case.hu), ("labels.nii.gz", case.label_map)):
        p = folder / name
        nib.save(nib.Nifti1Image(np.ascontiguousarray(arr.transpose(2, 1, 0)), case.affine_ras), str(p))
        paths.append(p)
    info = {"shape_zyx": list(case.hu.shape), "spacing_xyz_mm": list(case.spacing),
            "ct_bytes": paths[0].stat().st_size, "labels_bytes": paths[1].stat().st_size}
    return paths[0], paths[1], info


def build_predictor(preset: str, device: torch.device) -> Predictor:
    cfg = load_config(preset)
    cfg.model.vision.pretrained = ""  # random weights: time is what matters
    text = cfg.model.text
    if not text.pretrained.startswith("builtin:") and not (Path(text.pretrained) / "config.json").is_file():
        log.info("text model %s not found: a random BERT-base-sized encoder with the BERT uncased vocabulary",
                 text.pretrained)
        text.random_init = dict(BERT_BASE)
        text.tokenizer = "builtin:minilm"
    table = load_anatomy_table(cfg.data.anatomy_table)
    torch.manual_seed(0)
    model = FVLM(cfg, num_anatomies=len(table)).to(device).eval()
    return Predictor(model, cfg, table, device, checkpoint="(random weights)")


# ----------------------------------------------------------------------------------------------- baseline
def baseline_predict(predictor: Predictor, ct: Path, labels: Path, text_features: torch.Tensor) -> tuple[dict, dict]:
    """Whole-volume SimpleITK preprocessing, then one crop per anatomy, scored against the prompt features
    encoded once per checkpoint (``text_features``, as the release does); returns (probabilities, timing)."""
    import SimpleITK as sitk

    from fvlm.data.prepare import anatomy_boxes, bounding_box
    from fvlm.zeroshot import prompt_probabilities

    cfg, table = predictor.cfg, predictor.table
    timing = {}
    t0 = time.perf_counter()
    img = sitk.ReadImage(str(ct))
    lab = sitk.ReadImage(str(labels))
    timing["read"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    img, lab = sitk.DICOMOrient(img, "LPS"), sitk.DICOMOrient(lab, "LPS")
    spacing = [float(s) for s in cfg.data.spacing]
    size = [int(round(n * s / t)) for n, s, t in zip(img.GetSize(), img.GetSpacing(), spacing, strict=True)]
    origin = np.asarray(img.GetOrigin()) + 0.5 * (np.asarray(spacing) - np.asarray(img.GetSpacing()))
    ref = sitk.Image(size, sitk.sitkUInt8)
    ref.SetSpacing(spacing)
    ref.SetOrigin(origin.tolist())
    ref.SetDirection(img.GetDirection())
    hu = sitk.GetArrayFromImage(sitk.Resample(img, ref, sitk.Transform(), sitk.sitkLinear, -1024.0, sitk.sitkFloat32))
    mask = table.lut[sitk.GetArrayFromImage(sitk.Resample(lab, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                                                          sitk.sitkUInt8))]
    box = bounding_box(mask)
    lo = [max(0, box[2 * a] - cfg.data.margin[a]) for a in range(3)]
    hi = [min(mask.shape[a], box[2 * a + 1] + cfg.data.margin[a]) for a in range(3)]
    sl = tuple(slice(lo[a], hi[a]) for a in range(3))
    low, high = cfg.data.hu_window
    hu = np.clip(np.rint(hu[sl]), low, high).astype(np.int16)
    mask = mask[sl]
    need = [max(0, c - n) for c, n in zip(cfg.data.crop_size, hu.shape, strict=True)]
    pad = [(k // 2, k - k // 2) for k in need]
    hu = np.pad(hu, pad, constant_values=int(low))
    mask = np.ascontiguousarray(np.pad(mask, pad))
    meta = {"shape": list(hu.shape), "anatomies": anatomy_boxes(mask, table.names)}
    timing["preprocess"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    features, _ = predictor.anatomy_features(hu, mask, meta, share_windows=False)
    timing["encode"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    probs = prompt_probabilities(predictor.model, cfg, table, features[None], predictor.device, text_features)
    timing["score"] = time.perf_counter() - t0
    timing["total"] = sum(timing.values())
    return {k: float(v[0]) for k, v in probs.items()}, timing


# ----------------------------------------------------------------------------------------------- main
def summarise(runs: list[dict]) -> dict:
    return {s: {"min": round(min(r[s] for r in runs), 3), "median": round(statistics.median(r[s] for r in runs), 3)}
            for s in STAGES}


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    predictor = build_predictor(args.preset, device)
    with tempfile.TemporaryDirectory(prefix="fvlm_bench_predict_") as td:
        ct, labels, case_info = write_case(Path(td), args.size)
        ours_runs, base_runs = [], []
        # warm-up (page cache, allocator, CUDA kernels; ours also encodes the prompts once here), not in the stats
        from fvlm.zeroshot import prompt_text_features

        pred = predictor.predict(ct, mask=labels)
        first_call = {s: round(pred.timing[s], 3) for s in STAGES}
        t0 = time.perf_counter()  # the baseline's prompts: encoded once per checkpoint, like ours and the release
        prompts = prompt_text_features(predictor.model, predictor.cfg, predictor.table, device)
        prompt_seconds = time.perf_counter() - t0
        base_probs, _ = baseline_predict(predictor, ct, labels, prompts)
        for i in range(args.repeats):
            pred = predictor.predict(ct, mask=labels)
            ours_runs.append({s: pred.timing[s] for s in STAGES})
            base_probs, t = baseline_predict(predictor, ct, labels, prompts)
            base_runs.append(t)
            log.info("repeat %d: ours %.2f s (encode %.2f), baseline %.2f s (encode %.2f)", i + 1,
                     ours_runs[-1]["total"], ours_runs[-1]["encode"], t["total"], t["encode"])
    ours, base = summarise(ours_runs), summarise(base_runs)
    diff = max(abs(pred.probabilities[k] - base_probs[k]) for k in base_probs if pred.probabilities[k] is not None)
    cfg = predictor.cfg
    result = {
        "benchmark": "predict",
        "device": str(device),
        "machine": machine(device),
        "preset": args.preset,
        "model": {"vision": f"ViT width {cfg.model.vision.width}, depth {cfg.model.vision.depth}, patch "
                            f"{list(cfg.model.vision.patch_size)}",
                  "text": cfg.model.text.random_init or cfg.model.text.pretrained,
                  "eval_crop_size": list(cfg.data.eval_crop_size), "amp": "bf16" if device.type == "cuda" else "off"},
        "input": case_info,
        "processed_shape": pred.preprocessing["processed_shape"],
        "forward_passes": {"ours": len(pred.preprocessing["crops"]), "baseline": len(pred.found)},
        "crops_ours": pred.preprocessing["crops"],
        "repeats": args.repeats,
        "seconds_ours": ours,
        "seconds_baseline": base,
        "seconds_ours_first_scan": first_call,
        "seconds_prompt_encoding_once_per_checkpoint": round(prompt_seconds, 3),
        "speedup_median_total": round(base["total"]["median"] / ours["total"]["median"], 2),
        "max_probability_difference": round(diff, 5),
        "ct_clip_reported_gpu_seconds_per_volume": CT_CLIP_GPU_SECONDS,
        "note": "segmentation excluded (label map given); random weights",
    }
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--preset", default="paper_vitb")
    parser.add_argument("--size", choices=["full", "demo"], default="full")
    parser.add_argument("--dry-run", action="store_true", help="tiny preset, demo-size case, 1 repeat, no result file")
    parser.add_argument("--out", default="", help="result JSON (default results/predict[_cuda].json)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.dry_run:
        args.preset, args.size, args.repeats = "tiny", "demo", 1
    result = run(args)
    text = json.dumps(result, indent=2) + "\n"
    if args.dry_run:
        sys.stdout.write(text)
        return 0
    out = Path(args.out) if args.out else ROOT / "results" / ("predict_cuda.json" if "cuda" in args.device
                                                              else "predict.json")
    atomic_write_text(out, text)
    log.info("wrote %s", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
