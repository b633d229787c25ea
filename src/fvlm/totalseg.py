"""TotalSegmentator v2, task ``total``: the 117 class ids and names (as in TotalSegmentator's class map).

Label maps written by ``TotalSegmentator -ml`` (and by :mod:`fvlm.synth`) use these ids; anatomy tables
(:mod:`fvlm.anatomy`) refer to classes by name and are resolved through this table.
"""

from __future__ import annotations

_NAMES: tuple[str, ...] = (
    "spleen", "kidney_right", "kidney_left", "gallbladder", "liver", "stomach", "pancreas",
    "adrenal_gland_right", "adrenal_gland_left", "lung_upper_lobe_left", "lung_lower_lobe_left",
    "lung_upper_lobe_right", "lung_middle_lobe_right", "lung_lower_lobe_right", "esophagus", "trachea",
    "thyroid_gland", "small_bowel", "duodenum", "colon", "urinary_bladder", "prostate", "kidney_cyst_left",
    "kidney_cyst_right", "sacrum", "vertebrae_S1", "vertebrae_L5", "vertebrae_L4", "vertebrae_L3",
    "vertebrae_L2", "vertebrae_L1", "vertebrae_T12", "vertebrae_T11", "vertebrae_T10", "vertebrae_T9",
    "vertebrae_T8", "vertebrae_T7", "vertebrae_T6", "vertebrae_T5", "vertebrae_T4", "vertebrae_T3",
    "vertebrae_T2", "vertebrae_T1", "vertebrae_C7", "vertebrae_C6", "vertebrae_C5", "vertebrae_C4",
    "vertebrae_C3", "vertebrae_C2", "vertebrae_C1", "heart", "aorta", "pulmonary_vein",
    "brachiocephalic_trunk", "subclavian_artery_right", "subclavian_artery_left",
    "common_carotid_artery_right", "common_carotid_artery_left", "brachiocephalic_vein_left",
    "brachiocephalic_vein_right", "atrial_appendage_left", "superior_vena_cava", "inferior_vena_cava",
    "portal_vein_and_splenic_vein", "iliac_artery_left", "iliac_artery_right", "iliac_vena_left",
    "iliac_vena_right", "humerus_left", "humerus_right", "scapula_left", "scapula_right", "clavicula_left",
    "clavicula_right", "femur_left", "femur_right", "hip_left", "hip_right", "spinal_cord",
    "gluteus_maximus_left", "gluteus_maximus_right", "gluteus_medius_left", "gluteus_medius_right",
    "gluteus_minimus_left", "gluteus_minimus_right", "autochthon_left", "autochthon_right",
    "iliopsoas_left", "iliopsoas_right", "brain", "skull",
    *(f"rib_left_{i}" for i in range(1, 13)),
    *(f"rib_right_{i}" for i in range(1, 13)),
    "sternum", "costal_cartilages",
)  # fmt: skip

#: class id -> class name (ids 1..117; 0 is background)
CLASS_NAMES: dict[int, str] = {i + 1: name for i, name in enumerate(_NAMES)}
#: class name -> class id
CLASS_IDS: dict[str, int] = {name: i for i, name in CLASS_NAMES.items()}
#: largest valid class id
MAX_CLASS_ID: int = len(_NAMES)

assert MAX_CLASS_ID == 117 and CLASS_IDS["heart"] == 51 and CLASS_IDS["costal_cartilages"] == 117


def class_id(name: str) -> int:
    """Id of a TotalSegmentator v2 ``total`` class; raises ``KeyError`` naming the unknown class."""
    try:
        return CLASS_IDS[name]
    except KeyError:
        raise KeyError(f"unknown TotalSegmentator v2 'total' class {name!r}") from None
