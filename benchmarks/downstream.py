"""Beyond zero-shot on the demo data: zero-shot vs linear probes (1 %, 10 %, 100 % of the training labels) vs
fine-tuning, macro AUC on the validation split, several seeds.

    python benchmarks/downstream.py --run demo_out/run --data demo_out/processed --work /tmp/downstream

- **zero-shot**: the run's prompts on the anatomy embeddings (``fvlm eval``'s scores, computed by ``fvlm probe`` from
  the same cached embeddings);
- **probe**: ``fvlm probe --fractions 0.01,0.1,1 --seeds 3`` (frozen encoder, logistic head per label on the
  anatomy the table maps it to, C by cross-validation on the training labels);
- **fine-tune**: ``fvlm finetune`` per seed (``--set train.seed=S``), all training labels, a short CPU schedule
  (``--steps``, ``--batch-size``), scored on the validation split.

Macro AUCs are over the labels zero-shot scores that have both classes in train and validation (the released
table scores 16 labels), and, for probe and fine-tune, also over every evaluable label. Resumable: each stage's
result is written into the results JSON as soon as it is done and skipped on a rerun (a fine-tune interrupted
mid-run resumes from its last checkpoint).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from machine import machine  # noqa: E402  (sibling module of the benchmarks)

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("bench.downstream")


def _save(results: dict, path: Path) -> None:
    from fvlm.io import atomic_write_text

    atomic_write_text(path, json.dumps(results, indent=2) + "\n")


def _stats(values: list[float]) -> dict:
    return {"mean": round(statistics.mean(values), 4), "sd": round(statistics.stdev(values), 4) if len(values) > 1
            else 0.0, "per_seed": values}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="pre-trained run directory (e.g. demo_out/run)")
    p.add_argument("--data", required=True, help="processed directory with train and valid splits and labels/")
    p.add_argument("--work", required=True, help="working directory (probe outputs, fine-tuned runs)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--fractions", default="0.01,0.1,1")
    p.add_argument("--steps", type=int, default=30, help="fine-tuning optimizer steps per seed")
    p.add_argument("--batch-size", type=int, default=8, help="fine-tuning batch size")
    p.add_argument("--lr", type=float, default=1e-4, help="fine-tuning learning rate of the encoder")
    p.add_argument("--head-lr-scale", type=float, default=100.0,
                   help="heads' learning rate relative to --lr (a short schedule needs fast heads)")
    p.add_argument("--skip-finetune", action="store_true")
    p.add_argument("--long-steps", type=int, default=0,
                   help="also one fine-tune (seed 0) with this many steps: does a longer schedule pay off?")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "downstream.json"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from fvlm.checkpoint import resolve_checkpoint
    from fvlm.finetune import finetune
    from fvlm.probe import label_auc, run_probe

    data, work, out = Path(args.data), Path(args.work), Path(args.out)
    train_labels, valid_labels = data / "labels" / "train_labels.csv", data / "labels" / "valid_labels.csv"
    fractions = [float(f) for f in args.fractions.split(",")]
    settings = {"run": str(args.run), "checkpoint": str(resolve_checkpoint(args.run)), "data": str(data),
                "seeds": args.seeds, "fractions": fractions, "finetune_steps": args.steps,
                "finetune_batch_size": args.batch_size, "finetune_lr": args.lr,
                "finetune_head_lr_scale": args.head_lr_scale}
    results = json.loads(out.read_text()) if out.is_file() else {}
    if results.get("settings") != settings:
        if results:
            log.info("%s was computed with other settings: starting afresh", out)
        results = {"benchmark": "downstream", "settings": settings, "machine": machine(), "seconds": {}}
    results["commands"] = {
        "probe": f"fvlm probe --checkpoint {args.run} --data {data} --labels {train_labels},{valid_labels} "
                 f"--out {work / 'probe'} --fractions {args.fractions} --seeds {args.seeds}",
        "finetune": f"fvlm finetune --checkpoint {args.run} --data {data} --labels {train_labels} "
                    f"--out {work / 'finetune_seed{S}'} --set train.seed={{S}} --set train.max_steps={args.steps} "
                    f"--set train.batch_size={args.batch_size} --set train.lr={args.lr} "
                    f"--set train.warmup_steps={max(1, args.steps // 10)} --set train.ckpt_every=10 "
                    f"--head-lr-scale {args.head_lr_scale:g}",
        "metrics": f"fvlm metrics {work / 'finetune_seed0' / 'scores_valid.csv'} --labels {valid_labels}"}

    if "probe" not in results:
        t0 = time.perf_counter()
        s = run_probe(args.run, data, [train_labels, valid_labels], work / "probe", fractions=fractions,
                      seeds=args.seeds, device="cpu").to_dict()
        zs = s["zero_shot"]
        results["labels"] = {"zero_shot_labels": zs["labels"], "evaluable": s["evaluable_labels"],
                             "skipped": s["skipped"], "train_volumes": s["train_volumes"],
                             "valid_volumes": s["eval_volumes"]}
        results["zero_shot"] = {"macro_auc": zs["macro_auc"], "auc": zs["auc"]}
        results["probe"] = {f: {"macro_auc_zero_shot_labels": _stats(v["macro_auc_zero_shot_labels"]["seeds"]),
                                "macro_auc_all_labels": _stats(v["macro_auc"]["seeds"]),
                                "mean_train_labels_per_head": v["mean_train_n"]}
                            for f, v in s["by_fraction"].items()}
        results["probe_per_label"] = {f"{r['fraction']:g}/seed{r['seed']}": r["auc"] for r in s["runs"]}
        results["seconds"]["probe (embeddings of both splits + all heads)"] = round(time.perf_counter() - t0, 1)
        _save(results, out)
    common, evaluable = results["labels"]["zero_shot_labels"], results["labels"]["evaluable"]

    y_valid = pd.read_csv(valid_labels).set_index("VolumeName")

    def finetune_run(seed: int, steps: int, run2: Path) -> dict:
        from fvlm.checkpoint import latest_checkpoint
        from fvlm.finetune import score_split

        t0 = time.perf_counter()
        finetune(args.run, data, str(train_labels), run2, resume=latest_checkpoint(run2) is not None, device="cpu",
                 eval_split="valid", head_lr_scale=args.head_lr_scale,
                 overrides=[f"train.seed={seed}", f"train.max_steps={steps}", f"train.batch_size={args.batch_size}",
                            f"train.lr={args.lr}", f"train.warmup_steps={max(1, steps // 10)}", "train.ckpt_every=10",
                            "train.log_every=5"])
        if not (run2 / "scores_valid.csv").is_file():  # resumed after the last step: score now
            score_split(run2, data, "valid", device="cpu")
        scores = pd.read_csv(run2 / "scores_valid.csv").set_index("VolumeName")
        truth = y_valid.loc[scores.index]
        aucs = {c: label_auc(scores[c].to_numpy(float), truth[c].to_numpy(float)) for c in scores.columns}
        aucs = {k: None if v is None else round(v, 4) for k, v in aucs.items()}

        def macro(labels):
            vals = [aucs[k] for k in labels if aucs.get(k) is not None]
            return round(float(np.mean(vals)), 4) if vals else None

        record = {"macro_auc_zero_shot_labels": macro(common), "macro_auc_all_labels": macro(evaluable),
                  "auc": aucs, "steps": steps, "seconds": round(time.perf_counter() - t0, 1), "run": str(run2)}
        log.info("fine-tune seed %d, %d steps: macro AUC %s (zero-shot labels), %s (all) in %.0f s", seed, steps,
                 record["macro_auc_zero_shot_labels"], record["macro_auc_all_labels"], record["seconds"])
        return record

    if not args.skip_finetune:
        ft = results.setdefault("finetune_runs", {})
        for seed in range(args.seeds):
            if f"seed{seed}" not in ft:
                ft[f"seed{seed}"] = finetune_run(seed, args.steps, work / f"finetune_seed{seed}")
                _save(results, out)
        done = [ft[f"seed{s}"] for s in range(args.seeds) if f"seed{s}" in ft]
        if done:
            results["finetune"] = {k: _stats([r[k] for r in done]) for k in ("macro_auc_zero_shot_labels",
                                                                              "macro_auc_all_labels")}
            _save(results, out)
        if args.long_steps and results.get("finetune_long", {}).get("steps") != args.long_steps:
            results["finetune_long"] = finetune_run(0, args.long_steps, work / f"finetune_long{args.long_steps}_seed0")
            _save(results, out)

    rows = [("zero-shot", results["zero_shot"]["macro_auc"], None)]
    for f, v in results["probe"].items():
        rows.append((f"probe {float(f) * 100:g} %", v["macro_auc_zero_shot_labels"], v["macro_auc_all_labels"]))
    if "finetune" in results:
        rows.append(("fine-tune 100 %", results["finetune"]["macro_auc_zero_shot_labels"],
                     results["finetune"]["macro_auc_all_labels"]))
    if "finetune_long" in results:
        rows.append((f"fine-tune {results['finetune_long']['steps']} steps", results["finetune_long"][
            "macro_auc_zero_shot_labels"], results["finetune_long"]["macro_auc_all_labels"]))
    for name, a, b in rows:
        fmt = (lambda x: "-" if x is None else f"{x:.3f}" if isinstance(x, float)  # noqa: E731
               else f"{x['mean']:.3f} +- {x['sd']:.3f}")
        log.info("%-16s %-18s %s", name, fmt(a), fmt(b))
    log.info("-> %s", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
