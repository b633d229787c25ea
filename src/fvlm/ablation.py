"""The paper's claim in miniature: global vs anatomy-wise alignment, and the two false-negative reductions.

    fvlm demo --ablation --out ablation_out          (or: python benchmarks/ablation.py)

Same synthetic data, same preprocessing and the same training budget for every variant, several seeds:

- ``global``: CT-CLIP-style, whole crop vs whole report, standard InfoNCE (identity targets);
- ``anatomy``: anatomy-wise alignment, no false-negative reduction (identity targets);
- ``anatomy+normal``: + normal samples of an anatomy are mutual positives;
- ``anatomy+normal+text``: + identical texts are positives (the released rule, fVLM).

Writes ``OUT/ablation.json`` (per run: variant, seed, macro AUC, per-label AUC, seconds) and returns a
markdown table of mean +- sd macro AUC per variant.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from pathlib import Path
from typing import Any

from fvlm.io import atomic_write_text

log = logging.getLogger(__name__)

VARIANTS: dict[str, list[str]] = {
    "global": ["loss.mode=global", "loss.normal_positives=false", "loss.same_text_positives=false"],
    "anatomy": ["loss.mode=anatomy", "loss.normal_positives=false", "loss.same_text_positives=false"],
    "anatomy+normal": ["loss.mode=anatomy", "loss.normal_positives=true", "loss.same_text_positives=false"],
    "anatomy+normal+text": ["loss.mode=anatomy", "loss.normal_positives=true", "loss.same_text_positives=true"],
}


def ablation_table(runs: list[dict[str, Any]], reference: str = "anatomy") -> str:
    """Markdown table: variant, runs, mean +- sd macro AUC, the paired difference to ``reference`` (same seed,
    so the seed-to-seed spread that all variants share cancels), per-seed values."""
    by_seed = {(r["variant"], r["seed"]): r["macro_auc"] for r in runs}
    lines = [f"| variant | runs | macro AUC mean +- sd | paired difference to {reference} (mean +- sd) | per seed |",
             "|---|---|---|---|---|"]
    for variant in VARIANTS:
        seeds = sorted(s for v, s in by_seed if v == variant)
        if not seeds:
            continue
        aucs = [by_seed[(variant, s)] for s in seeds]
        sd = statistics.stdev(aucs) if len(aucs) > 1 else 0.0
        diffs = [by_seed[(variant, s)] - by_seed[(reference, s)] for s in seeds if (reference, s) in by_seed]
        if variant == reference or not diffs:
            paired = "-"
        else:
            paired = f"{statistics.mean(diffs):+.3f} +- {statistics.stdev(diffs) if len(diffs) > 1 else 0.0:.3f}"
        lines.append(f"| {variant} | {len(aucs)} | {statistics.mean(aucs):.3f} +- {sd:.3f} | {paired} | "
                     + ", ".join(f"{a:.3f}" for a in aucs) + " |")
    return "\n".join(lines)


def run_ablation(out: Path, config: str = "demo", overrides: list[str] | None = None, seed: int = 0,
                 seeds: int = 3, n_train: int = 0, n_valid: int = 0, workers: int = 2,
                 variants: list[str] | None = None) -> str:
    """Train and evaluate every variant with ``seeds`` seeds on one synthetic data set; returns the table."""
    import pandas as pd

    from fvlm.checkpoint import latest_checkpoint
    from fvlm.config import load_config
    from fvlm.demo import DEMO_MAX_RECONSTRUCTIONS, DEMO_TRAIN_PATIENTS, DEMO_VALID_PATIENTS, _preprocess
    from fvlm.metrics import compute_metrics
    from fvlm.synth import synthesize
    from fvlm.train import train
    from fvlm.zeroshot import evaluate

    out = Path(out)
    overrides = list(overrides or [])
    data, processed = out / "data", out / "processed"
    if not (data / "synth_info.json").exists():
        synthesize(data, n_train=n_train or DEMO_TRAIN_PATIENTS, n_valid=n_valid or DEMO_VALID_PATIENTS, seed=seed,
                   size="demo", workers=workers, max_reconstructions=DEMO_MAX_RECONSTRUCTIONS)
    for split in ("train", "valid"):
        _preprocess(data, processed, config, [o for o in overrides if o.startswith("data.")], split, workers)
    labels = pd.read_csv(processed / "labels" / "valid_labels.csv")
    results_path = out / "ablation.json"
    runs: list[dict[str, Any]] = json.loads(results_path.read_text())["runs"] if results_path.exists() else []
    done = {(r["variant"], r["seed"]) for r in runs}
    for variant in variants or list(VARIANTS):
        for s in range(seeds):
            if (variant, s) in done:
                log.info("ablation %s seed %d: done already", variant, s)
                continue
            run = out / "runs" / f"{variant}-seed{s}"
            cfg = load_config(config, overrides + VARIANTS[variant] + [f"train.seed={s}"])
            t0 = time.perf_counter()
            if latest_checkpoint(run) is None:
                train(cfg, processed, run)
            scores = evaluate(run, processed, "valid", run / "scores.csv")
            metrics = compute_metrics(scores, labels)
            runs.append({"variant": variant, "seed": s, "macro_auc": metrics["macro"]["auc"],
                         "auc": {k: (v["auc"] if v["auc"] == v["auc"] else None)  # NaN (one class) -> null
                                 for k, v in metrics["labels"].items()},
                         "seconds": round(time.perf_counter() - t0, 1)})
            log.info("ablation %s seed %d: macro AUC %.3f", variant, s, runs[-1]["macro_auc"])
            atomic_write_text(results_path, json.dumps({"config": config, "overrides": overrides, "runs": runs},
                                                       indent=2) + "\n")
    table = ablation_table(runs)
    print(table)  # noqa: T201  (the product of this command)
    return table
