"""The wordings of the synthetic reports: normal statements, and the sentences of every positive label (three
wordings each, one drawn by the RNG) with the finding's severity, size and location. See
:mod:`fvlm.synth.reports`."""

from __future__ import annotations

import numpy as np

from fvlm.synth.findings import Finding
from fvlm.synth.phantom import LOBES

LOBE_NAMES = {10: "left lung upper lobe", 11: "left lung lower lobe", 12: "right lung upper lobe",
              13: "right lung middle lobe", 14: "right lung lower lobe"}


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


def pick(rng: np.random.Generator, options: list[str]) -> str:
    return options[int(rng.integers(len(options)))]


#: findings sentences of a positive label (keyed ``label`` or ``label/variant``): one of the three is drawn.
#: Fields: ``loc`` (the lobes), ``sev`` / ``Sev`` (severity word, capitalised), and what :func:`_findings_fields`
#: takes from the finding's details.
FINDINGS: dict[str, tuple[str, str, str]] = {
    "Emphysema/beyond upper": ("{Kind} emphysematous changes are observed in both lungs, more prominent in the upper "
                               "lobes.",
                               "{Sev} {kind} emphysema is observed in {loc}.",
                               "Emphysema areas with low attenuation are observed in {loc}."),
    "Emphysema": ("{Kind} emphysematous changes are observed in {loc}.", "{Sev} {kind} emphysema is observed in {loc}.",
                  "Emphysema areas with low attenuation are observed in {loc}."),
    "Lung nodule/one": ("A {size} mm nodule was observed in {big}.",
                        "A solid nodule measuring {size} mm is seen in {big}.",
                        "There is a {size} mm solid nodule in {big}."),
    "Lung nodule": ("{n} nodules were observed in {loc}, the largest measuring {size} mm in {big}.",
                    "Multiple solid nodules are seen in {loc}, the largest {size} mm in {big}.",
                    "Nodules up to {size} mm in diameter are observed in {loc}."),
    "Lung opacity": ("Ground-glass opacities are observed in {loc}.",
                     "Patchy ground glass opacity areas were observed in {loc}, predominantly peripheral.",
                     "{Sev} opacity areas with ground glass density are observed in {loc}."),
    "Consolidation": ("Consolidation areas with air bronchograms are observed in {loc}.",
                      "Consolidated areas, the largest about {size} mm, are observed in {loc}.",
                      "Consolidation areas are observed in {loc}."),
    "Consolidation/one": ("Consolidation with air bronchograms is observed in {loc}.",
                          "A consolidated area measuring about {size} mm is observed in {loc}.",
                          "A consolidation area is observed in {loc}."),
    "Atelectasis/linear": ("Linear atelectasis is observed in {loc}.",
                           "Subsegmental plate-like atelectatic changes were observed in {loc}.",
                           "Band-like atelectasis is seen in {loc}."),
    "Atelectasis": ("Atelectasis is observed in the basal segments of {loc}.",
                    "Compressive atelectatic changes were observed in the posterobasal part of {loc}.",
                    "{Sev} basal atelectasis is seen in {loc}."),
    "Pulmonary fibrotic sequela": ("Fibrotic sequelae changes are observed in {loc}.",
                                   "Linear fibrotic densities were observed in {loc}.",
                                   "Sequela fibrotic bands are seen in {loc}."),
    "Mosaic attenuation pattern": ("Mosaic attenuation pattern is observed in {loc}.",
                                   "Areas of mosaic attenuation are observed in {loc}.",
                                   "Mosaic attenuation pattern, which may be secondary to small airway disease, "
                                   "is observed in {loc}."),
    "Peribronchial thickening": ("Peribronchial thickening is observed in {loc}.",
                                 "Bronchial wall thickening and peribronchial thickening were observed in {loc}.",
                                 "{Sev} peribronchial thickening is present in {loc}."),
    "Bronchiectasis": ("{Kind} bronchiectasis is observed in {loc}.", "Bronchiectatic changes were observed in {loc}.",
                       "Bronchiectasis with dilated bronchi is seen in {loc}."),
    "Interlobular septal thickening": ("Interlobular septal thickening is observed in {loc}.",
                                       "Thickening of interlobular septa is observed in the peripheral parts of {loc}.",
                                       "Smooth interlobular septal thickening was observed in {loc}."),
    "Pleural effusion/both": ("Bilateral pleural effusion is observed, {r} mm on the right and {l} mm on the left.",
                              "Pleural effusion reaching {max} mm in thickness is observed in both hemithoraces.",
                              "{Sev} bilateral pleural effusion was detected."),
    "Pleural effusion": ("Pleural effusion measuring {t} mm in thickness was observed on the {side}.",
                         "A {sev} pleural effusion is observed in the {side} hemithorax.",
                         "{Side} pleural effusion reaching {t} mm was detected."),
    "Cardiomegaly": ("The heart is enlarged, cardiomegaly is observed.",
                     "Heart size has increased, with a cardiothoracic ratio of about {ctr} percent.",
                     "Cardiomegaly is observed."),
    "Pericardial effusion": ("Pericardial effusion reaching {t} mm in its thickest part was observed.",
                             "Pericardial effusion measuring {t} mm was detected.",
                             "A {sev} pericardial effusion is observed around the heart."),
    "Coronary artery wall calcification": ("Calcific plaques are observed in the coronary arteries.",
                                           "Coronary artery calcifications were observed in the {vessels}.",
                                           "Coronary artery wall calcification is present in the {vessels}."),
    "Arterial wall calcification": ("Calcific atherosclerotic plaques are observed in the {parts}.",
                                    "Atherosclerotic calcifications were observed in the wall of the thoracic aorta, "
                                    "{amount}.",
                                    "Arterial wall calcification is observed in the {parts}."),
    "Hiatal hernia": ("Hiatal hernia is observed at the distal esophagus.",
                      "A sliding hiatal hernia measuring about {size} mm is observed.",
                      "The distal esophagus herniates through the hiatus, consistent with hiatal hernia."),
    "Lymphadenopathy": ("Lymph nodes reaching {size} mm in short axis were observed in the {stations} region.",
                        "Enlarged lymph nodes are observed in the mediastinum, the largest {size} mm in the {stations} "
                        "region.",
                        "Mediastinal lymphadenopathy with nodes up to {size} mm is observed in the {stations} region."),
    "Medical material/pacemaker": ("A pacemaker is observed in the {side} pectoral region, with its lead extending to "
                                   "the right heart chambers.",
                                   "Pacemaker device located in the {side} infraclavicular subcutaneous tissue, its "
                                   "lead tip in the right ventricle.",
                                   "A cardiac pacemaker with a lead in the right cardiac cavities was observed."),
    "Medical material/port catheter": ("A port catheter is observed in the {side} anterior chest wall, its tip in the "
                                       "superior vena cava.",
                                       "A venous port reservoir is seen in the {side} chest wall subcutaneous tissue.",
                                       "Port catheter is observed, with its tip at the superior vena cava."),
    "Medical material/sternotomy wires": ("Sternotomy wires are observed.", "Median sternotomy wires are seen.",
                                          "Post-sternotomy changes with sternal wires are observed."),
    "Medical material": ("Surgical clips are observed in the mediastinum.",
                         "Metallic surgical clips are seen in the mediastinal area.",
                         "Postoperative clips are observed in the mediastinum."),
}
_CORONARY_NAMES = {"LAD": "left anterior descending artery", "LCx": "circumflex artery", "RCA": "right coronary artery"}


