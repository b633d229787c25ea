"""The result of ``fvlm predict`` for one scan (:class:`Prediction`), written as JSON (and a picture)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fvlm import __version__
from fvlm.io import atomic_write_text
from fvlm.plots import save_overlay


def finite_or_none(x: float | None) -> float | None:
    """``x`` as a float, or None when it is missing or not finite (JSON has no NaN)."""
    return None if x is None or not math.isfinite(x) else float(x)


@dataclass
class Prediction:
    """The result for one scan.

    Attributes:
        probabilities: {label: probability of the positive prompt, or None when its anatomy is missing}, in the
            anatomy table's prompt order.
        labels: {label: {"anatomy", "probability", "status" ("scored" | "anatomy missing")}}.
        anatomies: {anatomy: {"found", "voxels" (input grid), "voxels_processed", "cut_by_scan_border" [faces],
            "bbox_processed" [z0, z1, y0, y1, x0, x1]}}.
        warnings: everything the user should know about this input (also logged).
        preprocessing: input geometry and orientation, what was applied (reorientation, oblique resampling,
            target spacing, window, crop, padding) and the evaluation crops.
        source, model, timing: what was read, which checkpoint scored it, seconds per stage.
        image, mask: the processed volume (int16 HU (D, H, W), LPS, ``data.spacing``) and anatomy mask (uint8),
            for plotting; not part of :meth:`to_dict`.
    """

    probabilities: dict[str, float | None]
    labels: dict[str, dict[str, Any]]
    anatomies: dict[str, dict[str, Any]]
    warnings: list[str]
    preprocessing: dict[str, Any]
    source: dict[str, Any]
    model: dict[str, Any]
    timing: dict[str, float] = field(default_factory=dict)
    unscored: list[str] = field(default_factory=list)
    image: np.ndarray | None = field(default=None, repr=False)
    mask: np.ndarray | None = field(default=None, repr=False)

    @property
    def found(self) -> list[str]:
        return [a for a, v in self.anatomies.items() if v["found"]]

    @property
    def missing(self) -> list[str]:
        return [a for a, v in self.anatomies.items() if not v["found"]]

    def top(self, n: int = 5) -> list[tuple[str, str, float]]:
        """The ``n`` highest-scoring labels as (label, anatomy, probability)."""
        scored = [(k, v["anatomy"], v["probability"]) for k, v in self.labels.items() if v["probability"] is not None]
        return sorted(scored, key=lambda t: -t[2])[:n]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary (no NaN: a missing value is ``null``)."""
        return {
            "fvlm_version": __version__,
            "source": self.source,
            "model": self.model,
            "probabilities": self.probabilities,
            "labels": self.labels,
            "unscored": self.unscored,
            "anatomies": self.anatomies,
            "found": self.found,
            "missing": self.missing,
            "warnings": self.warnings,
            "preprocessing": self.preprocessing,
            "timing": {k: round(v, 4) for k, v in self.timing.items()},
            "note": "zero-shot prompt scores of a research model (softmax over 'Not X.' / 'X.'), not calibrated "
                    "risks and not a diagnosis",
        }

    def to_json(self, path: str | Path | None = None) -> str:
        """The JSON text; written atomically to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n"
        if path is not None:
            atomic_write_text(path, text)
        return text

    def save_png(self, path: str | Path, top: int = 6) -> None:
        """Axial and coronal slices through the anatomies' centre with anatomy contours, and the top findings."""
        save_overlay(self, path, top=top)


__all__ = ["Prediction"]
