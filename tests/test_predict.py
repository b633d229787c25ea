"""fvlm predict: the same crops and scores as fvlm eval, DICOM == NIfTI, orientation/obliquity/coverage policies,
missing anatomies, TotalSegmentator plumbing, the CLI on a real CT (JSON + PNG)."""

from __future__ import annotations

import copy
import json
import os
import stat
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch

import fvlm
from fvlm.anatomy import load_anatomy_table
from fvlm.checkpoint import save_checkpoint
from fvlm.cli import main
from fvlm.config import load_config
from fvlm.data import store
from fvlm.data.preprocess import preprocess
from fvlm.data.volume import obliquity_degrees
from fvlm.model.fvlm import FVLM
from fvlm.predict import Predictor
from fvlm.synth import generate_case, synthesize
from fvlm.zeroshot import evaluate

LUNG_IDS = (10, 11, 12, 13, 14)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """An untrained tiny model with a low temperature (so inputs move the scores visibly)."""
    cfg = load_config("tiny")
    torch.manual_seed(0)
    model = FVLM(cfg, num_anatomies=4)
    with torch.no_grad():
        model.temp.fill_(0.01)
        model.query_tokens.normal_(0, 1.0)  # zero-init queries would make every anatomy pool alike
    out = tmp_path_factory.mktemp("predict") / "run"
    save_checkpoint(out, 3, model, cfg, load_anatomy_table("released"))
    return out


@pytest.fixture(scope="module")
def predictor(run) -> Predictor:
    return fvlm.load(run)


@pytest.fixture(scope="module")
def case():
    return generate_case(3, size="demo")


def write_nifti(path: Path, array_zyx: np.ndarray, affine: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(np.ascontiguousarray(np.transpose(array_zyx, (2, 1, 0))), affine), str(path))
    return path


def write_dicom(folder: Path, hu: np.ndarray, spacing, origin, series_uid: str, description: str) -> None:
    """One CT series, one file per slice, with the per-slice tags a scanner writes."""
    folder.mkdir(parents=True, exist_ok=True)
    img = sitk.GetImageFromArray(hu.astype(np.int16))
    img.SetSpacing([float(s) for s in spacing])
    img.SetOrigin([float(o) for o in origin])
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for i in range(img.GetDepth()):
        s = img[:, :, i]
        position = "\\".join(f"{x:.6f}" for x in img.TransformIndexToPhysicalPoint((0, 0, i)))
        for tag, value in (("0008|0060", "CT"), ("0020|000d", "1.2.826.0.1.3680043.2.1125.7"),
                           ("0020|000e", series_uid), ("0008|103e", description),
                           ("0020|0037", "1\\0\\0\\0\\1\\0"), ("0020|0032", position), ("0020|0013", str(i + 1)),
                           ("0018|0050", f"{spacing[2]:g}")):
            s.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{series_uid[-3:]}_{i:04d}.dcm"))
        writer.Execute(s)


def probs(pred) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in pred.probabilities.values()], dtype=np.float64)


def reoriented(hu, lab, spacing, origin, src=(0, 1, 2), flip=(False, False, False)):
    """The same physical volume stored with index axis a' = old axis src[a'] (reversed where flip[a'])."""
    n_xyz = hu.shape[::-1]
    perm = [2 - src[2 - ax] for ax in range(3)]
    hu2, lab2 = np.transpose(hu, perm), np.transpose(lab, perm)
    direction = np.zeros((3, 3))
    origin = np.asarray(origin, dtype=np.float64).copy()
    for a in range(3):
        col = np.eye(3)[:, src[a]]
        if flip[a]:
            origin = origin + col * spacing[src[a]] * (n_xyz[src[a]] - 1)
            col = -col
            hu2, lab2 = np.flip(hu2, axis=2 - a), np.flip(lab2, axis=2 - a)
        direction[:, a] = col
    return (np.ascontiguousarray(hu2), np.ascontiguousarray(lab2), tuple(spacing[s] for s in src), tuple(origin),
            tuple(direction.ravel()))


