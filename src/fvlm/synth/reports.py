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
from fvlm.synth.phantom import LOBES

LOBE_CLASSES = {10: "lung_upper_lobe_left", 11: "lung_lower_lobe_left", 12: "lung_upper_lobe_right",
                13: "lung_middle_lobe_right", 14: "lung_lower_lobe_right"}
LOBE_NAMES = {10: "left lung upper lobe", 11: "left lung lower lobe", 12: "right lung upper lobe",
              13: "right lung middle lobe", 14: "right lung lower lobe"}
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


# ------------------------------------------------------------------------------------------- wordings
def _loc(lobes) -> str:
    lobes = tuple(sorted(set(lobes)))
    if not lobes:
        return "both lungs"
    sides = {LOBES[v] for v in lobes}
    if len(lobes) == 1:
        return f"the {LOBE_NAMES[lobes[0]]}"
    if len(sides) == 2:
        if set(lobes) <= {10, 12}:
            return "the upper lobes of both lungs"
        if set(lobes) <= {11, 14}:
            return "the lower lobes of both lungs"
        return "both lungs"
    side = next(iter(sides))
    full = {"left": {10, 11}, "right": {12, 13, 14}}[side]
    if set(lobes) == full:
        return f"the {side} lung"
    parts = [LOBE_NAMES[v].split()[2] for v in lobes]
    return f"the {side} lung {' and '.join(parts)} lobes"


def _sev(s: float, mild="mild", moderate="moderate", marked="marked") -> str:
    return mild if s < 0.35 else (moderate if s < 0.7 else marked)


NORMAL = {
    "airways": ["Trachea and both main bronchi are in the midline and their lumens are open.",
                "Trachea and lumen of both main bronchi are open.",
                "The trachea and main bronchi are patent, and no obstructive lesion is seen in their lumens."],
    "mediastinal_vessels": ["Mediastinal main vascular structures are of normal width.",
                            "Calibration of the mediastinal main vascular structures is natural.",
                            "Mediastinal vascular structures are in normal calibration."],
    "Cardiomegaly": ["Heart contour and size are normal.", "Heart size is within normal limits.",
                     "The heart is of normal size and contour."],
    "Pericardial effusion": ["No pericardial effusion-thickening was observed.",
                             "Pericardial effusion-thickening was not detected.",
                             "There is no pericardial effusion or thickening."],
    "Coronary artery wall calcification": ["No calcified plaque was observed in the coronary arteries.",
                                           "Coronary arteries show no calcification.",
                                           "No coronary calcification is seen."],
    "Arterial wall calcification": ["Thoracic aorta diameter is normal.",
                                    "The thoracic aorta is of normal calibre.",
                                    "Thoracic aorta diameter was measured as normal."],
    "Hiatal hernia": ["Thoracic esophagus calibration was normal and no significant pathological wall "
                      "thickening was detected.",
                      "The esophagus is of normal calibre with no wall thickening.",
                      "No pathological wall thickening was observed in the thoracic esophagus."],
    "Lymphadenopathy": ["No lymph node was detected in mediastinal or bilateral hilar pathological size and "
                        "appearance.",
                        "No enlarged lymph nodes in prevascular, pre-paratracheal, subcarinal or bilateral "
                        "hilar-axillary pathological dimensions were detected.",
                        "No mediastinal or hilar lymph node of pathological size was observed."],
    "lung": ["When examined in the lung parenchyma window, aeration of both lung parenchyma is normal and no "
             "nodular or infiltrative lesion is detected in the lung parenchyma.",
             "Both lungs are normally aerated, and no mass, nodule or infiltration was detected.",
             "Lung parenchyma shows normal aeration without focal or diffuse lesion."],
    "Pleural effusion": ["Pleural effusion-thickening was not detected.",
                         "No pleural effusion or thickening was observed.", "There is no pleural effusion."],
    "upper_abdomen": ["Upper abdominal organs included in the sections are normal.",
                      "No space-occupying lesion was detected in the liver that entered the cross-sectional area.",
                      "Sections through the upper abdomen are unremarkable."],
    "bones": ["Bone structures in the study area are natural. Vertebral corpus heights are preserved.",
              "No lytic-destructive lesion was detected in the bone structures within the study area.",
              "Bony structures of the thorax are normal."],
    "bones_degenerative": ["Degenerative changes are observed in the thoracic vertebrae.",
                           "Osteophytes are observed at the anterior corners of the thoracic vertebrae.",
                           "Degenerative osteophytes are observed in the thoracic spine."],
}
#: optional negated statements about negative lung labels (said sometimes when other lung findings exist)
LUNG_NEGATIVE = {
    "Lung nodule": ["No mass lesion with distinct borders was detected in the lung parenchyma.",
                    "No nodular lesion was detected in both lungs.", "No pulmonary nodule was observed."],
    "Consolidation": ["No pneumonic infiltration or consolidation was observed.",
                      "No consolidation was detected.", "There is no consolidation in the lungs."],
    "Emphysema": ["No emphysematous change was observed.", "There is no emphysema.",
                  "No emphysema was detected in the lung parenchyma."],
}
NORMAL_IMPRESSION = ["No significant pathology was detected in the thorax CT examination.",
                     "Thorax CT findings within normal limits.",
                     "No pathological finding was detected in the current examination."]
