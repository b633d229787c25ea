"""How often the identical-text rule can act: duplicate abnormal anatomy texts per training batch (issue 12).

    python benchmarks/text_duplicates.py --data OUT/processed [--config demo] [--split train] [--draws 20000]

With normal samples already mutual positives (``anatomy+normal``), the identical-text rule (the released
reduction b) adds positives only between *abnormal* samples of an anatomy whose texts are identical (equal
``fvlm.text.text_id`` under the config's ``data.text_rule``). This counts, per anatomy, the abnormal texts of the
split, how many are distinct, how many have an identical twin elsewhere in the split, and, over random batches of
the config's ``train.batch_size`` volumes drawn without replacement (what one training step sees on one process),
the mean number of abnormal samples with an identical partner in the same batch and of such pairs. The anatomy's
presence in the crop (the loss's valid mask) is not applied, so these are upper bounds. Writes
``benchmarks/results/text_duplicates.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
from machine import machine as describe_machine  # noqa: E402  (sibling module of the benchmarks)

from fvlm.anatomy import load_anatomy_table
from fvlm.config import load_config
from fvlm.io import atomic_write_text
from fvlm.text import AnatomyTexts, scan_id

log = logging.getLogger("benchmarks.text_duplicates")


def batch_statistics(ids: list[int | None], batch_size: int, draws: int, rng: np.random.Generator) -> dict[str, float]:
    """Mean per batch of abnormal samples with an identical partner and of identical abnormal pairs.

    ``ids``: one entry per volume, the text id of an abnormal anatomy text, ``None`` for a normal one."""
    n = len(ids)
    samples = pairs = 0
    for _ in range(draws):
        batch = rng.choice(n, size=min(batch_size, n), replace=False)
        counts = Counter(ids[i] for i in batch if ids[i] is not None)
        samples += sum(c for c in counts.values() if c > 1)
        pairs += sum(c * (c - 1) // 2 for c in counts.values())
    return {"abnormal_with_partner_per_batch": samples / draws, "identical_abnormal_pairs_per_batch": pairs / draws}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="a preprocessed data set (fvlm preprocess output)")
    p.add_argument("--config", default="demo")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--split", default="train")
    p.add_argument("--draws", type=int, default=20000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "text_duplicates.json"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = load_config(args.config, args.overrides)
    data = Path(args.data)
    labels = data / "labels" / f"{args.split}_labels.csv"
    if not labels.is_file():
        raise SystemExit(f"{labels}: not found (expected a preprocessed data set with labels/{args.split}_labels.csv)")
    volumes = pd.read_csv(labels)["VolumeName"].tolist()
    texts = AnatomyTexts.load(data / "texts", rule=cfg.data.text_rule)
    anatomies = list(load_anatomy_table(cfg.data.anatomy_table).names)
    rng = np.random.default_rng(args.seed)
    per_anatomy: dict[str, dict[str, float]] = {}
    for name in anatomies:
        ids: list[int | None] = []
        for volume in volumes:
            scan = scan_id(volume)
            if not texts.has_scan(scan):
                ids.append(None)
                continue
            t = texts.get(scan, name)
            ids.append(None if t.is_normal else t.id)
        abnormal = Counter(i for i in ids if i is not None)
        per_anatomy[name] = {"volumes": len(ids), "abnormal": sum(abnormal.values()),
                             "distinct_abnormal": len(abnormal),
                             "abnormal_with_twin_in_split": sum(c for c in abnormal.values() if c > 1),
                             **batch_statistics(ids, cfg.train.batch_size, args.draws, rng)}
        log.info("%s: %s", name, per_anatomy[name])
    total = {k: sum(v[k] for v in per_anatomy.values())
             for k in ("abnormal_with_partner_per_batch", "identical_abnormal_pairs_per_batch")}
    result = {"machine": describe_machine(), "command": " ".join(["python", *sys.argv]),
              "config": args.config, "overrides": args.overrides, "text_rule": cfg.data.text_rule,
              "split": args.split, "batch_size": cfg.train.batch_size, "draws": args.draws,
              "anatomy_samples_per_batch": cfg.train.batch_size * len(anatomies),
              "per_anatomy": per_anatomy, "all_anatomies": total}
    atomic_write_text(Path(args.out), json.dumps(result, indent=2) + "\n")
    lines = ["| anatomy | abnormal texts | distinct | with an identical twin in the split | abnormal samples with "
             "an identical partner, per batch | identical abnormal pairs, per batch |", "|---|---|---|---|---|---|"]
    for name, v in per_anatomy.items():
        lines.append(f"| {name} | {v['abnormal']} | {v['distinct_abnormal']} | {v['abnormal_with_twin_in_split']} | "
                     f"{v['abnormal_with_partner_per_batch']:.3f} | {v['identical_abnormal_pairs_per_batch']:.3f} |")
    lines.append(f"| all | | | | {total['abnormal_with_partner_per_batch']:.3f} | "
                 f"{total['identical_abnormal_pairs_per_batch']:.3f} |")
    print("\n".join(lines))  # noqa: T201  (the product of this command)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
