"""fvlm eval: zero-shot diagnosis of every volume of a split -> scores.csv."""
from __future__ import annotations

import argparse

NAME = "eval"
HELP = "zero-shot diagnosis: score every volume of a split -> scores.csv"


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(NAME, help=HELP)
    p.add_argument("--checkpoint", required=True, help="run directory or checkpoint directory")
    p.add_argument("--data", required=True, help="processed data directory")
    p.add_argument("--split", default="valid")
    p.add_argument("--out", required=True, help="scores CSV (VolumeName + one column per scored label)")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=0, help="crops per forward pass (0 = config)")
    p.add_argument("--anatomy-table", default="", help="score with this table's prompts (default: the run's)")
    return p


def run(args: argparse.Namespace) -> int:
    # library imported here, not at the top: `fvlm --help` imports every command module, and the library pulls in
    # torch/transformers (~2-4 s measured) which a parser must not pay
    from fvlm.zeroshot import evaluate

    evaluate(args.checkpoint, data=args.data, split=args.split, out=args.out, device=args.device,
             batch_size=args.batch_size, anatomy_table=args.anatomy_table or None)
    return 0
