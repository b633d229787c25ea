"""Zero-shot diagnosis metrics: the CT-CLIP protocol exactly, plus honest variants as options.

The protocol (CT-CLIP's evaluation, reused unchanged by the released fVLM code), per scored CT-RATE label:

1. AUC: ``sklearn.metrics.roc_auc_score`` of the probabilities against the binary labels.
2. Threshold by the ROC-corner rule: of the 100 thresholds ``np.linspace(0, 1, 100)``, the one that minimises
   ``sqrt((1 - TPR)^2 + FPR^2)``; ties go to the **largest** threshold (the released loop keeps the last
   threshold with ``<=``). Distances are compared exactly (integer arithmetic), so a mathematical tie such as
   (1 - TPR, FPR) = (1/3, 0) vs (0, 1/3) is a tie; the released float loop may break it by rounding noise.
   The threshold is fitted on the very labels that are evaluated.
3. Prediction: ``score > threshold`` (strict, as in the released code; ``comparison=">="`` is available).
   The same comparison is used while fitting the threshold.
4. Accuracy, sensitivity (TPR), specificity (TNR), F1 with ``average="weighted"`` (the support-weighted
   mean of the F1 of both classes, as the protocol) and precision of the positive class (binary).
5. The macro mean of each metric over the scored labels is what the published tables report.

A missing score (empty cell in ``scores.csv``: the anatomy was absent) counts as 0 in the protocol
(``missing="zero"``); ``missing="drop"`` excludes that volume for that label instead.

Honest variants: thresholds fitted on another split (``threshold_source``), percentile bootstrap 95 %
confidence intervals resampling volumes (``bootstrap``), macro-averaged F1 (``macro_f1``).

Volume matching: names are normalised by stripping ``.nii.gz`` / ``.nii``. Every volume of the scores must
have a label row (else ``ValueError`` naming a few of them, since a silently shrunk evaluation set is
worse than a crash); label rows without scores are ignored and their count is logged and stored in
``policy``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from fvlm.io import atomic_path, atomic_write_text
from fvlm.labels import CT_RATE_LABELS

log = logging.getLogger(__name__)

THRESHOLDS: np.ndarray = np.linspace(0.0, 1.0, 100)
"""The protocol's candidate thresholds (100 evenly spaced in [0, 1], both ends included)."""

METRIC_KEYS: tuple[str, ...] = ("auc", "acc", "sens", "spec", "f1", "precision")
"""Metrics averaged into the macro row."""

LABEL_KEYS: tuple[str, ...] = (*METRIC_KEYS, "threshold", "n", "positives")
"""Keys of each per-label entry (more when bootstrap / macro-F1 are requested)."""

MISSING_POLICIES = ("zero", "drop")
COMPARISONS = (">", ">=")
_MAX_NAMES = 5  # volume names shown in an error message


def volume_key(name: str) -> str:
    """``valid_1_a_1.nii.gz`` -> ``valid_1_a_1`` (the key both CSVs are matched on)."""
    return str(name).strip().removesuffix(".nii.gz").removesuffix(".nii")


# ------------------------------------------------------------------------------------------ alignment
@dataclass
class _Aligned:
    """Scores and labels of the scored labels, row i = volume i.

    ``scores`` float64 (N, L) in [0, 1] with NaN for missing; ``truth`` int8 (N, L) in {0, 1}.
    """

    volumes: list[str]
    labels: list[str]
    scores: np.ndarray
    truth: np.ndarray
    label_rows_unscored: int


def _names(items: Sequence[str]) -> str:
    shown = ", ".join(list(items)[:_MAX_NAMES])
    return shown + (f", ... ({len(items)} in all)" if len(items) > _MAX_NAMES else "")


def _keyed(df: pd.DataFrame, what: str) -> pd.DataFrame:
    """Index a CSV frame by normalised volume name; loud on a missing column or duplicate volumes."""
    if "VolumeName" not in df.columns:
        raise ValueError(f"{what}: no 'VolumeName' column (columns: {list(df.columns)[:6]}...)")
    keys = df["VolumeName"].map(volume_key)
    dup = keys[keys.duplicated()].unique().tolist()
    if dup:
        raise ValueError(f"{what}: duplicate volumes {_names(dup)}")
    return df.set_index(keys.rename("volume")).drop(columns="VolumeName")


