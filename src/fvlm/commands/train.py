"""fvlm train: pre-train fVLM (single process or torchrun) on a processed store."""
from __future__ import annotations

import argparse

from fvlm.commands._common import add_config_args

NAME = "train"
HELP = "pre-train fVLM (single process or torchrun)"


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(NAME, help=HELP)
    add_config_args(p)
    p._option_string_actions["--config"].help = (  # fvlm.data.compat.config_for_store
        "preset name (paper_vitb, demo, tiny) or JSON file (default: the data settings --data was preprocessed "
        "with, the rest from the demo preset)")
    p.add_argument("--data", required=True, help="processed data directory (from fvlm preprocess)")
    p.add_argument("--out", required=True, help="run directory (checkpoints, logs, config.json)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    return p


def run(args: argparse.Namespace) -> int:
    # library imported here, not at the top: `fvlm --help` imports every command module, and the library pulls in
    # torch/transformers (~2-4 s measured) which a parser must not pay
    from fvlm.data.compat import config_for_store
    from fvlm.train import train

    cfg = config_for_store(args.data, args.config, args.overrides)
    train(cfg, data=args.data, out=args.out, resume=args.resume, device=args.device)
    return 0
