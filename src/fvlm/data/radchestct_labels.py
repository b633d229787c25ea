"""Rad-ChestCT (Draelos et al., MedIA 2021) labels and their mappings to CT-RATE's 18 labels.

**Labels.** The label CSVs have the key column ``NoteAcc_DEID`` and one 0/1 column per abnormality
(:data:`ABNORMALITIES`, the 84 of the release); the per-location file (``imgtest_Abnormality_and_Location_
Labels.csv``, columns ``{abnormality}*{location}``) is accepted too and reduced to "anywhere".
:data:`MAPPINGS` holds the three mappings to CT-RATE's 18 labels in use (``standard``, ``fvlm``,
``extended``); a CT-RATE label without a source in a mapping is absent from the output (not 0).
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

from fvlm.io import atomic_write_text
from fvlm.labels import CT_RATE_LABELS

log = logging.getLogger("fvlm.data.radchestct")  # messages under the command's module name, as before

#: key column of the label CSVs (the volume id, also the .npz file name)
KEY = "NoteAcc_DEID"

#: the 84 abnormality columns of the Rad-ChestCT label CSVs, in the release's (alphabetical) order
ABNORMALITIES: tuple[str, ...] = (
    "air_trapping", "airspace_disease", "aneurysm", "arthritis", "aspiration", "atelectasis", "atherosclerosis",
    "bandlike_or_linear", "breast_implant", "breast_surgery", "bronchial_wall_thickening", "bronchiectasis",
    "bronchiolectasis", "bronchiolitis", "bronchitis", "cabg", "calcification", "cancer", "cardiomegaly",
    "catheter_or_port", "cavitation", "chest_tube", "clip", "congestion", "consolidation", "coronary_artery_disease",
    "cyst", "debris", "deformity", "density", "dilation_or_ectasia", "distention", "emphysema", "fibrosis",
    "fracture", "gi_tube", "granuloma", "groundglass", "hardware", "heart_failure", "heart_valve_replacement",
    "hemothorax", "hernia", "honeycombing", "infection", "infiltrate", "inflammation", "interstitial_lung_disease",
    "lesion", "lucency", "lung_resection", "lymphadenopathy", "mass", "mucous_plugging", "nodule", "nodulegr1cm",
    "opacity", "other_path", "pacemaker_or_defib", "pericardial_effusion", "pericardial_thickening", "plaque",
    "pleural_effusion", "pleural_thickening", "pneumonia", "pneumonitis", "pneumothorax", "postsurgical",
    "pulmonary_edema", "reticulation", "scarring", "scattered_calc", "scattered_nod", "secretion",
    "septal_thickening", "soft_tissue", "staple", "stent", "sternotomy", "suture", "tracheal_tube", "transplant",
    "tree_in_bud", "tuberculosis",
)  # fmt: skip
assert len(ABNORMALITIES) == 84 and len(set(ABNORMALITIES)) == 84

#: abnormality columns that are medical material (devices, implants, wires, tubes) for "Medical material";
#: procedures without implied material (postsurgical, lung_resection, transplant, breast_surgery, cabg) are not
DEVICES: tuple[str, ...] = (
    "breast_implant", "catheter_or_port", "chest_tube", "clip", "gi_tube", "hardware", "heart_valve_replacement",
    "pacemaker_or_defib", "staple", "stent", "sternotomy", "suture", "tracheal_tube",
)  # fmt: skip

_ONE_TO_ONE = {
    "Cardiomegaly": ("cardiomegaly",),
    "Pericardial effusion": ("pericardial_effusion",),
    "Hiatal hernia": ("hernia",),
    "Lymphadenopathy": ("lymphadenopathy",),
    "Emphysema": ("emphysema",),
    "Atelectasis": ("atelectasis",),
    "Lung nodule": ("nodule", "nodulegr1cm"),
    "Lung opacity": ("opacity",),
    "Pleural effusion": ("pleural_effusion",),
    "Peribronchial thickening": ("bronchial_wall_thickening",),
    "Consolidation": ("consolidation",),
    "Bronchiectasis": ("bronchiectasis",),
    "Interlobular septal thickening": ("septal_thickening",),
}


def _ordered(m: Mapping[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
    return {label: m[label] for label in CT_RATE_LABELS if label in m}


#: CT-RATE label -> Rad-ChestCT columns (positive if any of them is 1). Labels missing from a mapping are unscored.
MAPPINGS: dict[str, dict[str, tuple[str, ...]]] = {
    # 16 classes: Mosaic has no source; the generic calcification column gives Arterial wall calcification, and
    # Coronary artery wall calcification is dropped (calcification is not coronary-specific)
    "standard": _ordered({**_ONE_TO_ONE, "Medical material": DEVICES, "Arterial wall calcification": ("calcification",),
                          "Pulmonary fibrotic sequela": ("scarring",)}),
    # 15 classes (fVLM's choice): no Medical material, Lymphadenopathy or Mosaic; calcification for both
    # calcification labels; fibrosis for Pulmonary fibrotic sequela
    "fvlm": _ordered({**{k: v for k, v in _ONE_TO_ONE.items() if k != "Lymphadenopathy"},
                      "Arterial wall calcification": ("calcification",),
                      "Coronary artery wall calcification": ("calcification",),
                      "Pulmonary fibrotic sequela": ("fibrosis",)}),
    # all 18: specific sources for the calcifications and Mosaic, wider groups for opacity, fibrosis, bronchiectasis
    "extended": _ordered({**_ONE_TO_ONE, "Medical material": DEVICES,
                          "Arterial wall calcification": ("atherosclerosis",),
                          "Coronary artery wall calcification": ("coronary_artery_disease",),
                          "Mosaic attenuation pattern": ("air_trapping",),
                          "Lung opacity": ("opacity", "groundglass", "infiltrate", "airspace_disease"),
                          "Pulmonary fibrotic sequela": ("fibrosis", "reticulation", "honeycombing", "scarring",
                                                         "interstitial_lung_disease"),
                          "Bronchiectasis": ("bronchiectasis", "bronchiolectasis")}),
}
assert [len(m) for m in MAPPINGS.values()] == [16, 15, 18]
assert all(c in ABNORMALITIES for m in MAPPINGS.values() for cols in m.values() for c in cols)


# ----------------------------------------------------------------------------------------------- labels
def read_labels(path: str | Path) -> dict[str, dict[str, int]]:
    """A Rad-ChestCT label CSV -> {NoteAcc_DEID: {abnormality: 0/1}}.

    Accepts the summary format (one column per abnormality) and the per-location format
    (``{abnormality}*{location}`` columns, reduced with "any location"). Columns that are no Rad-ChestCT
    abnormality are ignored with a warning; ``ValueError`` names the file and line of a value other than 0/1.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Rad-ChestCT labels CSV {path} not found")
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        cols = [c for c in (reader.fieldnames or []) if c is not None]
        if KEY not in cols:
            raise ValueError(f"{path}: no {KEY} column (is this a Rad-ChestCT label CSV?)")
        source: dict[str, list[str]] = {}
        unknown = []
        for c in cols:
            if c == KEY:
                continue
            abn = c.split("*", 1)[0].strip()
            if abn in ABNORMALITIES:
                source.setdefault(abn, []).append(c)
            else:
                unknown.append(c)
        if not source:
            raise ValueError(f"{path}: no Rad-ChestCT abnormality column (expected e.g. {ABNORMALITIES[:4]})")
        if unknown:
            log.warning("%s: ignoring %d column(s) that are no Rad-ChestCT abnormality: %s", path, len(unknown),
                        unknown[:8])
        out: dict[str, dict[str, int]] = {}
        for i, row in enumerate(reader, start=2):
            key = (row.get(KEY) or "").strip()
            if not key:
                continue
            if key in out:
                raise ValueError(f"{path} line {i}: {KEY} {key!r} appears twice")
            vals = {}
            for abn, src in source.items():
                v = 0
                for c in src:
                    text = (row.get(c) or "").strip()
                    try:
                        x = float(text)
                    except ValueError:
                        raise ValueError(f"{path} line {i}: {c} = {text!r} is not 0 or 1") from None
                    if x not in (0.0, 1.0):
                        raise ValueError(f"{path} line {i}: {c} = {text!r} is not 0 or 1")
                    v = max(v, int(x))
                vals[abn] = v
            out[key] = vals
    return out


