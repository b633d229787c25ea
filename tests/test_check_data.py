"""fvlm check-data on a small CT-RATE root built around the REAL validation metadata and labels CSVs."""

from __future__ import annotations

import csv
import json
import logging
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fvlm.cli import main
from fvlm.data import check, ctrate

SHAPE = (12, 16, 16)  # (z, y, x) of the tiny volumes


def _phantom() -> np.ndarray:
    """(z, y, x) HU int16: air outside, a soft-tissue body with two lungs inside."""
    z, y, x = np.mgrid[0 : SHAPE[0], 0 : SHAPE[1], 0 : SHAPE[2]]
    hu = np.full(SHAPE, -1000, dtype=np.int16)
    hu[((x - 7.5) / 7) ** 2 + ((y - 7.5) / 6) ** 2 < 1] = 30
    for cx in (4.5, 10.5):
        hu[((x - cx) / 2) ** 2 + ((y - 7.5) / 3.5) ** 2 < 1] = -850
    return hu


def _write(path: Path, arr_zyx: np.ndarray, affine: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(np.ascontiguousarray(arr_zyx.transpose(2, 1, 0)), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))


def _true_affine(meta: ctrate.VolumeMetadata) -> np.ndarray:
    """RAS affine of the metadata geometry (what a v2 header carries)."""
    g = meta.fix_geometry()
    lps = np.eye(4)
    lps[:3, :3] = g.matrix * np.asarray(g.spacing)
    lps[:3, 3] = g.origin
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


V1 = ["valid_1_a_1", "valid_1_a_2", "valid_3_a_1"]  # raw values under the default (identity) header
V2 = ["valid_2_a_1", "valid_2_a_2"]  # HU with the true header, in valid_fixed
BLANK_Z = "valid_4_a_1"  # v1 on disk, ZSpacing blanked in the metadata: header inconclusive, values decide
TRUNCATED = "valid_5_a_1"  # v1, file cut in half: header fine, values unreadable
NOT_LISTED = "valid_99999_a_1"  # on disk, in no CSV
NO_CHEST = ["valid_3_a_1", "valid_7_a_1"]  # listed in no_chest_valid.txt; the first is on disk


@pytest.fixture(scope="module")
def root(tmp_path_factory, real_data) -> Path:
    root = tmp_path_factory.mktemp("ctrate_check")
    (root / "metadata").mkdir()
    (root / "multi_abnormality_labels").mkdir()
    shutil.copy(real_data / "ct_rate" / "valid_labels.csv", root / "multi_abnormality_labels" /
                "valid_predicted_labels.csv")
    with open(real_data / "ct_rate" / "valid_metadata.csv", newline="") as f:
        reader = csv.DictReader(f)
        fields, rows = reader.fieldnames, list(reader)
    on_disk = set(V1 + V2 + [BLANK_Z, TRUNCATED])
    for r in rows:
        name = ctrate.strip_extension(r["VolumeName"])
        if name in on_disk and name != "valid_1_a_2":  # valid_1_a_2 keeps its real shape: a shape mismatch
            r["Rows"], r["Columns"], r["NumberofSlices"] = str(SHAPE[1]), str(SHAPE[2]), str(SHAPE[0])
        if name == BLANK_Z:
            r["ZSpacing"] = ""
    with open(root / "metadata" / "validation_metadata.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    meta = ctrate.read_metadata(root / "metadata" / "validation_metadata.csv")
    hu = _phantom()
    for n in [*V1, BLANK_Z, TRUNCATED]:
        raw = (hu.astype(np.int32) - int(meta[n].intercept)).astype(np.int16)
        _write(ctrate.volume_path(root, n, fixed=False), raw, np.eye(4))
    for n in V2:
        _write(ctrate.volume_path(root, n, fixed=True), hu, _true_affine(meta[n]))
    _write(ctrate.volume_path(root, NOT_LISTED, fixed=False), hu, np.eye(4))
    p = ctrate.volume_path(root, TRUNCATED)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    (root / "metadata" / "no_chest_valid.txt").write_text("".join(f"{n}.nii.gz\n" for n in NO_CHEST))
    texts = root / "anatomy_texts"
    texts.mkdir()
    desc = {"valid_1_a": {"lung": "Nodule.", "heart": "Normal."},
            "valid_2_a": {"lung": "Clear.", "aorta": "Calcified."}}
    (texts / "desc_info.json").write_text(json.dumps(desc))
    (texts / "conc_info.json").write_text(json.dumps({"valid_1_a": {"lung": "Nodule."}}))
    # label maps: one good, one with the wrong shape
    _write(ctrate.mask_path(root, "valid_1_a_1"), np.zeros(SHAPE, np.uint8), np.eye(4))
    _write(ctrate.mask_path(root, "valid_2_a_1"), np.zeros((SHAPE[0] - 1, *SHAPE[1:]), np.uint8), np.eye(4))
    return root


@pytest.fixture(scope="module")
def report(root, tmp_path_factory) -> tuple[dict, int]:
    out = tmp_path_factory.mktemp("report") / "report.json"
    rc = main(["check-data", str(root), "--json", str(out)])
    return json.loads(out.read_text()), rc


def test_exit_zero_and_counts_from_the_real_csvs(report):
    rep, rc = report
    assert rc == 0  # a report, even with problems
    v = rep["splits"]["valid"]
    assert list(rep["splits"]) == ["valid"]
    # the official validation split: 1,304 patients, 1,564 scans, 3,039 volumes
    assert v["listed"] == {"patients": 1304, "scans": 1564, "volumes": 3039}
    assert v["metadata"]["rows"] == 3039 and v["labels"]["rows"] == 3039
    assert not v["reports"]["exists"]
    assert v["on_disk"]["volumes"] == 8 and v["on_disk"]["in_fixed_folder"] == 2
    assert v["on_disk"]["patients"] == 6  # valid_1..5 and valid_99999
    assert v["on_disk"]["reconstructions_per_scan"] == {"1": 4, "2": 2}
    assert len(v["missing_on_disk"]) == 3039 - 7 and "valid_6_a_1" in v["missing_on_disk"]
    assert v["not_in_metadata"] == [NOT_LISTED] and v["not_in_labels"] == [NOT_LISTED]


def test_metadata_problems(report):
    v = report[0]["splits"]["valid"]
    assert v["metadata"]["empty"] == {"ZSpacing": [BLANK_Z]}
    assert [m["volume"] for m in v["shape_mismatch"]] == ["valid_1_a_2"]
    assert v["shape_mismatch"][0]["metadata_xyz"][0] in (512, 1024)
    assert any("empty ZSpacing" in p for p in v["problems"])


def test_versions_from_headers_and_values(report):
    v = report[0]["splits"]["valid"]
    vols = v["versions"]["volumes"]
    c = v["versions"]["counts"]
    # v1: three + the blanked one (its values decide); v2: the two fixed ones + the unlisted one (no metadata:
    # its HU values decide)
    assert v["versions"]["mixed"] is True
    assert vols[BLANK_Z]["version"] == "v1" and vols[BLANK_Z]["values_read"] == "yes"
    assert "header+values" in vols[BLANK_Z]["reason"]
    assert vols[TRUNCATED]["version"] == "unreadable" and "truncated" in vols[TRUNCATED]["reason"]
    assert vols[NOT_LISTED]["version"] == "v2"  # HU values, no metadata: decided from values only
    assert c["v1"] == 4 and c["v2"] == 3 and c["unreadable"] == 1 and c["conflict"] == 0
    assert v["values_read"]["inconclusive_headers"] == 2  # BLANK_Z and NOT_LISTED
    assert any("v1/v2 mix" in p for p in v["problems"])


@pytest.fixture(scope="module")
def headers_only(root) -> tuple[check.DataCheck, str]:
    """check_data with headers only and the extended table, and what it logged."""
    import io

    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    logger = logging.getLogger("fvlm")
    old = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        rep = check.check_data(root, sample=0, anatomy_table="extended")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)
    return rep, buf.getvalue()


