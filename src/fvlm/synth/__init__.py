"""Synthetic chest CT in CT-RATE's exact formats: the package's embedded default data set.

``fvlm synth`` (:func:`synthesize`) writes volumes (CT-RATE v1 or v2 headers), TotalSegmentator v2 label
maps, the 44-column metadata, reports, 18-label CSVs and the authors' anatomy-text JSONs, so that the same
code paths run on this set (on a laptop CPU) and on real CT-RATE (on a cluster). The same seed gives
byte-identical files whatever the number of workers.

What is in a volume: an analytic chest phantom built in patient millimetres (LPS), so every voxel size
shows the same anatomy: body wall (skin, fat, muscle), spine with vertebrae T1-T12, cord and back muscles,
ribs with costal cartilages, sternum, clavicles, five lung lobes with fissures, a pulmonary vessel and
bronchial tree, trachea and main bronchi, heart with the left atrial appendage, aorta (ascending, arch,
descending) with its branches, pulmonary arteries and veins, venae cavae, oesophagus, thyroid, liver,
stomach and spleen (:mod:`fvlm.synth.phantom`). Each scan's 18 labels are a whole real CT-RATE training row
(drawn by frequency); every positive label gets a visible signature in the right anatomy with a random
severity (:mod:`fvlm.synth.lesions`, table :data:`SIGNATURES`, knob ``difficulty``), and a CT-RATE-style
report whose sentences carry their region and label (:mod:`fvlm.synth.reports`).

In-memory API (for tests and benchmarks of other modules)::

    from fvlm.synth import generate_case
    case = generate_case(0, labels=["Cardiomegaly", "Lung nodule"], size="demo")
    case.hu          # int16 (D, H, W) = (z, y, x) HU, LPS, slice 0 most inferior
    case.label_map   # uint8 (D, H, W) TotalSegmentator v2 ids (lobes 10-14, heart 51, aorta 52, ...)
    case.spacing     # (sx, sy, sz) mm; case.origin: LPS mm of voxel (0, 0, 0); case.affine_ras: NIfTI affine
    case.labels      # {label: 0/1} in CT-RATE order; case.findings: severity, lobes, details per positive label
    case.report      # .findings / .impression text, .sentences with (section, region, classes, label) truth
    desc, conc = case.anatomy_texts("released")   # {anatomy: text}, as in desc_info.json / conc_info.json
"""

from fvlm.synth.case import Case, Grid, Scene, generate_case, label_rows, render_volume
from fvlm.synth.findings import Finding
from fvlm.synth.reports import REGIONS, Report, Sentence, anatomy_texts
from fvlm.synth.signatures import DEFAULT_DIFFICULTY, SIGNATURES, Signature
from fvlm.synth.writer import GENERATOR_VERSION, SynthResult, synthesize

__all__ = [
    "Case", "Grid", "Scene", "generate_case", "label_rows", "render_volume",
    "DEFAULT_DIFFICULTY", "SIGNATURES", "Finding", "Signature",
    "REGIONS", "Report", "Sentence", "anatomy_texts",
    "GENERATOR_VERSION", "SynthResult", "synthesize",
]  # fmt: skip
