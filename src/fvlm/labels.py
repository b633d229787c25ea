"""CT-RATE's 18 multi-abnormality labels (official column order of ``*_predicted_labels.csv``) and a reader for
any 0/1 label CSV keyed by ``VolumeName`` (missing = empty, never 0)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

CT_RATE_LABELS: tuple[str, ...] = (
    "Medical material",
    "Arterial wall calcification",
    "Cardiomegaly",
    "Pericardial effusion",
    "Coronary artery wall calcification",
    "Hiatal hernia",
    "Lymphadenopathy",
    "Emphysema",
    "Atelectasis",
    "Lung nodule",
    "Lung opacity",
    "Pulmonary fibrotic sequela",
    "Pleural effusion",
    "Mosaic attenuation pattern",
    "Peribronchial thickening",
    "Consolidation",
    "Bronchiectasis",
    "Interlobular septal thickening",
)


def volume_key(name: str) -> str:
    """``valid_1_a_1.nii.gz`` -> ``valid_1_a_1`` (the key label and score CSVs are matched on)."""
    return str(name).strip().removesuffix(".nii.gz").removesuffix(".nii")


def read_label_table(paths: str | Path | Sequence[str | Path], columns: Sequence[str] | None = None
                     ) -> pd.DataFrame:
    """Read one or more label CSVs keyed by ``VolumeName`` into a float frame indexed by volume key.

    Any CSV with a ``VolumeName`` column and 0/1 columns works (CT-RATE's 18, Rad-ChestCT's mapped labels, a
    user's own). ``paths``: a path, a comma-separated string of paths, or a list (e.g. the train and valid
    label files); rows are concatenated. Cells are 1.0, 0.0 or NaN: an empty cell (or ``NA``/``nan``) is a
    *missing* label, excluded for that label only, never read as 0. Any other value (``2``, ``yes``, ``0.5``)
    is a ``ValueError`` naming the file, the column and a few volumes. ``columns``: the label columns to keep
    (default: every column but ``VolumeName``). A volume listed twice with different labels is an error.

    The index holds volume keys (``train_1_a_1``: ``.nii.gz``/``.nii`` stripped, as :mod:`fvlm.metrics` matches).
    """
    # numpy and pandas here, not at the top: fvlm.anatomy (hence every command) imports this module for the label
    # names, and pandas costs ~0.3 s (measured) that only this reader needs
    import numpy as np
    import pandas as pd

    if isinstance(paths, (str, Path)):
        paths = [p for p in str(paths).split(",") if p.strip()]
    frames = []
    for path in paths:
        path = str(path).strip()
        try:
            df = pd.read_csv(path, dtype=str, keep_default_na=False)
        except FileNotFoundError:
            raise FileNotFoundError(f"labels CSV not found: {path}") from None
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not a readable CSV ({e})") from None
        if "VolumeName" not in df.columns:
            raise ValueError(f"{path}: no 'VolumeName' column (columns: {list(df.columns)[:6]})")
        wanted = [c for c in df.columns if c != "VolumeName"] if columns is None else list(columns)
        absent = [c for c in wanted if c not in df.columns]
        if absent:
            raise ValueError(f"{path}: no label column {absent} (has {[c for c in df.columns if c != 'VolumeName']})")
        if not wanted:
            raise ValueError(f"{path}: no label columns besides VolumeName")
        out = pd.DataFrame(index=df["VolumeName"].map(volume_key).rename("volume"))
        for c in wanted:
            raw = df[c].str.strip()
            missing = raw.str.lower().isin(("", "na", "nan", "n/a", "none", "null"))
            values = pd.to_numeric(raw.where(~missing), errors="coerce")
            bad = (~missing) & ~values.isin((0.0, 1.0))
            if bad.any():
                where = df["VolumeName"][bad].tolist()
                shown = ", ".join(f"{v}={x!r}" for v, x in zip(where[:3], raw[bad].tolist()[:3]))
                raise ValueError(f"{path}: column {c!r} holds values other than 0, 1 or empty in {int(bad.sum())} "
                                 f"row(s), e.g. {shown}")
            out[c] = values.to_numpy(dtype=np.float64)
        dup = out.index[out.index.duplicated()].unique().tolist()
        if dup:
            raise ValueError(f"{path}: duplicate volumes {dup[:5]}")
        frames.append((path, out))
    if not frames:
        raise ValueError("no labels CSV given")
    table = pd.concat([f for _, f in frames], axis=0, sort=False)
    if table.index.duplicated().any():
        dup = table.index[table.index.duplicated(keep=False)]
        rows = table.loc[dup].groupby(level=0).nunique(dropna=False)
        conflicting = rows.index[(rows > 1).any(axis=1)].tolist()
        if conflicting:
            raise ValueError(f"{', '.join(p for p, _ in frames)}: volumes labelled differently in two files: "
                             f"{conflicting[:5]}")
        table = table[~table.index.duplicated()]
    return table


def order_labels(labels: Iterable[str]) -> list[str]:
    """Label names with CT-RATE's labels first, in the official order, then the others alphabetically."""
    order = {label: i for i, label in enumerate(CT_RATE_LABELS)}
    return sorted(labels, key=lambda label: (order.get(label, len(order)), label))
