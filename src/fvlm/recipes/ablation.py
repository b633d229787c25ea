"""The paper's claim in miniature: global vs anatomy-wise alignment and the false-negative reductions.

    fvlm demo --ablation --out ablation_out          (or: python benchmarks/ablation.py)

Same synthetic data, same preprocessing, the same training budget and the same text length for every
variant, several seeds:

- ``global``: CT-CLIP-style, whole crop vs whole report, standard InfoNCE (identity targets);
- ``anatomy``: anatomy-wise alignment, no false-negative reduction (identity targets);
- ``anatomy+normal``: + normal samples of an anatomy are mutual positives;
- ``anatomy+normal+text``: + identical texts are positives (the released rule, fVLM);
- ``anatomy+normal+text+coteach``: + co-teaching of two models for abnormal samples (docs/co-teaching.md).

Text length: ``model.text.max_length`` is set for all variants to the smallest multiple of 32 that holds the
longest report and anatomy text of the data (capped by the text model's positions), so that no variant
loses text; the token statistics are returned with the results.

Each run writes ``OUT/runs/<variant>-seed<s>/result.json`` and then, last and atomically, ``DONE.json`` (the
completion marker, naming what produced it). A run counts as finished only when its marker exists; a run
with checkpoints but no marker is resumed (``--resume``), not trusted. ``OUT/ablation.json`` collects the
finished runs, what is left, the token statistics and the paired statistics, rewritten after every run.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd
from scipy import stats

from fvlm import __version__
from fvlm.anatomy import load_anatomy_table
from fvlm.checkpoint import latest_checkpoint
from fvlm.config import load_config
from fvlm.data.dataset import _report_texts
from fvlm.io import atomic_write_text
from fvlm.metrics import compute_metrics
from fvlm.model.text_encoder import load_tokenizer
from fvlm.recipes.demo import DEMO_MAX_RECONSTRUCTIONS, DEMO_TRAIN_PATIENTS, DEMO_VALID_PATIENTS, preprocess_splits
from fvlm.synth import synthesize
from fvlm.text import AnatomyTexts
from fvlm.train import train
from fvlm.zeroshot import evaluate

log = logging.getLogger(__name__)

_BASE = ["loss.co_teaching=false"]
VARIANTS: dict[str, list[str]] = {
    "global": ["loss.mode=global", "loss.normal_positives=false", "loss.same_text_positives=false", *_BASE],
    "anatomy": ["loss.mode=anatomy", "loss.normal_positives=false", "loss.same_text_positives=false", *_BASE],
    "anatomy+normal": ["loss.mode=anatomy", "loss.normal_positives=true", "loss.same_text_positives=false", *_BASE],
    "anatomy+normal+text": ["loss.mode=anatomy", "loss.normal_positives=true", "loss.same_text_positives=true",
                            *_BASE],
    "anatomy+normal+text+coteach": ["loss.mode=anatomy", "loss.normal_positives=true",
                                    "loss.same_text_positives=true", "loss.co_teaching=true"],
}
MARKER = "DONE.json"
#: result-key suffix -> anatomy table whose prompts score the run (None: the run's own table, the released prompts)
PROMPT_SETS: dict[str, str | None] = {"": None, "_ctclip": "released_ctclip_prompts"}
RESULT = "result.json"


# ---------------------------------------------------------------------------------------------- statistics


def sign_test(diffs: list[float]) -> float:
    """Two-sided exact sign test p-value (zeros dropped); 1.0 without non-zero differences."""
    pos = sum(d > 0 for d in diffs)
    n = pos + sum(d < 0 for d in diffs)
    if n == 0:
        return 1.0
    k = min(pos, n - pos)
    p = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * p)


def t_interval(diffs: list[float], level: float = 0.95) -> tuple[float, float]:
    """Student-t confidence interval of the mean of ``diffs`` (NaNs with fewer than 2 values)."""
    if len(diffs) < 2:
        return (float("nan"), float("nan"))
    m, sd = statistics.mean(diffs), statistics.stdev(diffs)
    h = stats.t.ppf(0.5 + level / 2, len(diffs) - 1) * sd / math.sqrt(len(diffs))
    return (m - h, m + h)


def paired(runs: list[dict[str, Any]], a: str, b: str, metric: str = "macro_auc") -> dict[str, Any] | None:
    """Seed-paired differences ``b - a`` of ``metric`` (a macro AUC): mean, sd, 95 % t interval, wins, sign test."""
    auc = {(r["variant"], r["seed"]): r[metric] for r in runs if r.get(metric) is not None}
    seeds = sorted(s for v, s in auc if v == b and (a, s) in auc)
    if not seeds:
        return None
    diffs = [auc[(b, s)] - auc[(a, s)] for s in seeds]
    ci = list(t_interval(diffs)) if len(diffs) > 1 else None
    return {"a": a, "b": b, "metric": metric, "seeds": seeds, "diffs": diffs, "mean": statistics.mean(diffs),
            "sd": statistics.stdev(diffs) if len(diffs) > 1 else None, "ci95_t": ci,
            "wins": sum(d > 0 for d in diffs), "losses": sum(d < 0 for d in diffs), "sign_test_p": sign_test(diffs)}


COMPARISONS = [("global", "anatomy"), ("anatomy", "anatomy+normal"), ("anatomy+normal", "anatomy+normal+text"),
               ("anatomy+normal+text", "anatomy+normal+text+coteach"), ("anatomy", "anatomy+normal+text"),
               ("anatomy", "anatomy+normal+text+coteach")]


#: the tables' metrics: the released prompts, then CT-CLIP's (see :func:`score_run`)
METRICS = {"macro_auc": 'released prompts ("X." / "Not X.")',
           "macro_auc_ctclip": 'CT-CLIP prompts ("X is present." / "X is not present.")'}


def ablation_table(runs: list[dict[str, Any]]) -> str:
    """Markdown, per prompt set: per variant runs / mean +- sd / per seed; then the seed-paired comparisons."""
    lines: list[str] = []
    for metric, title in METRICS.items():
        scored = [r for r in runs if r.get(metric) is not None]
        if not scored:
            continue
        lines += [*([""] if lines else []), f"Zero-shot macro AUC, {title}:", "",
                  "| variant | runs | macro AUC mean +- sd | per seed (seed: AUC) |", "|---|---|---|---|"]
        for variant in VARIANTS:
            rs = sorted((r for r in scored if r["variant"] == variant), key=lambda r: r["seed"])
            if not rs:
                continue
            aucs = [r[metric] for r in rs]
            sd = f"{statistics.stdev(aucs):.3f}" if len(aucs) > 1 else "-"
            lines.append(f"| {variant} | {len(rs)} | {statistics.mean(aucs):.3f} +- {sd} | "
                         + ", ".join(f"{r['seed']}: {r[metric]:.3f}" for r in rs) + " |")
        comps = [c for c in (paired(scored, a, b, metric) for a, b in COMPARISONS) if c is not None]
        if comps:
            lines += ["", "| comparison (same seeds) | pairs | mean difference | 95 % CI (t) | wins / losses | "
                          "sign test p (two-sided) |", "|---|---|---|---|---|---|"]
            for c in comps:
                ci = "-" if c["ci95_t"] is None else f"[{c['ci95_t'][0]:+.3f}, {c['ci95_t'][1]:+.3f}]"
                lines.append(f"| {c['b']} - {c['a']} | {len(c['diffs'])} | {c['mean']:+.3f} | {ci} | "
                             f"{c['wins']} / {c['losses']} | {c['sign_test_p']:.3f} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ text lengths


def _describe(lengths: list[int], limits: list[int]) -> dict[str, Any]:
    s = sorted(lengths)
    q = statistics.quantiles(s, n=20) if len(s) > 1 else [s[0]] * 19
    return {"n": len(s), "min": s[0], "median": statistics.median(s), "p95": q[18], "max": s[-1],
            **{f"truncated_at_{lim}": sum(x > lim for x in s) / len(s) for lim in limits}}


def token_lengths(processed: Path, split: str, tokenizer: Any, anatomies: list[str]) -> dict[str, list[int]]:
    """Token lengths ([CLS] and [SEP] included) of the whole reports (``report``) and of each anatomy's texts."""
    def lengths(texts: list[str]) -> list[int]:
        return [len(ids) for ids in tokenizer(texts, truncation=False)["input_ids"]]

    out = {"report": lengths([t for t in _report_texts(processed, split).values() if t])}
    texts = AnatomyTexts.load(processed / "texts")
    scans = sorted(set(texts.desc) | set(texts.conc))
    for name in anatomies:
        out[name] = lengths([texts.get(s, name).text for s in scans])
    return out