def test_headers_only_leaves_inconclusive_volumes_unknown(headers_only):
    rep, logged = headers_only
    v = rep.splits["valid"]
    assert v.values_read["volumes"] == 0
    assert v.versions["counts"] == {"v1": 4, "v2": 2, "unknown": 2, "conflict": 0, "unreadable": 0}
    assert v.versions["volumes"][BLANK_Z]["version"] == "unknown"
    assert any("raise --sample" in p for p in v.problems)
    # the summary is logged readably
    assert "versions: 4 v1, 2 v2, 2 unknown" in logged


def test_no_chest_texts_and_masks(report):
    v = report[0]["splits"]["valid"]
    assert v["no_chest"]["listed"] == 2 and v["no_chest"]["on_disk"] == ["valid_3_a_1"]
    at = v["anatomy_texts"]
    assert at["scans_on_disk"] == 6
    assert at["scans_without_texts"] == ["valid_3_a", "valid_4_a", "valid_5_a", "valid_99999_a"]
    assert at["anatomy_keys"] == {"aorta": 1, "heart": 1, "lung": 3}
    assert at["table_anatomies_without_text"] == ["esophagus"]
    m = v["masks"]
    assert m["present"] == 2 and len(m["missing"]) == 6
    assert [x["volume"] for x in m["mismatched"]] == ["valid_2_a_1"]


def test_extended_table_flags_anatomies_without_texts(headers_only):
    rep = headers_only[0]
    missing = rep.splits["valid"].anatomy_texts["table_anatomies_without_text"]
    assert missing == ["esophagus", "trachea", "mediastinum", "bones"]


def test_unusable_root_exit_code(tmp_path):
    assert main(["check-data", str(tmp_path / "nope")]) == 2
    (tmp_path / "empty").mkdir()
    assert main(["check-data", str(tmp_path / "empty")]) == 2


def test_read_volume_list(tmp_path):
    p = tmp_path / "l.txt"
    p.write_text("# comment\nvalid_1_a_1.nii.gz\n\nvalid_2_a_1, valid_1_a_1\n'valid_3_a_2'\n")
    assert ctrate.read_volume_list(p) == ["valid_1_a_1", "valid_2_a_1", "valid_3_a_2"]
