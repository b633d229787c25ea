"""Label maps in any axis order/direction: flipped and permuted copies of the real test CT's label map are the
same grid (reoriented, accepted, same stored volume); a shifted copy is another grid (refused, saying how)."""

from __future__ import annotations

import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fvlm.cli import main
from fvlm.data import store
from fvlm.data.labelmap import GridMismatch, align_label, grid_mapping
from fvlm.data.volume import read_nifti

CFG = ["--config", "tiny", "--set", "data.spacing=[3.0,3.0,3.0]", "--set", "data.margin=[1,2,2]",
       "--set", "data.crop_size=[16,32,32]"]

# (name, src, flip): stored index axis a' = original axis src[a'] (reversed where flip[a'])
VARIANTS = [
    ("flip_x", (0, 1, 2), (True, False, False)),
    ("flip_z", (0, 1, 2), (False, False, True)),
    ("flip_xy", (0, 1, 2), (True, True, False)),
    ("permute_zxy", (2, 0, 1), (False, False, False)),
    ("permute_yxz_flip", (1, 0, 2), (False, True, True)),
]


def rewrite(src_path: Path, dst: Path, src=(0, 1, 2), flip=(False, False, False), shift_vox=(0.0, 0.0, 0.0)) -> Path:
    """The same voxels stored with another axis order/direction (an independent NIfTI writer: nibabel, RAS)."""
    img = nib.load(str(src_path))
    data = np.asarray(img.dataobj)  # (x, y, z)
    aff = img.affine.copy()
    n = np.asarray(data.shape)
    cols = aff[:3, :3].copy()
    origin = aff[:3, 3] + cols @ np.asarray(shift_vox)
    new_cols = np.zeros((3, 3))
    arr = np.transpose(data, src)
    for a in range(3):
        col = cols[:, src[a]]
        if flip[a]:
            origin = origin + col * (n[src[a]] - 1)
            col = -col
            arr = np.flip(arr, axis=a)
        new_cols[:, a] = col
    new = np.eye(4)
    new[:3, :3], new[:3, 3] = new_cols, origin
    out = nib.Nifti1Image(np.ascontiguousarray(arr), new)
    out.set_qform(new, code=1)
    out.set_sform(new, code=1)
    nib.save(out, str(dst))
    return dst


@pytest.mark.parametrize("name,src,flip", VARIANTS)
def test_flipped_and_permuted_maps_are_the_same_grid(real_data, tmp_path, caplog, name, src, flip):
    ct = read_nifti(real_data / "real_ct" / "ct.nii.gz")
    orig = read_nifti(real_data / "real_ct" / "totalseg_v2.nii.gz")
    moved = read_nifti(rewrite(real_data / "real_ct" / "totalseg_v2.nii.gz", tmp_path / f"{name}.nii.gz", src, flip))
    assert moved.geometry != orig.geometry  # the header really differs (origin/direction/shape order)
    m = grid_mapping(ct.geometry, ct.array.shape, moved.geometry, moved.array.shape)
    assert not m.identity
    with caplog.at_level(logging.INFO, logger="fvlm.data.labelmap"):
        aligned = align_label(ct, moved, label_name=f"label map {name}")
    assert sum("reoriented" in r.getMessage() for r in caplog.records) == 1
    np.testing.assert_array_equal(aligned.array, orig.array)
    assert aligned.geometry == ct.geometry


def test_identity_is_returned_unchanged(real_data):
    ct = read_nifti(real_data / "real_ct" / "ct.nii.gz")
    lab = read_nifti(real_data / "real_ct" / "totalseg_v2.nii.gz")
    assert grid_mapping(ct.geometry, ct.array.shape, lab.geometry, lab.array.shape).identity
    assert align_label(ct, lab).array is lab.array


@pytest.mark.parametrize("shift,phrase", [((1.0, 0.0, 0.0), "origin mismatch"), ((0.0, 0.0, 0.5), "origin mismatch"),
                                          ((0.0, -2.0, 1.0), "shifted by")])
