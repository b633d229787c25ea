"""configs/anatomy/extended.json: valid, a superset of the released table, scores more labels, and works with the
real TotalSegmentator map, the decompose lexicon and fvlm synth (texts and label maps for the new anatomies)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from fvlm.anatomy import load_anatomy_table
from fvlm.cli import main
from fvlm.labels import CT_RATE_LABELS

NEW = ("trachea", "mediastinum", "bones")


def test_loads_and_extends_the_released_table():
    rel, ext = load_anatomy_table("released"), load_anatomy_table("extended")
    assert ext.name == "extended" and ext.names == (*rel.names, *NEW)
    assert ext.anatomies[: len(rel)] == rel.anatomies  # same classes, same mask values 1..4
    assert set(rel.prompts) <= set(ext.prompts)  # the released prompt pairs, unchanged
    assert set(ext.scored_labels) > set(rel.scored_labels)
    assert set(ext.scored_labels) - set(rel.scored_labels) == {"Lymphadenopathy", "Medical material"}
    assert sorted(ext.scored_labels) == sorted(CT_RATE_LABELS) and ext.unscored == ()
    owner = {p.label: p.anatomy for p in ext.prompts}
    assert owner["Lymphadenopathy"] == "mediastinum" and owner["Medical material"] == "bones"
    for p in ext.prompts:
        assert p.negative == f"Not {p.positive}"
    classes = {a.name: set(a.classes) for a in ext.anatomies}
    assert classes["trachea"] == {"trachea"}
    assert {"superior_vena_cava", "brachiocephalic_vein_left", "pulmonary_vein"} <= classes["mediastinum"]
    assert {"vertebrae_T1", "vertebrae_T12", "rib_left_1", "rib_right_12", "sternum"} <= classes["bones"]
    assert len(ext.class_ids) == len(set(ext.class_ids)) == 53


def test_merge_of_the_real_label_map(real_data):
    lab = sitk.GetArrayFromImage(sitk.ReadImage(str(real_data / "real_ct" / "totalseg_v2.nii.gz")))
    rel, ext = load_anatomy_table("released"), load_anatomy_table("extended")
    m_rel, m_ext = rel.merge(lab), ext.merge(lab)
    np.testing.assert_array_equal(np.where(m_ext <= len(rel), m_ext, 0), m_rel)  # released anatomies unchanged
    bones = ext.index("bones") + 1
    ids = list(ext.anatomies[bones - 1].class_ids)
    assert (m_ext == bones).sum() == np.isin(lab, ids).sum() > 0  # this scan shows T11-T12, ribs, cartilages
    assert (m_ext == ext.index("mediastinum") + 1).sum() == 0  # an abdominal scan: no great veins


def test_decompose_lexicon_reaches_every_new_anatomy(caplog):
    from fvlm.decompose.lexicon import load_lexicon

    ext = load_anatomy_table("extended")
    resolved = load_lexicon().resolve(ext)
    reached = {a for v in resolved.values() for a in v}
    assert reached == set(ext.names)
    assert "has no lexicon concept" not in caplog.text


def test_synth_writes_texts_and_maps_for_the_new_anatomies(tmp_path):
    out = tmp_path / "synth"
    assert main(["synth", "--out", str(out), "--train", "0", "--valid", "1", "--anatomy-table", "extended"]) == 0
    desc = json.loads((out / "anatomy_texts" / "desc_info.json").read_text())
    assert desc and all(set(NEW) <= set(texts) for texts in desc.values())
    ext = load_anatomy_table("extended")
    maps = sorted((out / "dataset" / "valid_mask").rglob("*.nii.gz"))
    assert maps
    mask = ext.merge(sitk.GetArrayFromImage(sitk.ReadImage(str(maps[0]))))
    counts = np.bincount(mask.ravel(), minlength=len(ext) + 1)[1:]
    assert (counts > 0).all(), dict(zip(ext.names, counts.tolist()))


def test_new_labels_land_in_the_texts_of_the_anatomy_that_scores_them():
    """A synthetic scan with lymphadenopathy and medical material: its impression texts go to the anatomies the
    extended prompt table scores these labels from (the prompt table follows the texts)."""
    from fvlm.synth import generate_case

    ext = load_anatomy_table("extended")
    case = generate_case(5, labels=["Lymphadenopathy", "Medical material"], size="demo")
    _, conc = case.anatomy_texts(ext)
    owner = {p.label: p.anatomy for p in ext.prompts}
    assert "ymph" in conc[owner["Lymphadenopathy"]]
    assert owner["Medical material"] in conc
    _, conc_rel = case.anatomy_texts("released")
    assert not set(conc_rel) & {"mediastinum", "bones"}


def test_table_file_is_shipped_with_the_package():
    from fvlm.anatomy import TABLE_DIR, available_tables

    assert "extended" in available_tables() and (Path(TABLE_DIR) / "extended.json").exists()