def scored_labels(scores_df: pd.DataFrame) -> list[str]:
    """CT-RATE labels that have a column in ``scores_df``, in the official CT-RATE order."""
    return [label for label in CT_RATE_LABELS if label in scores_df.columns]


def _align(scores_df: pd.DataFrame, labels_df: pd.DataFrame, sources: tuple[str, str],
           labels: Sequence[str] | None = None, quiet: bool = False) -> _Aligned:
    scores_src, labels_src = sources
    s = _keyed(scores_df, scores_src)
    y = _keyed(labels_df, labels_src)
    if labels is None:
        labels = scored_labels(scores_df)
        extra = [c for c in s.columns if c not in CT_RATE_LABELS]
        if extra and not quiet:
            log.warning("%s: ignoring columns that are not CT-RATE labels: %s", scores_src, extra)
        # an external test set maps only some of CT-RATE's labels (e.g. Rad-ChestCT): score the labels both
        # files have and say which were left out, rather than refusing the whole evaluation
        unlabelled_cols = [label for label in labels if label not in y.columns]
        if unlabelled_cols and len(unlabelled_cols) < len(labels):
            if not quiet:
                log.warning("%s has no column for %s: these scores are not evaluated", labels_src, unlabelled_cols)
            labels = [label for label in labels if label in y.columns]
    if not labels:
        raise ValueError(f"{scores_src}: no column is a CT-RATE label (expected some of {list(CT_RATE_LABELS)})")
    absent = [label for label in labels if label not in s.columns]
    if absent:
        raise ValueError(f"{scores_src}: no score column for {absent}")
    absent = [label for label in labels if label not in y.columns]
    if absent:
        raise ValueError(f"{labels_src}: no label column for {absent}")
    if len(s) == 0:
        raise ValueError(f"{scores_src}: no volumes")

    unlabelled = [v for v in s.index if v not in y.index]
    if unlabelled:
        raise ValueError(f"{labels_src}: no label row for {len(unlabelled)} scored volume(s): {_names(unlabelled)}")
    unscored = int((~y.index.isin(s.index)).sum())
    if unscored and not quiet:
        log.warning("%s: %d label row(s) have no scores and are ignored", labels_src, unscored)

    scores = s[list(labels)].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
    raw_missing = s[list(labels)].isna().to_numpy()
    bad = np.isnan(scores) & ~raw_missing
    if bad.any():
        i, j = np.argwhere(bad)[0]
        raise ValueError(f"{scores_src}: score of {s.index[i]} for {labels[j]!r} is not a number: "
                         f"{s[labels[j]].iloc[i]!r}")
    out_of_range = ~np.isnan(scores) & ((scores < 0) | (scores > 1))
    if out_of_range.any():
        i, j = np.argwhere(out_of_range)[0]
        raise ValueError(f"{scores_src}: score of {s.index[i]} for {labels[j]!r} is {scores[i, j]}, "
                         f"outside [0, 1] ({int(out_of_range.sum())} such scores): expected probabilities")

    truth_f = y.loc[s.index, list(labels)].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
    not_binary = ~np.isin(truth_f, (0.0, 1.0))
    if not_binary.any():
        i, j = np.argwhere(not_binary)[0]
        raw = y.loc[s.index[i], labels[j]]
        shown = "empty" if pd.isna(raw) or str(raw).strip() == "" else repr(raw if isinstance(raw, str) else float(raw))
        raise ValueError(f"{labels_src}: label of {s.index[i]} for {labels[j]!r} is {shown}, "
                         f"expected 0 or 1 ({int(not_binary.sum())} such cells)")
    return _Aligned(volumes=list(s.index), labels=list(labels), scores=scores,
                    truth=truth_f.astype(np.int8), label_rows_unscored=unscored)


