"""``fvlm probe``: label-efficient linear probes on the frozen anatomy embeddings.

    fvlm probe --checkpoint RUN --data PROCESSED --labels train_labels.csv,valid_labels.csv --out probe/ \\
        --fractions 0.01,0.1,1 --seeds 3

The encoder stays frozen. The anatomy embeddings of the training split and of the evaluated split are
computed once and cached in ``OUT/cache/`` (:mod:`fvlm.probe_cache`: a changed checkpoint or changed data
recomputes them).

Per label, one L2-regularised logistic regression (scikit-learn) on

- ``mapped`` (default): the embedding of the anatomy the anatomy table's prompt reads the label from
  (``--anatomy-map`` gives another table or a JSON ``{label: anatomy | [anatomies]}``; several anatomies are
  concatenated; a label the map lacks uses all anatomies, which is logged), or
- ``concat``: all anatomies' embeddings concatenated (an absent anatomy contributes zeros).

Features are standardised with the training split's statistics; ``C`` is chosen from :data:`C_GRID` by
stratified k-fold cross-validation (AUC) on the training labels only, ``k = min(5, positives, negatives)``; with
fewer than 2 positives (or negatives) there is nothing to cross-validate and ``C = 1`` is used (recorded).
Classes are balanced (``class_weight="balanced"``).

Labels (:func:`fvlm.labels.read_label_table`): any CSV(s) keyed by ``VolumeName`` with 0/1 columns; an empty
cell is a missing label, excluded for that label only. A label never positive (or never negative) in the
training split is not scored: it is logged and listed under ``skipped`` in the JSON.

Label fractions: for each fraction ``f < 1`` and seed, the training labels of each label are subsampled
stratified: ``max(1, round(f * positives))`` positives and ``max(1, round(f * negatives))`` negatives, drawn
at random (seeded by the seed and the label name). ``f = 1`` uses every training label.

Outputs in ``OUT/``: ``scores/probe_f{fraction}_seed{seed}.csv`` (the ``fvlm eval`` format: ``VolumeName`` +
one probability column per label, empty where the mapped anatomy is absent, so ``fvlm metrics`` reads them
unchanged), ``scores/zeroshot.csv`` (the run's zero-shot scores of the same volumes, from the same cached
embeddings), ``probe.json`` (per run and per label: AUC, chosen C, training counts; per fraction: mean and
standard deviation of the macro AUC over the seeds; the zero-shot macro AUC on the same labels), and
``probe_auc.png`` (macro AUC against label fraction, zero-shot as a horizontal line).
AUCs in the JSON follow the protocol's missing-score rule of ``fvlm metrics`` (an empty score counts as 0).
"""

from __future__ import annotations

import json
import logging
import statistics
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold
from threadpoolctl import threadpool_limits

from fvlm.anatomy import GLOBAL_ANATOMY, load_anatomy_table
from fvlm.checkpoint import load_model, load_run_config, resolve_checkpoint
from fvlm.io import atomic_path, atomic_write_text
from fvlm.labels import order_labels, read_label_table
from fvlm.plots import plot_fractions
from fvlm.probe_cache import split_embeddings
from fvlm.runtime import resolve_device
from fvlm.zeroshot import prompt_probabilities

log = logging.getLogger(__name__)

FEATURE_MODES = ("mapped", "concat")
C_GRID: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
DEFAULT_C = 1.0
MAX_FOLDS = 5


