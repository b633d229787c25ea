"""fvlm finetune: fine-tune the image encoder and anatomy pooling end to end with per-label heads."""
from __future__ import annotations

import argparse

NAME = "finetune"
HELP = ("fine-tune the image encoder + anatomy pooling end to end with per-label heads (single process or torchrun); "
        "scores a split in the fvlm eval format")


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(NAME, help=HELP)
    p.add_argument("--checkpoint", default="",
                   help="pre-trained run or checkpoint directory (not needed with --resume)")
    p.add_argument("--data", required=True, help="processed data directory")
    p.add_argument("--labels", default="",
                   help="labels CSV(s), comma-separated (VolumeName + 0/1 columns; empty = missing, excluded)")
    p.add_argument("--out", required=True, help="fine-tuned run directory")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override the pre-trained run's config, e.g. --set train.max_steps=300 (repeatable; "
                        "fine-tuning defaults: " + " ".join(["train.lr=1e-4", "train.epochs=5", "..."]) + ")")
    p.add_argument("--resume", action="store_true", help="continue exactly from the last checkpoint in --out")
    p.add_argument("--features", choices=["mapped", "concat"], default="mapped",
                   help="heads read the anatomy the anatomy map gives each label (mapped) or all anatomies (concat)")
    p.add_argument("--anatomy-map", default="", help="label -> anatomy map: an anatomy table (name or JSON) or a JSON "
                                                     "{label: anatomy | [anatomies]} (default: the run's table)")
    p.add_argument("--columns", default="", help="comma-separated label columns to use (default: all)")
    p.add_argument("--loss", choices=["bce", "focal"], default="bce")
    p.add_argument("--focal-gamma", type=float, default=2.0)
    p.add_argument("--no-class-weights", action="store_true", help="BCE without pos_weight = negatives/positives")
    p.add_argument("--layer-decay", type=float, default=1.0, help="layer-wise learning-rate decay (1 = off)")
    p.add_argument("--head-lr-scale", type=float, default=10.0, help="learning rate of the heads relative to train.lr")
    p.add_argument("--jitter", type=float, default=0.1, help="random shift of the training crop (fraction of its size)")
    p.add_argument("--fraction", type=float, default=1.0,
                   help="use this fraction of the training labels (stratified per label, seed train.seed)")
    p.add_argument("--train-split", default="train")
    p.add_argument("--split", default="valid", help="split scored at the end into OUT/scores_{split}.csv ('' = none)")
    p.add_argument("--score-only", action="store_true", help="only score --split with the fine-tuned run in --out")
    p.add_argument("--scores", default="", help="with --score-only: scores CSV path (default OUT/scores_{split}.csv)")
    p.add_argument("--device", default="auto")
    return p


def run(args: argparse.Namespace) -> int:
    # library imported here, not at the top: `fvlm --help` imports every command module, and the library pulls in
    # torch/transformers (~2-4 s measured) which a parser must not pay
    from fvlm.finetune import finetune, score_split

    if args.score_only:
        score_split(args.out, args.data, args.split, args.scores or None, device=args.device)
        return 0
    finetune(args.checkpoint or None, args.data, args.labels or None, args.out, overrides=args.overrides,
             resume=args.resume, device=args.device, features=args.features, anatomy_map=args.anatomy_map or None,
             loss=args.loss, focal_gamma=args.focal_gamma, class_weights=not args.no_class_weights,
             layer_decay=args.layer_decay, head_lr_scale=args.head_lr_scale, jitter=args.jitter,
             fraction=args.fraction, train_split=args.train_split, eval_split=args.split or None,
             columns=[c.strip() for c in args.columns.split(",")] if args.columns else None)
    return 0