# ----------------------------------------------------------------------------------------------- tests
def test_predict_equals_eval_of_the_same_volume(run, predictor, tmp_path):
    """A scan predicted alone gets exactly the scores fvlm eval gives it after fvlm preprocess."""
    synthesize(tmp_path / "ct", n_train=0, n_valid=1, seed=5, v2=True)
    cfg = predictor.cfg
    assert preprocess(tmp_path / "ct", tmp_path / "proc", cfg, splits=["valid"], version="v2").ok
    scores = evaluate(run, tmp_path / "proc", "valid", tmp_path / "scores.csv", device="cpu").scores
    name = scores["VolumeName"].iloc[0].removesuffix(".nii.gz")
    scan = next((tmp_path / "ct" / "dataset").rglob(f"valid/**/{name}.nii.gz"))
    mask = next((tmp_path / "ct" / "dataset").rglob(f"valid_mask/**/{name}.nii.gz"))
    pred = predictor.predict(scan, mask=mask)
    expected = scores.iloc[0][list(pred.probabilities)].to_numpy(dtype=np.float64)
    np.testing.assert_allclose(probs(pred), expected, atol=1e-5)
    assert np.ptp(expected) > 1e-3  # the scores differ between labels: the comparison is not trivially true
    stored = store.open_volume(tmp_path / "proc", "valid", name, mmap=False)
    np.testing.assert_array_equal(pred.image, stored.image)
    np.testing.assert_array_equal(pred.mask, stored.mask)


def test_shared_windows_equal_one_pass_per_anatomy(predictor, case):
    """Crops with identical windows share a forward pass; the features equal one pass per anatomy."""
    from fvlm.data.prepare import prepare_arrays
    from fvlm.data.store import Geometry
    from fvlm.data.volume import SourceVolume

    cfg = copy.deepcopy(predictor.cfg)
    cfg.data.eval_crop_size = (64, 96, 96)  # larger than the processed volume: every window is the whole volume
    wide = Predictor(predictor.model, cfg, predictor.table, predictor.device)
    g = Geometry(case.spacing, case.origin)
    img, msk, info = prepare_arrays(SourceVolume(case.hu, g), SourceVolume(case.label_map, g), cfg.data, wide.table)
    meta = {**info, "shape": list(img.shape)}
    shared, crops = wide.anatomy_features(img, msk, meta, share_windows=True)
    single, crops_single = wide.anatomy_features(img, msk, meta, share_windows=False)
    assert len(crops) == 1 and len(crops[0]["anatomies"]) == 4 and len(crops_single) == 4
    assert np.isfinite(shared).all()
    np.testing.assert_allclose(shared, single, atol=2e-5)


def test_dicom_series_equals_nifti(predictor, case, tmp_path):
    nifti = write_nifti(tmp_path / "ct.nii.gz", case.hu, case.affine_ras)
    labels = write_nifti(tmp_path / "labels.nii.gz", case.label_map, case.affine_ras)
    folder = tmp_path / "dicom"
    write_dicom(folder / "a", case.hu, case.spacing, case.origin, "1.2.826.0.1.3680043.2.1125.7.101", "chest")
    # a second, shorter series (e.g. a scout reconstruction) in the same folder tree
    write_dicom(folder / "b", case.hu[::4], (*case.spacing[:2], case.spacing[2] * 4), case.origin,
                "1.2.826.0.1.3680043.2.1125.7.202", "thick")
    from_nifti = predictor.predict(nifti, mask=labels)
    from_dicom = predictor.predict(folder, mask=labels)
    # the same voxels reach the model, up to the DICOM positions' 6 decimals (rounding of the resampled HU)
    diff = np.abs(from_dicom.image.astype(np.int32) - from_nifti.image.astype(np.int32))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3
    np.testing.assert_allclose(probs(from_dicom), probs(from_nifti), atol=1e-4)
    src = from_dicom.source
    assert src["format"] == "dicom" and src["series_uid"].endswith(".101") and src["slices"] == case.hu.shape[0]
    assert [s["uid"][-3:] for s in src["other_series"]] == ["202"]
    # the other series on request: the label map no longer fits it, and the error names both
    with pytest.raises(ValueError, match=r"labels\.nii\.gz.*dicom.*shape mismatch"):
        predictor.predict(folder, mask=labels, series="1.2.826.0.1.3680043.2.1125.7.202")
    with pytest.raises(ValueError, match="no DICOM series"):
        predictor.predict(folder, mask=labels, series="1.2.3")


def test_orientation_and_axis_order_do_not_change_the_result(predictor, case):
    ref = predictor.predict_arrays(case.hu, case.label_map, case.spacing, case.origin)
    assert ref.preprocessing["input"]["orientation"] == "LPS" and not ref.preprocessing["oblique_resampled"]
    for src, flip, code in (((0, 1, 2), (True, True, False), "RAS"), ((0, 1, 2), (False, False, True), "LPI"),
                            ((1, 2, 0), (False, True, False), "PIL"), ((2, 0, 1), (True, False, True), "ILA")):
        hu, lab, spacing, origin, direction = reoriented(case.hu, case.label_map, case.spacing, case.origin, src, flip)
        pred = predictor.predict_arrays(hu, lab, spacing, origin, direction)
        assert pred.preprocessing["input"]["orientation"] == code
        np.testing.assert_array_equal(pred.image, ref.image)
        np.testing.assert_allclose(probs(pred), probs(ref), atol=1e-6)
    # a mirrored volume WITHOUT the matching geometry is a different input: the scores move
    wrong = predictor.predict_arrays(case.hu[:, :, ::-1], case.label_map[:, :, ::-1], case.spacing, case.origin)
    assert np.abs(probs(wrong) - probs(ref)).max() > 1e-4


