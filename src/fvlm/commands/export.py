"""fvlm export: a run, checkpoint or converted model -> a Hugging Face model folder."""
from __future__ import annotations

import argparse

NAME = "export"
HELP = ("write a run, checkpoint or converted model as a Hugging Face model folder (safetensors, config, tokenizer, "
        "preprocessing spec, model card)")


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(NAME, help=HELP)
    p.add_argument("run", help="run directory, checkpoint directory or convert-official output")
    p.add_argument("out", help="model folder to write (load with fvlm.load(OUT); upload as a Hub model repo)")
    p.add_argument("--metrics", default="", help="fvlm metrics --json output for the model card's zero-shot table "
                                                 "(default: RUN/metrics.json if present)")
    p.add_argument("--training-data", default="", help="one paragraph on the training data for the model card")
    p.add_argument("--dataset", action="append", default=[], help="Hub data set id for the card's metadata, e.g. "
                                                                   "ibrahimhamamci/CT-RATE (repeatable)")
    p.add_argument("--license", default="apache-2.0", help="license id for the card's metadata")
    p.add_argument("--name", default="", help="model name in the card (default: OUT's folder name)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    return p


def run(args: argparse.Namespace) -> int:
    # library imported here, not at the top: `fvlm --help` imports every command module, and the library pulls in
    # torch/transformers (~2-4 s measured) which a parser must not pay
    from fvlm.export import export

    export(args.run, args.out, metrics=args.metrics or None, training_data=args.training_data,
           datasets=args.dataset, license=args.license, name=args.name, overwrite=args.force)
    return 0
