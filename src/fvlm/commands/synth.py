"""fvlm synth: write a synthetic CT-RATE-format data set."""

from __future__ import annotations

import argparse

NAME = "synth"
HELP = "write a synthetic CT-RATE-format data set"


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(NAME, help=HELP)
    p.add_argument("--out", required=True, help="output root (CT-RATE layout)")
    p.add_argument("--train", type=int, default=8, help="number of training patients")
    p.add_argument("--valid", type=int, default=4, help="number of validation patients")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", choices=["demo", "full"], default="demo",
                   help="demo: small volumes for CPU runs; full: realistic CT-RATE dimensions")
    p.add_argument("--v2", action="store_true", help="write already-fixed HU volumes (CT-RATE v2) instead of v1")
    p.add_argument("--anatomy-table", default="released",
                   help="anatomy table whose anatomies the reports and anatomy texts describe")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--difficulty", type=float, default=None,
                   help="lesion severity knob in [0, 1] (higher = subtler findings; default: the generator's)")
    p.add_argument("--max-reconstructions", type=int, default=0,
                   help="at most this many reconstructions per scan (0 = 1-3 as drawn)")
    return p


def run(args: argparse.Namespace) -> int:
    # library imported here, not at the top: `fvlm --help` imports every command module, and the library pulls in
    # numpy, scipy and nibabel (~0.5 s measured), which a parser must not pay
    from fvlm.synth import synthesize

    extra = {} if args.difficulty is None else {"difficulty": args.difficulty}
    # a failed scan raises RuntimeError listing every failure, after all other scans are written (as before)
    synthesize(args.out, n_train=args.train, n_valid=args.valid, seed=args.seed, size=args.size, v2=args.v2,
               anatomy_table=args.anatomy_table, workers=args.workers, max_reconstructions=args.max_reconstructions,
               **extra)
    return 0
