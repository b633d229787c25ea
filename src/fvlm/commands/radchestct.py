"""fvlm radchestct: convert Rad-ChestCT into NIfTI + pairs CSV + CT-RATE-format labels."""

from __future__ import annotations

import argparse

NAME = "radchestct"
HELP = ("convert Rad-ChestCT .npz volumes and labels into NIfTI + pairs CSV + CT-RATE-format labels (an external "
        "test set)")


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(NAME, help=HELP)
    p.add_argument("--npz-dir", required=True, help="folder of {NoteAcc_DEID}.npz volumes")
    p.add_argument("--labels", required=True,
                   help="Rad-ChestCT label CSV (NoteAcc_DEID + abnormality columns, or abnormality*location columns)")
    p.add_argument("--mapping", choices=["standard", "fvlm", "extended"], default="standard",
                   help="Rad-ChestCT -> CT-RATE label mapping (16, 15 or 18 CT-RATE labels)")
    p.add_argument("--masks", default="", help="folder of TotalSegmentator label maps {id}.nii.gz (default OUT/masks; "
                                               "existing maps are checked against the images)")
    p.add_argument("--out", required=True, help="output folder (images/, pairs.csv, labels_{mapping}.csv)")
    p.add_argument("--split", default="", help="split name for every volume (default: imgtrain/imgvalid/imgtest "
                                               "from the id prefix)")
    p.add_argument("--orientation", choices=["check", "documented", "flip"], default="check",
                   help="z direction: check against anatomy and flip when it disagrees (default), trust the "
                        "documented convention, or flip every volume")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--limit", type=int, default=0, help="convert only the first N volumes (0 = all)")
    return p


def run(args: argparse.Namespace) -> int:
    """0 when every volume converted, 1 when some failed (each is logged and listed in OUT/failures.csv)."""
    # library imported here, not at the top: `fvlm --help` imports every command module, and the library pulls in
    # numpy, scipy and the data modules (~0.4 s measured), which a parser must not pay
    from fvlm.data.radchestct import convert

    result = convert(args.npz_dir, args.labels, args.out, mapping=args.mapping, masks=args.masks or None,
                     split=args.split, orientation=args.orientation, limit=args.limit, workers=args.workers)
    return 0 if result.ok else 1
