"""fvlm preprocess: the fused pass on real and tiny CT-RATE-format data, bad input, resume, shards, workers."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from fvlm.anatomy import load_anatomy_table
from fvlm.cli import main
from fvlm.config import load_config
from fvlm.data import ctrate, joblist, prepare, preprocess, store, volume
from fvlm.data.store import Geometry
from fvlm.totalseg import CLASS_IDS

# small target grid so that tiny phantoms stay tiny (crop sizes are multiples of the tiny preset's patch)
CFG = ["--config", "tiny", "--set", "data.spacing=[3.0,3.0,6.0]", "--set", "data.margin=[1,2,2]",
       "--set", "data.crop_size=[8,16,16]"]
SPACING = (1.5, 1.5, 3.0)  # source (x, y, z) mm
ORIGIN = (-36.0, -30.0, 100.0)  # ImagePositionPatient


# ------------------------------------------------------------------------------------------- fixtures
def write_nifti(path: Path, arr_zyx: np.ndarray, geometry: Geometry | None = None) -> Path:
    """Write a (z, y, x) array as NIfTI the way CT-RATE/TotalSegmentator files are laid out (LPS -> RAS affine).

    ``geometry=None`` writes the default header of a CT-RATE v1 volume (identity affine).
    """
    lps = np.eye(4)
    if geometry is not None:
        lps[:3, :3] = geometry.matrix * np.asarray(geometry.spacing)
        lps[:3, 3] = geometry.origin
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps if geometry is not None else np.eye(4)
    img = nib.Nifti1Image(np.ascontiguousarray(np.asarray(arr_zyx).transpose(2, 1, 0)), ras)
    img.set_qform(ras, code=1)
    img.set_sform(ras, code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))
    return path


def phantom(seed: int = 0, shape=(24, 48, 48)) -> tuple[np.ndarray, np.ndarray]:
    """A chest-like (z, y, x) LPS phantom: HU int16 and a TotalSegmentator-style label map uint8."""
    rng = np.random.default_rng(seed)
    d, h, w = shape
    z, y, x = np.mgrid[0:d, 0:h, 0:w].astype(np.float32)
    hu = np.full(shape, -1000.0, dtype=np.float32)
    label = np.zeros(shape, dtype=np.uint8)
    body = ((x - w / 2) / (0.45 * w)) ** 2 + ((y - h / 2) / (0.4 * h)) ** 2 < 1
    hu[body] = 30.0
    # x grows to the patient's left in LPS: right lung at low x, left lung at high x
    for cx, cls, lo in ((0.3 * w, "lung_upper_lobe_right", "lung_lower_lobe_right"),
                        (0.7 * w, "lung_upper_lobe_left", "lung_lower_lobe_left")):
        lung = (((x - cx) / (0.14 * w)) ** 2 + ((y - 0.5 * h) / (0.25 * h)) ** 2 < 1) & (z >= 3) & (z < d - 3)
        hu[lung] = -850.0
        label[lung & (z >= d // 2)] = CLASS_IDS[cls]
        label[lung & (z < d // 2)] = CLASS_IDS[lo]
    heart = (((x - 0.5 * w) / (0.09 * w)) ** 2 + ((y - 0.35 * h) / (0.12 * h)) ** 2
             + ((z - 0.4 * d) / (0.2 * d)) ** 2) < 1
    hu[heart] = 45.0
    label[heart] = CLASS_IDS["heart"]
    aorta = (((x - 0.55 * w) / 2.0) ** 2 + ((y - 0.62 * h) / 2.0) ** 2 < 1) & (z >= 2) & (z < d - 2)
    hu[aorta] = 50.0
    label[aorta] = CLASS_IDS["aorta"]
    eso = (((x - 0.47 * w) / 1.5) ** 2 + ((y - 0.68 * h) / 1.5) ** 2 < 1) & (z >= 2) & (z < d - 2)
    hu[eso] = 20.0
    label[eso] = CLASS_IDS["esophagus"]
    spine = ((x - 0.5 * w) / 3.0) ** 2 + ((y - 0.8 * h) / 3.0) ** 2 < 1
    hu[spine] = 700.0
    label[spine] = CLASS_IDS["vertebrae_T5"]  # a class no anatomy merges: background after merging
    hu += rng.normal(0, 12, shape).astype(np.float32)
    outside = ((x - w / 2) ** 2 + (y - h / 2) ** 2) > (0.5 * w) ** 2 + (0.5 * h) ** 2 - 10  # corners: no FOV
    hu[outside] = -3024.0
    return np.rint(hu).astype(np.int16), label


def _metadata_header(real_data: Path) -> tuple[list[str], dict[str, str]]:
    with open(real_data / "ct_rate" / "valid_metadata.csv", newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames), next(reader)


def _meta_row(template: dict[str, str], volume: str, intercept: int = -1024, series: str = "HRCT",
              z_spacing: str = "3.0", shape=(24, 48, 48)) -> dict[str, str]:
    return {**template, "VolumeName": f"{volume}.nii.gz", "XYSpacing": f"[{SPACING[0]}, {SPACING[1]}]",
            "ZSpacing": z_spacing, "ImagePositionPatient": f"[{ORIGIN[0]}, {ORIGIN[1]}, {ORIGIN[2]}]",
            "ImageOrientationPatient": "[1, 0, 0, 0, 1, 0]", "RescaleIntercept": str(intercept), "RescaleSlope": "1",
            "SeriesDescription": series, "ConvolutionKernel": "B", "Rows": str(shape[1]), "Columns": str(shape[2]),
            "NumberofSlices": str(shape[0])}


TRUE_GEOMETRY = Geometry(SPACING, ORIGIN)
GOOD = ["train_1_a_1", "valid_1_a_1", "valid_1_a_2", "valid_2_a_1"]
BAD = {  # volume -> phrase its failures.csv line must contain
    "valid_3_a_1": "truncated",
    "valid_4_a_1": "missing from the metadata",
    "valid_5_a_1": "ZSpacing",
    "valid_6_a_1": "shape mismatch",
    "valid_7_a_1": "origin mismatch",
    "valid_8_a_1": "no voxel of any configured anatomy",
    "valid_9_a_1": "NaN",
    "valid_10_a_1": "unknown class ids [200]",
    "valid_11_a_1": "label map",
}


@pytest.fixture(scope="module")
def ctrate_root(tmp_path_factory, real_data) -> Path:
    """A tiny CT-RATE-format root: 4 good volumes (v1 with intercepts -1024/-8192, v2 in valid_fixed, a train
    volume) from one phantom, and one volume per kind of bad input."""
    root = tmp_path_factory.mktemp("ctrate")
    header, template = _metadata_header(real_data)
    hu, label = phantom()
    rows = {"train": [], "valid": []}

    def v1(name: str, intercept: int = -1024, stored: np.ndarray | None = None, lab: np.ndarray | None = None,
           lab_geometry: Geometry = TRUE_GEOMETRY, meta: bool = True, **row):
        split = name.split("_")[0]
        raw = (hu.astype(np.int32) - intercept).astype(np.int16) if stored is None else stored
        write_nifti(ctrate.volume_path(root, name, fixed=False), raw)
        if lab is not False:
            write_nifti(ctrate.mask_path(root, name), label if lab is None else lab, lab_geometry)
        if meta:
            rows[split].append(_meta_row(template, name, intercept, **row))

    v1("train_1_a_1")
    v1("valid_1_a_1", series="HRCT")
    v1("valid_1_a_2", intercept=-8192, series="MEDIASTEN, iDose (4)")
    # v2: HU with the true header, in the _fixed folder of a v2 download
    write_nifti(ctrate.volume_path(root, "valid_2_a_1", fixed=True), hu, TRUE_GEOMETRY)
    write_nifti(ctrate.mask_path(root, "valid_2_a_1"), label, TRUE_GEOMETRY)
    rows["valid"].append(_meta_row(template, "valid_2_a_1"))
    # bad input
    v1("valid_3_a_1")
    p = ctrate.volume_path(root, "valid_3_a_1")
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    v1("valid_4_a_1", meta=False)
    v1("valid_5_a_1", z_spacing="")
    v1("valid_6_a_1", lab=label[:-1])
    v1("valid_7_a_1", lab_geometry=Geometry(SPACING, (ORIGIN[0] + 10, ORIGIN[1], ORIGIN[2])))
    v1("valid_8_a_1", lab=np.where(label > 0, CLASS_IDS["spleen"], 0).astype(np.uint8))
    nan_raw = (hu.astype(np.float32) + 1024)
    nan_raw[5, 20, 20] = np.nan
    v1("valid_9_a_1", stored=nan_raw)
    bad_ids = label.copy()
    bad_ids[0, 0, 0] = 200
    v1("valid_10_a_1", lab=bad_ids)
    v1("valid_11_a_1", lab=False)
    (root / "metadata").mkdir()
    for split, fname in (("train", "train_metadata.csv"), ("valid", "validation_metadata.csv")):
        with open(root / "metadata" / fname, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=header)
            w.writeheader()
            w.writerows(rows[split])
    (root / "anatomy_texts").mkdir()
    for n in ("desc_info.json", "conc_info.json"):
        (root / "anatomy_texts" / n).write_text(json.dumps({"valid_1_a": {"lung": "Clear."}}))
    (root / "multi_abnormality_labels").mkdir()
    (root / "multi_abnormality_labels" / "valid_predicted_labels.csv").write_text("VolumeName\nvalid_1_a_1.nii.gz\n")
    (root / "radiology_text_reports").mkdir()
    (root / "radiology_text_reports" / "validation_reports.csv").write_text("VolumeName,Findings_EN\nvalid_1_a_1,x\n")
    return root


@pytest.fixture(scope="module")
def processed(ctrate_root, tmp_path_factory) -> tuple[Path, int]:
    out = tmp_path_factory.mktemp("out") / "processed"
    rc = main(["preprocess", "--data", str(ctrate_root), "--out", str(out), *CFG])
    return out, rc


def _sitk_resample_to(src: sitk.Image, meta: dict, default: float, interpolator=sitk.sitkLinear) -> np.ndarray:
    """Resample ``src`` onto the stored grid of ``meta`` with SimpleITK (the geometry reference)."""
    ref = sitk.Image([int(s) for s in meta["shape"][::-1]], sitk.sitkFloat32)
    ref.SetSpacing(meta["spacing"])
    ref.SetOrigin(meta["origin"])
    ref.SetDirection(meta["direction"])
    out = sitk.Resample(sitk.Cast(src, sitk.sitkFloat32), ref, sitk.Transform(), interpolator, default)
    return sitk.GetArrayFromImage(out)


# ------------------------------------------------------------------------------------------- units
def test_read_nifti_matches_simpleitk(real_data, tmp_path):
    path = real_data / "real_ct" / "ct.nii.gz"
    vol = volume.read_nifti(path)
    ref = sitk.ReadImage(str(path))
    np.testing.assert_array_equal(vol.array, sitk.GetArrayViewFromImage(ref))
    np.testing.assert_allclose(vol.geometry.spacing, ref.GetSpacing(), rtol=1e-6)
    np.testing.assert_allclose(vol.geometry.origin, ref.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(vol.geometry.direction, ref.GetDirection(), atol=1e-6)
    # uncompressed .nii too
    plain = tmp_path / "ct.nii"
    sitk.WriteImage(ref, str(plain))
    np.testing.assert_array_equal(volume.read_nifti(plain).array, vol.array)
    # SimpleITK silently reads a truncated .nii.gz; we refuse it
    data = path.read_bytes()
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(ValueError, match="truncated"):
        volume.read_nifti(cut)
    junk = tmp_path / "junk.nii.gz"
    junk.write_bytes(b"\x1f\x8b" + b"not gzip at all" * 10)
    with pytest.raises(ValueError, match="corrupt"):
        volume.read_nifti(junk)


@pytest.mark.parametrize("direction", [
    (-1, 0, 0, 0, -1, 0, 0, 0, 1),  # RAS (nibabel/TotalSegmentator files)
    (0, 1, 0, 0, 0, -1, -1, 0, 0),  # permuted and flipped
    (1, 0, 0, 0, 0, 1, 0, -1, 0),
])
def test_reorient_lps_matches_dicomorient(direction):
    rng = np.random.default_rng(1)
    arr = rng.integers(0, 100, size=(5, 6, 7)).astype(np.int16)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.5, 0.7, 2.0))
    img.SetOrigin((10.0, -20.0, 30.0))
    img.SetDirection(direction)
    ref = sitk.DICOMOrient(img, "LPS")
    got = volume.reorient_lps(volume.from_sitk(img))
    np.testing.assert_array_equal(got.array, sitk.GetArrayViewFromImage(ref))
    np.testing.assert_allclose(got.geometry.spacing, ref.GetSpacing())
    np.testing.assert_allclose(got.geometry.origin, ref.GetOrigin(), atol=1e-9)
    np.testing.assert_allclose(got.geometry.direction, ref.GetDirection(), atol=1e-12)


def test_prepare_arrays_geometry_matches_simpleitk_resampling():
    """The stored grid (origin/direction/spacing in meta) is where the stored voxels really are."""
    hu, label = phantom(seed=3)
    img = sitk.GetImageFromArray(hu)
    img.SetSpacing(SPACING)
    img.SetOrigin(ORIGIN)
    img.SetDirection((-1, 0, 0, 0, -1, 0, 0, 0, 1))  # RAS-stored input: reoriented with flips
    lab = sitk.GetImageFromArray(label)
    lab.CopyInformation(img)
    cfg = load_config("tiny", ["data.spacing=[2.0,2.5,4.0]", "data.margin=[1,2,2]", "data.crop_size=[8,16,16]"])
    table = load_anatomy_table("released")
    image, mask, info = prepare.prepare_arrays(img, lab, cfg.data, table)
    assert image.dtype == np.int16 and mask.dtype == np.uint8 and image.shape == mask.shape
    assert info["orientation"] == "LPS" and info["direction"] == [1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0]
    ref = _sitk_resample_to(img, {**info, "shape": list(image.shape)}, -1150.0)
    inside = mask > 0
    diff = np.abs(image[inside].astype(np.float64) - np.clip(ref[inside], -1150, 350))
    assert np.median(diff) <= 1.0 and np.percentile(diff, 99) <= 2.0, (np.median(diff), diff.max())
    # the anatomies are where the (nearest) resampled label map says
    lut = table.lut
    lab_ref = _sitk_resample_to(lab, {**info, "shape": list(image.shape)}, 0, sitk.sitkNearestNeighbor)
    agree = np.mean(lut[lab_ref.astype(np.uint8)] == mask)
    assert agree > 0.98, agree
    # no anatomy lost, boxes consistent with counts
    for name, a in info["anatomies"].items():
        assert a["voxels"] > 0, name
        z0, z1, y0, y1, x0, x1 = a["bbox"]
        k = table.index(name) + 1
        assert (mask[z0:z1, y0:y1, x0:x1] == k).sum() == a["voxels"]
    assert image.shape[0] >= 8 and image.shape[1] >= 16 and image.shape[2] >= 16


# ------------------------------------------------------------------------------------------- real data
def test_real_ct_pairs_through_cli(real_data, tmp_path):
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("volume,image,label\n"
                     f"real_ct,{real_data / 'real_ct' / 'ct.nii.gz'},{real_data / 'real_ct' / 'totalseg_v2.nii.gz'}\n")
    out = tmp_path / "out"
    rc = main(["preprocess", "--pairs", str(pairs), "--out", str(out), "--config", "tiny",
               "--set", "data.spacing=[1.5,1.5,3.0]", "--set", "data.margin=[2,4,4]",
               "--set", "data.crop_size=[16,32,32]"])
    assert rc == 0
    vol = store.open_volume(out, "valid", "real_ct")
    image, mask = np.asarray(vol.image), np.asarray(vol.mask)
    table = load_anatomy_table("released")
    lung = mask == table.index("lung") + 1
    assert lung.sum() > 1000
    assert image[lung].mean() < -500, image[lung].mean()  # image and mask stay aligned
    aorta = mask == table.index("aorta") + 1
    assert -100 < image[aorta].mean() < 200
    meta = vol.meta
    assert meta["source"]["version"] == "hu" and meta["source"]["spacing"] == [3.0, 3.0, 3.0]
    for name in ("lung", "aorta"):
        src = meta["source"]["voxels"][name]
        assert src > 0
        ratio = meta["anatomies"][name]["voxels"] / src  # (3 * 3 * 3) / (1.5 * 1.5 * 3) = 4
        assert 3.6 < ratio < 4.4, (name, ratio)
    # geometry: the stored voxels are where SimpleITK puts the source at the stored grid
    ref = _sitk_resample_to(sitk.ReadImage(str(real_data / "real_ct" / "ct.nii.gz")), meta, -1150.0)
    inside = mask > 0
    diff = np.abs(image[inside] - np.clip(ref[inside], -1150, 350))
    assert np.median(diff) <= 1.0, np.median(diff)
    manifest = store.read_manifest(out)
    assert list(manifest["status"]) == ["ok"] and int(manifest.loc[0, "voxels_lung"]) == meta["anatomies"]["lung"][
        "voxels"]
    assert (out / "failures.csv").read_text().strip() == "split,volume,error"


# ------------------------------------------------------------------------------------------- CT-RATE runs
def test_bad_input_each_fails_with_one_clear_line(processed):
    out, rc = processed
    assert rc == 1  # some volumes failed
    with open(out / "failures.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["volume"] for r in rows) == sorted(BAD)
    for r in rows:
        assert BAD[r["volume"]] in r["error"], r
        assert "\n" not in r["error"]
        assert not (out / r["split"] / r["volume"]).exists()  # no partial output
    assert store.list_volumes(out, "valid") == ["valid_1_a_1", "valid_1_a_2", "valid_2_a_1"]
    assert store.list_volumes(out, "train") == ["train_1_a_1"]
    manifest = store.read_manifest(out)
    assert len(manifest) == len(GOOD) + len(BAD)
    assert set(manifest.loc[manifest["status"] == "ok", "volume"]) == set(GOOD)
    assert not any(p.name.startswith(".tmp") for p in (out / "valid").iterdir())


def test_v1_fix_and_v2_give_the_same_volume(processed):
    out, _ = processed
    a = store.open_volume(out, "valid", "valid_1_a_1")  # v1, intercept -1024
    b = store.open_volume(out, "valid", "valid_1_a_2")  # v1, intercept -8192
    c = store.open_volume(out, "valid", "valid_2_a_1")  # v2 (already HU): must not be rescaled again
    assert a.meta["source"]["version"] == "v1" and a.meta["source"]["version_reason"] == "auto"
    assert b.meta["source"]["rescale"] == [1.0, -8192.0]
    assert c.meta["source"]["version"] == "v2" and c.meta["source"]["rescale"] == [1.0, 0.0]
    assert c.meta["source"]["evidence"]["header_says"] == "v2"
    for v in (b, c):
        np.testing.assert_array_equal(v.image, a.image)
        np.testing.assert_array_equal(v.mask, a.mask)
        assert v.meta["origin"] == pytest.approx(a.meta["origin"])
    assert a.meta["source"]["origin"] == list(ORIGIN) and a.meta["source"]["spacing"] == list(SPACING)
    lung = np.asarray(a.mask) == 1
    assert np.asarray(a.image)[lung].mean() < -700
    assert a.meta["scan"] == "valid_1_a" and a.meta["anatomy_table"] == "released"
    assert set(a.meta["anatomies"]) == {"lung", "heart", "esophagus", "aorta"}
    assert all(x["voxels"] > 0 for x in a.meta["anatomies"].values())


def test_side_files_and_config(processed, ctrate_root):
    out, _ = processed
    assert json.loads((out / "texts" / "desc_info.json").read_text()) == {"valid_1_a": {"lung": "Clear."}}
    assert (out / "labels" / "valid_labels.csv").exists() and (out / "reports" / "valid_reports.csv").exists()
    cfg = store.read_store_config(out)
    assert cfg["data"]["spacing"] == [3.0, 3.0, 6.0] and cfg["anatomy_table"]["name"] == "released"
    # another spacing into the same store is refused, with a clear message and exit code 2
    rc = main(["preprocess", "--data", str(ctrate_root), "--out", str(out), "--config", "tiny",
               "--set", "data.margin=[1,2,2]", "--set", "data.crop_size=[8,16,16]"])
    assert rc == 2
    assert store.read_store_config(out) == cfg
    assert main(["preprocess", "--out", str(out), *CFG]) == 2  # neither --data nor --pairs


def test_resume_skips_complete_and_redoes_damaged(processed, tmp_path):
    src, _ = processed
    out = tmp_path / "copy"
    shutil.copytree(src, out)
    mtimes = {v: (out / "valid" / v / store.IMAGE).stat().st_mtime_ns for v in ("valid_1_a_2", "valid_2_a_1")}
    damaged = out / "valid" / "valid_1_a_1" / store.IMAGE
    damaged.write_bytes(damaged.read_bytes()[:100])
    leftover = out / "valid" / ".tmp.valid_1_a_2.deadbeef"
    leftover.mkdir()
    (leftover / store.IMAGE).write_bytes(b"partial")
    args = ["preprocess", "--data", str(_root_of(src)), "--out", str(out), *CFG]
    rc = main(args)
    assert rc == 1  # the bad volumes still fail
    assert store.is_complete(out, "valid", "valid_1_a_1")
    np.testing.assert_array_equal(store.open_volume(src, "valid", "valid_1_a_1").image[...],
                                  store.open_volume(out, "valid", "valid_1_a_1").image[...])
    for v, t in mtimes.items():
        assert (out / "valid" / v / store.IMAGE).stat().st_mtime_ns == t  # skipped, untouched
    assert not leftover.exists()


def _root_of(out: Path) -> Path:
    return Path(json.loads((out / "valid" / "valid_1_a_1" / "meta.json").read_text())["source"]["image"]).parents[4]


def test_shards_cover_every_volume_once(ctrate_root, tmp_path):
    out = tmp_path / "sharded"
    jobs = joblist.ctrate_jobs(ctrate_root, ["train", "valid"])
    table = load_anatomy_table("released")
    cfg = load_config("tiny", ["data.spacing=[3.0,3.0,6.0]", "data.margin=[1,2,2]", "data.crop_size=[8,16,16]"])
    seen = []
    for i in range(2):
        summary = preprocess.run_preprocess(jobs, out, cfg.data, table, shard=(i, 2))
        seen.append({r.volume for r in summary.results})
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(GOOD) | set(BAD)
    manifest = store.read_manifest(out)  # the last shard's manifest holds both shards' volumes
    assert sorted(manifest["volume"]) == sorted(set(GOOD) | set(BAD))
    assert sum(manifest["status"] == "ok") == len(GOOD)


def test_workers_match_single_process(processed, ctrate_root, tmp_path):
    ref, _ = processed
    out = tmp_path / "parallel"
    rc = main(["preprocess", "--data", str(ctrate_root), "--out", str(out), "--workers", "2", *CFG])
    assert rc == 1
    assert (out / "failures.csv").read_text() == (ref / "failures.csv").read_text()
    for split in ("train", "valid"):
        assert store.list_volumes(out, split) == store.list_volumes(ref, split)
        for v in store.list_volumes(ref, split):
            a, b = store.open_volume(ref, split, v), store.open_volume(out, split, v)
            np.testing.assert_array_equal(a.image, b.image)
            np.testing.assert_array_equal(a.mask, b.mask)
            drop = {"seconds"}
            assert {k: x for k, x in a.meta.items() if k not in drop} == {k: x for k, x in b.meta.items()
                                                                          if k not in drop}


def test_reconstructions_and_limit(ctrate_root, tmp_path):
    jobs = joblist.ctrate_jobs(ctrate_root, ["valid"], reconstructions=1)
    names = [j.volume for j in jobs]
    assert "valid_1_a_1" in names and "valid_1_a_2" not in names  # HRCT kept over the mediastinal series
    out = tmp_path / "limited"
    rc = main(["preprocess", "--data", str(ctrate_root), "--split", "valid", "--out", str(out), "--limit", "2",
               "--reconstructions", "1", *CFG])
    assert rc == 0
    assert store.list_volumes(out, "valid") == ["valid_1_a_1", "valid_2_a_1"]
    assert not (out / "train").exists()
    with pytest.raises(ValueError, match="shard"):
        joblist.parse_shard("2/2")
    with pytest.raises(ValueError, match="reconstructions"):
        joblist.parse_reconstructions("0")


def test_forced_version(ctrate_root, tmp_path):
    """--version v2 on raw v1 data is obeyed (the user decides) and recorded; auto never rescales twice."""
    jobs = [j for j in joblist.ctrate_jobs(ctrate_root, ["valid"], version="v1") if j.volume == "valid_2_a_1"]
    cfg = load_config("tiny", ["data.spacing=[3.0,3.0,6.0]", "data.margin=[1,2,2]", "data.crop_size=[8,16,16]"])
    r = preprocess.process_volume(jobs[0], tmp_path, cfg.data, load_anatomy_table("released"))
    assert r.status == "ok" and r.version == "v1"
    meta = store.read_meta(tmp_path, "valid", "valid_2_a_1")
    assert meta["source"]["version_reason"] == "forced"
    # HU data rescaled as if raw: lungs at about -850 - 1024, clipped to the window low
    vol = store.open_volume(tmp_path, "valid", "valid_2_a_1")
    assert np.asarray(vol.image)[np.asarray(vol.mask) == 1].mean() < -1100