def _column(data: _Aligned, j: int, missing: str) -> tuple[np.ndarray, np.ndarray]:
    """Scores (n,) float64 and labels (n,) int8 of label j after the missing-score policy."""
    s, y = data.scores[:, j], data.truth[:, j]
    if missing == "zero":
        return np.nan_to_num(s, nan=0.0), y
    keep = ~np.isnan(s)
    return s[keep], y[keep]


# ------------------------------------------------------------------------------------------ core rules
def _count_predicted(sorted_scores: np.ndarray, thresholds: np.ndarray, comparison: str) -> np.ndarray:
    """Number of ``sorted_scores`` predicted positive at each threshold: (T,) int."""
    side = "right" if comparison == ">" else "left"
    return len(sorted_scores) - np.searchsorted(sorted_scores, thresholds, side=side)


def roc_corner_threshold(scores: np.ndarray, truth: np.ndarray, *, comparison: str = ">",
                         thresholds: np.ndarray = THRESHOLDS) -> float:
    """The protocol's threshold: argmin over ``thresholds`` of ``sqrt((1-TPR)^2 + FPR^2)``, ties -> largest.

    ``scores`` (n,) probabilities, ``truth`` (n,) in {0, 1}; a volume is predicted positive when
    ``score > threshold`` (``comparison=">"``, the released rule) or ``score >= threshold``. When a class
    is absent its rate term is taken as 0 (nothing to miss), so a label without positives gets the
    largest threshold and one without negatives the smallest.
    """
    if comparison not in COMPARISONS:
        raise ValueError(f"comparison must be one of {COMPARISONS}, got {comparison!r}")
    truth = np.asarray(truth).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    pos, neg = np.sort(scores[truth]), np.sort(scores[~truth])
    n_pos, n_neg = len(pos), len(neg)
    # Compare squared distances times (P * N)^2 = (FN * N)^2 + (FP * P)^2 in exact integers: rate pairs that
    # are mathematically equal (FN/P = 1/3 vs FP/N = 1/3) tie exactly instead of by float rounding, and no
    # float tolerance can merge distinct distances. Python ints (object arrays) once int64 could overflow.
    dtype = np.int64 if max(n_pos, n_neg, 1) ** 4 < 2**61 else object
    fn = (n_pos - _count_predicted(pos, thresholds, comparison)).astype(dtype)
    fp = _count_predicted(neg, thresholds, comparison).astype(dtype)
    if n_pos and n_neg:
        key = (fn * n_neg) ** 2 + (fp * n_pos) ** 2
    else:  # a class is absent: its rate term is 0
        key = fp**2 if n_neg else fn**2
    best = np.flatnonzero(key == key.min())[-1]
    return float(thresholds[best])


def predict(scores: np.ndarray, threshold: float, comparison: str = ">") -> np.ndarray:
    """Binary predictions (n,) int8: ``score > threshold`` (or ``>=``)."""
    if comparison not in COMPARISONS:
        raise ValueError(f"comparison must be one of {COMPARISONS}, got {comparison!r}")
    return (scores > threshold if comparison == ">" else scores >= threshold).astype(np.int8)


def label_metrics(scores: np.ndarray, truth: np.ndarray, threshold: float, *, comparison: str = ">",
                  macro_f1: bool = False) -> dict[str, float]:
    """Protocol metrics of one label at a given threshold (sklearn for AUC, F1, precision, accuracy).

    ``scores`` (n,) probabilities, ``truth`` (n,) in {0, 1}. Undefined values are NaN: AUC with a single
    class, sensitivity without positives, specificity without negatives. Precision without predicted
    positives is 0 (sklearn's ``zero_division`` value, as the protocol gets it).
    """
    from sklearn.metrics import accuracy_score, f1_score, precision_score, roc_auc_score

    n, positives = len(truth), int(np.sum(truth))
    out: dict[str, float] = {key: math.nan for key in METRIC_KEYS}
    out.update(threshold=float(threshold), n=n, positives=positives)
    if macro_f1:
        out["f1_macro"] = math.nan
    if n == 0:
        return out
    pred = predict(scores, threshold, comparison)
    if 0 < positives < n:
        out["auc"] = float(roc_auc_score(truth, scores))
    tp = int(np.sum((pred == 1) & (truth == 1)))
    tn = int(np.sum((pred == 0) & (truth == 0)))
    out["sens"] = tp / positives if positives else math.nan
    out["spec"] = tn / (n - positives) if n - positives else math.nan
    out["acc"] = float(accuracy_score(truth, pred))
    out["f1"] = float(f1_score(truth, pred, average="weighted", zero_division=0.0))
    out["precision"] = float(precision_score(truth, pred, zero_division=0.0))
    if macro_f1:
        out["f1_macro"] = float(f1_score(truth, pred, average="macro", labels=[0, 1], zero_division=0.0))
    return out


