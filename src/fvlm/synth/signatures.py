"""The visible signature of every CT-RATE label (:data:`SIGNATURES`) and the severity draw.

Every range is written ``(subtle, strong)``: a finding's severity ``s`` in [0, 1] interpolates between the two
ends (:func:`lerp`). Severities are drawn from ``Beta(1 + 2 (1 - d), 1 + 2 d)`` where ``d`` is the single
``difficulty`` knob (:func:`draw_severity`; default :data:`DEFAULT_DIFFICULTY`). See :mod:`fvlm.synth.lesions`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fvlm.labels import CT_RATE_LABELS

#: default of the one difficulty knob (0 = mostly strong findings, 1 = mostly subtle)
DEFAULT_DIFFICULTY = 0.4


@dataclass(frozen=True)
class Signature:
    """Signature parameters of one label; each range is ``(subtle, strong)`` (see the module docstring).

    ``size`` and ``hu`` mean what the label's entry says (e.g. a nodule diameter, a wall-thickness factor,
    an HU value or an HU change); ``count`` is how many lesions (or lobes) one finding has.
    """

    size: tuple[float, float]
    hu: tuple[float, float]
    count: tuple[float, float] = (1, 1)
    extra: dict = field(default_factory=dict)
    note: str = ""


SIGNATURES: dict[str, Signature] = {
    "Medical material": Signature((0.8, 1.1), (2200, 3000), (3, 8),
                                  note="size: device scale; hu: metal HU; count: clips or sternal wires"),
    "Arterial wall calcification": Signature((1.2, 3.0), (400, 1200), (3, 30), extra={"length": (3, 10)},
                                             note="size: plaque radius mm in the aortic wall; count: plaques; "
                                                  "length: plaque length mm along the wall"),
    "Cardiomegaly": Signature((0.55, 0.70), (0, 0), note="size: cardiothoracic ratio (normal hearts: 0.38-0.48)"),
    "Pericardial effusion": Signature((5, 22), (15, 5), note="size: fluid rim thickness mm; hu: fluid HU"),
    "Coronary artery wall calcification": Signature((1.6, 3.5), (500, 1200), (2, 16), extra={"length": (3, 10)},
                                                    note="size: plaque radius mm on the coronary course; "
                                                         "length: plaque length mm along the artery"),
    "Hiatal hernia": Signature((14, 36), (30, 15), note="size: radius mm of the bulge above the hiatus"),
    "Lymphadenopathy": Signature((12, 28), (48, 38), (1, 5), note="size: node short axis mm; count: nodes"),
    "Emphysema": Signature((6.0, 12.0), (-980, -1000), (80, 400), extra={"lobe_shift": (-15, -50)},
                           note="size: hole radius mm; hu: hole HU; count: holes; lobe_shift: HU change of lobes"),
    "Atelectasis": Signature((6, 30), (-320, 25), (1, 2), extra={"dome_raise": (0, 14), "plate_length": (25, 55)},
                             note="size: basal band thickness mm; hu: collapsed lung HU; dome_raise: volume loss mm; "
                                  "plate_length: half length mm of linear (plate) atelectasis"),
    "Lung nodule": Signature((5, 25), (10, 45), (1, 4), note="size: largest diameter mm; count: nodules"),
    "Lung opacity": Signature((11, 40), (150, 430), (1, 6),
                              note="size: ground-glass patch radius mm; hu: HU added; count: patches"),
    "Pulmonary fibrotic sequela": Signature((1.2, 2.6), (-250, 40), (3, 16), extra={"length": (15, 45)},
                                            note="size: strand radius mm; count: strands; length mm"),
    "Pleural effusion": Signature((8, 65), (16, 4), note="size: fluid depth mm at the base; hu: fluid HU"),
    "Mosaic attenuation pattern": Signature((60, 35), (45, 140),
                                            note="size: patch wavelength mm; hu: +- HU of the patches"),
    "Peribronchial thickening": Signature((1.8, 3.8), (10, 40), (2, 5),
                                          note="size: bronchial wall factor; hu: wall HU; count: lobes"),
    "Consolidation": Signature((16, 50), (-250, 35), (1, 2), note="size: radius mm; hu: HU; count: foci"),
    "Bronchiectasis": Signature((1.6, 3.2), (-1000, -1000), (1, 4), extra={"cysts": (0, 8)},
                                note="size: bronchial lumen factor; count: lobes; cysts: cystic dilatations"),
    "Interlobular septal thickening": Signature((0.8, 1.6), (-250, 20), (2, 5),
                                                extra={"cell": (18, 12), "zone": (12, 32)},
                                                note="size: septal half thickness mm; cell: lobule size mm; "
                                                     "zone: subpleural depth mm; count: lobes"),
}
assert set(SIGNATURES) == set(CT_RATE_LABELS)


def draw_severity(rng: np.random.Generator, difficulty: float = DEFAULT_DIFFICULTY) -> float:
    d = float(np.clip(difficulty, 0.0, 1.0))
    return float(rng.beta(1 + 2 * (1 - d), 1 + 2 * d))


def lerp(rng_pair: tuple[float, float], s: float) -> float:
    return float(rng_pair[0] + (rng_pair[1] - rng_pair[0]) * s)
