"""CT-RATE-style reports and anatomy-wise texts, with per-sentence truth.

Reports follow the style of CT-RATE's (Turkish, translated) chest CT reports: a Findings paragraph that
walks through trachea and bronchi, mediastinum, heart, pericardium, aorta, oesophagus, lymph nodes, lungs,
pleura, upper abdomen and bones; an Impressions paragraph listing the abnormal findings (or a normal
statement). Every finding and normal statement has at least three wordings chosen by the RNG; lesion
sentences reflect the drawn severity, size and location.

Every generated :class:`Sentence` is tagged with a *region*: a set of TotalSegmentator classes (for lung
findings, exactly the lobes involved). :func:`anatomy_texts` maps regions to the anatomies of any anatomy
table by class membership, so a table with more anatomies gets its texts without code changes; sentences
whose region belongs to no anatomy of the table stay in the report only. Each sentence also records the
CT-RATE label that produced it (``None`` for normal statements): the generator's truth for evaluating a
report decomposer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from fvlm.anatomy import AnatomyTable, load_anatomy_table
from fvlm.synth.findings import Finding
from fvlm.synth.wording import (
    CLINICAL,
    LUNG_NEGATIVE,
    NORMAL,
    NORMAL_IMPRESSION,
    findings_text,
    impression_text,
    pick,
)

LOBE_CLASSES = {10: "lung_upper_lobe_left", 11: "lung_lower_lobe_left", 12: "lung_upper_lobe_right",
                13: "lung_middle_lobe_right", 14: "lung_lower_lobe_right"}
_ALL_LOBES = tuple(LOBE_CLASSES.values())

#: report region -> TotalSegmentator v2 classes it is about
REGIONS: dict[str, tuple[str, ...]] = {
    "airways": ("trachea",),
    "mediastinal_vessels": ("superior_vena_cava", "brachiocephalic_trunk", "common_carotid_artery_left",
                            "subclavian_artery_left", "brachiocephalic_vein_left"),
    "lymph_nodes": ("superior_vena_cava", "brachiocephalic_vein_left", "brachiocephalic_vein_right"),
    "heart": ("heart", "atrial_appendage_left"),
    "coronary": ("heart",),
    "aorta": ("aorta",),
    "esophagus": ("esophagus",),
    "thyroid": ("thyroid_gland",),
    "lung": _ALL_LOBES,
    "pleura": _ALL_LOBES,
    "upper_abdomen": ("liver", "stomach", "spleen", "gallbladder", "pancreas", "adrenal_gland_right",
                      "adrenal_gland_left", "kidney_right", "kidney_left"),
    "bones": tuple(f"vertebrae_T{i}" for i in range(1, 13)) + ("sternum",)
    + tuple(f"rib_{s}_{i}" for s in ("left", "right") for i in range(1, 13)),
    "chest_wall": ("sternum", "costal_cartilages", "clavicula_left", "clavicula_right"),
    "none": (),
}

#: where each label's sentences go (lung labels use their lobes instead)
LABEL_REGION = {
    "Medical material": "chest_wall",
    "Arterial wall calcification": "aorta",
    "Cardiomegaly": "heart",
    "Pericardial effusion": "heart",
    "Coronary artery wall calcification": "coronary",
    "Hiatal hernia": "esophagus",
    "Lymphadenopathy": "lymph_nodes",
    "Pleural effusion": "pleura",
}


@dataclass(frozen=True)
class Sentence:
    """One report sentence and its truth: section ("findings"/"impression"), region, classes, label."""

    section: str
    text: str
    region: str
    classes: tuple[str, ...]
    label: str | None

    def to_dict(self) -> dict:
        return {"section": self.section, "text": self.text, "region": self.region, "classes": list(self.classes),
                "label": self.label}


@dataclass
class Report:
    """A CT-RATE-style report: sections as in ``*_reports.csv`` plus the per-sentence truth."""

    clinical: str
    technique: str
    sentences: list[Sentence] = field(default_factory=list)

    @property
    def findings(self) -> str:
        return " ".join(s.text for s in self.sentences if s.section == "findings") or "Not given."

    @property
    def impression(self) -> str:
        return " ".join(s.text for s in self.sentences if s.section == "impression") or "Not given."

    def row(self, volume_name: str) -> dict[str, str]:
        return {"VolumeName": volume_name, "ClinicalInformation_EN": self.clinical or "Not given.",
                "Technique_EN": self.technique or "Not given.", "Findings_EN": self.findings,
                "Impressions_EN": self.impression}


# ------------------------------------------------------------------------------------------- assembly
_LUNG_ORDER = ("Emphysema", "Lung nodule", "Lung opacity", "Consolidation", "Atelectasis",
               "Pulmonary fibrotic sequela", "Mosaic attenuation pattern", "Interlobular septal thickening",
               "Peribronchial thickening", "Bronchiectasis")
_IMPRESSION_ORDER = ("Lung opacity", "Consolidation", "Lung nodule", "Emphysema", "Atelectasis", "Pleural effusion",
                     "Pulmonary fibrotic sequela", "Mosaic attenuation pattern", "Interlobular septal thickening",
                     "Peribronchial thickening", "Bronchiectasis", "Lymphadenopathy", "Cardiomegaly",
                     "Pericardial effusion", "Coronary artery wall calcification", "Arterial wall calcification",
                     "Hiatal hernia", "Medical material")


def _classes(f: Finding) -> tuple[str, tuple[str, ...]]:
    """(region name, classes) a finding's sentences are about."""
    if f.label in LABEL_REGION and f.label != "Pleural effusion":
        region = LABEL_REGION[f.label]
        return region, REGIONS[region]
    lobes = f.lobes or tuple(LOBE_CLASSES)
    region = "pleura" if f.label == "Pleural effusion" else "lung"
    return region, tuple(LOBE_CLASSES[v] for v in sorted(lobes))


