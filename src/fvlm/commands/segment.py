"""fvlm segment: TotalSegmentator v2 label maps into dataset/{split}_mask/ (or the label paths of a pairs CSV)."""

from __future__ import annotations

import argparse

from fvlm.commands._common import exit_code

NAME = "segment"
HELP = ("TotalSegmentator v2 (task total, roi_subset of the anatomy table) label maps into dataset/{split}_mask/, "
        "resumable")


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(NAME, help=HELP)
    p.add_argument("--data", help="CT-RATE-format root (dataset/, metadata/, ...)")
    p.add_argument("--split", choices=["train", "valid"], help="split of --data (required with --data)")
    p.add_argument("--pairs", help="CSV volume,image,label[,split] (fvlm preprocess --pairs format): segment each "
                                   "image (HU, correct header) into its label path instead of --data")
    p.add_argument("--anatomy-table", default="released",
                   help="anatomy table whose TotalSegmentator classes are segmented (extended covers released too)")
    p.add_argument("--fast", action="store_true", help="TotalSegmentator's 3 mm model (about 3x faster, coarser)")
    p.add_argument("--device", default=None, help="TotalSegmentator --device: gpu, gpu:N or cpu (default: its own)")
    p.add_argument("--workers", type=int, default=1, help="volumes segmented at the same time")
    p.add_argument("--shard", default="0/1", help="i/N: process only shard i of N (cluster job arrays)")
    p.add_argument("--totalseg-cmd", default="",
                   help="TotalSegmentator executable (e.g. from another environment); default: the Python API if "
                        "installed (fvlm[segment]), else TotalSegmentator on PATH")
    p.add_argument("--task", default="total",
                   help="TotalSegmentator task (default total; total_v2 reproduces v2 maps with TotalSegmentator 3)")
    p.add_argument("--version", choices=["auto", "v1", "v2"], default="auto",
                   help="CT-RATE header version: auto-detect per volume (default), or force v1 (fix) / v2 (HU)")
    p.add_argument("--reconstructions", default="all",
                   help="'all' or a number K: segment at most K reconstructions per scan (as fvlm preprocess)")
    p.add_argument("--include-no-chest", action="store_true",
                   help="also segment the volumes listed in metadata/no_chest_{split}.txt (left out by default)")
    p.add_argument("--exclude-no-chest", action="store_true", help=argparse.SUPPRESS)  # the default; old scripts
    p.add_argument("--limit", type=int, default=0, help="segment only the first N volumes (0 = all)")
    p.add_argument("--timeout", type=float, default=0.0,
                   help="seconds per volume before a TotalSegmentator subprocess is killed (0 = no limit)")
    p.add_argument("--verify", choices=["header", "full"], default="header",
                   help="how existing maps are checked before being skipped: header (shape, geometry) or full "
                        "(also inflate the data)")
    p.add_argument("--tmp-dir", default="", help="folder for fixed v1 volumes handed to TotalSegmentator "
                                                  "(default: next to the failures CSV; cleaned by the next run)")
    p.add_argument("--failures", default="", help="failures CSV (default: dataset/{split}_mask/segment_failures.csv "
                                                  "or next to --pairs)")
    return p


def run(args: argparse.Namespace) -> int:
    """0 when every volume of this run has a map, 1 when some failed (listed in the failures CSV)."""
    # library imported here, not at the top: `fvlm --help` imports every command module; the library reads
    # NIfTI/DICOM (nibabel, SimpleITK: about 0.3 s measured), which building the parser must not pay
    from fvlm.segment import segment

    summary = segment(args.data, split=args.split, pairs=args.pairs, anatomy_table=args.anatomy_table,
                      totalseg_cmd=args.totalseg_cmd, fast=args.fast, device=args.device, task=args.task,
                      timeout=args.timeout, workers=args.workers, shard=args.shard, version=args.version,
                      reconstructions=args.reconstructions, include_no_chest=args.include_no_chest, limit=args.limit,
                      verify=args.verify, tmp_dir=args.tmp_dir, failures=args.failures)
    return exit_code(summary.ok)