def map_labels(labels: Mapping[str, Mapping[str, int]], mapping: str) -> dict[str, dict[str, int]]:
    """Rad-ChestCT labels -> CT-RATE labels with ``mapping`` (``standard``, ``fvlm``, ``extended``).

    Returns {NoteAcc_DEID: {CT-RATE label: 0/1}} with only the labels the mapping defines, in CT-RATE order.
    ``ValueError`` if a column the mapping needs is absent from the labels.
    """
    if mapping not in MAPPINGS:
        raise ValueError(f"unknown Rad-ChestCT label mapping {mapping!r}; choose one of {sorted(MAPPINGS)}")
    m = MAPPINGS[mapping]
    if labels:
        have = set(next(iter(labels.values())))
        need = sorted({c for cols in m.values() for c in cols if c not in have})
        if need:
            raise ValueError(f"mapping {mapping!r} needs Rad-ChestCT column(s) absent from the labels: {need}")
    return {k: {label: int(any(v[c] for c in cols)) for label, cols in m.items()} for k, v in labels.items()}


def write_ctrate_labels(path: str | Path, mapped: Mapping[str, Mapping[str, int]], mapping: str,
                        volumes: Sequence[str] | None = None) -> None:
    """A CT-RATE-format labels CSV: ``VolumeName`` (``{id}.nii.gz``) + the mapping's CT-RATE label columns."""
    labels = list(MAPPINGS[mapping])
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["VolumeName", *labels])
    for k in (volumes if volumes is not None else sorted(mapped)):
        w.writerow([f"{k}.nii.gz", *(mapped[k][label] for label in labels)])
    atomic_write_text(path, buf.getvalue())
