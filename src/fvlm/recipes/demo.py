"""The main job, end to end on a laptop CPU: synthesise -> preprocess -> train -> zero-shot eval -> metrics.

    fvlm demo --out demo_out          (what ``make demo`` runs)

Writes into ``OUT/``: ``data/`` (synthetic CT-RATE), ``processed/``, ``run/`` (checkpoints, log.csv,
loss.png), ``scores.csv``, ``metrics.json``, ``roc.png``, ``loss.png``, ``embeddings.safetensors`` (per-anatomy
image and text embeddings of the validation split), ``retrieval.json`` (volume <-> report Recall@K) and
``summary.json`` (timings).
Every stage is resumable: a stage is done only when its completion marker (``{stage}.done.json``, written
last and atomically, see :mod:`fvlm.markers`) says so for the same settings; a rerun reuses marked stages,
continues an interrupted preprocessing (per volume) or training (from its last checkpoint, ``--resume``), and
redoes everything downstream of a stage it had to redo.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import pandas as pd

from fvlm.checkpoint import latest_checkpoint, load_run_config
from fvlm.config import load_config
from fvlm.data.preprocess import preprocess
from fvlm.decompose import decompose_files
from fvlm.embed import embed
from fvlm.io import atomic_path, atomic_write_text
from fvlm.markers import clear_marker, is_done, read_marker, write_marker
from fvlm.metrics import compute_metrics, format_table, metrics_to_json
from fvlm.plots import plot_roc
from fvlm.retrieval import format_retrieval_table, retrieval_from_file
from fvlm.synth import synthesize
from fvlm.train import train
from fvlm.zeroshot import evaluate

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


def preprocess_splits(data: Path, processed: Path, config: str, overrides: list[str], workers: int,
                      splits: tuple[str, ...] = ("train", "valid")) -> None:
    """Preprocess ``splits`` of a CT-RATE-format root into ``processed`` (resumes per volume); any failure raises."""
    cfg = load_config(config, overrides)
    for split in splits:
        result = preprocess(data, processed, cfg, splits=[split], workers=workers)
        if not result.ok:
            raise RuntimeError(f"preprocessing {split} failed for {result.n_failed} volume(s); see "
                               f"{processed / 'failures.csv'}")


def run_demo(out: str | Path, config: str = "demo", overrides: list[str] | None = None, n_train: int = 0,
             n_valid: int = 0, seed: int = 0, texts: str = "generator", workers: int = 2) -> dict[str, Any]:
    """Run the whole pipeline; returns the metrics dict (also written to ``OUT/metrics.json``)."""
    out = Path(out)
    overrides = list(overrides or [])
    load_config(config, overrides)  # a bad --set or config file fails now, before anything is written
    n_train = n_train or DEMO_TRAIN_PATIENTS
    n_valid = n_valid or DEMO_VALID_PATIENTS
    data, processed, run = out / "data", out / "processed", out / "run"
    timings: dict[str, float] = {}
    t_start = time.perf_counter()

    # each stage's settings include the marker of the stage before it: a redone stage invalidates what follows
    def settings(stage_dir: Path, stage: str, **extra: Any) -> dict[str, Any]:
        return {**extra, "upstream": (read_marker(stage_dir, stage) or {}).get("id")}

    synth_settings = {"n_train": n_train, "n_valid": n_valid, "seed": seed, "size": "demo",
                      "max_reconstructions": DEMO_MAX_RECONSTRUCTIONS}
    with _stage("synthesise", timings):
        if is_done(data, "synth", config=synth_settings):
            log.info("reusing %s", data)
        else:
            previous = read_marker(data, "synth")
            if previous is not None:
                raise ValueError(f"{data} was synthesised with other settings ({previous.get('settings')}; now "
                                 f"{synth_settings}): use another --out, or delete {data}")
            # no marker: not synthesised, or interrupted; the generator is deterministic and writes atomically
            synthesize(data, n_train=n_train, n_valid=n_valid, seed=seed, size="demo", workers=workers,
                       max_reconstructions=DEMO_MAX_RECONSTRUCTIONS)
            write_marker(data, "synth", config=synth_settings, settings=synth_settings)

    if texts == "decomposed":
        with _stage("decompose reports", timings):
            target = data / "anatomy_texts_decomposed"
            dec_settings = settings(data, "synth")
            if is_done(target, "decompose", config=dec_settings):
                log.info("reusing %s", target)
            else:
                clear_marker(target, "decompose")
                reports = ",".join(str(data / "radiology_text_reports" / f"{s}_reports.csv")
                                   for s in ("train", "validation"))
                if not decompose_files(reports, target).ok:
                    raise RuntimeError("fvlm decompose failed")
                write_marker(target, "decompose", config=dec_settings)
            overrides.append(f"data.texts={target}")

    data_overrides = [o for o in overrides if o.startswith("data.") and not o.startswith("data.texts")]
    with _stage("preprocess", timings):
        pre_settings = settings(data, "synth", config=config, overrides=data_overrides)
        if is_done(processed, "demo-preprocess", config=pre_settings):
            log.info("reusing %s", processed)
        else:
            clear_marker(processed, "demo-preprocess")
            # resumes per volume: complete volumes are skipped
            preprocess_splits(data, processed, config, data_overrides, workers)
            write_marker(processed, "demo-preprocess", config=pre_settings)

    cfg = load_config(config, overrides)
    with _stage("train", timings):
        # fvlm train writes the "train" marker (config hash = the run's config) once the whole schedule is done
        if is_done(run, "train", config=cfg.to_dict()) and latest_checkpoint(run) is not None:
            log.info("reusing the trained run in %s", run)
        else:
            resume = False
            ckpt = latest_checkpoint(run)
            if ckpt is not None:
                if load_run_config(ckpt)[0].to_dict() == cfg.to_dict():
                    log.info("continuing the interrupted training in %s from %s", run, ckpt.name)
                    resume = True
                else:
                    log.warning("%s was trained with another configuration: training again from scratch", run)
                    shutil.rmtree(run)  # the demo's own run directory (OUT/run)
            train(cfg, processed, run, resume=resume)
            if not is_done(run, "train", config=cfg.to_dict()):
                raise RuntimeError(f"training in {run} ended without its completion marker")

    scores = out / "scores.csv"
    eval_settings = settings(run, "train", checkpoint=str(latest_checkpoint(run)))
    with _stage("zero-shot eval", timings):
        if is_done(out, "eval", config=eval_settings) and scores.exists():
            log.info("reusing %s", scores)
        else:
            clear_marker(out, "eval")
            evaluate(run, processed, "valid", scores)
            write_marker(out, "eval", config=eval_settings)

    with _stage("embed + retrieval", timings):
        embeddings = out / "embeddings.safetensors"
        if not (is_done(out, "embed", config=eval_settings) and embeddings.exists()
                and (out / "retrieval.json").exists()):
            clear_marker(out, "embed")
            embeddings = embed(run, processed, "valid", embeddings)
            retrieval = retrieval_from_file(embeddings)
            atomic_write_text(out / "retrieval.json", json.dumps(retrieval, indent=2) + "\n")
            write_marker(out, "embed", config=eval_settings)
        else:
            log.info("reusing %s", embeddings)
            retrieval = json.loads((out / "retrieval.json").read_text())

    with _stage("metrics", timings):
        labels = processed / "labels" / "valid_labels.csv"
        scores_df, labels_df = pd.read_csv(scores), pd.read_csv(labels)
        metrics = compute_metrics(scores_df, labels_df)
        atomic_write_text(out / "metrics.json", metrics_to_json(metrics) + "\n")
        plot_roc(scores_df, labels_df, out / "roc.png")
        with atomic_path(out / "loss.png", suffix=".png") as tmp:
            shutil.copyfile(run / "loss.png", tmp)

    total = time.perf_counter() - t_start
    summary = {"seconds": timings, "total_seconds": round(total, 1), "config": config, "overrides": overrides,
               "train_patients": n_train, "valid_patients": n_valid, "seed": seed, "texts": texts,
               "macro_auc": metrics["macro"]["auc"],
               "retrieval_mean_recall": {d: {k: v for k, v in retrieval["mean"][d].items() if k.startswith("recall@")}
                                         for d in ("image_to_text", "text_to_image")}}
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    write_marker(out, "demo", config=eval_settings, macro_auc=metrics["macro"]["auc"])
    table = format_table(metrics)
    # the demo's product is this table: print it to stdout (the one place fvlm prints)
    print(table)  # noqa: T201
    print("\nretrieval (validation split, anatomy embeddings):\n" + format_retrieval_table(retrieval))  # noqa: T201
    print(f"\nmacro AUC {metrics['macro']['auc']:.3f} over {len(metrics['scored'])} labels; "  # noqa: T201
          f"total {total / 60:.1f} min; outputs in {out}/ (metrics.json, roc.png, loss.png, scores.csv)")
    return metrics