def test_anisotropic_spacing_and_few_slices(predictor):
    thick = generate_case(3, size="demo", spacing=(1.6, 3.1, 8.0))
    pred = predictor.predict_arrays(thick.hu, thick.label_map, thick.spacing, thick.origin)
    assert pred.preprocessing["input"]["spacing"] == pytest.approx([1.6, 3.1, 8.0])
    assert all(v is not None for v in pred.probabilities.values())
    # 6 slices of 8 mm around the heart: padded, with coverage warnings, anatomies cut by the border
    z = int(np.median(np.nonzero((thick.label_map == 51).any(axis=(1, 2)))[0]))
    few = predictor.predict_arrays(thick.hu[z - 3 : z + 3], thick.label_map[z - 3 : z + 3], thick.spacing,
                                   (thick.origin[0], thick.origin[1], thick.origin[2] + (z - 3) * 8.0))
    text = " | ".join(few.warnings)
    assert "covers only 48 mm" in text and "'lung' is cut by the scan's inferior/superior border" in text
    assert few.anatomies["lung"]["cut_by_scan_border"] == ["inferior", "superior"]
    assert sum(map(sum, few.preprocessing["padding"])) > 0
    assert np.isfinite(probs(few)).sum() > 0


def test_oblique_scan_is_resampled_to_lps(predictor, case):
    """A scan acquired on a rotated grid is resampled back onto the patient axes (with a warning)."""
    ref = predictor.predict_arrays(case.hu, case.label_map, case.spacing, case.origin)
    img = sitk.GetImageFromArray(case.hu)
    lab = sitk.GetImageFromArray(case.label_map)
    for im in (img, lab):
        im.SetSpacing(case.spacing)
        im.SetOrigin(case.origin)
    angle = np.radians(25.0)
    rot = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    rot = rot @ np.array([[1, 0, 0], [0, np.cos(0.2), -np.sin(0.2)], [0, np.sin(0.2), np.cos(0.2)]])
    size = [int(s * 1.2) for s in img.GetSize()]
    centre = np.asarray(img.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in img.GetSize()]))
    origin = centre - rot @ (np.asarray(case.spacing) * (np.asarray(size) - 1) / 2)
    grid = sitk.Image(size, sitk.sitkUInt8)
    grid.SetSpacing(case.spacing)
    grid.SetOrigin(origin.tolist())
    grid.SetDirection(rot.ravel().tolist())
    hu = sitk.GetArrayFromImage(sitk.Resample(img, grid, sitk.Transform(), sitk.sitkLinear, -1024, sitk.sitkInt16))
    lm = sitk.GetArrayFromImage(sitk.Resample(lab, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0))
    assert obliquity_degrees(rot.ravel()) > 20

    pred = predictor.predict_arrays(hu, lm, case.spacing, tuple(origin), tuple(rot.ravel()))
    assert pred.preprocessing["oblique_resampled"] and any("oblique" in w for w in pred.warnings)
    # the processed lung lies where it lies in the axis-aligned original (compare on the shared physical grid)
    spacing = np.asarray(pred.preprocessing["target_spacing"])
    shift = np.rint((np.asarray(pred.preprocessing["processed_origin"])
                     - np.asarray(ref.preprocessing["processed_origin"])) / spacing).astype(int)[::-1]  # (z, y, x)
    a = ref.mask == 1
    b = np.zeros_like(a)
    src = tuple(slice(max(0, -s), min(n, m - s)) for s, n, m in zip(shift, pred.mask.shape, a.shape, strict=True))
    dst = tuple(slice(max(0, s), max(0, s) + (x.stop - x.start)) for s, x in zip(shift, src, strict=True))
    b[dst] = pred.mask[src] == 1
    dice = 2 * (a & b).sum() / (a.sum() + b.sum())
    assert dice > 0.8, dice


