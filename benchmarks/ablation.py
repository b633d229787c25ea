"""The false-negative-reduction ablation: 5 variants x 5 seeds, paired statistics (issue 12).

    python benchmarks/ablation.py --out /tmp/fvlm_ablation12 [--seeds 5] [--max-runs N] [--set KEY=VALUE ...]
    python benchmarks/ablation.py --out /tmp/fvlm_ablation12 --collect     (only gather the finished runs)

Same synthetic data (the demo's), training budget and text length for: global CT-CLIP-style baseline;
anatomy-wise without false-negative reduction; + normal-sample reduction; + identical texts (the released
rule); + co-teaching (docs/co-teaching.md). The text length is chosen from the data so that no report or
anatomy text is truncated (token statistics in the JSON). Runs go seed by seed; each finished run has
``runs/<variant>-seed<s>/result.json`` and a completion marker ``DONE.json`` written last, and is skipped on
rerun. Writes ``benchmarks/results/ablation.json`` (every finished run, what is left, token statistics, paired
differences with 95 % t intervals and sign tests, the machine, the command) and prints the tables that
benchmarks/README.md quotes. A result with runs left is marked ``"partial": true``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from machine import machine as describe_machine  # noqa: E402  (sibling module of the benchmarks)

from fvlm.io import atomic_write_text
from fvlm.recipes.ablation import run_ablation


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="/tmp/fvlm_ablation12")
    p.add_argument("--config", default="demo")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--variants", nargs="*", default=None)
    p.add_argument("--max-runs", type=int, default=None, help="train at most N new runs")
    p.add_argument("--collect", action="store_true", help="train nothing; gather the finished runs")
    p.add_argument("--train", type=int, default=0)
    p.add_argument("--valid", type=int, default=0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--results", default=str(Path(__file__).parent / "results" / "ablation.json"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # runs finished by an earlier session (its --out may be gone): the results JSON this command keeps
    results = Path(args.results)
    previous = json.loads(results.read_text()).get("runs", []) if results.is_file() else []
    table = run_ablation(Path(args.out), config=args.config, overrides=args.overrides, seeds=args.seeds,
                         n_train=args.train, n_valid=args.valid, workers=args.workers, variants=args.variants,
                         max_runs=0 if args.collect else args.max_runs, previous=previous)
    summary = json.loads((Path(args.out) / "ablation.json").read_text())
    cont = f"nice -n 19 python benchmarks/ablation.py --out {args.out} --seeds {args.seeds}"
    atomic_write_text(Path(args.results), json.dumps(
        {"machine": describe_machine(), "command": " ".join(["python", *sys.argv]),
         "status": (f"PARTIAL: {len(summary['runs'])} of {len(summary['plan'])} runs finished; the table covers only "
                    f"those" if summary["partial"] else f"complete: {len(summary['runs'])} runs"),
         "continue_with": cont if summary["partial"] else None, **summary, "table": table}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
