"""Where does a run's zero-shot AUC go? Per label: zero-shot, a linear probe, and the text-side ceiling.

    python benchmarks/zeroshot_ceiling.py --run demo_out/run --data demo_out/processed
    python benchmarks/zeroshot_ceiling.py --run RUN --data PROCESSED --prompts released_ctclip_prompts --out X.json

A global-mode (CT-CLIP-style) run works the same way: its one entry (the whole crop) against the whole reports.
``--prompts TABLE`` scores another anatomy table's prompts (same anatomies), e.g. CT-CLIP's "X is present." pairs.

For every prompt item (anatomy, label) of the run's anatomy table, on the validation split:

- **zero-shot**: the protocol's score, ``img . (text(positive) - text(negative))`` (a monotone transform of the
  softmax probability, so the same AUC as ``fvlm eval``);
- **image probe**: a logistic regression trained on the *train* split's anatomy embeddings and labels, scored on
  validation: what the image embedding knows about the label at all (supervised, an upper reference, not a
  zero-shot number);
- **text side**: the zero-shot score computed with the anatomy's own *text* embedding in place of the image
  embedding: what a perfectly aligned image encoder would get with these prompts and this text encoder;
- **text probe**: a logistic regression on the text embeddings: whether the text embedding carries the label.

A label is limited by the image encoder when its image probe is low, by the prompts / text encoder when its
text-side score is low although its text probe is high. Writes ``results/zeroshot_ceiling.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from machine import machine  # noqa: E402  (sibling module of the benchmarks)
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("bench.zeroshot_ceiling")


def _auc(y: np.ndarray, s: np.ndarray) -> float | None:
    return float(roc_auc_score(y, s)) if 0 < y.sum() < len(y) else None


def _probe(x_train: np.ndarray, y_train: np.ndarray, x_valid: np.ndarray, y_valid: np.ndarray) -> float | None:
    if not 0 < y_train.sum() < len(y_train):
        return None
    clf = LogisticRegression(max_iter=5000).fit(x_train, y_train)
    return _auc(y_valid, clf.predict_proba(x_valid)[:, 1])


def score_prompts(scoring, prompts: np.ndarray, split_data: dict) -> dict:
    """Per prompt item of ``scoring``: zero-shot, image probe, text side, text probe; and their macro means."""
    result = {}
    for j, item in enumerate(scoring.prompts):
        k = scoring.index(item.anatomy)
        direction = prompts[2 * j + 1] - prompts[2 * j]
        row = {"anatomy": item.anatomy}
        (img_t, txt_t, y_t), (img_v, txt_v, y_v) = split_data["train"], split_data["valid"]
        yt, yv = y_t[item.label].to_numpy(), y_v[item.label].to_numpy()
        mt, mv = np.isfinite(img_t[:, k]).all(1), np.isfinite(img_v[:, k]).all(1)
        row["zero_shot"] = _auc(yv[mv], img_v[mv, k] @ direction)
        row["image_probe"] = _probe(img_t[mt, k], yt[mt], img_v[mv, k], yv[mv])
        tt, tv = txt_t[item.anatomy], txt_v[item.anatomy]
        nt, nv = np.isfinite(tt).all(1), np.isfinite(tv).all(1)
        row["text_side"] = _auc(yv[nv], tv[nv] @ direction)
        row["text_probe"] = _probe(tt[nt], yt[nt], tv[nv], yv[nv])
        row["positives"] = int(yv[mv].sum())
        result[item.label] = row
        log.info("%-36s zero-shot %s  image probe %s  text side %s  text probe %s", item.label,
                 *(f"{row[c]:.3f}" if row[c] is not None else "  -  " for c in
                   ("zero_shot", "image_probe", "text_side", "text_probe")))
    macro = {c: round(statistics.mean(r[c] for r in result.values() if r[c] is not None), 4)
             for c in ("zero_shot", "image_probe", "text_side", "text_probe")}
    return {"labels": result, "macro": macro}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="run (or checkpoint) directory")
    p.add_argument("--data", required=True, help="processed directory with train and valid splits")
    p.add_argument("--prompts", nargs="*", default=[],
                   help="anatomy tables whose prompt pairs are scored, each against the same embeddings (default: "
                        "the run's own); with several, the JSON has one entry per table under prompt_sets")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "zeroshot_ceiling.json"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from fvlm.anatomy import TEXTS_REPORT, alignment, load_anatomy_table
    from fvlm.checkpoint import load_model
    from fvlm.embed import encode_texts, volume_texts
    from fvlm.zeroshot import anatomy_embeddings, prompt_text_features

    dev = torch.device("cpu")
    model, cfg, table = load_model(args.run, dev)
    aligned = alignment(cfg, table)  # the model's entries (one, the whole crop, for a global-mode run)
    tables = [alignment(cfg, load_anatomy_table(t)).table for t in args.prompts] or [aligned.table]
    for t, scoring in zip(args.prompts, tables):
        if tuple(a.name for a in scoring.anatomies) != aligned.names:
            raise SystemExit(f"--prompts {t}: anatomies differ from the run's {aligned.names}")
    data = Path(args.data)
    split_data = {}
    for split in ("train", "valid"):
        volumes, image = anatomy_embeddings(model, cfg, table, data, split, dev)
        texts = volume_texts(volumes, list(aligned.names), data, split, aligned.texts == TEXTS_REPORT,
                             rule=cfg.data.text_rule)
        labels = pd.read_csv(data / "labels" / f"{split}_labels.csv").set_index("VolumeName")
        y = labels.loc[[f"{v}.nii.gz" for v in volumes]]
        text_emb = {}
        for k, name in enumerate(aligned.names):
            rows = [i for i, r in enumerate(texts) if r[k]]
            enc = encode_texts(model, [texts[i][k] for i in rows], cfg.model.text.max_length, dev)
            full = np.full((len(volumes), enc.shape[1]), np.nan, dtype=np.float32)
            full[rows] = enc
            text_emb[name] = full
        split_data[split] = (image, text_emb, y)

    sets = {}
    for scoring in tables:
        prompts = prompt_text_features(model, cfg, scoring, dev).numpy()  # (2P, E): negative_j, positive_j
        log.info("prompts of table %r", scoring.name)
        sets[scoring.name] = score_prompts(scoring, prompts, split_data)
    out = {"benchmark": "zeroshot_ceiling", "machine": machine(), "run": str(args.run), "data": str(args.data),
           "mode": cfg.loss.mode}
    if len(sets) == 1:
        (name, one), = sets.items()
        out.update({"prompts": name, **one})
    else:
        out["prompt_sets"] = sets
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    log.info("macro %s -> %s", {k: v["macro"] for k, v in sets.items()}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
