"""The ``fvlm`` command line: fine-grained vision-language pre-training for 3D CT.

One module per subcommand in :mod:`fvlm.commands`, each with ``add_parser`` and ``run(args)``; this file only
assembles the parser, sets up logging and turns expected errors into one line.

Nothing in the library imports this module or :mod:`fvlm.commands`. Every subcommand returns a process exit code
(0 = success, 1 = finished with failures that were reported, 2 = bad input).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from fvlm.commands import (
    check_data,
    convert_official,
    decompose,
    demo,
    embed,
    export,
    finetune,
    metrics,
    predict,
    preprocess,
    probe,
    radchestct,
    segment,
    synth,
    train,
)
from fvlm.commands import eval as eval_command

log = logging.getLogger("fvlm")

#: the subcommands, in the order ``fvlm --help`` lists them
COMMANDS = (synth, preprocess, train, eval_command, metrics, demo, decompose, check_data, segment, radchestct,
            predict, convert_official, embed, export, probe, finetune)
BY_NAME = {command.NAME: command for command in COMMANDS}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fvlm", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default=os.environ.get("FVLM_LOG_LEVEL", "INFO"),
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def setup_logging(level: str = "INFO") -> None:
    """Log to stderr; under torchrun only rank 0 logs below WARNING."""
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=getattr(logging, level) if rank == 0 else logging.WARNING,
        format=f"%(asctime)s %(levelname)s{f' [rank {rank}]' if 'RANK' in os.environ else ''} %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
        force=True,
    )


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    try:
        return BY_NAME[args.command].run(args)
    except (FileNotFoundError, ValueError, KeyError) as e:
        # expected user errors: one clear line, no traceback (use --log-level DEBUG for one)
        log.debug("traceback", exc_info=True)
        log.error("%s: %s", type(e).__name__, e)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