# ------------------------------------------------------------------------------------------ bootstrap
def _ci(samples: np.ndarray) -> list[float] | None:
    """Percentile 95 % interval of bootstrap samples, ignoring undefined (NaN) resamples."""
    finite = samples[np.isfinite(samples)]
    if finite.size == 0:
        return None
    lo, hi = np.percentile(finite, [2.5, 97.5])
    return [float(lo), float(hi)]


def resampled_metrics(scores: np.ndarray, truth: np.ndarray, counts: np.ndarray, *, threshold: float | None = None,
                      comparison: str = ">") -> dict[str, np.ndarray]:
    """Protocol metrics of one label on B bootstrap resamples at once, given as multiplicities.

    Args:
        scores: (n,) probabilities; truth: (n,) labels in {0, 1}.
        counts: (B, n) int, how often each volume is drawn in each resample.
        threshold: a fixed threshold, or None to refit the ROC-corner threshold on every resample (same rule,
            exact ties, as :func:`roc_corner_threshold`).

    Returns:
        ``{"auc", "acc", "sens", "spec", "f1", "precision", "f1_macro"}``: (B,) float64, NaN where undefined.
        Equal to :func:`label_metrics` on the expanded resample (tested), but one sort per label instead of
        one per resample: scores are grouped by distinct value and every count becomes a cumulative sum.
    """
    order = np.argsort(scores, kind="stable")
    s, pos = np.asarray(scores, dtype=np.float64)[order], np.asarray(truth).astype(bool)[order]
    w = np.asarray(counts, dtype=np.int64).T[order]  # (n, B): row gathers and axis-0 cumsums are contiguous
    n_boot = w.shape[1]
    ends = np.flatnonzero(np.r_[s[1:] != s[:-1], True])  # last index of each distinct score
    values = s[ends]
    zero = np.zeros((1, n_boot), dtype=np.int64)
    cum_p = np.cumsum(w * pos[:, None], axis=0)
    cp = np.concatenate([zero, cum_p[ends]])  # (G + 1, B): positives scoring below distinct value g
    cn = np.concatenate([zero, (np.cumsum(w, axis=0) - cum_p)[ends]])
    gp, gn = np.diff(cp, axis=0), np.diff(cn, axis=0)  # (G, B) per distinct value
    n_pos, n_neg = cp[-1], cn[-1]
    side = "right" if comparison == ">" else "left"  # groups [cut:] are predicted positive
    if threshold is None:
        cut = np.searchsorted(values, THRESHOLDS, side=side)  # (T,)
        fn_t, fp_t = cp[cut], n_neg - cn[cut]  # (T, B)
        if len(s) ** 4 >= 2**62:  # int64 could overflow: exact Python ints
            fn_t, fp_t = fn_t.astype(object), fp_t.astype(object)
        key = np.where((n_pos > 0) & (n_neg > 0), (fn_t * n_neg) ** 2 + (fp_t * n_pos) ** 2,
                       np.where(n_neg > 0, fp_t**2, fn_t**2))
        best = len(THRESHOLDS) - 1 - np.argmin(key[::-1], axis=0)  # last minimum = largest threshold
        cut_b = cut[best]
    else:
        cut_b = np.full(n_boot, np.searchsorted(values, threshold, side=side))
    rows = np.arange(n_boot)
    fn, tn = cp[cut_b, rows], cn[cut_b, rows]
    tp, fp = n_pos - fn, n_neg - tn
    total = n_pos + n_neg
    with np.errstate(divide="ignore", invalid="ignore"):  # undefined -> NaN, as label_metrics
        f1_pos = np.where(tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), 0.0)
        f1_neg = np.where(tn + fp + fn > 0, 2 * tn / (2 * tn + fp + fn), 0.0)
        return {
            "auc": (gp * (cn[:-1] + 0.5 * gn)).sum(axis=0) / (n_pos * n_neg),  # Mann-Whitney, ties 1/2
            "acc": (tp + tn) / total,
            "sens": tp / n_pos,
            "spec": tn / n_neg,
            "f1": (n_pos * f1_pos + n_neg * f1_neg) / total,
            "precision": np.where(tp + fp > 0, tp / (tp + fp), 0.0),
            "f1_macro": (f1_pos + f1_neg) / 2,
        }