CLINICAL = ["Cough.", "Shortness of breath.", "Chest pain.", "Fever and cough.", "COVID-19 screening.",
            "Malignancy screening.", "Dyspnea.", "Follow-up.", "Trauma.", "Hemoptysis.", "Weight loss."]


def _pick(rng: np.random.Generator, options: list[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _findings_text(rng: np.random.Generator, f: Finding) -> list[str]:
    """Findings-section sentences for one positive label (already formatted)."""
    d, s, label = f.details, f.severity, f.label
    loc = _loc(f.lobes)
    sev = _sev(s)
    if label == "Emphysema":
        kind = d.get("kind", "centrilobular")
        first = (f"{kind.capitalize()} emphysematous changes are observed in both lungs, more prominent in the "
                 "upper lobes." if set(f.lobes) - {10, 12} else
                 f"{kind.capitalize()} emphysematous changes are observed in {loc}.")
        return [_pick(rng, [first, f"{sev.capitalize()} {kind} emphysema is observed in {loc}.",
                            f"Emphysema areas with low attenuation are observed in {loc}."])]
    if label == "Lung nodule":
        sizes, lobes = d.get("sizes_mm", []), d.get("lobes", [])
        if not sizes:
            return ["A nodule was observed in the lung parenchyma."]
        big = f"the {LOBE_NAMES[lobes[0]]}"
        if len(sizes) == 1:
            return [_pick(rng, [f"A {sizes[0]} mm nodule was observed in {big}.",
                                f"A solid nodule measuring {sizes[0]} mm is seen in {big}.",
                                f"There is a {sizes[0]} mm solid nodule in {big}."])]
        return [_pick(rng, [f"{len(sizes)} nodules were observed in {loc}, the largest measuring {sizes[0]} mm "
                            f"in {big}.",
                            f"Multiple solid nodules are seen in {loc}, the largest {sizes[0]} mm in {big}.",
                            f"Nodules up to {sizes[0]} mm in diameter are observed in {loc}."])]
    if label == "Lung opacity":
        return [_pick(rng, [f"Ground-glass opacities are observed in {loc}.",
                            f"Patchy ground glass opacity areas were observed in {loc}, predominantly peripheral.",
                            f"{sev.capitalize()} opacity areas with ground glass density are observed in {loc}."])]
    if label == "Consolidation":
        size = d.get("size_mm", 0)
        if len(f.lobes) > 1:
            return [_pick(rng, [f"Consolidation areas with air bronchograms are observed in {loc}.",
                                f"Consolidated areas, the largest about {size} mm, are observed in {loc}.",
                                f"Consolidation areas are observed in {loc}."])]
        return [_pick(rng, [f"Consolidation with air bronchograms is observed in {loc}.",
                            f"A consolidated area measuring about {size} mm is observed in {loc}.",
                            f"A consolidation area is observed in {loc}."])]
    if label == "Atelectasis":
        if d.get("kind") == "linear":
            return [_pick(rng, [f"Linear atelectasis is observed in {loc}.",
                                f"Subsegmental plate-like atelectatic changes were observed in {loc}.",
                                f"Band-like atelectasis is seen in {loc}."])]
        return [_pick(rng, [f"Atelectasis is observed in the basal segments of {loc}.",
                            f"Compressive atelectatic changes were observed in the posterobasal part of {loc}.",
                            f"{sev.capitalize()} basal atelectasis is seen in {loc}."])]
    if label == "Pulmonary fibrotic sequela":
        return [_pick(rng, [f"Fibrotic sequelae changes are observed in {loc}.",
                            f"Linear fibrotic densities were observed in {loc}.",
                            f"Sequela fibrotic bands are seen in {loc}."])]
    if label == "Mosaic attenuation pattern":
        return [_pick(rng, [f"Mosaic attenuation pattern is observed in {loc}.",
                            f"Areas of mosaic attenuation are observed in {loc}.",
                            f"Mosaic attenuation pattern, which may be secondary to small airway disease, "
                            f"is observed in {loc}."])]
    if label == "Peribronchial thickening":
        return [_pick(rng, [f"Peribronchial thickening is observed in {loc}.",
                            f"Bronchial wall thickening and peribronchial thickening were observed in {loc}.",
                            f"{sev.capitalize()} peribronchial thickening is present in {loc}."])]
    if label == "Bronchiectasis":
        kind = d.get("kind", "cylindrical")
        return [_pick(rng, [f"{kind.capitalize()} bronchiectasis is observed in {loc}.",
                            f"Bronchiectatic changes were observed in {loc}.",
                            f"Bronchiectasis with dilated bronchi is seen in {loc}."])]
    if label == "Interlobular septal thickening":
        return [_pick(rng, [f"Interlobular septal thickening is observed in {loc}.",
                            f"Thickening of interlobular septa is observed in the peripheral parts of {loc}.",
                            f"Smooth interlobular septal thickening was observed in {loc}."])]
    if label == "Pleural effusion":
        depth = d.get("depth_mm", {})
        sides = d.get("sides", [])
        if len(sides) == 2:
            r, lft = round(depth["right"]), round(depth["left"])
            return [_pick(rng, [f"Bilateral pleural effusion is observed, {r} mm on the right and {lft} mm on the "
                                "left.",
                                f"Pleural effusion reaching {max(r, lft)} mm in thickness is observed in both "
                                "hemithoraces.",
                                f"{sev.capitalize()} bilateral pleural effusion was detected."])]
        side = sides[0] if sides else "right"
        t = round(depth.get(side, 0))
        return [_pick(rng, [f"Pleural effusion measuring {t} mm in thickness was observed on the {side}.",
                            f"A {sev} pleural effusion is observed in the {side} hemithorax.",
                            f"{side.capitalize()} pleural effusion reaching {t} mm was detected."])]
    if label == "Cardiomegaly":
        ctr = round(100 * d.get("ctr", 0.55))
        return [_pick(rng, ["The heart is enlarged, cardiomegaly is observed.",
                            f"Heart size has increased, with a cardiothoracic ratio of about {ctr} percent.",
                            "Cardiomegaly is observed."])]
    if label == "Pericardial effusion":
        t = round(d.get("thickness_mm", 5))
        return [_pick(rng, [f"Pericardial effusion reaching {t} mm in its thickest part was observed.",
                            f"Pericardial effusion measuring {t} mm was detected.",
                            f"A {sev} pericardial effusion is observed around the heart."])]
    if label == "Coronary artery wall calcification":
        names = {"LAD": "left anterior descending artery", "LCx": "circumflex artery",
                 "RCA": "right coronary artery"}
        v = " and ".join(names[k] for k in d.get("vessels", ["LAD"]))
        return [_pick(rng, ["Calcific plaques are observed in the coronary arteries.",
                            f"Coronary artery calcifications were observed in the {v}.",
                            f"Coronary artery wall calcification is present in the {v}."])]
    if label == "Arterial wall calcification":
        parts = " and ".join(f"{p} aorta" if p == "descending" else "aortic arch" for p in d.get("parts", ["arch"]))
        amount = _sev(s, "a few", "scattered", "extensive")
        return [_pick(rng, [f"Calcific atherosclerotic plaques are observed in the {parts}.",
                            f"Atherosclerotic calcifications were observed in the wall of the thoracic aorta, "
                            f"{amount}.",
                            f"Arterial wall calcification is observed in the {parts}."])]
    if label == "Hiatal hernia":
        size = round(d.get("size_mm", 30))
        return [_pick(rng, ["Hiatal hernia is observed at the distal esophagus.",
                            f"A sliding hiatal hernia measuring about {size} mm is observed.",
                            "The distal esophagus herniates through the hiatus, consistent with hiatal hernia."])]
    if label == "Lymphadenopathy":
        st = " and ".join(d.get("stations", ["mediastinal"])[:2])
        size = d.get("size_mm", 15)
        return [_pick(rng, [f"Lymph nodes reaching {size} mm in short axis were observed in the {st} region.",
                            f"Enlarged lymph nodes are observed in the mediastinum, the largest {size} mm in the "
                            f"{st} region.",
                            f"Mediastinal lymphadenopathy with nodes up to {size} mm is observed in the {st} region."])]
    if label == "Medical material":
        kind, side = d.get("kind"), d.get("side", "left")
        if kind == "pacemaker":
            return [_pick(rng, [f"A pacemaker is observed in the {side} pectoral region, with its lead extending "
                                "to the right heart chambers.",
                                f"Pacemaker device located in the {side} infraclavicular subcutaneous tissue, its lead "
                                "tip in the right ventricle.",
                                "A cardiac pacemaker with a lead in the right cardiac cavities was observed."])]
        if kind == "port catheter":
            return [_pick(rng, [f"A port catheter is observed in the {side} anterior chest wall, its tip in the "
                                "superior vena cava.",
                                f"A venous port reservoir is seen in the {side} chest wall subcutaneous tissue.",
                                "Port catheter is observed, with its tip at the superior vena cava."])]
        if kind == "sternotomy wires":
            return [_pick(rng, ["Sternotomy wires are observed.", "Median sternotomy wires are seen.",
                                "Post-sternotomy changes with sternal wires are observed."])]
        return [_pick(rng, ["Surgical clips are observed in the mediastinum.",
                            "Metallic surgical clips are seen in the mediastinal area.",
                            "Postoperative clips are observed in the mediastinum."])]
    raise KeyError(f"no wording for label {label!r}")


def _impression_text(rng: np.random.Generator, f: Finding) -> str:
    """One impression sentence for a positive label (it always uses the zero-shot prompt's vocabulary)."""
    d, s, label = f.details, f.severity, f.label
    loc = _loc(f.lobes)
    sev = _sev(s).capitalize()
    sides = d.get("sides") or ["right"]
    depth = d.get("depth_mm", {})
    if label == "Lung nodule":
        sized = (f"{d['sizes_mm'][0]} mm nodule in the {LOBE_NAMES[d['lobes'][0]]}." if d.get("sizes_mm")
                 else "Lung nodule.")
        options = ["Pulmonary nodule.", f"Nodule in {loc}.", sized]
    elif label == "Interlobular septal thickening":
        bilateral = len({LOBES[v] for v in f.lobes}) == 2
        options = ["Interlobular septal thickening.", f"Interlobular septal thickening in {loc}.",
                   "Interlobular septal thickening in both lungs." if bilateral
                   else "Interlobular septal thickening, fluid overload?"]
    elif label == "Pleural effusion" and len(sides) == 2:
        more = "right" if depth.get("right", 0) >= depth.get("left", 0) else "left"
        options = ["Bilateral pleural effusion.", "Pleural effusion in both hemithoraces.",
                   f"Bilateral pleural effusion, more on the {more}."]
    elif label == "Pleural effusion":
        options = [f"{sides[0].capitalize()} pleural effusion.", "Pleural effusion.",
                   f"{sev} pleural effusion on the {sides[0]}."]
    elif label == "Medical material":
        options = {
            "pacemaker": ["Pacemaker.", "Cardiac pacemaker in place.", "Pacemaker device."],
            "port catheter": ["Port catheter.", "Venous port catheter in place.", "Port catheter in the chest wall."],
            "sternotomy wires": ["Sternotomy.", "Post-sternotomy status.", "Sternotomy wires."],
        }.get(d.get("kind"), ["Surgical clips in the mediastinum.", "Postoperative clips.", "Metallic surgical clips."])
    else:
        options = {
            "Emphysema": ["Emphysema.", f"Emphysematous changes in {loc}.",
                          f"{d.get('kind', 'centrilobular').capitalize()} emphysema."],
            "Lung opacity": ["Ground-glass opacities.", f"Lung opacity in {loc}.",
                             f"Opacities in {loc} compatible with viral pneumonia."],
            "Consolidation": [f"Consolidation in {loc}.", "Pneumonic consolidation.", "Consolidation."],
            "Atelectasis": ["Atelectasis.", f"Atelectatic changes in {loc}.", f"{sev} atelectasis in {loc}."],
            "Pulmonary fibrotic sequela": ["Pulmonary fibrotic sequelae.", f"Fibrotic changes in {loc}.",
                                           "Sequela fibrotic changes."],
            "Mosaic attenuation pattern": ["Mosaic attenuation pattern.", f"Mosaic attenuation in {loc}.",
                                           "Mosaic attenuation pattern, small airway disease?"],
            "Peribronchial thickening": ["Peribronchial thickening.", "Bronchial wall and peribronchial thickening.",
                                         f"Peribronchial thickening in {loc}."],
            "Bronchiectasis": ["Bronchiectasis.", f"Bronchiectasis in {loc}.",
                               "Bronchiectatic changes, bronchiectasis."],
            "Cardiomegaly": ["Cardiomegaly.", "Enlarged heart, cardiomegaly.", "Cardiomegaly is noted."],
            "Pericardial effusion": ["Pericardial effusion.", f"{sev} pericardial effusion.",
                                     "Pericardial effusion is noted."],
            "Coronary artery wall calcification": ["Coronary artery calcification.",
                                                   "Coronary artery wall calcification.",
                                                   "Coronary artery calcification due to atherosclerotic disease."],
            "Arterial wall calcification": ["Atherosclerotic calcification in the aorta.",
                                            "Arterial wall calcification.", "Aortic atherosclerotic calcification."],
            "Hiatal hernia": ["Hiatal hernia.", "Sliding hiatal hernia.", "Hiatal hernia is noted."],
            "Lymphadenopathy": ["Mediastinal lymphadenopathy.", "Enlarged mediastinal lymph nodes.",
                                f"Lymphadenopathy in the {(d.get('stations') or ['mediastinal'])[0]} region."],
        }[label]
    return _pick(rng, options)


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
        for t in _findings_text(rng, f):
            add("findings", t, region, classes, label)

    def either(label, region):
        if label in found:
            positive(label)
        else:
            add("findings", _pick(rng, NORMAL[label]), region)

    add("findings", _pick(rng, NORMAL["airways"]), "airways")
    add("findings", _pick(rng, NORMAL["mediastinal_vessels"]), "mediastinal_vessels")
    either("Cardiomegaly", "heart")
    either("Pericardial effusion", "heart")
    if "Coronary artery wall calcification" in found:
        positive("Coronary artery wall calcification")
    elif rng.random() < 0.3:
        add("findings", _pick(rng, NORMAL["Coronary artery wall calcification"]), "coronary")
    if "Arterial wall calcification" in found and rng.random() < 0.5:
        add("findings", _pick(rng, NORMAL["Arterial wall calcification"]), "aorta")  # diameter is still normal
    either("Arterial wall calcification", "aorta")
    either("Hiatal hernia", "esophagus")
    either("Lymphadenopathy", "lymph_nodes")
    if "Medical material" in found:
        positive("Medical material")
    lung_pos = [lb for lb in _LUNG_ORDER if lb in found]
    if not lung_pos:
        add("findings", _pick(rng, NORMAL["lung"]), "lung")
    else:
        for label in lung_pos:
            positive(label)
        for label, options in LUNG_NEGATIVE.items():
            if label not in found and rng.random() < 0.35:
                add("findings", _pick(rng, options), "lung")
    either("Pleural effusion", "pleura")
    add("findings", _pick(rng, NORMAL["upper_abdomen"]), "upper_abdomen")
    bones = "bones_degenerative" if scene.anatomy.age > 55 and rng.random() < 0.6 else "bones"
    add("findings", _pick(rng, NORMAL[bones]), "bones")

    for label in _IMPRESSION_ORDER:
        if label in found:
            region, classes = _classes(found[label])
            add("impression", _impression_text(rng, found[label]), region, classes, label)
    if not found:
        add("impression", _pick(rng, NORMAL_IMPRESSION), "none")

    clinical = "Not given." if rng.random() < 0.3 else _pick(rng, CLINICAL)
    t = f"{slice_thickness:g}"
    technique = _pick(rng, [f"Non-contrast thorax CT examination was performed with {t} mm slice thickness in the "
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