def test_shifted_map_is_refused_with_how_and_what_to_do(real_data, tmp_path, shift, phrase):
    ct = read_nifti(real_data / "real_ct" / "ct.nii.gz")
    path = rewrite(real_data / "real_ct" / "totalseg_v2.nii.gz", tmp_path / "shifted.nii.gz", (0, 1, 2),
                   (True, False, False), shift_vox=shift)
    with pytest.raises(GridMismatch) as e:
        align_label(ct, read_nifti(path), label_name=f"label map {path}", image_name="scan ct.nii.gz")
    msg = str(e.value)
    assert phrase in msg and str(path) in msg and "ct.nii.gz" in msg
    assert "voxels" in msg and "resample the label map" in msg  # how much, and what to do


def test_other_extent_and_rotation_are_refused(real_data):
    from fvlm.data.store import Geometry

    ct = read_nifti(real_data / "real_ct" / "ct.nii.gz")
    g = ct.geometry
    with pytest.raises(GridMismatch, match="shape mismatch"):
        grid_mapping(g, ct.array.shape, g, (ct.array.shape[0] - 1, *ct.array.shape[1:]))
    c, s = np.cos(0.1), np.sin(0.1)
    rot = Geometry(g.spacing, g.origin, (c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0))
    with pytest.raises(GridMismatch, match="direction mismatch"):
        grid_mapping(g, ct.array.shape, rot, ct.array.shape)
    other = Geometry((g.spacing[0] * 1.1, g.spacing[1], g.spacing[2]), g.origin, g.direction)
    with pytest.raises(GridMismatch, match="spacing mismatch"):
        grid_mapping(g, ct.array.shape, other, ct.array.shape)


def test_preprocess_accepts_reoriented_maps_and_refuses_shifted(real_data, tmp_path):
    """fvlm preprocess --pairs: the flipped/permuted maps give bit-equal stored volumes; the shifted one fails."""
    ct, lab = real_data / "real_ct" / "ct.nii.gz", real_data / "real_ct" / "totalseg_v2.nii.gz"
    rows = ["volume,image,label", f"orig,{ct},{lab}"]
    for name, src, flip in VARIANTS[:2] + VARIANTS[3:4]:
        rows.append(f"{name},{ct},{rewrite(lab, tmp_path / f'{name}.nii.gz', src, flip)}")
    shifted = rewrite(lab, tmp_path / "shifted.nii.gz", shift_vox=(0.0, 1.0, 0.0))
    rows.append(f"shifted,{ct},{shifted}")
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    assert main(["preprocess", "--pairs", str(tmp_path / "pairs.csv"), "--out", str(out), *CFG]) == 1
    ref = store.open_volume(out, "valid", "orig", mmap=False)
    for name, _, _ in VARIANTS[:2] + VARIANTS[3:4]:
        v = store.open_volume(out, "valid", name, mmap=False)
        np.testing.assert_array_equal(np.asarray(v.image), np.asarray(ref.image))
        np.testing.assert_array_equal(np.asarray(v.mask), np.asarray(ref.mask))
    assert not (out / "valid" / "shifted").exists()
    failures = (out / "failures.csv").read_text()
    assert "shifted" in failures and "origin mismatch" in failures and str(shifted) in failures


def test_radchestct_verify_mask_accepts_flipped(real_data, tmp_path):
    from fvlm.data.radchestct import verify_mask

    lab = real_data / "real_ct" / "totalseg_v2.nii.gz"
    # Rad-ChestCT images are stored with slice 0 superior: the real CT with z reversed
    ct = rewrite(real_data / "real_ct" / "ct.nii.gz", tmp_path / "ct.nii.gz", (0, 1, 2), (False, False, True))
    on_grid = rewrite(lab, tmp_path / "lab.nii.gz", (0, 1, 2), (False, False, True))
    a, b = verify_mask(ct, on_grid), verify_mask(ct, lab)  # the original map: z the other way round
    assert a == b and a.superior == "start"
    with pytest.raises(ValueError, match="origin mismatch"):
        verify_mask(ct, rewrite(lab, tmp_path / "s.nii.gz", shift_vox=(3.0, 0.0, 0.0)))