def build_report(rng: np.random.Generator, scene, slice_thickness: float = 1.5) -> Report:
    """The scan's report (identical for all its reconstructions) with per-sentence truth."""
    found = {f.label: f for f in scene.findings}
    sent: list[Sentence] = []

    def add(section, text, region, classes=None, label=None):
        sent.append(Sentence(section, text, region, tuple(REGIONS[region] if classes is None else classes), label))

    def positive(label):
        f = found[label]
        region, classes = _classes(f)
        for t in findings_text(rng, f):
            add("findings", t, region, classes, label)

    def either(label, region):
        if label in found:
            positive(label)
        else:
            add("findings", pick(rng, NORMAL[label]), region)

    add("findings", pick(rng, NORMAL["airways"]), "airways")
    add("findings", pick(rng, NORMAL["mediastinal_vessels"]), "mediastinal_vessels")
    either("Cardiomegaly", "heart")
    either("Pericardial effusion", "heart")
    if "Coronary artery wall calcification" in found:
        positive("Coronary artery wall calcification")
    elif rng.random() < 0.3:
        add("findings", pick(rng, NORMAL["Coronary artery wall calcification"]), "coronary")
    if "Arterial wall calcification" in found and rng.random() < 0.5:
        add("findings", pick(rng, NORMAL["Arterial wall calcification"]), "aorta")  # diameter is still normal
    either("Arterial wall calcification", "aorta")
    either("Hiatal hernia", "esophagus")
    either("Lymphadenopathy", "lymph_nodes")
    if "Medical material" in found:
        positive("Medical material")
    lung_pos = [lb for lb in _LUNG_ORDER if lb in found]
    if not lung_pos:
        add("findings", pick(rng, NORMAL["lung"]), "lung")
    else:
        for label in lung_pos:
            positive(label)
        for label, options in LUNG_NEGATIVE.items():
            if label not in found and rng.random() < 0.35:
                add("findings", pick(rng, options), "lung")
    either("Pleural effusion", "pleura")
    add("findings", pick(rng, NORMAL["upper_abdomen"]), "upper_abdomen")
    bones = "bones_degenerative" if scene.anatomy.age > 55 and rng.random() < 0.6 else "bones"
    add("findings", pick(rng, NORMAL[bones]), "bones")

    for label in _IMPRESSION_ORDER:
        if label in found:
            region, classes = _classes(found[label])
            add("impression", impression_text(rng, found[label]), region, classes, label)
    if not found:
        add("impression", pick(rng, NORMAL_IMPRESSION), "none")

    clinical = "Not given." if rng.random() < 0.3 else pick(rng, CLINICAL)
    t = f"{slice_thickness:g}"
    technique = pick(rng, [f"Non-contrast thorax CT examination was performed with {t} mm slice thickness in the "
                            "axial plane.",
                            f"Thorax CT without contrast, axial sections of {t} mm thickness.",
                            f"Axial images of {t} mm thickness were obtained without intravenous contrast."])
    return Report(clinical, technique, sent)


@lru_cache(maxsize=8)
def _load_table(name: str) -> AnatomyTable:
    return load_anatomy_table(name)


def anatomy_texts(report: Report, table="released") -> tuple[dict[str, str], dict[str, str]]:
    """Per-anatomy texts of one scan, in the authors' format.

    Returns ``(desc, conc)``: ``desc[anatomy]`` joins the findings sentences whose region shares a class with
    the anatomy; ``conc[anatomy]`` joins its impression sentences and exists only for abnormal anatomies.
    """
    if not isinstance(table, AnatomyTable):
        table = _load_table(str(table))
    desc: dict[str, str] = {}
    conc: dict[str, str] = {}
    for anat in table.anatomies:
        cls = set(anat.classes)
        for section, out in (("findings", desc), ("impression", conc)):
            texts = [s.text for s in report.sentences if s.section == section and cls & set(s.classes)]
            if texts:
                out[anat.name] = " ".join(texts)
    return desc, conc
