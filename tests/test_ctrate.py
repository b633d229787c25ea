"""CT-RATE names, paths, CSV readers (against the real validation metadata and labels), v1/v2 detection."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from fvlm.data import ctrate, ctrate_reports, joblist, v1fix
from fvlm.data.store import Geometry
from fvlm.labels import CT_RATE_LABELS


@pytest.fixture(scope="module")
def real_metadata(real_data):
    return ctrate.read_metadata(real_data / "ct_rate" / "valid_metadata.csv")


def test_parse_volume_name():
    v = ctrate.parse_volume_name("valid_53_a_1")
    assert (v.split, v.patient, v.scan, v.reconstruction) == ("valid", 53, "a", 1)
    assert v.scan_id == "valid_53_a" and v.name == "valid_53_a_1" and v.patient_id == "valid_53"
    assert v.relpath == "valid_53/valid_53_a/valid_53_a_1.nii.gz"
    assert ctrate.parse_volume_name("/x/y/train_11755_a_3.nii.gz").scan_id == "train_11755_a"
    for bad in ("valid_53_a", "valid_x_a_1", "valid_53_a_1_2", "", "53_a_1"):
        with pytest.raises(ValueError, match="not a CT-RATE volume name"):
            ctrate.parse_volume_name(bad)
    names = ["train_10_a_1", "train_2_b_1", "train_2_a_10", "train_2_a_2", "zzz"]
    assert sorted(names, key=ctrate.natural_key) == ["train_2_a_2", "train_2_a_10", "train_2_b_1", "train_10_a_1",
                                                      "zzz"]


def test_paths(tmp_path):
    root = tmp_path
    assert ctrate.volume_path(root, "valid_53_a_1") == root / "dataset/valid/valid_53/valid_53_a/valid_53_a_1.nii.gz"
    fixed = root / "dataset/valid_fixed/valid_53/valid_53_a/valid_53_a_1.nii.gz"
    fixed.parent.mkdir(parents=True)
    fixed.write_bytes(b"")
    assert ctrate.volume_path(root, "valid_53_a_1") == fixed  # only the v2 download exists
    assert ctrate.mask_path(root, "valid_53_a_1") == root / "dataset/valid_mask/valid_53/valid_53_a/valid_53_a_1.nii.gz"
    assert ctrate.metadata_path(root, "valid") == root / "metadata/validation_metadata.csv"
    assert ctrate.metadata_path(root, "train") == root / "metadata/train_metadata.csv"
    assert ctrate.reports_path(root, "valid") == root / "radiology_text_reports/validation_reports.csv"
    assert ctrate.labels_path(root, "valid") == root / "multi_abnormality_labels/valid_predicted_labels.csv"
    # find_volumes: natural order, _fixed wins over the v1 copy, foreign names ignored
    plain = root / "dataset/valid/valid_53/valid_53_a/valid_53_a_1.nii.gz"
    plain.parent.mkdir(parents=True)
    plain.write_bytes(b"")
    other = root / "dataset/valid/valid_7/valid_7_b/valid_7_b_2.nii.gz"
    other.parent.mkdir(parents=True)
    other.write_bytes(b"")
    (root / "dataset/valid/readme.nii.gz").write_bytes(b"")
    found = ctrate.find_volumes(root, "valid")
    assert list(found) == ["valid_7_b_2", "valid_53_a_1"]
    assert found["valid_53_a_1"] == fixed and found["valid_7_b_2"] == other


def test_real_metadata(real_metadata):
    md = real_metadata
    assert len(md) == 3039
    assert all(not m.problems for m in md.values())  # every real row parses
    m = md["valid_1_a_1"]
    assert m.spacing == (0.341796875, 0.341796875, 1.5)
    assert m.position == (-166.0, 9.0, 56.2998657)
    assert m.direction == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    assert (m.intercept, m.slope, m.kernel, m.series_description) == (-1024.0, 1.0, "YA", "HRCT")
    assert (m.rows, m.columns, m.slices) == (1024, 1024, 251)
    g = m.fix_geometry()
    assert g.spacing == (0.341796875, 0.341796875, 1.5) and g.origin == (-166.0, 9.0, 56.2998657)
    # "[1.000000, ..., -0.000000]" orientation and 6-decimal lists
    m19 = md["valid_19_a_1"]
    assert m19.direction == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    assert m19.xy_spacing == (0.49349, 0.49349) and m19.position == (-196.2, -189.5, -718.400024)
    assert md["valid_2_a_1"].kernel == "Bl57d"  # "['Bl57d', '3']"
    assert {m.intercept for m in md.values()} == {-1024.0, -8192.0}
    assert md["valid_5_a_1"].intercept == -8192.0
    assert md["valid_106_a_4"].series_description is None  # empty cell -> None


def _write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def test_bad_metadata_rows_never_crash(tmp_path, real_data):
    with open(real_data / "ct_rate" / "valid_metadata.csv", newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames
        template = next(reader)
    rows = []
    for name, changes in [
        ("train_11755_a_3.nii.gz", {"ZSpacing": ""}),
        ("train_1_a_1.nii.gz", {"XYSpacing": "[abc, 0.5]", "RescaleIntercept": "n/a"}),
        ("train_2_a_1.nii.gz", {"ImageOrientationPatient": "[1, 0, 0, 0, 1]", "ImagePositionPatient": "[1, 2]"}),
        ("train_3_a_1.nii.gz", {"ImageOrientationPatient": "[1, 0, 0, 1, 0, 0]", "ZSpacing": "-1"}),
        ("", {}),
    ]:
        rows.append([name if c == "VolumeName" else changes.get(c, template[c]) for c in header])
    path = tmp_path / "train_metadata.csv"
    _write_csv(path, header, rows)
    md = ctrate.read_metadata(path)
    assert list(md) == ["train_11755_a_3", "train_1_a_1", "train_2_a_1", "train_3_a_1"]
    m = md["train_11755_a_3"]
    assert m.z_spacing is None and m.spacing is None and m.problems == ()
    with pytest.raises(ValueError, match="ZSpacing"):
        m.fix_geometry()
    m = md["train_1_a_1"]
    assert m.xy_spacing is None and m.intercept is None
    assert any(p.startswith("XYSpacing") for p in m.problems) and any("RescaleIntercept" in p for p in m.problems)
    with pytest.raises(ValueError, match="XYSpacing"):
        m.fix_geometry()
    m = md["train_2_a_1"]
    assert m.orientation is None and m.position is None and len(m.problems) == 2
    m = md["train_3_a_1"]
    assert m.orientation is None and m.z_spacing is None  # parallel cosines and a negative spacing
    with pytest.raises(FileNotFoundError, match="nowhere.csv"):
        ctrate.read_metadata(tmp_path / "nowhere.csv")


def test_direction_from_orientation():
    # rows along patient posterior (y), columns along left (x): a transposed acquisition
    d = np.asarray(ctrate.direction_from_orientation((0, 1, 0, 1, 0, 0))).reshape(3, 3)
    np.testing.assert_allclose(d[:, 0], [0, 1, 0])
    np.testing.assert_allclose(d[:, 1], [1, 0, 0])
    np.testing.assert_allclose(d[:, 2], [0, 0, -1])  # row x column
    with pytest.raises(ValueError, match="orthonormal"):
        ctrate.direction_from_orientation((1, 0, 0, 1, 0, 0))


def test_reports_and_labels(tmp_path, real_data):
    labels = ctrate_reports.read_labels(real_data / "ct_rate" / "valid_labels.csv")
    assert len(labels) == 3039
    assert labels["valid_1_a_1"].shape == (18,) and labels["valid_1_a_1"].dtype == np.int8
    assert labels["valid_1_a_1"][CT_RATE_LABELS.index("Lung nodule")] == 1
    path = tmp_path / "labels.csv"
    _write_csv(path, ["VolumeName", *CT_RATE_LABELS], [["valid_1_a_1.nii.gz", *([0] * 17), 2]])
    with pytest.raises(ValueError, match="line 2"):
        ctrate_reports.read_labels(path)
    path = tmp_path / "reports.csv"
    _write_csv(path, ["VolumeName", *ctrate_reports.REPORT_COLUMNS],
               [["valid_1_a_1.nii.gz", "Not given.", "Non-contrast CT.", "Lungs clear.\nHeart normal.", "Normal."]])
    r = ctrate_reports.read_reports(path)["valid_1_a_1"]
    assert r.clinical_information == "" and r.findings == "Lungs clear.\nHeart normal." and r.impressions == "Normal."


def test_rescale():
    stored = np.array([0, 24, 7192, 9000], dtype=np.uint16)
    np.testing.assert_array_equal(v1fix.rescale(stored, 1.0, -1024.0), [-1024, -1000, 6168, 7976])
    np.testing.assert_array_equal(v1fix.rescale(stored, 1.0, -8192.0), [-8192, -8168, -1000, 808])
    assert v1fix.rescale(stored, 1.0, -8192.0).dtype == np.int16


def _hu_phantom(rng):
    """(z, y, x) HU: air outside a soft-tissue body with lungs, and -3024 padding in the corners."""
    hu = np.full((20, 40, 40), 40.0) + rng.normal(0, 15, (20, 40, 40))
    hu[:, :8] = -1000 + rng.normal(0, 10, (20, 8, 40))
    hu[:, 15:30, 5:18] = -850 + rng.normal(0, 30, (20, 15, 13))
    hu[:, :3, :3] = -3024
    return np.rint(hu).astype(np.int16)


def test_detect_version(real_metadata):
    rng = np.random.default_rng(0)
    hu = _hu_phantom(rng)
    md = real_metadata["valid_1_a_1"]  # intercept -1024, spacing (0.34, 0.34, 1.5)
    md8192 = real_metadata["valid_5_a_1"]  # intercept -8192
    v1_header = Geometry((1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    v2_header = Geometry(md.spacing, md.position)
    for meta in (md, md8192):
        raw = (hu.astype(np.int32) - int(meta.intercept)).astype(np.int32)  # stored values of a v1 volume
        d = v1fix.detect_version(v1_header, v1fix.value_statistics(raw), meta)
        assert d.version == "v1" and d.reason == "auto"
        assert d.evidence["header_says"] == "v1" and d.evidence["values_say"] == "v1"
    d = v1fix.detect_version(Geometry(md.spacing, md.position), v1fix.value_statistics(hu), md)
    assert d.version == "v2" and d.evidence["header_says"] == "v2" and d.evidence["values_say"] == "v2"
    # values alone decide when the header is ambiguous (metadata spacing of 1 mm)
    one_mm = ctrate.VolumeMetadata("x", (1.0, 1.0), 1.0)
    assert v1fix.detect_version(v1_header, v1fix.value_statistics(hu), one_mm).version == "v2"
    assert v1fix.detect_version(v1_header, v1fix.value_statistics(hu + 1024), one_mm).version == "v1"
    # conflict: a fixed header over raw values (e.g. rescaled twice / not at all) is refused
    with pytest.raises(ValueError, match="conflicting"):
        v1fix.detect_version(v2_header, v1fix.value_statistics(hu + 1024), md)
    # inconclusive values and header
    flat = np.full((8, 8, 8), -300, dtype=np.int16)
    flat[0, 0, 0] = -350
    with pytest.raises(ValueError, match="cannot tell"):
        v1fix.detect_version(v1_header, v1fix.value_statistics(flat), one_mm)
    # forced
    d = v1fix.detect_version(v2_header, v1fix.value_statistics(hu + 1024), md, forced="v1")
    assert (d.version, d.reason) == ("v1", "forced")


def test_select_reconstructions(real_metadata):
    names = [n for n in real_metadata if n.startswith(("valid_109_a_", "valid_106_a_", "valid_1_a_"))]
    assert joblist.select_reconstructions(names, real_metadata, None) == sorted(names, key=ctrate.natural_key)
    one = joblist.select_reconstructions(names, real_metadata, 1)
    # HRCT (Philips YA) and PARANKIM (parenchyma) are lung reconstructions; valid_1_a: both HRCT, larger first
    assert one == ["valid_1_a_1", "valid_106_a_3", "valid_109_a_3"]
    two = joblist.select_reconstructions(names, real_metadata, 2)
    assert "valid_109_a_5" in two and "valid_109_a_1" not in two  # then the larger volume (474 vs 209 slices)
    assert len(two) == 6
    assert joblist.reconstruction_preference(real_metadata["valid_2_a_1"]) == 2  # "Thorax Lung ... Bl57"
    assert joblist.reconstruction_preference(None) == 0