def test_segment_check_label_map_accepts_flipped(real_data, tmp_path):
    from fvlm.segment import check_label_map

    ct = read_nifti(real_data / "real_ct" / "ct.nii.gz")
    lab = real_data / "real_ct" / "totalseg_v2.nii.gz"
    n = check_label_map(lab, ct)
    assert n > 10
    assert check_label_map(rewrite(lab, tmp_path / "f.nii.gz", (2, 1, 0), (False, True, False)), ct) == n
    with pytest.raises(ValueError, match="origin mismatch"):
        check_label_map(rewrite(lab, tmp_path / "s.nii.gz", shift_vox=(0.0, 0.0, -1.0)), ct)


def test_predict_accepts_flipped_mask_and_refuses_shifted(real_data, tmp_path):
    import torch

    import fvlm
    from fvlm.anatomy import load_anatomy_table
    from fvlm.checkpoint import save_checkpoint
    from fvlm.config import load_config
    from fvlm.model.fvlm import FVLM

    cfg = load_config("tiny")
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "run", 1, FVLM(cfg, num_anatomies=4), cfg, load_anatomy_table("released"))
    predictor = fvlm.load(tmp_path / "run")
    ct, lab = real_data / "real_ct" / "ct.nii.gz", real_data / "real_ct" / "totalseg_v2.nii.gz"
    ref = predictor.predict(ct, mask=lab)
    got = predictor.predict(ct, mask=rewrite(lab, tmp_path / "p.nii.gz", (2, 0, 1), (True, False, False)))
    assert got.probabilities == ref.probabilities
    np.testing.assert_array_equal(got.mask, ref.mask)
    shifted = rewrite(lab, tmp_path / "s.nii.gz", shift_vox=(0.0, 1.0, 0.0))
    with pytest.raises(ValueError, match=r"s\.nii\.gz does not lie on the grid of scan .*ct\.nii\.gz.*origin mismatch"):
        predictor.predict(ct, mask=shifted)


def test_dicom_series_with_the_nifti_label_map(real_data, tmp_path):
    """The issue's case: a DICOM series read by SimpleITK (LPS, rows flipped against the NIfTI's RAS storage) with
    the TotalSegmentator map of the NIfTI export: the same grid, so predict accepts it and scores it alike."""
    import SimpleITK as sitk
    import torch

    import fvlm
    from fvlm.anatomy import load_anatomy_table
    from fvlm.checkpoint import save_checkpoint
    from fvlm.config import load_config
    from fvlm.data.volume import reorient_lps
    from fvlm.model.fvlm import FVLM

    cfg = load_config("tiny")
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "run", 1, FVLM(cfg, num_anatomies=4), cfg, load_anatomy_table("released"))
    predictor = fvlm.load(tmp_path / "run")
    ct, lab = real_data / "real_ct" / "ct.nii.gz", real_data / "real_ct" / "totalseg_v2.nii.gz"
    v = reorient_lps(read_nifti(ct))
    img = sitk.GetImageFromArray(np.ascontiguousarray(v.array).astype(np.int16))
    img.SetSpacing(v.geometry.spacing)
    img.SetOrigin(v.geometry.origin)
    folder = tmp_path / "dicom"
    folder.mkdir()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for i in range(img.GetDepth()):
        s = img[:, :, i]
        for tag, value in (("0008|0060", "CT"), ("0020|000e", "1.2.826.0.1.3680043.2.1125.5.1"),
                           ("0020|0037", "1\\0\\0\\0\\1\\0"), ("0020|0013", str(i + 1)),
                           ("0020|0032", "\\".join(f"{x:.6f}" for x in img.TransformIndexToPhysicalPoint((0, 0, i))))):
            s.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{i:04d}.dcm"))
        writer.Execute(s)
    ref = predictor.predict(ct, mask=lab)
    got = predictor.predict(folder, mask=lab)
    assert got.probabilities == pytest.approx(ref.probabilities, abs=1e-5)