def token_statistics(lengths: dict[str, list[int]], limits: list[int]) -> dict[str, Any]:
    """min / median / p95 / max and the fraction longer than each limit, per kind of text."""
    return {k: _describe(v, limits) for k, v in lengths.items()}


def choose_max_length(lengths: dict[str, list[int]], model_max: int) -> int:
    """The smallest multiple of 32 holding every text, at most the text model's positions."""
    longest = max(max(v) for v in lengths.values())
    return min(model_max, 32 * math.ceil(longest / 32))


# ------------------------------------------------------------------------------------------------- runs


def _git_rev() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent, text=True,
                              capture_output=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def score_run(run: Path, processed: Path, labels: Any) -> dict[str, Any]:
    """Zero-shot macro AUC (and per label) of a trained run with each prompt set of :data:`PROMPT_SETS`.

    ``macro_auc`` / ``auc``: the released "X." / "Not X." prompts; ``macro_auc_ctclip`` / ``auc_ctclip``: CT-CLIP's
    "{label} is present." / "{label} is not present." (what CT-CLIP scores itself with; the global variant is
    CT-CLIP-style, so it is compared under both).
    """
    out: dict[str, Any] = {}
    for key, table in PROMPT_SETS.items():
        scores = evaluate(run, processed, "valid", run / f"scores{key}.csv", anatomy_table=table).scores
        metrics = compute_metrics(scores, labels)
        out[f"macro_auc{key}"] = metrics["macro"]["auc"]
        out[f"auc{key}"] = {k: (v["auc"] if v["auc"] == v["auc"] else None)  # NaN (one class) -> null
                            for k, v in metrics["labels"].items()}
    return out


