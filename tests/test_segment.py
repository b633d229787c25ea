"""fvlm segment with a stand-in TotalSegmentator executable: exact arguments, the v1 fix before segmentation,
placement, atomic outputs, resume, failures and timeouts, and the maps going through fvlm preprocess."""

from __future__ import annotations

import csv
import json
import os
import shutil
import stat
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fvlm.anatomy import load_anatomy_table
from fvlm.cli import main
from fvlm.data import ctrate, store
from fvlm.data.volume import read_nifti
from fvlm.segment import roi_subset, totalseg_arguments
from fvlm.totalseg import CLASS_IDS

SPACING = (1.5, 1.5, 3.0)
ORIGIN = (-30.0, -30.0, 80.0)
SHAPE = (16, 40, 40)  # (z, y, x)
RELEASED_ROI = ["lung_upper_lobe_left", "lung_lower_lobe_left", "lung_upper_lobe_right", "lung_middle_lobe_right",
                "lung_lower_lobe_right", "esophagus", "heart", "aorta", "atrial_appendage_left"]

# A stand-in for the TotalSegmentator CLI: records its arguments and what it was given, fails or hangs on request,
# and writes a label map with the input's geometry (lung density -> left/right upper lobe, soft tissue -> heart).
STANDIN = '''#!{python}
import json, os, sys, time
import nibabel as nib
import numpy as np
args = sys.argv[1:]
inp, out = args[args.index("-i") + 1], args[args.index("-o") + 1]
img = nib.load(inp)
hu = np.asarray(img.dataobj)
with open(os.environ["STANDIN_LOG"], "a") as f:
    f.write(json.dumps({{"args": args, "zooms": [float(z) for z in img.header.get_zooms()[:3]],
                        "min": float(hu.min()), "max": float(hu.max())}}) + "\\n")
name = os.path.basename(inp)
if os.environ.get("STANDIN_FAIL", "@") in name:
    with open(out, "wb") as f:
        f.write(b"\\x1f\\x8b partial")  # a half-written file must never become the output
    sys.stderr.write("RuntimeError: CUDA out of memory (stand-in)\\n")
    sys.exit(3)
if os.environ.get("STANDIN_SLEEP", "@") in name:
    time.sleep(60)
lab = np.zeros(hu.shape, dtype=np.uint8)
lung = (hu >= -950) & (hu < -500)
half = hu.shape[0] // 2  # nibabel order (x, y, z): x < half is the patient's right in RAS terms
lab[:half][lung[:half]] = {right}
lab[half:][lung[half:]] = {left}
lab[hu > -200] = {heart}
if os.environ.get("STANDIN_GARBAGE", "@") in name:
    lab = lab[:, :, 1:]  # wrong shape, exit code 0: fvlm must refuse it
nib.save(nib.Nifti1Image(lab, img.affine), out)
'''


def _phantom() -> np.ndarray:
    z, y, x = np.mgrid[0 : SHAPE[0], 0 : SHAPE[1], 0 : SHAPE[2]].astype(np.float32)
    hu = np.full(SHAPE, -1000, dtype=np.int16)
    hu[((x - 19.5) / 18) ** 2 + ((y - 19.5) / 15) ** 2 < 1] = 40
    for cx in (11.0, 28.0):
        hu[(((x - cx) / 6) ** 2 + ((y - 19.5) / 10) ** 2 < 1) & (z > 1) & (z < SHAPE[0] - 2)] = -850
    return hu


def _write(path: Path, arr_zyx: np.ndarray, geometry: bool) -> None:
    """v1 (geometry=False: the default identity header) or v2 (the true LPS geometry as a RAS affine)."""
    if geometry:
        ras = np.diag([-SPACING[0], -SPACING[1], SPACING[2], 1.0])
        ras[:3, 3] = [-ORIGIN[0], -ORIGIN[1], ORIGIN[2]]
    else:
        ras = np.eye(4)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(np.ascontiguousarray(arr_zyx.transpose(2, 1, 0)), ras)
    img.set_qform(ras, code=1)
    img.set_sform(ras, code=1)
    nib.save(img, str(path))


