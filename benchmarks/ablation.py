"""The false-negative-reduction ablation (issue: the paper's claim in miniature).

    python benchmarks/ablation.py --out /tmp/ablation [--seeds 3] [--set KEY=VALUE ...]

Same synthetic data and training budget for: global CT-CLIP-style baseline; anatomy-wise without
false-negative reduction; + normal-sample reduction; + both (the released rule). Writes
``benchmarks/results/ablation.json`` (all runs + the machine) and prints the mean +- sd table that
benchmarks/README.md quotes. Resumable: finished runs in --out are reused.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from pathlib import Path

from machine import machine as describe_machine  # noqa: E402  (sibling module of the benchmarks)

from fvlm.ablation import run_ablation


def machine() -> dict:
    return describe_machine()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="/tmp/fvlm_ablation")
    p.add_argument("--config", default="demo")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--train", type=int, default=0)
    p.add_argument("--valid", type=int, default=0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--results", default=str(Path(__file__).parent / "results" / "ablation.json"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    table = run_ablation(Path(args.out), config=args.config, overrides=args.overrides, seeds=args.seeds,
                         n_train=args.train, n_valid=args.valid, workers=args.workers)
    runs = json.loads((Path(args.out) / "ablation.json").read_text())
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(args.results).with_suffix(".tmp")
    tmp.write_text(json.dumps({"machine": machine(), "command": " ".join(sys.argv), **runs, "table": table},
                              indent=2) + "\n")
    shutil.move(tmp, args.results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