def bootstrap_counts(rng: np.random.Generator, n_volumes: int, n_boot: int) -> np.ndarray:
    """(n_boot, n_volumes) int64 multiplicities of ``n_boot`` resamples of the volumes with replacement."""
    idx = rng.integers(0, n_volumes, size=(n_boot, n_volumes))
    flat = idx + n_volumes * np.arange(n_boot)[:, None]
    return np.bincount(flat.ravel(), minlength=n_boot * n_volumes).reshape(n_boot, n_volumes)


_BOOT_BLOCK = 128  # resamples per block: bounds memory at (128, N) per array


def _bootstrap(data: _Aligned, missing: str, fixed: dict[str, float] | None, comparison: str, keys: Sequence[str],
               n_boot: int, seed: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Resample volumes with replacement ``n_boot`` times (the same resamples for every label).

    Returns per-label AUC samples (n_boot, L) and macro samples {key: (n_boot,)}. The threshold is refitted on
    every resample when it is fitted on the evaluated labels (it is part of the estimator), and kept fixed
    when it comes from another split.
    """
    rng = np.random.default_rng(seed)
    n_vol, n_lab = data.scores.shape
    per = {key: np.full((n_boot, n_lab), np.nan) for key in keys}
    with tqdm(total=n_boot, desc="bootstrap", unit="resample", disable=n_boot < 1000, leave=False) as bar:
        for start in range(0, n_boot, _BOOT_BLOCK):
            stop = min(n_boot, start + _BOOT_BLOCK)
            counts = bootstrap_counts(rng, n_vol, stop - start)
            for j, label in enumerate(data.labels):
                s, y = data.scores[:, j], data.truth[:, j]
                c = counts
                if missing == "zero":
                    s = np.nan_to_num(s, nan=0.0)
                else:
                    keep = ~np.isnan(s)
                    s, y, c = s[keep], y[keep], counts[:, keep]
                if len(s) == 0:
                    continue
                res = resampled_metrics(s, y, c, threshold=None if fixed is None else fixed[label],
                                        comparison=comparison)
                for key in keys:
                    per[key][start:stop, j] = res[key]
            bar.update(stop - start)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows: degenerate resamples
        macro = {key: np.nanmean(per[key], axis=1) for key in keys}
    return per["auc"], macro


# ------------------------------------------------------------------------------------------ public API
def _nanmean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan


def compute_metrics(
    scores_df: pd.DataFrame,
    labels_df: pd.DataFrame,
    *,
    missing: str = "zero",
    threshold_source: tuple[pd.DataFrame, pd.DataFrame] | Mapping[str, float] | None = None,
    bootstrap: int = 0,
    macro_f1: bool = False,
    seed: int = 0,
    comparison: str = ">",
    sources: tuple[str, str] = ("scores", "labels"),
) -> dict[str, Any]:
    """Per-label and macro metrics of zero-shot scores against CT-RATE labels.

    Args:
        scores_df: ``VolumeName`` + one probability column per scored CT-RATE label (NaN = missing).
        labels_df: ``VolumeName`` + CT-RATE label columns (0/1).
        missing: ``"zero"`` (protocol: a missing score counts as 0) or ``"drop"`` (volume excluded for that label).
        threshold_source: None = fit on ``labels_df`` (protocol); ``(scores_df, labels_df)`` of another split
            = fit there with the same rule and missing policy; or a ``{label: threshold}`` mapping.
        bootstrap: number of percentile-bootstrap resamples of the volumes for 95 % CIs (0 = off).
        macro_f1: also report F1 with ``average="macro"`` (key ``f1_macro``).
        seed: bootstrap seed.
        comparison: ``">"`` (released protocol) or ``">="``: how a score is compared with the threshold.
        sources: names (e.g. file paths) used in error messages.

    Returns:
        ``{"labels": {label: {auc, acc, sens, spec, f1, precision, threshold, n, positives[, f1_macro]
        [, auc_ci95]}}, "macro": {auc, acc, sens, spec, f1, precision, n_labels[, f1_macro][, <key>_ci95]},
        "scored": [...], "unscored": [...], "missing": {label: count}, "policy": {...}}``. Undefined values are
        NaN (``null`` in JSON); macro means skip them.
    """
    if missing not in MISSING_POLICIES:
        raise ValueError(f"missing must be one of {MISSING_POLICIES}, got {missing!r}")
    if comparison not in COMPARISONS:
        raise ValueError(f"comparison must be one of {COMPARISONS}, got {comparison!r}")
    if bootstrap < 0:
        raise ValueError(f"bootstrap must be >= 0, got {bootstrap}")
    data = _align(scores_df, labels_df, sources)

    fixed: dict[str, float] | None = None
    threshold_rule = "roc_corner fitted on the evaluated labels (protocol)"
    if isinstance(threshold_source, Mapping):
        absent = [label for label in data.labels if label not in threshold_source]
        if absent:
            raise ValueError(f"threshold_source has no threshold for {absent}")
        fixed = {label: float(threshold_source[label]) for label in data.labels}
        threshold_rule = "given thresholds"
    elif threshold_source is not None:
        fit_scores, fit_labels = threshold_source
        fit = _align(fit_scores, fit_labels, ("threshold scores", "threshold labels"), labels=data.labels)
        fixed = {}
        for j, label in enumerate(data.labels):
            s, y = _column(fit, j, missing)
            fixed[label] = roc_corner_threshold(s, y, comparison=comparison)
        threshold_rule = f"roc_corner fitted on another split ({len(fit.volumes)} volumes)"

    per_label: dict[str, dict[str, float]] = {}
    missing_counts: dict[str, int] = {}
    for j, label in enumerate(data.labels):
        missing_counts[label] = int(np.isnan(data.scores[:, j]).sum())
        s, y = _column(data, j, missing)
        if len(s) == 0:
            log.warning("%s: every score is missing; its metrics are undefined", label)
        thr = fixed[label] if fixed is not None else (roc_corner_threshold(s, y, comparison=comparison)
                                                     if len(s) else math.nan)
        per_label[label] = label_metrics(s, y, thr, comparison=comparison, macro_f1=macro_f1)
        if 0 < len(s) and not 0 < per_label[label]["positives"] < len(s):
            log.warning("%s: only one class among %d volumes; AUC undefined, left out of the macro AUC", label, len(s))

    keys = (*METRIC_KEYS, "f1_macro") if macro_f1 else METRIC_KEYS
    macro: dict[str, Any] = {key: _nanmean([m[key] for m in per_label.values()]) for key in keys}
    macro["n_labels"] = len(per_label)

    if bootstrap:
        auc_samples, macro_samples = _bootstrap(data, missing, fixed, comparison, keys, bootstrap, seed)
        for j, label in enumerate(data.labels):
            per_label[label]["auc_ci95"] = _ci(auc_samples[:, j])
        for key in keys:
            macro[f"{key}_ci95"] = _ci(macro_samples[key])

    total_missing = sum(missing_counts.values())
    if total_missing:
        log.info("%d missing score(s) %s", total_missing,
                 "counted as 0 (protocol)" if missing == "zero" else "dropped per label")
    policy = {
        "missing": missing,
        "threshold": threshold_rule,
        "thresholds_grid": "numpy.linspace(0, 1, 100); ties -> largest threshold",
        "prediction": f"score {comparison} threshold",
        "f1_average": "weighted",
        "precision": "binary (positive class); 0 when nothing is predicted positive",
        "macro": "mean over scored labels; undefined (NaN) values left out",
        "bootstrap": {"resamples": bootstrap, "seed": seed, "interval": "percentile 95%", "unit": "volume",
                      "threshold": "refitted per resample" if fixed is None else "fixed"} if bootstrap else None,
        "macro_f1": macro_f1,
        "n_volumes": len(data.volumes),
        "label_rows_without_scores": data.label_rows_unscored,
    }
    return {
        "labels": per_label,
        "macro": macro,
        "scored": list(data.labels),
        "unscored": [label for label in CT_RATE_LABELS if label not in data.labels],
        "missing": missing_counts,
        "policy": policy,
    }


def _json_clean(obj: Any) -> Any:
    """NaN/inf -> None and numpy scalars -> Python, so the JSON is strict (``allow_nan=False``)."""
    if isinstance(obj, dict):
        return {str(k): _json_clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_clean(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def metrics_to_json(metrics: Mapping[str, Any]) -> str:
    """Strict JSON text of a metrics dict (undefined values as ``null``)."""
    return json.dumps(_json_clean(metrics), indent=2, allow_nan=False) + "\n"


def _fmt(value: Any, width: int = 6) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-".rjust(width)
    return f"{value:.3f}".rjust(width)


def format_table(metrics: Mapping[str, Any]) -> str:
    """A fixed-width text table: one row per scored label, the macro row, and the policy in one line."""
    labels = metrics["labels"]
    has_ci = any("auc_ci95" in m for m in labels.values())
    has_f1m = any("f1_macro" in m for m in labels.values())
    width = max([len(label) for label in labels] + [len("macro (99 labels)")])
    head = f"{'label':<{width}}  {'AUC':>6} {'ACC':>6} {'F1':>6} {'Prec':>6} {'Sens':>6} {'Spec':>6} {'Thr':>6}"
    head += f" {'F1-mac':>6}" if has_f1m else ""
    head += f" {'n':>6} {'pos':>6}"
    head += f"  {'AUC 95% CI':>15}" if has_ci else ""
    lines = [head, "-" * len(head)]

    def row(name: str, m: Mapping[str, Any], ci_key: str, n: str, pos: str) -> str:
        text = f"{name:<{width}}  " + " ".join(_fmt(m.get(k)) for k in ("auc", "acc", "f1", "precision", "sens",
                                                                         "spec", "threshold"))
        text += f" {_fmt(m.get('f1_macro'))}" if has_f1m else ""
        text += f" {n:>6} {pos:>6}"
        if has_ci:
            ci = m.get(ci_key)
            shown = f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "-"
            text += f"  {shown:>15}"
        return text

    for label, m in labels.items():
        lines.append(row(label, m, "auc_ci95", str(m["n"]), str(m["positives"])))
    lines.append("-" * len(head))
    macro = metrics["macro"]
    lines.append(row(f"macro ({macro['n_labels']} labels)", macro, "auc_ci95", "", ""))
    policy = metrics["policy"]
    missing = sum(metrics["missing"].values())
    lines.append(f"volumes: {policy['n_volumes']}; missing scores: {missing} ({policy['missing']}); "
                 f"threshold: {policy['threshold']}; prediction: {policy['prediction']}")
    if metrics.get("unscored"):
        lines.append(f"unscored labels: {', '.join(metrics['unscored'])}")
    return "\n".join(lines)


def plot_roc(scores_df: pd.DataFrame, labels_df: pd.DataFrame, path: str | Path, *, missing: str = "zero",
             title: str = "Zero-shot ROC curves", sources: tuple[str, str] = ("scores", "labels")) -> Path:
    """Write the ROC curves of all scored labels in one PNG (legend with AUCs, chance diagonal), atomically.

    Uses matplotlib's Agg canvas directly (no pyplot state, no display needed). Labels with a single class
    have no ROC curve and are listed in the legend as undefined.
    """
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from sklearn.metrics import roc_auc_score, roc_curve

    if missing not in MISSING_POLICIES:
        raise ValueError(f"missing must be one of {MISSING_POLICIES}, got {missing!r}")
    data = _align(scores_df, labels_df, sources, quiet=True)  # compute_metrics already reported
    fig = Figure(figsize=(8, 7), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    cmap = matplotlib.colormaps["tab20"]  # 16 labels: distinct colours
    for j, label in enumerate(data.labels):
        s, y = _column(data, j, missing)
        if len(s) == 0 or not 0 < int(y.sum()) < len(y):
            ax.plot([], [], color=cmap(j % 20), label=f"{label} (AUC undefined)")
            continue
        fpr, tpr, _ = roc_curve(y, s)
        ax.plot(fpr, tpr, color=cmap(j % 20), linewidth=1.2, label=f"{label} ({roc_auc_score(y, s):.3f})")
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="chance (0.500)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_aspect("equal")
    ax.set_xlabel("false positive rate (1 - specificity)")
    ax.set_ylabel("true positive rate (sensitivity)")
    ax.set_title(f"{title} ({len(data.volumes)} volumes, missing={missing})")
    ax.grid(color="lightgrey", linewidth=0.5)
    ax.legend(loc="lower right", fontsize=7, title="label (AUC)", title_fontsize=7)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    log.info("wrote ROC curves to %s", path)
    return path


def _read_csv(path: str | Path, what: str) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} CSV not found: {path}")
    try:
        return pd.read_csv(path)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as e:
        raise ValueError(f"{what} CSV {path}: not a readable CSV ({type(e).__name__}: "
                         f"{' '.join(str(e).split())[:200]})") from None


def run_metrics_cli(args: argparse.Namespace) -> int:
    """``fvlm metrics``: metrics of a scores CSV against a labels CSV, and/or retrieval from an embeddings file.

    Uses ``args.scores``, ``args.labels``, ``args.json``, ``args.plot``, ``args.thresholds_from`` (None or
    [SCORES, LABELS]), ``args.bootstrap``, ``args.macro_f1``, ``args.missing``, ``args.seed``,
    ``args.retrieval``. With ``--retrieval`` alone, the scores CSV and ``--labels`` may be omitted.
    The table goes to the log; ``--json`` gets everything (retrieval under the key ``retrieval``).
    """
    scores_path, labels_path = getattr(args, "scores", None), getattr(args, "labels", None)
    retrieval_path = getattr(args, "retrieval", None)
    if scores_path is None and retrieval_path is None:
        raise ValueError("fvlm metrics needs a scores CSV with --labels, or --retrieval EMBEDDINGS")
    if scores_path is not None and labels_path is None:
        raise ValueError("--labels is required with a scores CSV")
    if scores_path is None and (labels_path or args.plot or args.thresholds_from):
        raise ValueError("--labels, --plot and --thresholds-from need a scores CSV")

    result: dict[str, Any] = {}
    if scores_path is not None:
        scores_df = _read_csv(scores_path, "scores")
        labels_df = _read_csv(labels_path, "labels")
        source = None
        if args.thresholds_from:
            fit_scores, fit_labels = args.thresholds_from
            source = (_read_csv(fit_scores, "threshold scores"), _read_csv(fit_labels, "threshold labels"))
        result = compute_metrics(scores_df, labels_df, missing=args.missing, threshold_source=source,
                                 bootstrap=args.bootstrap, macro_f1=args.macro_f1, seed=args.seed,
                                 sources=(str(scores_path), str(labels_path)))
        result["policy"]["files"] = {"scores": str(scores_path), "labels": str(labels_path),
                                     "thresholds_from": list(map(str, args.thresholds_from or [])) or None}
        log.info("zero-shot metrics of %s\n%s", scores_path, format_table(result))
        if args.plot:
            plot_roc(scores_df, labels_df, args.plot, missing=args.missing,
                     sources=(str(scores_path), str(labels_path)))
    if retrieval_path is not None:
        from fvlm.retrieval import format_retrieval_table, retrieval_from_file

        result["retrieval"] = retrieval_from_file(retrieval_path)
        log.info("retrieval of %s\n%s", retrieval_path, format_retrieval_table(result["retrieval"]))
    if args.json:
        atomic_write_text(args.json, metrics_to_json(result))
        log.info("wrote metrics to %s", args.json)
    return 0