V1 = {"valid_1_a_1": -8192, "valid_3_a_1": -1024, "valid_4_a_1": -1024, "valid_5_a_1": -1024}
V2 = ["valid_2_a_1"]
FAILS, HANGS, NO_CHEST = "valid_3_a_1", "valid_4_a_1", "valid_5_a_1"


@pytest.fixture(scope="module")
def standin(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("bin")
    p = d / "TotalSegmentator"
    p.write_text(STANDIN.format(python=sys.executable, right=CLASS_IDS["lung_upper_lobe_right"],
                                left=CLASS_IDS["lung_upper_lobe_left"], heart=CLASS_IDS["heart"]))
    p.chmod(p.stat().st_mode | stat.S_IXUSR)
    return p


@pytest.fixture(scope="module")
def root(tmp_path_factory, real_data) -> Path:
    root = tmp_path_factory.mktemp("ctrate_seg")
    with open(real_data / "ct_rate" / "valid_metadata.csv", newline="") as f:
        reader = csv.DictReader(f)
        fields, template = reader.fieldnames, next(reader)
    hu = _phantom()
    rows = []
    for name, intercept in [*V1.items(), *((n, -1024) for n in V2)]:
        if name in V2:
            _write(ctrate.volume_path(root, name, fixed=True), hu, geometry=True)
        else:
            _write(ctrate.volume_path(root, name, fixed=False), (hu.astype(np.int32) - intercept).astype(np.int16),
                   geometry=False)
        rows.append({**template, "VolumeName": f"{name}.nii.gz", "XYSpacing": f"[{SPACING[0]}, {SPACING[1]}]",
                     "ZSpacing": str(SPACING[2]), "ImagePositionPatient": f"[{ORIGIN[0]}, {ORIGIN[1]}, {ORIGIN[2]}]",
                     "ImageOrientationPatient": "[1, 0, 0, 0, 1, 0]", "RescaleIntercept": str(intercept),
                     "RescaleSlope": "1"})
    (root / "metadata").mkdir()
    with open(root / "metadata" / "validation_metadata.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    (root / "metadata" / "no_chest_valid.txt").write_text(f"{NO_CHEST}.nii.gz\n")
    return root


def _calls(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


@pytest.fixture(scope="module")
def first_run(root, standin, tmp_path_factory) -> tuple[int, list[dict]]:
    log = tmp_path_factory.mktemp("log") / "calls.jsonl"
    env = {"STANDIN_LOG": str(log), "STANDIN_FAIL": FAILS, "STANDIN_SLEEP": HANGS}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        rc = main(["segment", "--data", str(root), "--split", "valid", "--totalseg-cmd", str(standin), "--fast",
                   "--device", "cpu", "--workers", "2", "--timeout", "5", "--exclude-no-chest"])
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    return rc, _calls(log)


def test_roi_subset_is_the_tables_classes():
    assert roi_subset(load_anatomy_table("released")) == RELEASED_ROI
    ext = roi_subset(load_anatomy_table("extended"))
    assert ext[:5] == RELEASED_ROI[:5] and "trachea" in ext and "superior_vena_cava" in ext and "sternum" in ext
    assert [CLASS_IDS[c] for c in ext] == sorted(CLASS_IDS[c] for c in ext)
    assert totalseg_arguments("in.nii", "out.nii.gz", ["heart", "aorta"], fast=True, device="gpu:1") == [
        "-i", "in.nii", "-o", "out.nii.gz", "--ml", "--task", "total", "--roi_subset", "heart", "aorta", "--fast",
        "--device", "gpu:1"]


def test_exact_arguments_and_fixed_input(first_run, root):
    rc, calls = first_run
    assert rc == 1  # one failure and one timeout
    by_name = {ctrate.strip_extension(Path(c["args"][1]).name): c for c in calls}
    assert set(by_name) == {*V1, *V2} - {NO_CHEST}  # the non-chest volume was excluded
    for name, c in by_name.items():
        a = c["args"]
        out = Path(a[3])
        final = ctrate.mask_path(root, name)
        assert a[0] == "-i" and a[2] == "-o"
        assert a[4:] == ["--ml", "--task", "total", "--roi_subset", *RELEASED_ROI, "--fast", "--device", "cpu"]
        # written next to the final path under a temporary name, then renamed
        assert out.parent == final.parent and out.name.startswith(f".{final.name}.") and out.name.endswith(".nii.gz")
        # TotalSegmentator always sees HU with the true spacing: v1 volumes were fixed into a temporary file
        assert c["zooms"] == pytest.approx(SPACING) and c["min"] == -1000 and c["max"] == 40
        if name in V2:
            assert Path(a[1]) == ctrate.volume_path(root, name)
        else:
            assert Path(a[1]) != ctrate.volume_path(root, name) and a[1].endswith(".nii")
            assert not Path(a[1]).exists()  # the temporary fixed volume is removed


def test_outputs_placement_failures_and_no_leftovers(first_run, root):
    for name in ("valid_1_a_1", "valid_2_a_1"):
        lab = read_nifti(ctrate.mask_path(root, name))
        assert lab.array.shape == SHAPE
        np.testing.assert_allclose(lab.geometry.spacing, SPACING, rtol=1e-5)
        np.testing.assert_allclose(lab.geometry.origin, ORIGIN, atol=1e-3)
        assert set(np.unique(lab.array)) == {0, CLASS_IDS["lung_upper_lobe_left"], CLASS_IDS["lung_upper_lobe_right"],
                                             CLASS_IDS["heart"]}
    for name in (FAILS, HANGS, NO_CHEST):
        assert not ctrate.mask_path(root, name).exists()
    leftovers = [p for p in (root / "dataset" / "valid_mask").rglob(".*") if p.is_file()]
    assert leftovers == []
    with open(root / "dataset" / "valid_mask" / "segment_failures.csv", newline="") as f:
        rows = {r["volume"]: r["error"] for r in csv.DictReader(f)}
    assert set(rows) == {FAILS, HANGS}
    assert "exited with code 3" in rows[FAILS] and "CUDA out of memory (stand-in)" in rows[FAILS]
    assert "timed out after 5 s" in rows[HANGS]


def test_resume_segments_only_what_is_missing(first_run, root, standin, tmp_path, monkeypatch):
    log = tmp_path / "calls.jsonl"
    monkeypatch.setenv("STANDIN_LOG", str(log))
    done = ctrate.mask_path(root, "valid_1_a_1")
    mtime = done.stat().st_mtime_ns
    rc = main(["segment", "--data", str(root), "--split", "valid", "--totalseg-cmd", str(standin),
               "--exclude-no-chest"])
    assert rc == 0
    assert sorted(ctrate.strip_extension(Path(c["args"][1]).name) for c in _calls(log)) == [FAILS, HANGS]
    assert done.stat().st_mtime_ns == mtime
    assert "--fast" not in _calls(log)[0]["args"] and "--device" not in _calls(log)[0]["args"]
    with open(root / "dataset" / "valid_mask" / "segment_failures.csv") as f:
        assert f.read().strip() == "split,volume,error"  # this run had no failure
    # a map that does not match its volume is redone
    _write(done, np.zeros((4, 4, 4), np.uint8), geometry=True)
    rc = main(["segment", "--data", str(root), "--split", "valid", "--totalseg-cmd", str(standin), "--limit", "1"])
    assert rc == 0 and read_nifti(done).array.shape == SHAPE


def test_bad_map_with_exit_code_zero_is_refused(root, standin, tmp_path, monkeypatch):
    monkeypatch.setenv("STANDIN_LOG", str(tmp_path / "calls.jsonl"))
    monkeypatch.setenv("STANDIN_GARBAGE", "valid_")
    out = tmp_path / "maps"
    pairs = tmp_path / "pairs.csv"
    pairs.write_text(f"volume,image,label\nv2vol,{ctrate.volume_path(root, 'valid_2_a_1')},{out / 'v2vol.nii.gz'}\n")
    rc = main(["segment", "--pairs", str(pairs), "--totalseg-cmd", str(standin)])
    assert rc == 1
    assert not (out / "v2vol.nii.gz").exists() and [p.name for p in out.iterdir()] == []
    with open(tmp_path / "pairs_segment_failures.csv", newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert row["volume"] == "v2vol" and "shape mismatch" in row["error"]


def test_totalsegmentator_not_found(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert main(["segment", "--data", str(tmp_path), "--split", "valid"]) == 2
    assert "TotalSegmentator not found" in capsys.readouterr().err
    assert main(["segment", "--data", str(tmp_path), "--split", "valid", "--totalseg-cmd", str(tmp_path / "x")]) == 2


def test_segmented_maps_go_through_preprocess(first_run, root, tmp_path):
    out = tmp_path / "processed"
    rc = main(["preprocess", "--data", str(root), "--split", "valid", "--out", str(out), "--config", "tiny",
               "--set", "data.spacing=[3.0,3.0,6.0]", "--set", "data.crop_size=[8,16,16]"])
    m = store.read_manifest(out)
    status = dict(zip(m["volume"], m["status"]))
    # every volume with a map is processed (v1 fixed and v2 alike); the non-chest one is left out, as in segment
    assert NO_CHEST not in status
    assert rc == (1 if "failed" in status.values() else 0)
    assert {n for n, s in status.items() if s == "ok"} == {*V1, *V2} - {NO_CHEST}
    a = store.open_volume(out, "valid", "valid_1_a_1", mmap=False)
    b = store.open_volume(out, "valid", "valid_2_a_1", mmap=False)
    np.testing.assert_array_equal(a.image, b.image)  # v1 (fixed) and v2 give the same volume
    np.testing.assert_array_equal(a.mask, b.mask)
    assert a.meta["anatomies"]["lung"]["voxels"] > 0 and a.meta["anatomies"]["heart"]["voxels"] > 0


def test_ctrate_root_flow_check_segment_preprocess(root, standin, tmp_path, monkeypatch):
    """A CT-RATE root with v1 (both intercepts) and v2 files, a no_chest list, a file missing on disk and a
    row without ZSpacing goes through check-data -> segment (stand-in) -> preprocess with the right outcome
    for each case (issue: real data sets at scale)."""
    r = tmp_path / "ctrate"
    shutil.copytree(root, r, ignore=shutil.ignore_patterns("valid_mask"))
    meta_csv = r / "metadata" / "validation_metadata.csv"
    with open(meta_csv, newline="") as f:
        reader = csv.DictReader(f)
        fields, rows = reader.fieldnames, list(reader)
    blank = "valid_4_a_1"  # a v1 volume whose row lost its ZSpacing (as train_11755_a_3 in CT-RATE)
    for row in rows:
        if row["VolumeName"] == f"{blank}.nii.gz":
            row["ZSpacing"] = ""
    rows.append({**rows[0], "VolumeName": "valid_6_a_1.nii.gz"})  # listed, never downloaded
    with open(meta_csv, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)

    report = tmp_path / "report.json"
    assert main(["check-data", str(r), "--json", str(report)]) == 0
    v = json.loads(report.read_text())["splits"]["valid"]
    assert v["missing_on_disk"] == ["valid_6_a_1"]
    assert v["metadata"]["empty"]["ZSpacing"] == [blank]
    assert v["no_chest"]["on_disk"] == [NO_CHEST]
    assert v["versions"]["mixed"] is True and v["versions"]["counts"]["v2"] == len(V2)

    monkeypatch.setenv("STANDIN_LOG", str(tmp_path / "calls.jsonl"))
    rc = main(["segment", "--data", str(r), "--split", "valid", "--totalseg-cmd", str(standin), "--device", "cpu"])
    assert rc == 1  # the row without ZSpacing cannot be fixed for TotalSegmentator: reported, others continue
    masks = {p.name.removesuffix(".nii.gz") for p in (r / "dataset" / "valid_mask").rglob("*.nii.gz")}
    assert masks == {*V1, *V2} - {NO_CHEST, blank}

    out = tmp_path / "processed"
    rc = main(["preprocess", "--data", str(r), "--split", "valid", "--out", str(out), "--config", "tiny",
               "--set", "data.spacing=[3.0,3.0,6.0]", "--set", "data.crop_size=[8,16,16]"])
    assert rc == 1
    m = store.read_manifest(out)
    status = dict(zip(m["volume"], m["status"]))
    assert status == {**{n: "ok" for n in masks}, blank: "failed"}  # no_chest and not-downloaded: not jobs
    failures = open(out / "failures.csv").read()
    assert blank in failures and "ZSpacing" in failures
