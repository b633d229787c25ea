"""fvlm metrics: AUC, accuracy, sensitivity, specificity, F1, precision from scores.csv (and retrieval)."""
from __future__ import annotations

import argparse

NAME = "metrics"
HELP = "AUC, accuracy, sensitivity, specificity, F1, precision from scores.csv"


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(NAME, help=HELP)
    p.add_argument("scores", nargs="?", help="scores CSV from fvlm eval (may be omitted with --retrieval alone)")
    p.add_argument("--labels", help="labels CSV (VolumeName + 18 CT-RATE label columns); required with SCORES")
    p.add_argument("--json", help="write the metrics as JSON")
    p.add_argument("--plot", help="write ROC curves (PNG)")
    p.add_argument("--thresholds-from", nargs=2, metavar=("SCORES", "LABELS"),
                   help="fit thresholds on another split (honest variant) instead of the evaluated labels")
    p.add_argument("--bootstrap", type=int, default=0, help="bootstrap resamples for 95%% CIs (0 = off)")
    p.add_argument("--macro-f1", action="store_true", help="also report F1 with average='macro'")
    p.add_argument("--missing", choices=["zero", "drop"], default="zero",
                   help="a missing score counts as 0 (protocol, default) or the volume is dropped for that label")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--retrieval", metavar="EMBEDDINGS", help="report/volume retrieval Recall@K from fvlm embed output")
    return p


def run(args: argparse.Namespace) -> int:
    # library imported here, not at the top: `fvlm --help` imports every command module, and the library pulls in
    # pandas/sklearn/matplotlib (~2 s measured) which a parser must not pay
    from fvlm.metrics_report import metrics_from_files

    metrics_from_files(args.scores, args.labels, json_out=args.json, plot=args.plot,
                       thresholds_from=tuple(args.thresholds_from) if args.thresholds_from else None,
                       bootstrap=args.bootstrap, macro_f1=args.macro_f1, missing=args.missing, seed=args.seed,
                       retrieval=args.retrieval)
    return 0