def test_missing_anatomies_and_non_chest(predictor, case):
    lab = case.label_map.copy()
    lab[np.isin(lab, LUNG_IDS)] = 0
    pred = predictor.predict_arrays(case.hu, lab, case.spacing, case.origin)
    lung_labels = [p.label for p in predictor.table.prompts if p.anatomy == "lung"]
    assert all(pred.probabilities[label] is None for label in lung_labels)
    assert all(pred.labels[label]["status"] == "anatomy missing" for label in lung_labels)
    assert pred.probabilities["Cardiomegaly"] is not None
    assert any("does not look like a chest CT" in w for w in pred.warnings)
    assert pred.missing == ["lung"] and json.loads(pred.to_json())["probabilities"]["Emphysema"] is None
    # nothing of the table at all (e.g. a head CT): refused
    other = np.where(np.isin(case.label_map, predictor.table.class_ids), 0, case.label_map)
    with pytest.raises(ValueError, match="none of the anatomies"):
        predictor.predict_arrays(case.hu, other, case.spacing, case.origin)
    # raw stored values (no rescale to HU): a warning
    raw = predictor.predict_arrays(case.hu.astype(np.int32) + 1024, case.label_map, case.spacing, case.origin)
    assert any("Hounsfield" in w for w in raw.warnings)


def test_without_mask_totalsegmentator_or_clear_refusal(predictor, case, tmp_path, monkeypatch):
    nifti = write_nifti(tmp_path / "ct.nii.gz", case.hu, case.affine_ras)
    labels = write_nifti(tmp_path / "labels.nii.gz", case.label_map, case.affine_ras)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match=r"--mask labels\.nii\.gz"):
        predictor.predict(nifti)
    # a stand-in TotalSegmentator executable: records its arguments and writes the known label map
    fake = tmp_path / "TotalSegmentator"
    fake.write_text(f"#!{sys.executable}\nimport shutil, sys, json\n"
                    f"json.dump(sys.argv[1:], open({str(tmp_path / 'argv.json')!r}, 'w'))\n"
                    f"shutil.copy({str(labels)!r}, sys.argv[sys.argv.index('-o') + 1])\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    saved = tmp_path / "saved_labels.nii.gz"
    pred = predictor.predict(nifti, totalseg_cmd=str(fake), save_mask=saved)
    argv = json.loads((tmp_path / "argv.json").read_text())
    assert argv[:2] == ["-i", str(nifti)] and "--ml" in argv and "--roi_subset" in argv and "heart" in argv
    assert pred.source["segmentation"]["method"] == "TotalSegmentator" and saved.exists()
    np.testing.assert_allclose(probs(pred), probs(predictor.predict(nifti, mask=labels)), atol=1e-6)
    assert os.path.getsize(saved) > 0


def test_cli_on_the_real_ct(run, real_data, tmp_path):
    """Real CT (abdomen with lung bases, no heart): valid JSON with the heart's labels null, and a PNG."""
    ct = real_data / "real_ct"
    out, png = tmp_path / "result.json", tmp_path / "overlay.png"
    rc = main(["predict", str(ct / "ct.nii.gz"), "--mask", str(ct / "totalseg_v2.nii.gz"), "--checkpoint", str(run),
               "--out", str(out), "--png", str(png), "--device", "cpu"])
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["found"] == ["lung", "aorta"] and result["missing"] == ["heart", "esophagus"]
    assert result["probabilities"]["Cardiomegaly"] is None
    assert result["labels"]["Cardiomegaly"] == {"anatomy": "heart", "probability": None, "status": "anatomy missing"}
    assert 0 < result["probabilities"]["Emphysema"] < 1
    assert any("'heart' not in the label map" in w for w in result["warnings"])
    pre = result["preprocessing"]
    assert pre["input"]["shape_xyz"] == [122, 101, 30] and pre["input"]["orientation"] == "RAS"
    assert pre["target_spacing"] == list(load_config("tiny").data.spacing) and pre["hu_window"] == [-1150.0, 350.0]
    assert result["anatomies"]["lung"]["voxels"] == int(np.isin(
        np.asarray(nib.load(str(ct / "totalseg_v2.nii.gz")).dataobj), LUNG_IDS).sum())
    assert set(result["timing"]) >= {"read", "preprocess", "encode", "score"}
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    h, w = matplotlib.image.imread(str(png)).shape[:2]
    assert h >= 500 and w >= 1000
    # the geometry check names both files
    bad = tmp_path / "shifted.nii.gz"
    lab = nib.load(str(ct / "totalseg_v2.nii.gz"))
    affine = lab.affine.copy()
    affine[:3, 3] += 10.0
    nib.save(nib.Nifti1Image(np.asarray(lab.dataobj), affine), str(bad))
    assert main(["predict", str(ct / "ct.nii.gz"), "--mask", str(bad), "--checkpoint", str(run)]) == 2