# ------------------------------------------------------------------------------------------ labels -> features
def label_anatomies(labels: Sequence[str], anatomies: Sequence[str], table: Any, features: str = "mapped",
                    anatomy_map: str | None = None) -> tuple[dict[str, list[str]], list[str]]:
    """Which anatomies' embeddings each label's head reads; and the labels that fell back to all anatomies.

    ``anatomies``: the embeddings' anatomies (``["global"]`` for a global-mode run: every label reads it).
    ``anatomy_map``: None (the run's anatomy table prompts), a shipped table name / table JSON, or a JSON file
    ``{label: anatomy or [anatomies]}``.
    """
    if features not in FEATURE_MODES:
        raise ValueError(f"features must be one of {FEATURE_MODES}, got {features!r}")
    anatomies = list(anatomies)
    if features == "concat" or anatomies == [GLOBAL_ANATOMY]:
        return {label: anatomies for label in labels}, []
    mapping: dict[str, list[str]] = {}
    source = "the run's anatomy table"
    if anatomy_map:
        source = str(anatomy_map)
        p = Path(anatomy_map)
        raw = None
        if p.is_file():
            try:
                raw = json.loads(p.read_text())
            except json.JSONDecodeError as e:
                raise ValueError(f"--anatomy-map {p}: not JSON ({e})") from None
        if isinstance(raw, dict) and "anatomies" not in raw:
            for label, value in raw.items():
                names = [value] if isinstance(value, str) else value
                if not isinstance(names, list) or not all(isinstance(n, str) for n in names) or not names:
                    raise ValueError(f"--anatomy-map {p}: {label!r} must map to an anatomy name or a list of them")
                mapping[label] = list(names)
        else:
            other = load_anatomy_table(anatomy_map)
            mapping = {pr.label: [pr.anatomy] for pr in other.prompts}
    elif table is not None:
        mapping = {pr.label: [pr.anatomy] for pr in table.prompts}
    unknown = sorted({a for names in mapping.values() for a in names if a not in anatomies})
    if unknown and any(label in labels for label, names in mapping.items() if set(names) & set(unknown)):
        raise ValueError(f"anatomy map ({source}) names anatomies {unknown} the run does not have ({anatomies})")
    out, fallback = {}, []
    for label in labels:
        if label in mapping:
            out[label] = mapping[label]
        else:
            out[label] = anatomies
            fallback.append(label)
    if fallback:
        log.info("no anatomy mapped to %s by %s: their heads read all anatomies concatenated", fallback, source)
    return out, fallback


