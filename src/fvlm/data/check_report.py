"""The report of ``fvlm check-data`` (:func:`fvlm.data.check.check_data`): its types, its JSON form and its
readable log summary."""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from fvlm.io import atomic_write_text

log = logging.getLogger("fvlm.data.check")  # the summary logs under the checking module's name, as before

_EXAMPLES = 5  # names shown per problem in the log summary (the JSON report lists all)


@dataclass(kw_only=True)
class SplitCheck:
    """The inventory of one split (the sections of the module doc of :mod:`fvlm.data.check`).

    The sections are JSON-ready dicts and lists, in the order the JSON report lists them; ``not_in_labels`` /
    ``not_in_reports`` are ``None`` (and absent from the JSON) when that CSV could not be read.
    """

    problems: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    labels: dict[str, Any] = field(default_factory=dict)
    reports: dict[str, Any] = field(default_factory=dict)
    listed: dict[str, int] = field(default_factory=dict)
    on_disk: dict[str, Any] = field(default_factory=dict)
    missing_on_disk: list[str] = field(default_factory=list)
    not_in_metadata: list[str] = field(default_factory=list)
    not_in_labels: list[str] | None = None
    not_in_reports: list[str] | None = None
    shape_mismatch: list[dict[str, Any]] = field(default_factory=list)
    values_read: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, Any] = field(default_factory=dict)
    no_chest: dict[str, Any] = field(default_factory=dict)
    anatomy_texts: dict[str, Any] = field(default_factory=dict)
    masks: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (the split's entry of the JSON report)."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if v is None and f.name in ("not_in_labels", "not_in_reports"):
                continue
            out[f.name] = v
        return out


@dataclass
class DataCheck:
    """What :func:`~fvlm.data.check.check_data` found in a CT-RATE root (``problems``: how many in all)."""

    root: str
    created: str
    sample: int
    splits: dict[str, SplitCheck] = field(default_factory=dict)
    problems: int = 0

    def problem_lines(self) -> list[str]:
        """Every problem of every split as ``"{split}: {problem}"``."""
        return [f"{split}: {p}" for split, rep in self.splits.items() for p in rep.problems]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (the JSON report: every listed volume)."""
        return {"root": self.root, "created": self.created, "sample": self.sample,
                "splits": {k: v.to_dict() for k, v in self.splits.items()}, "problems": self.problems}

    def to_json(self, path: str | Path | None = None) -> str:
        """The JSON text of the report; written atomically to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=1, default=_jsonable) + "\n"
        if path is not None:
            atomic_write_text(path, text)
        return text


def _jsonable(o: Any) -> Any:
    if isinstance(o, Counter):
        return dict(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def examples(names: Sequence[Any]) -> str:
    """`` (e.g. a, b, c, d, e, ...)`` for a problem line (volume names, or dicts with a ``volume``); "" if empty."""
    shown = ", ".join(str(n if not isinstance(n, dict) else n.get("volume")) for n in list(names)[:_EXAMPLES])
    return f" (e.g. {shown}{', ...' if len(names) > _EXAMPLES else ''})" if names else ""


def log_summary(report: DataCheck) -> None:
    """A readable summary of a :func:`~fvlm.data.check.check_data` report (logging, INFO; problems as WARNING)."""
    log.info("CT-RATE root %s", report.root)
    for split, r in report.splits.items():
        lst, disk = r.listed, r.on_disk
        log.info("[%s] listed: %d patients, %d scans, %d volumes | on disk: %d patients, %d scans, %d volumes "
                 "(%d in %s_fixed); reconstructions per scan %s", split, lst["patients"], lst["scans"],
                 lst["volumes"], disk["patients"], disk["scans"], disk["volumes"], disk["in_fixed_folder"], split,
                 disk["reconstructions_per_scan"])
        c = r.versions["counts"]
        log.info("[%s] versions: %d v1, %d v2, %d unknown, %d conflict, %d unreadable (values read for %d volumes in "
                 "%.1f s)", split, c["v1"], c["v2"], c["unknown"], c["conflict"], c["unreadable"],
                 r.values_read["volumes"], r.values_read["seconds"])
        log.info("[%s] label maps: %d present, %d missing; non-chest list: %d listed, %d on disk", split,
                 r.masks["present"], len(r.masks["missing"]), r.no_chest["listed"], len(r.no_chest["on_disk"]))
        details = {
            "missing on disk": r.missing_on_disk, "no metadata row": r.not_in_metadata,
            "shape differs from metadata": r.shape_mismatch, "non-chest on disk": r.no_chest["on_disk"],
            "without anatomy texts": r.anatomy_texts.get("scans_without_texts", []),
            **{f"empty {k}": v for k, v in r.metadata.get("empty", {}).items()},
        }
        for problem in r.problems:
            log.warning("[%s] %s", split, problem)
        for what, names in details.items():
            if names:
                log.info("[%s] %s%s", split, what, examples(names))
    if not report.problems:
        log.info("no problems found")
