"""The report and label CSVs of CT-RATE (``radiology_text_reports/``, ``multi_abnormality_labels/``)."""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fvlm.data.ctrate import _clean, strip_extension
from fvlm.labels import CT_RATE_LABELS

REPORT_COLUMNS = ("ClinicalInformation_EN", "Technique_EN", "Findings_EN", "Impressions_EN")


@dataclass(frozen=True)
class Report:
    """The four English sections of a report; "Not given." and missing sections are empty strings."""

    clinical_information: str = ""
    technique: str = ""
    findings: str = ""
    impressions: str = ""


def _section(text: Any) -> str:
    s = _clean(text) or ""
    return "" if s.rstrip(".").strip().lower() == "not given" else s


def read_reports(path: str | Path) -> dict[str, Report]:
    """A CT-RATE reports CSV -> {volume name: Report}."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"reports CSV {path} not found")
    out: dict[str, Report] = {}
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or "VolumeName" not in reader.fieldnames:
                raise ValueError(f"reports CSV {path}: no VolumeName column (is this a CT-RATE reports CSV?)")
            for row in reader:
                name = _clean(row.get("VolumeName"))
                if name is None:
                    continue
                report = Report(*(_section(row.get(c)) for c in REPORT_COLUMNS))
                key = strip_extension(name)
                if key in out and not (report.findings or report.impressions) and (
                        out[key].findings or out[key].impressions):
                    continue  # an empty duplicate row never replaces a report
                out[key] = report
    except UnicodeDecodeError as e:
        raise ValueError(f"reports CSV {path}: not a UTF-8 text file ({e.reason} at byte {e.start})") from None
    except csv.Error as e:
        raise ValueError(f"reports CSV {path}: not a readable CSV ({e})") from None
    return out


def read_labels(path: str | Path) -> dict[str, np.ndarray]:
    """A CT-RATE labels CSV -> {volume name: int8 (18,) in :data:`fvlm.labels.CT_RATE_LABELS` order}.

    ``ValueError`` names the file and line for a missing column or a value other than 0/1.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"labels CSV {path} not found")
    out = {}
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        cols = reader.fieldnames or []
        missing = [c for c in ("VolumeName", *CT_RATE_LABELS) if c not in cols]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}")
        for i, row in enumerate(reader, start=2):
            vals = []
            for c in CT_RATE_LABELS:
                cell = (row.get(c) or "").strip()
                try:
                    v = float(cell)
                except ValueError:
                    v = math.nan
                if v not in (0.0, 1.0):
                    raise ValueError(f"{path} line {i}: label {c!r} of {row.get('VolumeName')} is {cell!r}: labels "
                                     f"must be 0 or 1")
                vals.append(int(v))
            out[strip_extension(row["VolumeName"])] = np.asarray(vals, dtype=np.int8)
    return out
