"""Rad-ChestCT: the 84 real label columns, the three CT-RATE mappings, the orientation checks on a real CT, and
the conversion into NIfTI + pairs CSV + CT-RATE-format labels that fvlm preprocess --pairs reads."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from fvlm.cli import main
from fvlm.data import orientation, store
from fvlm.data import radchestct as rc
from fvlm.data import radchestct_labels as rcl
from fvlm.data.volume import read_nifti, write_nifti
from fvlm.labels import CT_RATE_LABELS

# the columns docs/ct-rate.md names (from the release's label files)
DOC_COLUMNS = ["air_trapping", "atelectasis", "atherosclerosis", "calcification", "cardiomegaly", "nodule",
               "nodulegr1cm", "opacity", "groundglass", "septal_thickening", "bronchial_wall_thickening", "hernia",
               "pericardial_effusion", "pleural_effusion", "lymphadenopathy", "pacemaker_or_defib", "stent",
               "coronary_artery_disease", "fibrosis", "reticulation", "honeycombing", "scarring",
               "interstitial_lung_disease", "bronchiectasis", "bronchiolectasis", "infiltrate", "airspace_disease"]


@pytest.fixture(scope="module")
def real_rc(real_data) -> tuple[np.ndarray, np.ndarray]:
    """The real CT and its TotalSegmentator map laid out as a Rad-ChestCT array: (z, y, x) with z to inferior,
    y to posterior, x to the patient's left, HU clipped to [-1000, 1000] (the file is x->right, y->anterior,
    z->superior: every axis flips)."""
    ct = sitk.GetArrayFromImage(sitk.ReadImage(str(real_data / "real_ct" / "ct.nii.gz")))
    lab = sitk.GetArrayFromImage(sitk.ReadImage(str(real_data / "real_ct" / "totalseg_v2.nii.gz")))
    assert sitk.ReadImage(str(real_data / "real_ct" / "ct.nii.gz")).GetDirection() == (-1, 0, 0, 0, -1, 0, 0, 0, 1)
    return (np.clip(ct[::-1, ::-1, ::-1], -1000, 1000).astype(np.int16), np.ascontiguousarray(lab[::-1, ::-1, ::-1]))


def _label_rows(ids_values: dict[str, dict[str, int]]) -> list[dict[str, str]]:
    return [{rcl.KEY: k, **{c: str(v.get(c, 0)) for c in rcl.ABNORMALITIES}} for k, v in ids_values.items()]


def _write_csv(path: Path, fields: list[str], rows: list[dict[str, str]]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    return path


def test_columns_and_mapping_definitions():
    assert len(rcl.ABNORMALITIES) == 84 and set(DOC_COLUMNS) <= set(rcl.ABNORMALITIES)
    std, fv, ext = rcl.MAPPINGS["standard"], rcl.MAPPINGS["fvlm"], rcl.MAPPINGS["extended"]
    assert (len(std), len(fv), len(ext)) == (16, 15, 18)
    for m in (std, fv, ext):  # CT-RATE order
        assert list(m) == [label for label in CT_RATE_LABELS if label in m]
    # standard: no Mosaic source, one calcification label, devices -> Medical material
    assert "Mosaic attenuation pattern" not in std and "Coronary artery wall calcification" not in std
    assert std["Arterial wall calcification"] == ("calcification",)
    assert {"pacemaker_or_defib", "stent"} <= set(std["Medical material"])
    assert std["Lung nodule"] == ("nodule", "nodulegr1cm") and std["Pulmonary fibrotic sequela"] == ("scarring",)
    assert std["Peribronchial thickening"] == ("bronchial_wall_thickening",) and std["Hiatal hernia"] == ("hernia",)
    # fVLM: 15 classes without Medical material, Lymphadenopathy, Mosaic; calcification for both
    assert not {"Medical material", "Lymphadenopathy", "Mosaic attenuation pattern"} & set(fv)
    assert fv["Arterial wall calcification"] == fv["Coronary artery wall calcification"] == ("calcification",)
    assert fv["Pulmonary fibrotic sequela"] == ("fibrosis",)
    # extended: all 18
    assert list(ext) == list(CT_RATE_LABELS)
    assert ext["Arterial wall calcification"] == ("atherosclerosis",)
    assert ext["Coronary artery wall calcification"] == ("coronary_artery_disease",)
    assert ext["Mosaic attenuation pattern"] == ("air_trapping",)
    assert set(ext["Lung opacity"]) == {"opacity", "groundglass", "infiltrate", "airspace_disease"}
    assert set(ext["Pulmonary fibrotic sequela"]) == {"fibrosis", "reticulation", "honeycombing", "scarring",
                                                      "interstitial_lung_disease"}
    assert set(ext["Bronchiectasis"]) == {"bronchiectasis", "bronchiolectasis"}


def test_labels_both_formats_and_mappings(tmp_path):
    truth = {"tst00001": {"groundglass": 1, "calcification": 1}, "tst00002": {"stent": 1, "nodulegr1cm": 1},
             "tst00003": {"air_trapping": 1, "lymphadenopathy": 1, "scarring": 1}}
    summary = _write_csv(tmp_path / "summary.csv", [rcl.KEY, *rcl.ABNORMALITIES], _label_rows(truth))
    # the per-location file: abnormality*location columns, reduced to "anywhere"
    locs = ["left_lung", "right_lung", "heart"]
    fields = [rcl.KEY, *(f"{a}*{loc}" for a in rcl.ABNORMALITIES for loc in locs)]
    rows = [{rcl.KEY: k, **{f"{a}*{loc}": str(int(v.get(a, 0) and loc == "right_lung")) for a in rcl.ABNORMALITIES
                           for loc in locs}} for k, v in truth.items()]
    located = _write_csv(tmp_path / "located.csv", fields, rows)
    a, b = rcl.read_labels(summary), rcl.read_labels(located)
    assert a == b and a["tst00001"]["groundglass"] == 1 and a["tst00001"]["opacity"] == 0
    std, fv, ext = (rcl.map_labels(a, m) for m in ("standard", "fvlm", "extended"))
    assert std["tst00001"]["Lung opacity"] == 0 and ext["tst00001"]["Lung opacity"] == 1
    assert std["tst00001"]["Arterial wall calcification"] == 1 and ext["tst00001"]["Arterial wall calcification"] == 0
    assert fv["tst00001"]["Coronary artery wall calcification"] == 1
    assert std["tst00002"]["Medical material"] == 1 and std["tst00002"]["Lung nodule"] == 1
    assert "Medical material" not in fv["tst00002"]
    assert ext["tst00003"]["Mosaic attenuation pattern"] == 1 and std["tst00003"]["Lymphadenopathy"] == 1
    assert std["tst00003"]["Pulmonary fibrotic sequela"] == 1 and fv["tst00003"]["Pulmonary fibrotic sequela"] == 0
    # bad input: a value other than 0/1, a mapping needing an absent column, an unknown mapping
    bad = _label_rows({"tst1": {}})
    bad[0]["stent"] = "2"
    with pytest.raises(ValueError, match="stent = '2' is not 0 or 1"):
        rcl.read_labels(_write_csv(tmp_path / "bad.csv", [rcl.KEY, *rcl.ABNORMALITIES], bad))
    with pytest.raises(ValueError, match="air_trapping"):
        rcl.map_labels({"x": {c: 0 for c in rcl.ABNORMALITIES if c != "air_trapping"}}, "extended")
    with pytest.raises(ValueError, match="unknown Rad-ChestCT label mapping"):
        rcl.map_labels(a, "ct-clip")


def test_orientation_checks_on_a_real_ct(real_rc):
    ct, lab = real_rc
    # the real scan (upper abdomen with the lung bases) in the Rad-ChestCT convention: superior at slice 0
    assert orientation.superior_end_from_hu(ct).superior == "start"
    assert orientation.superior_end_from_labels(lab).superior == "start"
    assert orientation.superior_end_from_hu(ct[::-1]).superior == "end"
    assert orientation.superior_end_from_labels(lab[::-1]).superior == "end"
    assert orientation.superior_end_from_hu(np.full((8, 8, 8), -1000, np.int16)).superior is None
    arr, flipped, chk = rc.orient(ct[::-1].copy(), "check", "tst0")
    assert flipped and chk.superior == "end"
    np.testing.assert_array_equal(arr, ct)
    assert rc.orient(ct, "check")[1] is False and rc.orient(ct, "documented")[1] is False
    assert rc.orient(ct, "flip")[1] is True
    g = rc.geometry()
    assert g.spacing == (0.8, 0.8, 0.8) and g.direction == (1, 0, 0, 0, 1, 0, 0, 0, -1)


def test_orientation_checks_on_a_synthetic_chest():
    """A whole chest (fvlm.synth's phantom: trachea, lungs, heart, liver; slice 0 inferior) in the release's
    layout: the airway cue finds the superior end, and the labels agree."""
    from fvlm.synth import generate_case

    case = generate_case(2, labels=[], size="demo")
    hu = np.clip(case.hu[::-1], -1000, 1000)  # slice 0 superior, as the release stores it
    chk = orientation.superior_end_from_hu(hu, spacing_mm=case.spacing[0])
    assert chk.superior == "start" and chk.evidence["cue"] == "airway"
    assert orientation.superior_end_from_hu(hu[::-1], spacing_mm=case.spacing[0]).superior == "end"
    lab = orientation.superior_end_from_labels(case.label_map[::-1])
    assert lab.superior == "start" and lab.evidence["lungs_complete"] and len(lab.evidence) == 3


def test_convert_then_preprocess_pairs(real_rc, tmp_path, capsys):
    ct, lab = real_rc
    npz = tmp_path / "npz"
    npz.mkdir()
    np.savez_compressed(npz / "tst00001.npz", ct=ct)
    np.savez_compressed(npz / "tst00002.npz", ct=ct[::-1])  # stored upside down: the check flips it
    np.savez_compressed(npz / "tst00003.npz", volume=ct)  # wrong key
    np.savez_compressed(npz / "tst00004.npz", ct=ct)  # no label row
    truth = {"tst00001": {"nodule": 1, "stent": 1}, "tst00002": {"emphysema": 1}, "tst00003": {},
             "tst09999": {"hernia": 1}}
    labels = _write_csv(tmp_path / "imgtest_labels.csv", [rcl.KEY, *rcl.ABNORMALITIES], _label_rows(truth))
    out = tmp_path / "rc"
    code = main(["radchestct", "--npz-dir", str(npz), "--labels", str(labels), "--mapping", "standard",
                 "--out", str(out)])
    assert code == 1  # tst00003 failed, the others converted
    assert "tst00003.npz: no 'ct' array" in capsys.readouterr().err
    a, b = read_nifti(out / "images" / "tst00001.nii.gz"), read_nifti(out / "images" / "tst00002.nii.gz")
    np.testing.assert_array_equal(a.array, ct)
    np.testing.assert_array_equal(b.array, ct)  # flipped back
    assert a.geometry.spacing == pytest.approx((0.8, 0.8, 0.8))
    np.testing.assert_allclose(a.geometry.direction, rc.DIRECTION, atol=1e-6)
    with open(out / "conversion.csv", newline="") as f:
        conv = {r["volume"]: r for r in csv.DictReader(f)}
    assert list(conv) == ["tst00001", "tst00002", "tst00003"]  # tst00004 has no label row
    assert conv["tst00001"]["flipped"] == "False" and conv["tst00002"]["flipped"] == "True"
    assert conv["tst00003"]["status"] == "failed" and conv["tst00001"]["split"] == "imgtest"
    with open(out / "pairs.csv", newline="") as f:
        pairs = list(csv.DictReader(f))
    assert [(p["volume"], p["image"], p["label"], p["split"]) for p in pairs] == [
        ("tst00001", "images/tst00001.nii.gz", "masks/tst00001.nii.gz", "imgtest"),
        ("tst00002", "images/tst00002.nii.gz", "masks/tst00002.nii.gz", "imgtest")]
    with open(out / "labels_standard.csv", newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == ["VolumeName", *rcl.MAPPINGS["standard"]]  # unmapped labels absent, not 0
    assert [r["VolumeName"] for r in rows] == ["tst00001.nii.gz", "tst00002.nii.gz"]
    assert rows[0]["Lung nodule"] == "1" and rows[0]["Medical material"] == "1" and rows[0]["Emphysema"] == "0"
    assert rows[1]["Emphysema"] == "1"

    # label maps (as fvlm segment --pairs would write them): an upright one and an upside-down one
    (out / "masks").mkdir()
    write_nifti(out / "masks" / "tst00001.nii.gz", lab, rc.geometry())
    write_nifti(out / "masks" / "tst00002.nii.gz", lab[::-1].copy(), rc.geometry())
    code = main(["radchestct", "--npz-dir", str(npz), "--labels", str(labels), "--mapping", "extended",
                 "--out", str(out)])
    assert code == 1
    with open(out / "conversion.csv", newline="") as f:
        conv = {r["volume"]: r for r in csv.DictReader(f)}
    assert conv["tst00001"]["status"] == "skipped"  # converted before
    assert conv["tst00002"]["status"] == "failed" and "upside down" in conv["tst00002"]["error"]
    with open(out / "labels_extended.csv", newline="") as f:
        assert next(csv.reader(f)) == ["VolumeName", *CT_RATE_LABELS]

    processed = tmp_path / "processed"
    code = main(["preprocess", "--pairs", str(out / "pairs.csv"), "--out", str(processed), "--config", "tiny",
                 "--set", "data.spacing=[3.0,3.0,6.0]", "--set", "data.crop_size=[8,16,16]"])
    assert code == 0
    v = store.open_volume(processed, "imgtest", "tst00001", mmap=False)
    assert v.meta["anatomies"]["lung"]["voxels"] > 0 and v.meta["anatomies"]["aorta"]["voxels"] > 0
    assert v.meta["source"]["spacing"] == pytest.approx([0.8, 0.8, 0.8])
