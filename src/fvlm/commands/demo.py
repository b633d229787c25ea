"""fvlm demo: the main job on CPU (synthesise -> preprocess -> train -> eval -> metrics), or the ablation."""

from __future__ import annotations

import argparse
from pathlib import Path

NAME = "demo"
HELP = "synthesise -> preprocess -> train -> eval -> metrics on CPU"


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(NAME, help=HELP)
    p.add_argument("--out", default="demo_out")
    p.add_argument("--config", default="demo")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--train", type=int, default=0, help="training patients (0 = demo default)")
    p.add_argument("--valid", type=int, default=0, help="validation patients (0 = demo default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--texts", choices=["generator", "decomposed"], default="generator",
                   help="anatomy texts from the generator's JSON or from fvlm decompose of the reports")
    p.add_argument("--ablation", action="store_true", help="run the false-negative-reduction ablation instead")
    p.add_argument("--workers", type=int, default=2)
    return p


def run(args: argparse.Namespace) -> int:
    # library imported here, not at the top: `fvlm --help` imports every command module, and the recipes pull in
    # torch and transformers (about 2-4 s measured), which building the parser must not pay
    if args.ablation:
        from fvlm.recipes.ablation import run_ablation

        run_ablation(Path(args.out), config=args.config, overrides=args.overrides, seed=args.seed,
                     n_train=args.train, n_valid=args.valid, workers=args.workers)
        return 0
    from fvlm.recipes.demo import run_demo

    run_demo(args.out, config=args.config, overrides=args.overrides, n_train=args.train, n_valid=args.valid,
             seed=args.seed, texts=args.texts, workers=args.workers)
    return 0
