"""What the released-code switches change at demo size (README "What is different from the released code").

    python benchmarks/parity_switches.py --out /tmp/fvlm_parity_switches [--seeds 3] [--processed DIR]
    python benchmarks/parity_switches.py --out /tmp/fvlm_parity_switches --windows-only

On one processed data set (the demo's: synthesised and preprocessed here, or ``--processed``), for each training
seed ``s`` (``train.seed=s``):
1. ``ours``: the demo preset (our choices), evaluated with our centred evaluation window and with the released one
   (``data.eval_window=released``);
2. ``released``: the same preset with the released training switches that need no new preprocessing
   (``data.text_rule=released``, ``model.text.type_embeddings=false``, the per-epoch LAVIS cosine
   ``train.lr_schedule=epoch``, ``train.weight_decay=0.01`` on every parameter), evaluated with both windows.
   The released schedule runs 20 epochs of CT-RATE; here it gets the **same optimizer-step budget** as ours
   (``train.max_steps`` of the preset) with its per-epoch cosine stretched over as many epochs as that budget
   spans, so the comparison is the shape of the schedule, not the amount of training.
Paired (same seed) differences with 95 % t intervals and sign tests, as in benchmarks/ablation.py. Every finished
run has ``runs/<arm>-seed<s>/result.json`` and then ``DONE.json``; a rerun skips finished runs and resumes
interrupted ones, so more seeds can be added later (``--seeds 5``). Writes ``benchmarks/results/parity_switches.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

from machine import machine as describe_machine  # noqa: E402  (sibling module of the benchmarks)

log = logging.getLogger("benchmarks.parity_switches")


def _macro(scores: Path, labels: Path) -> dict:
    import pandas as pd

    from fvlm.metrics import compute_metrics

    m = compute_metrics(pd.read_csv(scores), pd.read_csv(labels))
    return {"macro_auc": round(float(m["macro"]["auc"]), 4),
            "auc": {k: (round(float(v["auc"]), 4) if v["auc"] == v["auc"] else None)  # NaN (one class) -> null
                    for k, v in m["labels"].items()} if "labels" in m else {}}


def _eval(run: Path, processed: Path, out: Path, window: str) -> dict:
    """Zero-shot macro AUC of ``run`` with the evaluation window ``window`` (``data.eval_window``)."""
    from fvlm.zeroshot import evaluate

    scores = out / "scores" / f"{run.name}_{window}.csv"
    scores.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    evaluate(run, processed, "valid", scores, eval_window=window)
    seconds = round(time.perf_counter() - t0, 1)
    return {**_macro(scores, processed / "labels" / "valid_labels.csv"), "eval_seconds": seconds}


def window_statistics(processed: Path, config: str = "demo") -> dict:
    """Released vs centred evaluation windows on a processed split (no model needed): how many differ, and how
    many anatomy voxels the released window (one voxel short of the extent) leaves out."""
    from fvlm.anatomy import load_anatomy_table
    from fvlm.config import load_config
    from fvlm.data import store
    from fvlm.zeroshot import read_crop, volume_crop_specs

    table = load_anatomy_table("released")
    ours, released = load_config(config), load_config(config, ["data.eval_window=released"])
    stats = {"volumes": 0, "windows": 0, "differ": 0, "anatomies_cut": 0, "voxels_lost": 0, "voxels": 0}
    for volume in store.list_volumes(processed, "valid"):
        meta, vol = store.read_meta(processed, "valid", volume), store.open_volume(processed, "valid", volume)
        a = {s.anatomy: s for s in volume_crop_specs(volume, meta, ours, table, False)}
        b = {s.anatomy: s for s in volume_crop_specs(volume, meta, released, table, False)}
        stats["volumes"] += 1
        for k, sa in a.items():
            sb = b[k]
            stats["windows"] += 1
            stats["differ"] += sa.start != sb.start or sa.size != sb.size or (sb.extent or sb.size) != sb.size
            _, mask = read_crop(vol, sb, released.data.hu_window)
            kept, full = int((mask == k + 1).sum()), int(meta["anatomies"][table.names[k]]["voxels"])
            stats["anatomies_cut"] += kept < full
            stats["voxels_lost"] += full - kept
            stats["voxels"] += full
    return {"config": config, "eval_crop_size": list(ours.data.eval_crop_size), **stats}


def text_statistics(processed: Path, config: str = "demo") -> dict:
    """Our text rule vs the released one on the processed training split's anatomy texts (no model needed):
    strings and token ids that differ, scans without texts (left out by ours, all-normal in the release),
    identical-text pairs that only one rule finds."""
    import pandas as pd

    from fvlm.anatomy import load_anatomy_table
    from fvlm.config import load_config
    from fvlm.model.text_encoder import load_tokenizer
    from fvlm.text import AnatomyTexts

    cfg = load_config(config)
    table = load_anatomy_table("released")
    tok = load_tokenizer(cfg.model.text.tokenizer or cfg.model.text.pretrained)
    ours = AnatomyTexts.load(processed / "texts", rule="fvlm")
    released = AnatomyTexts(ours.desc, ours.conc, rule="released")
    manifest = pd.read_csv(processed / "manifest.csv", keep_default_na=False)
    scans = sorted(set(manifest[(manifest["split"] == "train") & (manifest["status"] == "ok")]["scan"]))
    stats = {"scans": len(scans), "scans_without_texts": sum(not ours.has_scan(s) for s in scans), "texts": 0,
             "strings_differ": 0, "tokens_differ": 0, "identical_pairs_ours": 0, "identical_pairs_released": 0}
    for name in table.names:
        a = [ours.get(s, name) for s in scans if ours.has_scan(s)]
        b = [released.get(s, name) for s in scans if ours.has_scan(s)]
        stats["texts"] += len(a)
        stats["strings_differ"] += sum(x.text != y.text for x, y in zip(a, b))
        stats["tokens_differ"] += sum(tok(x.text)["input_ids"] != tok(y.text)["input_ids"] for x, y in zip(a, b))
        for rule, items in (("ours", a), ("released", b)):
            ids = pd.Series([t.id for t in items])
            stats[f"identical_pairs_{rule}"] += int((ids.value_counts() * (ids.value_counts() - 1) // 2).sum())
    return {"config": config, "tokenizer": cfg.model.text.tokenizer or cfg.model.text.pretrained, **stats}


RELEASED_SWITCHES = ["data.text_rule=released", "model.text.type_embeddings=false", "train.lr_schedule=epoch",
                     "train.weight_decay=0.01", "train.weight_decay_all=true"]
ARMS = ("ours", "released")
COMPARISONS = [  # (name, (arm, window) a, (arm, window) b): b - a
    ("released training switches", ("ours", "centred"), ("released", "centred")),
    ("released evaluation window", ("ours", "centred"), ("ours", "released")),
    ("all released switches", ("ours", "centred"), ("released", "released")),
]


def released_overrides(processed: Path, config: str, overrides: list[str]) -> list[str]:
    """The released switches at the same optimizer-step budget as ``config``: per-epoch cosine over the epochs
    that ``train.max_steps`` spans on this training split (``drop_last`` batches, one process)."""
    from fvlm.config import load_config
    from fvlm.data import store

    cfg = load_config(config, overrides)
    per_epoch = len(store.list_volumes(processed, "train")) // cfg.train.batch_size // cfg.train.grad_accum
    if per_epoch <= 0:
        raise ValueError(f"{processed}: fewer training volumes than one batch of {cfg.train.batch_size}")
    steps = cfg.train.max_steps or cfg.train.epochs * per_epoch
    return RELEASED_SWITCHES + [f"train.max_steps={steps}", f"train.epochs={max(1, math.ceil(steps / per_epoch))}"]


def finish_run(run: Path, cfg, processed: Path, out: Path) -> dict:
    """Train (or resume) ``run`` to the end of its schedule and evaluate it with both windows; ``result.json`` and
    then ``DONE.json`` are written atomically; a run with ``DONE.json`` is returned as stored."""
    from fvlm.checkpoint import latest_checkpoint
    from fvlm.io import atomic_write_text
    from fvlm.train import train

    if (run / "DONE.json").is_file() and (run / "result.json").is_file():
        return json.loads((run / "result.json").read_text())
    t0 = time.perf_counter()
    train(cfg, processed, run, resume=latest_checkpoint(run) is not None)
    train_seconds = round(time.perf_counter() - t0, 1)
    result = {"train_seconds": train_seconds, **{w: _eval(run, processed, out, w) for w in ("centred", "released")}}
    atomic_write_text(run / "result.json", json.dumps(result, indent=2) + "\n")
    atomic_write_text(run / "DONE.json", json.dumps({"finished": True}) + "\n")
    return result


def paired_differences(results: dict[int, dict[str, dict]]) -> list[dict]:
    """Seed-paired macro-AUC differences for :data:`COMPARISONS` over the seeds where both sides are finished."""
    from fvlm.recipes.ablation import sign_test, t_interval

    out = []
    for name, (arm_a, win_a), (arm_b, win_b) in COMPARISONS:
        seeds = sorted(s for s, r in results.items() if arm_a in r and arm_b in r)
        diffs = [results[s][arm_b][win_b]["macro_auc"] - results[s][arm_a][win_a]["macro_auc"] for s in seeds]
        if not diffs:
            continue
        lo, hi = t_interval(diffs) if len(diffs) > 1 else (float("nan"), float("nan"))
        out.append({"comparison": name, "a": f"{arm_a} trained, {win_a} window",
                    "b": f"{arm_b} trained, {win_b} window",
                    "seeds": seeds, "diffs": [round(d, 4) for d in diffs], "mean": round(sum(diffs) / len(diffs), 4),
                    "ci95_t": [round(lo, 4), round(hi, 4)] if len(diffs) > 1 else None,
                    "wins": sum(d > 0 for d in diffs), "losses": sum(d < 0 for d in diffs),
                    "sign_test_p": round(sign_test(diffs), 4)})
    return out


def table(results: dict[int, dict[str, dict]], paired: list[dict]) -> str:
    lines = ["| seed | ours, centred window | ours, released window | released switches, centred window | "
             "released switches, released window |", "|---|---|---|---|---|"]
    for s, r in sorted(results.items()):
        cells = [f"{r[a][w]['macro_auc']:.3f}" if a in r else "-" for a in ARMS for w in ("centred", "released")]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    lines += ["", "| comparison (b - a, same seeds) | pairs | mean difference | 95 % CI (t) | wins / losses "
              "| sign test p |",
              "|---|---|---|---|---|---|"]
    for c in paired:
        ci = f"[{c['ci95_t'][0]:+.3f}, {c['ci95_t'][1]:+.3f}]" if c["ci95_t"] else "-"
        lines.append(f"| {c['comparison']} | {len(c['seeds'])} | {c['mean']:+.3f} | {ci} | {c['wins']} / {c['losses']} "
                     f"| {c['sign_test_p']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="/tmp/fvlm_parity_switches")
    p.add_argument("--seeds", type=int, default=3, help="training seeds 0..N-1 per arm")
    p.add_argument("--config", default="demo")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--processed", default=None,
                   help="an existing processed data set (default: synthesise and preprocess the demo's in OUT)")
    p.add_argument("--train", type=int, default=0, help="synthetic training patients (default: the demo's)")
    p.add_argument("--valid", type=int, default=0, help="synthetic validation patients (default: the demo's)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--results", default=str(Path(__file__).parent / "results" / "parity_switches.json"))
    p.add_argument("--windows-only", action="store_true",
                   help="only the window and text statistics of the processed data (no training)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from fvlm.config import load_config
    from fvlm.io import atomic_write_text
    from fvlm.recipes.demo import DEMO_MAX_RECONSTRUCTIONS, DEMO_TRAIN_PATIENTS, DEMO_VALID_PATIENTS, preprocess_splits
    from fvlm.synth import synthesize

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if args.processed:
        processed = Path(args.processed)
    else:
        data, processed = out / "data", out / "processed"
        if not (data / "synth_info.json").exists():
            synthesize(data, n_train=args.train or DEMO_TRAIN_PATIENTS, n_valid=args.valid or DEMO_VALID_PATIENTS,
                       seed=0, size="demo", workers=args.workers, max_reconstructions=DEMO_MAX_RECONSTRUCTIONS)
        preprocess_splits(data, processed, args.config, [o for o in args.overrides if o.startswith("data.")],
                          args.workers)
    if not (processed / "manifest.csv").exists():
        raise FileNotFoundError(f"{processed}: not a processed data set (no manifest.csv)")
    result: dict = {"machine": describe_machine(), "command": " ".join(["python", *sys.argv]),
                    "config": args.config, "overrides": args.overrides,
                    "windows": window_statistics(processed, args.config),
                    "texts": text_statistics(processed, args.config)}
    if not args.windows_only:
        released = released_overrides(processed, args.config, args.overrides)
        results: dict[int, dict[str, dict]] = {}
        for s in range(args.seeds):
            for arm, extra in (("ours", []), ("released", released)):
                cfg = load_config(args.config, args.overrides + extra + [f"train.seed={s}"])
                run = out / "runs" / f"{arm}-seed{s}"
                results.setdefault(s, {})[arm] = finish_run(run, cfg, processed, out)
                log.info("%s seed %d: macro AUC %.3f (centred window)", arm, s, results[s][arm]["centred"]["macro_auc"])
        paired = paired_differences(results)
        result.update({"released_training_overrides": released, "seeds": sorted(results),
                       "runs": {str(s): r for s, r in results.items()}, "paired": paired,
                       "table": table(results, paired), "total_seconds": round(time.perf_counter() - t0, 1)})
    atomic_write_text(Path(args.results), json.dumps(result, indent=2) + "\n")
    print(result.get("table") or json.dumps({k: result[k] for k in ("windows", "texts")}, indent=2))  # noqa: T201
    return 0


if __name__ == "__main__":
    sys.exit(main())
