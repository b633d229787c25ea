"""What the released-code switches change at demo size (README "What is different from the released code").

    python benchmarks/parity_switches.py --out /tmp/fvlm_parity_switches [--windows-only | --skip-released-training]

1. ``fvlm demo`` (demo preset: our choices) -> macro AUC;
2. the same trained run evaluated with the released eval window (``data.eval_window=released``);
3. a second run trained on the same processed data with the released training switches that need no new
   preprocessing (``data.text_rule``, ``model.text.type_embeddings``, ``train.lr_schedule=epoch`` over 20
   epochs, ``train.weight_decay=0.01`` on every parameter), evaluated with both windows.
One seed per variant: compare the differences with the seed-to-seed spread of benchmarks/results/ablation.json.
Writes ``benchmarks/results/parity_switches.json``. Resumable: finished runs in --out are reused.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

from machine import machine as describe_machine  # noqa: E402  (sibling module of the benchmarks)

RELEASED_TRAINING = ["data.text_rule=released", "model.text.type_embeddings=false", "train.lr_schedule=epoch",
                     "train.epochs=20", "train.max_steps=0", "train.weight_decay=0.01", "train.weight_decay_all=true"]


def _macro(scores: Path, labels: Path) -> dict:
    import pandas as pd

    from fvlm.metrics import compute_metrics

    m = compute_metrics(pd.read_csv(scores), pd.read_csv(labels))
    return {"macro_auc": round(float(m["macro"]["auc"]), 4),
            "auc": {k: round(float(v["auc"]), 4) for k, v in m["labels"].items()} if "labels" in m else {}}


def _eval(run: Path, processed: Path, out: Path, window: str) -> dict:
    """Evaluate a copy of ``run`` whose config selects ``window``."""
    from fvlm.config import apply_overrides, config_from_dict
    from fvlm.zeroshot import evaluate

    copy = out / f"{run.name}_{window}"
    if not copy.exists():
        shutil.copytree(run, copy, symlinks=True)
        for path in [copy / "config.json", *copy.glob("checkpoints/step_*/config.json")]:
            config_from_dict(apply_overrides(json.loads(path.read_text()), [f"data.eval_window={window}"])).save(path)
    scores = out / f"scores_{run.name}_{window}.csv"
    t0 = time.perf_counter()
    evaluate(copy, processed, "valid", scores)
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="/tmp/fvlm_parity_switches")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--results", default=str(Path(__file__).parent / "results" / "parity_switches.json"))
    p.add_argument("--windows-only", action="store_true",
                   help="only the window statistics of the demo's processed validation split (no training)")
    p.add_argument("--skip-released-training", action="store_true",
                   help="only the demo run and its evaluation with both windows (step 3 left out)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from fvlm.checkpoint import latest_checkpoint
    from fvlm.config import load_config
    from fvlm.recipes.demo import run_demo
    from fvlm.train import train

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    processed, ours = out / "demo" / "processed", out / "demo" / "run"
    if args.windows_only:
        if not (processed / "manifest.csv").exists():
            raise FileNotFoundError(f"{processed}: run once without --windows-only first (or fvlm demo --out "
                                    f"{out / 'demo'}) to make the demo's processed data")
        result = {"machine": describe_machine(), "windows": window_statistics(processed),
                  "texts": text_statistics(processed)}
        Path(args.results).parent.mkdir(parents=True, exist_ok=True)
        Path(args.results).write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps({k: result[k] for k in ("windows", "texts")}, indent=2))  # noqa: T201
        return 0
    run_demo(out / "demo", workers=args.workers)
    released = out / "released_training"
    train_seconds = None
    if args.skip_released_training:
        pass
    elif latest_checkpoint(released) is None or not (released / "loss.png").exists():
        if released.exists():
            shutil.rmtree(released)
        t1 = time.perf_counter()
        train(load_config("demo", RELEASED_TRAINING), processed, released)
        train_seconds = round(time.perf_counter() - t1, 1)
    result = {
        "machine": describe_machine(),
        "windows": window_statistics(processed),
        "texts": text_statistics(processed),
        "config": "demo",
        "released_training_overrides": RELEASED_TRAINING,
        "ours_trained": {w: _eval(ours, processed, out, w) for w in ("centred", "released")},
        "released_trained": None if args.skip_released_training else {
            w: _eval(released, processed, out, w) for w in ("centred", "released")},
        "released_training_seconds": train_seconds,
        "total_seconds": round(time.perf_counter() - t0, 1),
        "seeds": 1,
    }
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps(result, indent=2) + "\n")
    table = {f"{t} / {w} window": v["macro_auc"] for t in ("ours_trained", "released_trained")
             for w, v in (result[t] or {}).items()}
    print(json.dumps(table, indent=2))  # noqa: T201
    return 0


if __name__ == "__main__":
    sys.exit(main())
