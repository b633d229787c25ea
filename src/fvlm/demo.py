"""The main job, end to end on a laptop CPU: synthesise -> preprocess -> train -> zero-shot eval -> metrics.

    fvlm demo --out demo_out          (what ``make demo`` runs)

Writes into ``OUT/``: ``data/`` (synthetic CT-RATE), ``processed/``, ``run/`` (checkpoints, log.csv,
loss.png), ``scores.csv``, ``metrics.json``, ``roc.png``, ``loss.png``, ``embeddings.safetensors`` (per-anatomy
image and text embeddings of the validation split), ``retrieval.json`` (volume <-> report Recall@K) and
``summary.json`` (timings).
Every stage is resumable: a rerun reuses what is complete.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from fvlm.io import atomic_write_text

log = logging.getLogger(__name__)

DEMO_TRAIN_PATIENTS = 360
DEMO_VALID_PATIENTS = 80
#: one reconstruction per scan keeps the demo's synthesis inside its CPU budget (the code paths for several
#: reconstructions per scan run in the tests)
DEMO_MAX_RECONSTRUCTIONS = 1


def _stage(name: str, timings: dict[str, float]):
    class _Timer:
        def __enter__(self):
            log.info("== %s ==", name)
            self.t0 = time.perf_counter()

        def __exit__(self, *exc):
            timings[name] = round(time.perf_counter() - self.t0, 1)
            if exc[0] is None:
                log.info("== %s done in %.1f s ==", name, timings[name])

    return _Timer()


def _preprocess(data: Path, processed: Path, config: str, overrides: list[str], split: str, workers: int) -> None:
    from fvlm.cli import main as cli_main

    argv = ["preprocess", "--data", str(data), "--split", split, "--out", str(processed), "--config", config,
            "--workers", str(workers)]
    for o in overrides:
        argv += ["--set", o]
    code = cli_main(argv)
    if code != 0:
        raise RuntimeError(f"preprocessing {split} failed (exit {code}); see {processed / 'failures.csv'}")


def run_demo(out: str | Path, config: str = "demo", overrides: list[str] | None = None, n_train: int = 0,
             n_valid: int = 0, seed: int = 0, texts: str = "generator", workers: int = 2) -> dict[str, Any]:
    """Run the whole pipeline; returns the metrics dict (also written to ``OUT/metrics.json``)."""
    import pandas as pd

    from fvlm.checkpoint import latest_checkpoint
    from fvlm.config import load_config
    from fvlm.metrics import compute_metrics, format_table, metrics_to_json, plot_roc
    from fvlm.synth import synthesize
    from fvlm.train import train
    from fvlm.zeroshot import evaluate

    out = Path(out)
    overrides = list(overrides or [])
    n_train = n_train or DEMO_TRAIN_PATIENTS
    n_valid = n_valid or DEMO_VALID_PATIENTS
    data, processed, run = out / "data", out / "processed", out / "run"
    timings: dict[str, float] = {}
    t_start = time.perf_counter()

    with _stage("synthesise", timings):
        info = data / "synth_info.json"
        if info.exists():
            log.info("reusing %s", data)
        else:
            synthesize(data, n_train=n_train, n_valid=n_valid, seed=seed, size="demo", workers=workers,
                       max_reconstructions=DEMO_MAX_RECONSTRUCTIONS)

    if texts == "decomposed":
        with _stage("decompose reports", timings):
            from fvlm.cli import main as cli_main

            target = data / "anatomy_texts_decomposed"
            reports = ",".join(str(data / "radiology_text_reports" / f"{s}_reports.csv")
                               for s in ("train", "validation"))
            if cli_main(["decompose", "--reports", reports, "--out", str(target)]) != 0:
                raise RuntimeError("fvlm decompose failed")
            overrides.append(f"data.texts={target}")

    with _stage("preprocess", timings):
        for split in ("train", "valid"):
            _preprocess(data, processed, config, [o for o in overrides if o.startswith("data.")
                                                  and not o.startswith("data.texts")], split, workers)

    cfg = load_config(config, overrides)
    with _stage("train", timings):
        if latest_checkpoint(run) is not None and (run / "loss.png").exists():
            log.info("reusing the trained run in %s", run)
        else:
            if run.exists():
                shutil.rmtree(run)
            train(cfg, processed, run)

    scores = out / "scores.csv"
    with _stage("zero-shot eval", timings):
        evaluate(run, processed, "valid", scores)

    with _stage("embed + retrieval", timings):
        from fvlm.embed import embed
        from fvlm.retrieval import format_retrieval_table, retrieval_from_file

        embeddings = embed(run, processed, "valid", out / "embeddings.safetensors")
        retrieval = retrieval_from_file(embeddings)
        atomic_write_text(out / "retrieval.json", json.dumps(retrieval, indent=2) + "\n")

    with _stage("metrics", timings):
        labels = processed / "labels" / "valid_labels.csv"
        scores_df, labels_df = pd.read_csv(scores), pd.read_csv(labels)
        metrics = compute_metrics(scores_df, labels_df)
        atomic_write_text(out / "metrics.json", metrics_to_json(metrics) + "\n")
        plot_roc(scores_df, labels_df, out / "roc.png")
        shutil.copyfile(run / "loss.png", out / "loss.png")

    total = time.perf_counter() - t_start
    summary = {"seconds": timings, "total_seconds": round(total, 1), "config": config, "overrides": overrides,
               "train_patients": n_train, "valid_patients": n_valid, "seed": seed, "texts": texts,
               "macro_auc": metrics["macro"]["auc"],
               "retrieval_mean_recall": {d: {k: v for k, v in retrieval["mean"][d].items() if k.startswith("recall@")}
                                         for d in ("image_to_text", "text_to_image")}}
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    table = format_table(metrics)
    # the demo's product is this table: print it to stdout (the one place fvlm prints)
    print(table)  # noqa: T201
    print("\nretrieval (validation split, anatomy embeddings):\n" + format_retrieval_table(retrieval))  # noqa: T201
    print(f"\nmacro AUC {metrics['macro']['auc']:.3f} over {len(metrics['scored'])} labels; "  # noqa: T201
          f"total {total / 60:.1f} min; outputs in {out}/ (metrics.json, roc.png, loss.png, scores.csv)")
    return metrics


def run_demo_cli(args: argparse.Namespace) -> int:
    if args.ablation:
        from fvlm.ablation import run_ablation

        run_ablation(Path(args.out), config=args.config, overrides=args.overrides, seed=args.seed,
                     n_train=args.train, n_valid=args.valid, workers=args.workers)
        return 0
    run_demo(args.out, config=args.config, overrides=args.overrides, n_train=args.train, n_valid=args.valid,
             seed=args.seed, texts=args.texts, workers=args.workers)
    return 0
