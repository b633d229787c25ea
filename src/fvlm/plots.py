"""Every picture fvlm draws: ROC curves of zero-shot scores (``fvlm metrics --plot``) and the overlay of a
prediction (``fvlm predict --png``).

Figures are drawn on matplotlib's Agg canvas directly (:func:`new_figure`: no pyplot state, no display, no
backend switch), and written atomically (:func:`save_png`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from sklearn.metrics import roc_auc_score, roc_curve

from fvlm.io import atomic_path
from fvlm.metrics import label_columns

if TYPE_CHECKING:
    from fvlm.prediction import Prediction

log = logging.getLogger(__name__)


def new_figure(figsize: tuple[float, float], dpi: int = 100) -> Figure:
    """A figure on its own Agg canvas (the one place the backend is chosen)."""
    fig = Figure(figsize=figsize, dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def save_png(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` as PNG, atomically (temporary file + rename); returns the path."""
    path = Path(path)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    return path


# ----------------------------------------------------------------------------------------------- training curves
def plot_loss(log_csv: str | Path, out_png: str | Path) -> None:
    """Total and per-anatomy loss curves of a run's ``log.csv`` (PNG); nothing for an empty log."""
    df = pd.read_csv(log_csv)
    if df.empty:
        return
    fig = new_figure((7, 4), dpi=120)
    ax = fig.subplots()
    for col in [c for c in df.columns if c == "loss" or c.startswith("loss/")]:
        series = pd.to_numeric(df[col], errors="coerce")
        ax.plot(df["step"], series, label=col.replace("loss/", ""), lw=2 if col == "loss" else 1)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("contrastive loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_png(fig, out_png)


def plot_fractions(summary: dict[str, Any], path: str | Path) -> None:
    """Linear-probe macro AUC (mean +- sd over seeds) against the label fraction (log scale), zero-shot as a line
    (``summary``: ``fvlm probe``'s probe.json content)."""
    zs = summary.get("zero_shot")
    key = "macro_auc_zero_shot_labels" if zs and zs.get("labels") else "macro_auc"
    fr = [float(f) for f in summary["by_fraction"]]
    mean = [summary["by_fraction"][f][key]["mean"] for f in summary["by_fraction"]]
    std = [summary["by_fraction"][f][key]["std"] for f in summary["by_fraction"]]
    fig = new_figure((6, 4), dpi=120)
    ax = fig.subplots()
    ax.errorbar([f * 100 for f in fr], [m if m is not None else np.nan for m in mean],
                yerr=[s or 0 for s in std], marker="o", capsize=4, label=f"linear probe ({summary['features']})")
    if zs and zs.get("macro_auc") is not None:
        ax.axhline(zs["macro_auc"], color="tab:red", ls="--", label="zero-shot")
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.set_xscale("log")
    ax.set_xlabel(f"% of {summary['train_split']} labels used")
    n = len(zs["labels"]) if zs and zs.get("labels") else len(summary["evaluable_labels"])
    ax.set_ylabel(f"macro AUC ({summary['split']}, {n} labels)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_png(fig, path)


# ----------------------------------------------------------------------------------------------- ROC curves
def plot_roc(scores_df: pd.DataFrame, labels_df: pd.DataFrame, path: str | Path, *, missing: str = "zero",
             title: str = "Zero-shot ROC curves", sources: tuple[str, str] = ("scores", "labels")) -> Path:
    """Write the ROC curves of all scored labels in one PNG (legend with AUCs, chance diagonal), atomically.

    Uses matplotlib's Agg canvas directly (no pyplot state, no display needed). Labels with a single class
    have no ROC curve and are listed in the legend as undefined.
    """
    n_volumes, columns = label_columns(scores_df, labels_df, missing=missing, sources=sources)
    fig = new_figure(figsize=(8, 7), dpi=120)
    ax = fig.add_subplot(1, 1, 1)
    cmap = matplotlib.colormaps["tab20"]  # 16 labels: distinct colours
    for j, (label, s, y) in enumerate(columns):
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
    ax.set_title(f"{title} ({n_volumes} volumes, missing={missing})")
    ax.grid(color="lightgrey", linewidth=0.5)
    ax.legend(loc="lower right", fontsize=7, title="label (AUC)", title_fontsize=7)
    fig.tight_layout()
    path = save_png(fig, path)
    log.info("wrote ROC curves to %s", path)
    return path


# ----------------------------------------------------------------------------------------------- prediction
def _centre(pred: Prediction) -> tuple[int, int, int]:
    boxes = [v["bbox_processed"] for v in pred.anatomies.values() if v["found"] and v["bbox_processed"]]
    assert pred.image is not None
    if not boxes:
        return tuple(s // 2 for s in pred.image.shape)  # type: ignore[return-value]
    lo = [min(b[2 * a] for b in boxes) for a in range(3)]
    hi = [max(b[2 * a + 1] for b in boxes) for a in range(3)]
    return tuple((lo[a] + hi[a] - 1) // 2 for a in range(3))  # type: ignore[return-value]


def save_overlay(pred: Prediction, path: str | Path, top: int = 6) -> None:
    """PNG: axial and coronal slices of the processed volume (radiological view: patient's right on the image's
    left) through the centre of the anatomies found, anatomy contours with a legend, and the top findings."""
    if pred.image is None or pred.mask is None:
        raise ValueError("this prediction holds no processed volume to draw")
    sx, sy, sz = pred.preprocessing["target_spacing"]
    low, high = pred.preprocessing["hu_window"]
    zc, yc, _ = _centre(pred)
    names = list(pred.anatomies)
    colours = [f"C{k % 10}" for k in range(len(names))]
    fig = new_figure(figsize=(12, 7), dpi=100)
    gs = fig.add_gridspec(2, 2, height_ratios=[5, 1.5], top=0.9, bottom=0.03, left=0.03, right=0.97, hspace=0.08)
    views = [("axial", pred.image[zc], pred.mask[zc], sy / sx, "upper", f"axial z={zc}", ("R", "L"), ("A", "P")),
             ("coronal", pred.image[:, yc], pred.mask[:, yc], sz / sx, "lower", f"coronal y={yc}", ("R", "L"),
              ("I", "S"))]
    for col, (_, img, msk, aspect, origin, title, (left, right), (bottom_or_top, other)) in enumerate(views):
        ax = fig.add_subplot(gs[0, col])
        ax.imshow(img, cmap="gray", vmin=low, vmax=high, aspect=aspect, origin=origin, interpolation="nearest")
        for k in range(len(names)):
            sel = msk == k + 1
            if sel.any() and sel.shape[0] > 1 and sel.shape[1] > 1:
                ax.contour(sel.astype(np.float32), levels=[0.5], colors=[colours[k]], linewidths=1.2)
        ax.set_title(title, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
        kw = {"transform": ax.transAxes, "color": "yellow", "fontsize": 11, "fontweight": "bold"}
        ax.text(0.01, 0.5, left, ha="left", va="center", **kw)
        ax.text(0.99, 0.5, right, ha="right", va="center", **kw)
        # axial: anterior at the top; coronal: superior at the top
        top_letter, bottom_letter = (bottom_or_top, other) if origin == "upper" else (other, bottom_or_top)
        ax.text(0.5, 0.99, top_letter, ha="center", va="top", **kw)
        ax.text(0.5, 0.01, bottom_letter, ha="center", va="bottom", **kw)
    handles = [Line2D([0], [0], color=colours[k], lw=2,
                      label=f"{n}" + ("" if pred.anatomies[n]["found"] else " (missing)"))
               for k, n in enumerate(names)]
    fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.96), ncol=len(names), fontsize=9,
               frameon=False)
    lines = [f"{label} ({anatomy}): {p:.3f}" for label, anatomy, p in pred.top(top)]
    text = "Top findings (zero-shot prompt scores, not calibrated risks):\n" + "\n".join(lines or ["(none scored)"])
    if pred.missing:
        text += f"\nMissing anatomies (labels not scored): {', '.join(pred.missing)}"
    ax = fig.add_subplot(gs[1, :])
    ax.axis("off")
    ax.text(0.0, 1.0, text, ha="left", va="top", fontsize=9, family="monospace", transform=ax.transAxes)
    if pred.warnings:
        ax.text(1.0, 1.0, f"{len(pred.warnings)} warning(s): see the JSON", ha="right", va="top", fontsize=9,
                color="darkred", transform=ax.transAxes)
    src = pred.source.get("path") or "array"
    fig.suptitle(f"fvlm predict: {Path(src).name if src != 'array' else src}", fontsize=11, y=0.995)
    save_png(fig, path)


__all__ = ["new_figure", "plot_fractions", "plot_loss", "plot_roc", "save_overlay", "save_png"]
