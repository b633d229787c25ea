"""The ``fvlm metrics`` job on files: a scores CSV against a labels CSV (:func:`fvlm.metrics.compute_metrics`,
table logged, ROC curves drawn) and/or retrieval from an ``fvlm embed`` file, written as one JSON."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from fvlm.io import atomic_write_text
from fvlm.metrics import Metrics, compute_metrics, format_table, metrics_to_json
from fvlm.plots import plot_roc
from fvlm.retrieval import format_retrieval_table, retrieval_from_file

log = logging.getLogger(__name__)


@dataclass
class MetricsReport:
    """What ``fvlm metrics`` computed: zero-shot metrics (with the files in ``policy["files"]``) and/or retrieval."""

    metrics: Metrics | None = None
    retrieval: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = self.metrics.to_dict() if self.metrics is not None else {}
        if self.retrieval is not None:
            out["retrieval"] = self.retrieval
        return out

    def to_json(self, path: str | Path | None = None) -> str:
        """The ``--json`` text (strict JSON, undefined values as ``null``); written atomically to ``path``."""
        text = metrics_to_json(self.to_dict())
        if path is not None:
            atomic_write_text(path, text)
        return text


def read_csv(path: str | Path, what: str) -> pd.DataFrame:
    """A CSV, or a one-line error naming it (missing file, not a CSV)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} CSV not found: {path}")
    try:
        return pd.read_csv(path)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as e:
        raise ValueError(f"{what} CSV {path}: not a readable CSV ({type(e).__name__}: "
                         f"{' '.join(str(e).split())[:200]})") from None


def metrics_from_files(scores: str | Path | None = None, labels: str | Path | None = None, *,
                       json_out: str | Path | None = None, plot: str | Path | None = None,
                       thresholds_from: tuple[str | Path, str | Path] | None = None, bootstrap: int = 0,
                       macro_f1: bool = False, missing: str = "zero", seed: int = 0,
                       retrieval: str | Path | None = None) -> MetricsReport:
    """Metrics of a scores CSV against a labels CSV, and/or retrieval Recall@K from an embeddings file.

    With ``retrieval`` alone, ``scores`` and ``labels`` may be omitted. The tables go to the log; ``json_out``
    gets everything (retrieval under the key ``retrieval``); ``plot``: ROC curves (PNG);
    ``thresholds_from``: (scores, labels) CSVs of another split the thresholds are fitted on.
    """
    if scores is None and retrieval is None:
        raise ValueError("fvlm metrics needs a scores CSV with --labels, or --retrieval EMBEDDINGS")
    if scores is not None and labels is None:
        raise ValueError("--labels is required with a scores CSV")
    if scores is None and (labels or plot or thresholds_from):
        raise ValueError("--labels, --plot and --thresholds-from need a scores CSV")

    report = MetricsReport()
    if scores is not None:
        scores_df = read_csv(scores, "scores")
        labels_df = read_csv(labels, "labels")
        source = None
        if thresholds_from:
            fit_scores, fit_labels = thresholds_from
            source = (read_csv(fit_scores, "threshold scores"), read_csv(fit_labels, "threshold labels"))
        result = compute_metrics(scores_df, labels_df, missing=missing, threshold_source=source, bootstrap=bootstrap,
                                 macro_f1=macro_f1, seed=seed, sources=(str(scores), str(labels)))
        result.policy["files"] = {"scores": str(scores), "labels": str(labels),
                                  "thresholds_from": list(map(str, thresholds_from or [])) or None}
        log.info("zero-shot metrics of %s\n%s", scores, format_table(result))
        if plot:
            plot_roc(scores_df, labels_df, plot, missing=missing, sources=(str(scores), str(labels)))
        report.metrics = result
    if retrieval is not None:
        report.retrieval = retrieval_from_file(retrieval)
        log.info("retrieval of %s\n%s", retrieval, format_retrieval_table(report.retrieval))
    if json_out:
        report.to_json(json_out)
        log.info("wrote metrics to %s", json_out)
    return report


__all__ = ["MetricsReport", "metrics_from_files", "read_csv"]
