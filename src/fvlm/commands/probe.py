"""fvlm probe: linear probes on the frozen anatomy embeddings at several label fractions, against zero-shot."""
from __future__ import annotations

import argparse

NAME = "probe"
HELP = ("linear probes (logistic regression per label) on the frozen anatomy embeddings, at several label fractions "
        "and seeds, against zero-shot")


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(NAME, help=HELP)
    p.add_argument("--checkpoint", required=True, help="run directory or checkpoint directory (kept frozen)")
    p.add_argument("--data", required=True, help="processed data directory (training and evaluated splits)")
    p.add_argument("--labels", required=True,
                   help="labels CSV(s), comma-separated (VolumeName + 0/1 columns; empty = missing, excluded)")
    p.add_argument("--out", required=True, help="output directory (scores/, probe.json, probe_auc.png, cache/)")
    p.add_argument("--fractions", default="0.01,0.1,1", help="fractions of the training labels (default 0.01,0.1,1)")
    p.add_argument("--seeds", type=int, default=3, help="subsampling / cross-validation seeds per fraction")
    p.add_argument("--features", choices=["mapped", "concat"], default="mapped",
                   help="mapped: the anatomy the anatomy map reads each label from; concat: all anatomies")
    p.add_argument("--anatomy-map", default="", help="label -> anatomy map: an anatomy table (name or JSON) or a JSON "
                                                     "{label: anatomy | [anatomies]} (default: the run's table)")
    p.add_argument("--columns", default="", help="comma-separated label columns to use (default: all)")
    p.add_argument("--train-split", default="train", help="split the heads are fitted on")
    p.add_argument("--split", default="valid", help="split that is scored")
    p.add_argument("--cache", default="", help="embeddings cache directory (default: OUT/cache)")
    p.add_argument("--no-zero-shot", action="store_true", help="do not score the run's zero-shot prompts")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=0, help="crops per forward pass (0 = config)")
    return p


def run(args: argparse.Namespace) -> int:
    # library imported here, not at the top: `fvlm --help` imports every command module, and the library pulls in
    # torch/transformers (~2-4 s measured) which a parser must not pay
    from fvlm.probe import run_probe

    try:
        fractions = [float(f) for f in str(args.fractions).split(",") if f.strip()]
    except ValueError:
        raise ValueError(f"--fractions: expected comma-separated numbers, got {args.fractions!r}") from None
    run_probe(args.checkpoint, args.data, args.labels, args.out, fractions=fractions, seeds=args.seeds,
              anatomy_map=args.anatomy_map or None, features=args.features, train_split=args.train_split,
              split=args.split, device=args.device, batch_size=args.batch_size, cache=args.cache or None,
              zero_shot=not args.no_zero_shot,
              label_columns=[c.strip() for c in args.columns.split(",")] if args.columns else None)
    return 0