def _findings_fields(f: Finding) -> tuple[str, dict]:
    """(key of :data:`FINDINGS`, fields of its sentences) for a positive label."""
    d, label = f.details, f.label
    if label == "Emphysema":
        kind = d.get("kind", "centrilobular")
        return ("Emphysema/beyond upper" if set(f.lobes) - {10, 12} else label), {"kind": kind,
                                                                                  "Kind": kind.capitalize()}
    if label == "Lung nodule":
        sizes, lobes = d["sizes_mm"], d.get("lobes", [])
        fields = {"size": sizes[0], "big": f"the {LOBE_NAMES[lobes[0]]}", "n": len(sizes)}
        return ("Lung nodule/one" if len(sizes) == 1 else label), fields
    if label == "Consolidation":
        return (label if len(f.lobes) > 1 else "Consolidation/one"), {"size": d.get("size_mm", 0)}
    if label == "Atelectasis":
        return ("Atelectasis/linear" if d.get("kind") == "linear" else label), {}
    if label == "Bronchiectasis":
        return label, {"Kind": d.get("kind", "cylindrical").capitalize()}
    if label == "Pleural effusion":
        depth, sides = d.get("depth_mm", {}), d.get("sides", [])
        if len(sides) == 2:
            r, lft = round(depth["right"]), round(depth["left"])
            return "Pleural effusion/both", {"r": r, "l": lft, "max": max(r, lft)}
        side = sides[0] if sides else "right"
        return label, {"side": side, "Side": side.capitalize(), "t": round(depth.get(side, 0))}
    if label == "Cardiomegaly":
        return label, {"ctr": round(100 * d.get("ctr", 0.55))}
    if label == "Pericardial effusion":
        return label, {"t": round(d.get("thickness_mm", 5))}
    if label == "Coronary artery wall calcification":
        return label, {"vessels": " and ".join(_CORONARY_NAMES[k] for k in d.get("vessels", ["LAD"]))}
    if label == "Arterial wall calcification":
        parts = " and ".join(f"{p} aorta" if p == "descending" else "aortic arch" for p in d.get("parts", ["arch"]))
        return label, {"parts": parts, "amount": _sev(f.severity, "a few", "scattered", "extensive")}
    if label == "Hiatal hernia":
        return label, {"size": round(d.get("size_mm", 30))}
    if label == "Lymphadenopathy":
        return label, {"stations": " and ".join(d.get("stations", ["mediastinal"])[:2]), "size": d.get("size_mm", 15)}
    if label == "Medical material":
        kind = d.get("kind")
        key = f"{label}/{kind}" if kind in ("pacemaker", "port catheter", "sternotomy wires") else label
        return key, {"side": d.get("side", "left")}
    if label in FINDINGS:
        return label, {}
    raise KeyError(f"no wording for label {label!r}")


def findings_text(rng: np.random.Generator, f: Finding) -> list[str]:
    """Findings-section sentences for one positive label (already formatted)."""
    if f.label == "Lung nodule" and not f.details.get("sizes_mm", []):
        return ["A nodule was observed in the lung parenchyma."]
    key, fields = _findings_fields(f)
    sev = _sev(f.severity)
    fields = {"loc": _loc(f.lobes), "sev": sev, "Sev": sev.capitalize(), **fields}
    return [pick(rng, [t.format(**fields) for t in FINDINGS[key]])]


def impression_text(rng: np.random.Generator, f: Finding) -> str:
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
    return pick(rng, options)