def finished_result(run: Path, processed: Path | None = None, labels: Any = None) -> dict[str, Any] | None:
    """The result of a run whose completion marker exists, else ``None``.

    A result written before a prompt set was added is completed from the run's checkpoint when ``processed`` and
    ``labels`` are given (``result.json`` is rewritten atomically; the marker stays).
    """
    if not (run / MARKER).is_file() or not (run / RESULT).is_file():
        return None
    result = json.loads((run / RESULT).read_text())
    missing = [k for k in PROMPT_SETS if f"macro_auc{k}" not in result]
    if missing and processed is not None and latest_checkpoint(run) is not None:
        log.info("ablation: scoring %s with the prompt sets it lacks (%s)", run.name, missing)
        result = {**result, **score_run(run, processed, labels)}
        atomic_write_text(run / RESULT, json.dumps(result, indent=2) + "\n")
    return result


def finish_run(run: Path, cfg: Any, processed: Path, labels: Any, variant: str, seed: int) -> dict[str, Any]:
    """Train (or resume) one run to the end of its schedule, evaluate it, write ``result.json`` and then the
    completion marker; a run whose marker exists is returned as stored, untouched."""
    stored = finished_result(run)
    if stored is not None:
        return stored
    t0 = time.perf_counter()
    # a checkpoint is not a finished run: resume it to the end of its schedule (a no-op if it is complete)
    train(cfg, processed, run, resume=latest_checkpoint(run) is not None)
    result = {"variant": variant, "seed": seed, **score_run(run, processed, labels),
              "seconds": round(time.perf_counter() - t0, 1), "text_max_length": cfg.model.text.max_length}
    atomic_write_text(run / RESULT, json.dumps(result, indent=2) + "\n")
    marker = {"produced_by": f"fvlm.recipes.ablation.finish_run (fvlm {__version__}, git {_git_rev()})",
              "variant": variant, "seed": seed, "result": RESULT,
              "finished_utc": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    atomic_write_text(run / MARKER, json.dumps(marker, indent=2) + "\n")  # last: the run is finished
    return result


def previous_result(previous: list[dict[str, Any]], variant: str, seed: int, max_length: int) -> dict[str, Any] | None:
    """A finished run recorded by an earlier session (the committed results JSON), if it matches this one."""
    for r in previous:
        if r.get("variant") == variant and r.get("seed") == seed and r.get("text_max_length") == max_length:
            return r
    return None


def run_ablation(out: Path, config: str = "demo", overrides: list[str] | None = None, seed: int = 0,
                 seeds: int = 5, n_train: int = 0, n_valid: int = 0, workers: int = 2,
                 variants: list[str] | None = None, max_runs: int | None = None,
                 previous: list[dict[str, Any]] | None = None) -> str:
    """Train and evaluate every variant x seed on one synthetic data set (seed-major order, so that paired
    comparisons are available early); finished runs are skipped. Returns the markdown table.

    ``max_runs``: train at most that many new runs (0 = only collect the finished ones; ``None`` = all).
    ``previous``: finished runs recorded elsewhere (the committed ``benchmarks/results/ablation.json`` of an
    earlier session, whose ``OUT`` is gone): taken as finished when variant, seed and text length match, so
    the ablation spans sessions (the data set and every run are seeded).
    """
    out = Path(out)
    overrides = list(overrides or [])
    variants = variants or list(VARIANTS)
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown ablation variants {unknown}; known: {list(VARIANTS)}")
    data, processed = out / "data", out / "processed"
    if not (data / "synth_info.json").exists():
        synthesize(data, n_train=n_train or DEMO_TRAIN_PATIENTS, n_valid=n_valid or DEMO_VALID_PATIENTS, seed=seed,
                   size="demo", workers=workers, max_reconstructions=DEMO_MAX_RECONSTRUCTIONS)
    preprocess_splits(data, processed, config, [o for o in overrides if o.startswith("data.")], workers)
    labels = pd.read_csv(processed / "labels" / "valid_labels.csv")

    base = load_config(config, overrides)
    tokenizer = load_tokenizer(base.model.text.tokenizer or base.model.text.pretrained)
    anatomies = list(load_anatomy_table(base.data.anatomy_table).names)
    lengths = token_lengths(processed, "train", tokenizer, anatomies)
    model_max = min(512, int(getattr(tokenizer, "model_max_length", 512) or 512))
    if any(o.startswith("model.text.max_length=") for o in overrides):
        max_length = base.model.text.max_length
    else:
        max_length = choose_max_length(lengths, model_max)
        overrides = overrides + [f"model.text.max_length={max_length}"]
    stats_all = token_statistics(lengths, sorted({96, max_length}))
    log.info("ablation: text max_length %d (longest text %d tokens)", max_length,
             max(v["max"] for v in stats_all.values()))

    plan = [(v, s) for s in range(seeds) for v in variants]
    results_path = out / "ablation.json"
    runs: list[dict[str, Any]] = []
    new = 0

    def write_summary() -> None:
        done = {(r["variant"], r["seed"]) for r in runs}
        left = [f"{v}-seed{s}" for v, s in plan if (v, s) not in done]
        summary = {"config": config, "overrides": overrides, "text_max_length": max_length,
                   "token_statistics": stats_all,
                   "token_statistics_note": "MiniLM WordPiece tokens incl. [CLS]/[SEP]; report = whole train-split "
                                            "reports (findings + impression, what the global variant reads); "
                                            "anatomy texts = every scan in texts/ (train + valid)",
                   "plan": [f"{v}-seed{s}" for v, s in plan],
                   "partial": bool(left), "left": left, "runs": runs,
                   "paired": [c for m in METRICS for c in (paired(runs, a, b, m) for a, b in COMPARISONS)
                              if c is not None]}
        atomic_write_text(results_path, json.dumps(summary, indent=2) + "\n")

    for variant, s in plan:
        run = out / "runs" / f"{variant}-seed{s}"
        result = finished_result(run, processed, labels)
        if result is not None:
            log.info("ablation %s seed %d: finished already (%s)", variant, s, run / MARKER)
            runs.append(result)
            continue
        result = previous_result(previous or [], variant, s, max_length)
        if result is not None:
            log.info("ablation %s seed %d: finished in an earlier session (recorded results)", variant, s)
            runs.append(result)
            continue
        if max_runs is not None and new >= max_runs:
            continue
        cfg = load_config(config, overrides + VARIANTS[variant] + [f"train.seed={s}"])
        result = finish_run(run, cfg, processed, labels, variant, s)
        runs.append(result)
        new += 1
        log.info("ablation %s seed %d: macro AUC %.3f (%.0f s)", variant, s, result["macro_auc"], result["seconds"])
        write_summary()
    write_summary()
    table = ablation_table(runs)
    print(table)  # noqa: T201  (the product of this command)
    return table
