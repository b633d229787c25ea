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

import json
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fvlm.io import atomic_write_text
from fvlm.labels import CT_RATE_LABELS, volume_key
from fvlm.metric_rules import (
    COMPARISONS,
    METRIC_KEYS,
    THRESHOLDS,
    bootstrap_counts,
    bootstrap_samples,
    label_metrics,
    percentile_ci,
    predict,
    resampled_metrics,
    roc_corner_threshold,
)

log = logging.getLogger(__name__)

LABEL_KEYS: tuple[str, ...] = (*METRIC_KEYS, "threshold", "n", "positives")
"""Keys of each per-label entry (more when bootstrap / macro-F1 are requested)."""

MISSING_POLICIES = ("zero", "drop")
_MAX_NAMES = 5  # volume names shown in an error message


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


def label_columns(scores_df: pd.DataFrame, labels_df: pd.DataFrame, *, missing: str = "zero",
                  sources: tuple[str, str] = ("scores", "labels")
                  ) -> tuple[int, list[tuple[str, np.ndarray, np.ndarray]]]:
    """The matched volumes' count and, per scored label, (label, scores, truth) after the missing-score policy
    (what the ROC curves of :func:`fvlm.plots.plot_roc` draw; nothing is logged: compute_metrics reports)."""
    if missing not in MISSING_POLICIES:
        raise ValueError(f"missing must be one of {MISSING_POLICIES}, got {missing!r}")
    data = _align(scores_df, labels_df, sources, quiet=True)
    return len(data.volumes), [(label, *_column(data, j, missing)) for j, label in enumerate(data.labels)]


# ------------------------------------------------------------------------------------------ public API
@dataclass
class Metrics(Mapping):
    """The result of :func:`compute_metrics` (``fvlm metrics --json`` writes :meth:`to_json`).

    Read as attributes or, like the dictionary it replaces, by key (``metrics["macro"]["auc"]``).

    Attributes:
        labels: {label: {auc, acc, sens, spec, f1, precision, threshold, n, positives[, f1_macro][, auc_ci95]}}.
        macro: {auc, acc, sens, spec, f1, precision, n_labels[, f1_macro][, <key>_ci95]}.
        scored, unscored: the CT-RATE labels scored, and the others.
        missing: {label: missing scores}. policy: the rules applied (and the files, from the command line).
    """

    labels: dict[str, dict[str, Any]]
    macro: dict[str, Any]
    scored: list[str]
    unscored: list[str]
    missing: dict[str, int]
    policy: dict[str, Any]

    def __getitem__(self, key: str) -> Any:
        if key not in self._keys():
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys())

    def __len__(self) -> int:
        return len(self._keys())

    @classmethod
    def _keys(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    def to_dict(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in self._keys()}

    def to_json(self, path: str | Path | None = None) -> str:
        """Strict JSON text (undefined values as ``null``); written atomically to ``path`` when given."""
        text = metrics_to_json(self)
        if path is not None:
            atomic_write_text(path, text)
        return text


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
) -> Metrics:
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
        :class:`Metrics`. Undefined values are NaN (``null`` in JSON); macro means skip them.
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
        auc_samples, macro_samples = bootstrap_samples(data.scores, data.truth, data.labels, missing, fixed, comparison,
                                                       keys, bootstrap, seed)
        for j, label in enumerate(data.labels):
            per_label[label]["auc_ci95"] = percentile_ci(auc_samples[:, j])
        for key in keys:
            macro[f"{key}_ci95"] = percentile_ci(macro_samples[key])

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
    return Metrics(labels=per_label, macro=macro, scored=list(data.labels),
                   unscored=[label for label in CT_RATE_LABELS if label not in data.labels], missing=missing_counts,
                   policy=policy)


def _json_clean(obj: Any) -> Any:
    """NaN/inf -> None and numpy scalars -> Python, so the JSON is strict (``allow_nan=False``)."""
    if isinstance(obj, Mapping):
        return {str(k): _json_clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_clean(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def metrics_to_json(metrics: Mapping[str, Any]) -> str:
    """Strict JSON text of :class:`Metrics` or a dictionary of them (undefined values as ``null``)."""
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


__all__ = ["COMPARISONS", "LABEL_KEYS", "METRIC_KEYS", "MISSING_POLICIES", "THRESHOLDS", "Metrics", "bootstrap_counts",
           "compute_metrics", "format_table", "label_columns", "label_metrics", "metrics_to_json", "predict",
           "resampled_metrics", "roc_corner_threshold", "scored_labels", "volume_key"]
