"""fvlm check-data: inventory a CT-RATE root before hours are spent."""

from __future__ import annotations

import argparse
import logging

NAME = "check-data"
HELP = ("inventory a CT-RATE root before hours are spent: counts, missing files, metadata problems, v1/v2 mix, "
        "non-chest volumes, texts, label maps")

log = logging.getLogger("fvlm.data.check")  # the messages of the former run_check_data_cli, under its name


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(NAME, help=HELP)
    p.add_argument("data", help="CT-RATE-format root (dataset/, metadata/, ...)")
    p.add_argument("--split", choices=["train", "valid"], help="check only this split (default: every split present)")
    p.add_argument("--json", help="write the full report (every listed volume) as JSON")
    p.add_argument("--sample", type=int, default=20,
                   help="per split, read the voxel values of at most K volumes: those whose header cannot tell v1 "
                        "from v2 first, then a spread of the others (0 = headers only; default 20)")
    p.add_argument("--anatomy-table", default="released",
                   help="anatomy table whose anatomies the anatomy-text check looks for")
    p.add_argument("--workers", type=int, default=4, help="threads reading headers")
    p.add_argument("--strict", action="store_true", help="exit 1 when any problem is found (default: report only)")
    return p


def run(args: argparse.Namespace) -> int:
    """0 whenever the root could be inventoried (problems are reported, not fatal); with ``--strict``, 1 when any
    problem was found (for scripts that must stop before hours are spent)."""
    # library imported here, not at the top: `fvlm --help` imports every command module, and the library pulls in
    # numpy, tqdm and the data modules (~0.2 s measured), which a parser must not pay
    from fvlm.data.check import check_data

    report = check_data(args.data, splits=[args.split] if args.split else None, sample=args.sample,
                        anatomy_table=args.anatomy_table or None, workers=args.workers)
    if args.json:
        report.to_json(args.json)
        log.info("report written to %s", args.json)
    if args.strict:
        found = report.problem_lines()
        if found:
            log.error("check-data --strict: %d problem(s) in %s: %s", len(found), args.data, " | ".join(found))
            return 1
    return 0
