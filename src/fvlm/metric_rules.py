"""The zero-shot protocol's rules on arrays, one label at a time: the ROC-corner threshold, the prediction, the
metrics (see :mod:`fvlm.metrics` for the protocol and the table-level API), and their percentile bootstrap.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
from sklearn.metrics import accuracy_score, f1_score, precision_score, roc_auc_score
from tqdm import tqdm

THRESHOLDS: np.ndarray = np.linspace(0.0, 1.0, 100)
"""The protocol's candidate thresholds (100 evenly spaced in [0, 1], both ends included)."""

METRIC_KEYS: tuple[str, ...] = ("auc", "acc", "sens", "spec", "f1", "precision")
"""Metrics averaged into the macro row."""

COMPARISONS = (">", ">=")


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
def percentile_ci(samples: np.ndarray) -> list[float] | None:
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


def bootstrap_samples(scores: np.ndarray, truth: np.ndarray, labels: Sequence[str], missing: str,
                      fixed: dict[str, float] | None, comparison: str, keys: Sequence[str], n_boot: int, seed: int
                      ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Resample volumes with replacement ``n_boot`` times (the same resamples for every label).

    ``scores`` float64 (N, L) with NaN for missing, ``truth`` (N, L) in {0, 1}, column j = ``labels[j]``.

    Returns per-label AUC samples (n_boot, L) and macro samples {key: (n_boot,)}. The threshold is refitted on
    every resample when it is fitted on the evaluated labels (it is part of the estimator), and kept fixed
    when it comes from another split.
    """
    rng = np.random.default_rng(seed)
    n_vol, n_lab = scores.shape
    per = {key: np.full((n_boot, n_lab), np.nan) for key in keys}
    with tqdm(total=n_boot, desc="bootstrap", unit="resample", disable=n_boot < 1000, leave=False) as bar:
        for start in range(0, n_boot, _BOOT_BLOCK):
            stop = min(n_boot, start + _BOOT_BLOCK)
            counts = bootstrap_counts(rng, n_vol, stop - start)
            for j, label in enumerate(labels):
                s, y = scores[:, j], truth[:, j]
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


__all__ = ["COMPARISONS", "METRIC_KEYS", "THRESHOLDS", "bootstrap_counts", "bootstrap_samples", "label_metrics",
           "percentile_ci", "predict", "resampled_metrics", "roc_corner_threshold"]