def feature_matrix(feats: np.ndarray, anatomies: Sequence[str], use: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Concatenated embeddings of the anatomies ``use`` (absent ones as zeros) and which rows are usable
    (at least one of them present): float64 (N, len(use) * E), bool (N,)."""
    idx = [list(anatomies).index(a) for a in use]
    sub = feats[:, idx]  # (N, k, E)
    present = np.isfinite(sub).all(axis=2)  # (N, k)
    x = np.nan_to_num(sub, nan=0.0).reshape(len(feats), -1).astype(np.float64)
    return x, present.any(axis=1)


def subsample(y: np.ndarray, fraction: float, seed: int, label: str) -> np.ndarray:
    """bool mask of the labelled rows of ``y`` (float, NaN = missing) kept at ``fraction``, stratified:
    ``max(1, round(fraction * n))`` of each class present, drawn with a generator seeded by (seed, label)."""
    labelled = ~np.isnan(y)
    if fraction >= 1.0:
        return labelled
    if not 0.0 < fraction:
        raise ValueError(f"label fraction must be in (0, 1], got {fraction}")
    rng = np.random.default_rng([seed, zlib.crc32(label.encode())])
    keep = np.zeros(len(y), dtype=bool)
    for cls in (0.0, 1.0):
        rows = np.flatnonzero(labelled & (y == cls))
        if len(rows):
            k = max(1, int(round(fraction * len(rows))))
            keep[rng.choice(rows, size=k, replace=False)] = True
    return keep


# ------------------------------------------------------------------------------------------ one head
@dataclass
class Head:
    """A fitted per-label head: standardisation + logistic regression, and how C was chosen."""

    mean: np.ndarray
    scale: np.ndarray
    clf: Any
    C: float
    cv_folds: int
    cv_auc: float | None

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.clf.predict_proba((x - self.mean) / self.scale)[:, 1]


def fit_head(x: np.ndarray, y: np.ndarray, seed: int = 0, cs: Sequence[float] = C_GRID,
             max_folds: int = MAX_FOLDS) -> Head:
    """Fit one label's head on training rows ``x`` (n, d), ``y`` (n,) in {0, 1} (both classes present)."""
    y = y.astype(int)
    n_pos, n_neg = int(y.sum()), int(len(y) - y.sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"a head needs both classes, got {n_pos} positive(s) and {n_neg} negative(s)")
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale[scale < 1e-8] = 1.0
    z = (x - mean) / scale

    def make(c: float):
        return LogisticRegression(C=c, class_weight="balanced", max_iter=5000)

    folds = min(max_folds, n_pos, n_neg)
    best_c, best_auc = DEFAULT_C, None
    if folds >= 2:
        cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
        splits = list(cv.split(z, y))
        for c in cs:
            aucs = []
            for tr, te in splits:
                p = make(c).fit(z[tr], y[tr]).predict_proba(z[te])[:, 1]
                aucs.append(roc_auc_score(y[te], p))
            auc = float(np.mean(aucs))
            if best_auc is None or auc > best_auc + 1e-12:  # ties: the smallest C (strongest regularisation)
                best_c, best_auc = float(c), auc
    clf = make(best_c).fit(z, y)
    return Head(mean, scale, clf, best_c, folds if folds >= 2 else 0, best_auc)


def label_auc(scores: np.ndarray, truth: np.ndarray) -> float | None:
    """AUC of one label over its labelled volumes (NaN truth excluded); a missing score counts as 0 (the
    protocol's rule in ``fvlm metrics``). None when the volumes hold a single class."""
    keep = ~np.isnan(truth)
    y, s = truth[keep], np.nan_to_num(scores[keep], nan=0.0)
    if y.size == 0 or y.min() == y.max():
        return None
    return float(roc_auc_score(y, s))


def _macro(aucs: dict[str, float | None], labels: Sequence[str]) -> float | None:
    vals = [aucs[label] for label in labels if aucs.get(label) is not None]
    return round(float(np.mean(vals)), 4) if vals else None


def _aligned_labels(table: pd.DataFrame, volumes: Sequence[str], split: str) -> pd.DataFrame:
    """Label rows of ``volumes`` (NaN rows for volumes the CSV lacks: every label missing)."""
    frame = table.reindex(list(volumes))
    absent = int(frame.isna().all(axis=1).sum())
    if absent == len(volumes):
        raise ValueError(f"none of the {len(volumes)} volumes of split {split!r} has a row in the labels CSV(s) "
                         f"(e.g. {list(volumes)[:3]} vs {list(table.index[:3])})")
    if absent:
        log.warning("%d of %d volumes of %s have no labels (left out)", absent, len(volumes), split)
    return frame


def scores_frame(volumes: Sequence[str], columns: dict[str, np.ndarray]) -> pd.DataFrame:
    """The ``fvlm eval`` scores format: ``VolumeName`` (with ``.nii.gz``) + one column per label."""
    order = order_labels(columns)
    return pd.DataFrame({"VolumeName": [f"{v}.nii.gz" for v in volumes], **{c: columns[c] for c in order}})


def write_scores(df: pd.DataFrame, path: Path) -> None:
    with atomic_path(path, suffix=".csv") as tmp:
        df.to_csv(tmp, index=False, na_rep="")


def _frac_name(f: float) -> str:
    return f"{f:g}"


# ------------------------------------------------------------------------------------------ the command
@dataclass
class ZeroShotReference:
    """The run's zero-shot scores of the evaluated volumes (from the same embeddings), on the probes' labels."""

    scores: str  # the scores CSV
    auc: dict[str, float | None]  # per label the run's prompts score
    labels: list[str]  # labels both zero-shot and the probes score (with both classes in the evaluated split)
    macro_auc: float | None  # over ``labels``


@dataclass
class ProbeRun:
    """The probes of one label fraction and seed."""

    fraction: float
    seed: int
    scores: str  # the scores CSV
    macro_auc: float | None  # over the evaluable labels
    macro_auc_zero_shot_labels: float | None  # over the zero-shot reference's labels
    auc: dict[str, float | None]
    heads: dict[str, dict[str, Any]]  # label -> C, cv_folds, cv_auc, train_positives, train_n


@dataclass
class ProbeResult:
    """What ``fvlm probe`` found (``probe.json``: :meth:`to_json`)."""

    checkpoint: str
    data: str
    labels: str | list[str]
    features: str
    anatomy_map: str
    train_split: str
    split: str
    fractions: list[float]
    seeds: int
    c_grid: list[float]
    train_volumes: int
    eval_volumes: int
    scored_labels: list[str]
    evaluable_labels: list[str]
    skipped: dict[str, str]  # label -> why it has no probe
    fallback_all_anatomies: list[str]
    label_info: dict[str, dict[str, Any]]  # label -> anatomies read, training and evaluation counts
    zero_shot: ZeroShotReference | None
    by_fraction: dict[str, dict[str, Any]]  # "0.1" -> mean/std/seeds of the macro AUCs, mean training labels
    runs: list[ProbeRun]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"


def run_probe(checkpoint: str | Path, data: str | Path, labels: str | Sequence[str], out: str | Path,
              fractions: Sequence[float] = (0.01, 0.1, 1.0), seeds: int = 3, anatomy_map: str | None = None,
              features: str = "mapped", train_split: str = "train", split: str = "valid", device: str = "auto",
              batch_size: int = 0, cache: str | Path | None = None, zero_shot: bool = True,
              label_columns: Sequence[str] | None = None) -> ProbeResult:
    """Fit and score the probes; writes ``OUT/`` (see the module docstring) and returns what ``probe.json`` holds.

    ``fractions``: of the training labels, each in (0, 1]; ``seeds``: subsampling / cross-validation seeds per
    fraction; ``cache``: the embeddings cache directory (default ``OUT/cache``); ``label_columns``: the label
    columns to use (default all)."""
    data, out = Path(data), Path(out)
    fractions = sorted({float(f) for f in fractions})
    if not fractions or fractions[0] <= 0 or fractions[-1] > 1:
        raise ValueError(f"label fractions must lie in (0, 1], got {fractions}")
    if seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {seeds}")
    ckpt = resolve_checkpoint(checkpoint)
    cfg, table = load_run_config(ckpt)
    dev = resolve_device(device)
    bundle: dict[str, Any] = {}

    def model_bundle():
        if not bundle:
            bundle["m"] = load_model(ckpt, dev)
        return bundle["m"]

    label_table = read_label_table(labels, label_columns)
    cache_dir = Path(cache) if cache else out / "cache"
    tr_vol, anatomies, tr_feats = split_embeddings(ckpt, data, train_split, cache_dir, model_bundle, dev, batch_size)
    ev_vol, _, ev_feats = split_embeddings(ckpt, data, split, cache_dir, model_bundle, dev, batch_size)
    y_tr = _aligned_labels(label_table, tr_vol, train_split)
    y_ev = _aligned_labels(label_table, ev_vol, split)
    all_labels = order_labels(label_table.columns)
    use, fallback = label_anatomies(all_labels, anatomies, table, features, anatomy_map)

    label_info: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    prepared: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = {}
    for label in all_labels:
        x_tr, ok_tr = feature_matrix(tr_feats, anatomies, use[label])
        x_ev, ok_ev = feature_matrix(ev_feats, anatomies, use[label])
        yt = y_tr[label].to_numpy(dtype=np.float64)
        yt = np.where(ok_tr, yt, np.nan)  # no usable embedding: not a training row
        ye = y_ev[label].to_numpy(dtype=np.float64)
        n_pos, n_neg = int(np.nansum(yt == 1)), int(np.nansum(yt == 0))
        info = {"anatomies": use[label], "train_positives": n_pos, "train_negatives": n_neg,
                "train_missing": int(np.isnan(y_tr[label].to_numpy(dtype=np.float64)).sum()),
                "eval_positives": int(np.nansum(ye == 1)), "eval_negatives": int(np.nansum(ye == 0)),
                "eval_missing": int(np.isnan(ye).sum())}
        label_info[label] = info
        if n_pos == 0 or n_neg == 0:
            reason = (f"never {'positive' if n_pos == 0 else 'negative'} in the training labels "
                      f"({n_pos} positive, {n_neg} negative of {n_pos + n_neg} labelled {train_split} volumes)")
            skipped[label] = reason
            log.warning("label %r not scored: %s", label, reason)
            continue
        if info["eval_positives"] == 0 or info["eval_negatives"] == 0:
            log.warning("label %r: %s holds a single class (%d positive, %d negative): scored, no AUC", label, split,
                        info["eval_positives"], info["eval_negatives"])
        prepared[label] = (x_tr, yt, x_ev, ok_ev, ye)
    if not prepared:
        raise ValueError(f"no label has both classes in the training labels of split {train_split!r}: {skipped}")
    scored = list(prepared)
    evaluable = [label for label in scored
                 if label_info[label]["eval_positives"] and label_info[label]["eval_negatives"]]

    zs: ZeroShotReference | None = None
    if zero_shot and table.prompts:
        model, mcfg, mtable = model_bundle()
        probs = prompt_probabilities(model, mcfg, mtable, ev_feats.astype(np.float32), dev)
        write_scores(scores_frame(ev_vol, probs), out / "scores" / "zeroshot.csv")
        aucs = {label: label_auc(p, y_ev[label].to_numpy(dtype=np.float64)) if label in y_ev else None
                for label, p in probs.items()}
        common = [label for label in evaluable if aucs.get(label) is not None]
        zs = ZeroShotReference(str(out / "scores" / "zeroshot.csv"), aucs, common, _macro(aucs, common))
    common = zs.labels if zs else []

    runs: list[ProbeRun] = []
    for fraction, seed in ((f, s) for f in fractions for s in range(seeds)):
        # small BLAS problems: one thread each is ~10x faster than contended multi-threading
        with threadpool_limits(limits=1):
            columns, aucs, chosen = {}, {}, {}
            for label in scored:
                x_tr, yt, x_ev, ok_ev, ye = prepared[label]
                keep = subsample(yt, fraction, seed, label)
                head = fit_head(x_tr[keep], yt[keep], seed=seed)
                p = np.full(len(ev_vol), np.nan)
                p[ok_ev] = head.predict(x_ev[ok_ev])
                columns[label] = p
                aucs[label] = label_auc(p, ye)
                chosen[label] = {"C": head.C, "cv_folds": head.cv_folds,
                                 "cv_auc": None if head.cv_auc is None else round(head.cv_auc, 4),
                                 "train_positives": int(yt[keep].sum()), "train_n": int(keep.sum())}
            path = out / "scores" / f"probe_f{_frac_name(fraction)}_seed{seed}.csv"
            write_scores(scores_frame(ev_vol, columns), path)
            run = ProbeRun(fraction, seed, str(path), _macro(aucs, evaluable),
                           _macro(aucs, common) if common else None,
                           {k: None if v is None else round(v, 4) for k, v in aucs.items()}, chosen)
            runs.append(run)
            log.info("probe fraction %g seed %d: macro AUC %s over %d labels -> %s", fraction, seed,
                     run.macro_auc, len(evaluable), path)

    by_fraction = {}
    for fraction in fractions:
        rows = [r for r in runs if r.fraction == fraction]
        entry = {}
        for key in ("macro_auc", "macro_auc_zero_shot_labels"):
            vals = [getattr(r, key) for r in rows if getattr(r, key) is not None]
            entry[key] = {"mean": round(statistics.mean(vals), 4) if vals else None,
                          "std": round(statistics.stdev(vals), 4) if len(vals) > 1 else 0.0 if vals else None,
                          "seeds": vals}
        entry["mean_train_n"] = round(statistics.mean(
            statistics.mean(h["train_n"] for h in r.heads.values()) for r in rows), 1)
        by_fraction[_frac_name(fraction)] = entry
    result = ProbeResult(
        checkpoint=str(ckpt), data=str(data), labels=labels if isinstance(labels, str) else list(map(str, labels)),
        features=features, anatomy_map=anatomy_map or "run's anatomy table", train_split=train_split, split=split,
        fractions=fractions, seeds=seeds, c_grid=list(C_GRID), train_volumes=len(tr_vol), eval_volumes=len(ev_vol),
        scored_labels=scored, evaluable_labels=evaluable, skipped=skipped, fallback_all_anatomies=fallback,
        label_info=label_info, zero_shot=zs, by_fraction=by_fraction, runs=runs)
    atomic_write_text(out / "probe.json", result.to_json())
    plot_fractions(result.to_dict(), out / "probe_auc.png")
    log.info("probe summary -> %s", out / "probe.json")
    return result


__all__ = ["C_GRID", "FEATURE_MODES", "ProbeResult", "ProbeRun", "ZeroShotReference", "fit_head",
           "label_anatomies", "label_auc", "run_probe", "split_embeddings", "subsample"]
