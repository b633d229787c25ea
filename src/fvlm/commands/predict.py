"""fvlm predict: zero-shot findings for one scan (NIfTI file or DICOM folder) -> JSON [+ PNG]."""
from __future__ import annotations

import argparse
import sys

NAME = "predict"
HELP = "zero-shot findings for one scan (NIfTI file or DICOM folder) -> JSON [+ PNG]"


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(NAME, help=HELP)
    p.add_argument("scan", help="NIfTI file (.nii/.nii.gz, HU), DICOM series folder, or a 3D image SimpleITK reads")
    p.add_argument("--checkpoint", required=True, help="run directory or checkpoint directory")
    p.add_argument("--mask", help="TotalSegmentator v2 'total' multilabel map of the scan (TotalSegmentator --ml); "
                                  "default: run TotalSegmentator if available")
    p.add_argument("--out", help="result JSON (default: print to stdout)")
    p.add_argument("--png", help="overlay picture: axial + coronal slices, anatomy contours, top findings")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--series", default="", help="DICOM SeriesInstanceUID when the folder holds several series "
                                                "(default: the one with most slices)")
    p.add_argument("--totalseg-cmd", default="", help="TotalSegmentator executable (without --mask; default: the "
                                                      "Python API if installed, else TotalSegmentator on PATH)")
    p.add_argument("--totalseg-device", default="", help="TotalSegmentator --device: gpu, gpu:N or cpu")
    p.add_argument("--fast", action="store_true", help="TotalSegmentator's 3 mm model (faster, coarser)")
    p.add_argument("--save-mask", default="", help="keep the label map TotalSegmentator made (reuse with --mask)")
    return p


def run(args: argparse.Namespace) -> int:
    # library imported here, not at the top: `fvlm --help` imports every command module, and the library pulls in
    # torch/transformers (~2-4 s measured) which a parser must not pay
    from fvlm.predict import predict

    pred = predict(args.scan, args.checkpoint, mask=args.mask, device=args.device, series=args.series or None,
                   totalseg_cmd=args.totalseg_cmd, totalseg_fast=args.fast,
                   totalseg_device=args.totalseg_device or None, save_mask=args.save_mask or None,
                   out=args.out or None, png=args.png)
    if not args.out:
        sys.stdout.write(pred.to_json())
    return 0
