import numpy as np
import pytest

from fvlm.anatomy import AnatomyTable, anatomy_counts, intact_anatomies, load_anatomy_table
from fvlm.labels import CT_RATE_LABELS
from fvlm.text import AnatomyText, AnatomyTexts, anatomy_text, clean_text, scan_id, text_id
from fvlm.totalseg import CLASS_IDS, CLASS_NAMES


def test_totalseg_ids_match_v2():
    assert len(CLASS_NAMES) == 117
    expected = {"lung_upper_lobe_left": 10, "lung_lower_lobe_left": 11, "lung_upper_lobe_right": 12,
                "lung_middle_lobe_right": 13, "lung_lower_lobe_right": 14, "esophagus": 15, "trachea": 16,
                "heart": 51, "aorta": 52, "atrial_appendage_left": 61, "autochthon_left": 86, "rib_left_1": 92,
                "rib_right_12": 115, "sternum": 116, "costal_cartilages": 117}
    for name, i in expected.items():
        assert CLASS_IDS[name] == i


def test_released_table():
    t = load_anatomy_table("released")
    assert t.names == ("lung", "heart", "esophagus", "aorta")
    assert t.class_ids == (10, 11, 12, 13, 14, 15, 51, 52, 61)
    assert len(t.prompts) == 16 and set(t.unscored) == {"Medical material", "Lymphadenopathy"}
    assert set(t.scored_labels) | set(t.unscored) == set(CT_RATE_LABELS)
    p = {p.label: p for p in t.prompts}
    assert p["Atelectasis"].positive == "Atelectatic." and p["Atelectasis"].negative == "Not Atelectatic."
    assert p["Hiatal hernia"].anatomy == "esophagus"


def test_merge_maps_classes_and_drops_others():
    t = load_anatomy_table("released")
    lm = np.array([[[0, 10, 14, 51], [61, 15, 52, 16], [5, 79, 116, 117]]], dtype=np.uint8)
    m = t.merge(lm)
    assert m.dtype == np.uint8
    assert m.tolist() == [[[0, 1, 1, 2], [2, 3, 4, 0], [0, 0, 0, 0]]]


@pytest.mark.parametrize("bad", [np.array([[[0, 118]]], dtype=np.int16), np.array([[[0, -1]]], dtype=np.int16),
                                 np.array([[[0.0, 1.5]]])])
def test_merge_rejects_unknown_ids(bad):
    with pytest.raises(ValueError, match="class ids|non-integer"):
        load_anatomy_table().merge(bad)


def test_table_validation():
    good = load_anatomy_table().to_dict()
    bad = dict(good, anatomies=good["anatomies"] + [{"name": "lung2", "classes": ["lung_upper_lobe_left"]}])
    with pytest.raises(ValueError, match="both"):
        AnatomyTable.from_dict(bad)
    bad = dict(good, anatomies=[{"name": "x", "classes": ["spleeen"]}], prompts=[])
    with pytest.raises(ValueError, match="unknown TotalSegmentator class"):
        AnatomyTable.from_dict(bad)
    bad = dict(good, prompts=[{"anatomy": "liver", "label": "Emphysema", "negative": "a", "positive": "b"}])
    with pytest.raises(ValueError, match="unknown anatomy"):
        AnatomyTable.from_dict(bad)
    with pytest.raises(FileNotFoundError):
        load_anatomy_table("no_such_table")


def test_intact_rule():
    m = np.zeros((6, 6, 6), dtype=np.uint8)
    m[2:4, 2:4, 2:4] = 1  # inside: intact
    m[0, 3, 3] = 2  # touches the z=0 face: cut
    m[3, 3, 5] = 3  # touches the x=-1 face: cut
    m[1, 1, 1] = 3
    ok = intact_anatomies(m, 4)
    assert ok.tolist() == [True, False, False, False]  # anatomy 4 absent
    assert anatomy_counts(m, 4).tolist() == [8, 1, 2, 0]


def test_text_rule_released():
    # abnormal: impression + findings
    t = anatomy_text("lung", "Nodule (8 mm) in the right upper lobe.", "Lung \"nodule\".")
    assert t == AnatomyText("Lung nodule. Nodule 8 mm in the right upper lobe.", is_normal=False)
    # normal with findings: findings only; normal without: bare template
    assert anatomy_text("heart", "Heart size is normal.", None) == AnatomyText("Heart size is normal.", True)
    assert anatomy_text("heart", "", "") == AnatomyText("Heart shows no significant abnormalities.", True)
    assert clean_text("  a  (b)  'c' ") == "a b c"


def test_text_ids_stable_and_distinct():
    assert text_id("Heart size is normal.") == text_id("  heart size  is normal. ")
    assert text_id("Heart size is normal.") != text_id("Heart size is enlarged.")
    assert 0 <= text_id("anything") < 2**63


def test_scan_id_and_texts(tmp_path):
    assert scan_id("train_12_a_2.nii.gz") == "train_12_a" and scan_id("valid_1_b_10") == "valid_1_b"
    with pytest.raises(ValueError):
        scan_id("volume.nii.gz")
    (tmp_path / "desc_info.json").write_text('{"train_1_a": {"lung": "Clear lungs."}}')
    (tmp_path / "conc_info.json").write_text('{"train_1_a": {"heart": "Cardiomegaly."}}')
    texts = AnatomyTexts.load(tmp_path)
    assert texts.get("train_1_a", "lung") == AnatomyText("Clear lungs.", True)
    assert texts.get("train_1_a", "heart") == AnatomyText("Cardiomegaly.", False)
    assert texts.has_scan("train_1_a") and not texts.has_scan("train_2_a")
