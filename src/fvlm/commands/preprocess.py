"""fvlm preprocess: fix, merge, resample, crop, window, pad and store volumes."""

from __future__ import annotations

import argparse

from fvlm.commands._common import add_config_args, exit_code

NAME = "preprocess"
HELP = "fix, merge, resample, crop, window, pad and store volumes"


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(NAME, help=HELP)
    p.add_argument("--data", help="CT-RATE-format root (dataset/, metadata/, ...)")
    p.add_argument("--split", choices=["train", "valid"],
                   help="split of --data to process (default: every split present); with --pairs: the split of "
                        "rows without one (default valid)")
    p.add_argument("--pairs", help="CSV with columns volume,image,label[,split]: arbitrary NIfTI image/label pairs "
                                   "(HU already) instead of --data")
    p.add_argument("--out", required=True, help="processed data directory")
    add_config_args(p)
    p.add_argument("--workers", type=int, default=1, help="parallel processes")
    p.add_argument("--shard", default="0/1", help="i/N: process only shard i of N (cluster job arrays)")
    p.add_argument("--version", choices=["auto", "v1", "v2"], default="auto",
                   help="CT-RATE header version: auto-detect per volume (default), or force v1 (rescale) / v2 (HU)")
    p.add_argument("--reconstructions", default="all",
                   help="'all' or a number K: keep at most K reconstructions per scan")
    p.add_argument("--limit", type=int, default=0, help="process only the first N volumes (0 = all)")
    p.add_argument("--include-no-chest", action="store_true",
                   help="also process the volumes listed in metadata/no_chest_{split}.txt (left out by default)")
    p.add_argument("--verify", action="store_true",
                   help="check the content hashes of existing volumes (written at creation) before skipping them: "
                        "damaged ones are redone (reads every stored file)")
    return p


def run(args: argparse.Namespace) -> int:
    """0 when every volume of this run succeeded, 1 when some failed (listed in OUT/failures.csv)."""
    # library imported here, not at the top: `fvlm --help` imports every command module, and the library pulls in
    # torch (about 1-2 s measured), which building the parser must not pay
    from fvlm.config import load_config
    from fvlm.data.preprocess import preprocess

    cfg = load_config(args.config, args.overrides)
    result = preprocess(args.data, args.out, cfg, splits=[args.split] if args.split else None, pairs=args.pairs,
                        default_split=args.split or "valid", workers=args.workers, shard=args.shard,
                        version=args.version, reconstructions=args.reconstructions, limit=args.limit,
                        include_no_chest=args.include_no_chest, verify=args.verify)
    return exit_code(result.ok)
