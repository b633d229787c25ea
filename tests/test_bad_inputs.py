"""The bad-input matrix: each fault, given to the command a user would run, must end with a non-zero exit
(batch commands: after processing the good items), an error message naming the file and the problem, and no
partial output. ``benchmarks/bad_inputs.py`` runs the same cases and writes benchmarks/results/bad_inputs.json.

Every case builds its inputs from the real test CT and its TotalSegmentator map (tests/data/real_ct) or the real
CT-RATE metadata/label rows (tests/data/ct_rate) and runs ``fvlm`` in-process (``fvlm.cli.main``).
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import io
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
REAL = REPO / "tests" / "data"
CT = REAL / "real_ct" / "ct.nii.gz"
LABEL = REAL / "real_ct" / "totalseg_v2.nii.gz"
PRE_CFG = ["--config", "tiny", "--set", "data.spacing=[3.0,3.0,3.0]", "--set", "data.margin=[1,2,2]",
           "--set", "data.crop_size=[16,32,32]"]


# ----------------------------------------------------------------------------------------------- plumbing
@dataclass
class Expect:
    """What a case runs and what must hold afterwards."""

    argv: list[str]
    names: list[str]  # the message must name one of these (the faulty file, or the --set key)
    problem: str  # regex the message must match (the problem, in words)
    out: Path | None = None  # folder searched for partial outputs (temporary files, forbidden outputs)
    forbidden: list[Path] = field(default_factory=list)  # outputs that must not exist afterwards
    required: list[Path] = field(default_factory=list)  # outputs of the good items that must exist afterwards


@dataclass
class Result:
    fault: str
    command: str
    exit_code: int | str
    message: str
    partial_files: list[str]
    names_file: bool
    names_problem: bool
    good_items_done: bool

    @property
    def ok(self) -> bool:
        return (isinstance(self.exit_code, int) and self.exit_code != 0 and not self.partial_files
                and self.names_file and self.names_problem and self.good_items_done)

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "ok": self.ok}


def run_fvlm(argv: list[str]) -> tuple[int | str, str]:
    """``fvlm ARGV`` in this process; (exit code or "traceback", stderr)."""
    from fvlm.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code: int | str = main(argv)
        except SystemExit as e:  # argparse
            code = int(e.code or 0)
        except BaseException as e:  # an uncaught exception is a raw traceback for the user: a failed case
            code = "traceback"
            err.write(f"\nTRACEBACK {type(e).__name__}: {e}\n")
    return code, err.getvalue()


def partial_files(expect: Expect) -> list[str]:
    found = [str(p) for p in expect.forbidden if p.exists()]
    if expect.out is not None and expect.out.exists():
        for p in expect.out.rglob("*"):
            if ".tmp" in p.name or p.name.startswith(".trash."):
                found.append(str(p))
    return found


def run_case(name: str, tmp: Path, res: Resources) -> Result:
    fault, command, build = CASES[name]
    tmp.mkdir(parents=True, exist_ok=True)
    expect = build(tmp, res)
    code, stderr = run_fvlm(expect.argv)
    errors = [ln for ln in stderr.splitlines() if " ERROR " in ln or "TRACEBACK" in ln or ln.startswith("fvlm: error")]
    message = " | ".join(errors) if errors else stderr.strip()[-2000:]
    return Result(fault=fault, command=command, exit_code=code, message=message[:2000],
                  partial_files=partial_files(expect),
                  names_file=any(n in message for n in expect.names),
                  names_problem=re.search(expect.problem, message, flags=re.I) is not None,
                  good_items_done=all(p.exists() for p in expect.required))


class Resources:
    """Shared inputs built once: a tiny model run (for predict)."""

    def __init__(self, root: Path):
        self.root = root
        self._run: Path | None = None

    @property
    def run(self) -> Path:
        if self._run is None:
            import torch

            from fvlm.anatomy import load_anatomy_table
            from fvlm.checkpoint import save_checkpoint
            from fvlm.config import load_config
            from fvlm.model.fvlm import FVLM

            cfg = load_config("tiny")
            torch.manual_seed(0)
            self._run = self.root / "run"
            save_checkpoint(self._run, 1, FVLM(cfg, num_anatomies=4), cfg, load_anatomy_table("released"))
        return self._run


# ----------------------------------------------------------------------------------------------- input makers
def ct_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The real CT (x, y, z) as stored, its label map (x, y, z), and the affine."""
    img = nib.load(str(CT))
    return np.asarray(img.dataobj), np.asarray(nib.load(str(LABEL)).dataobj), img.affine


def save_nifti(path: Path, array_xyz: np.ndarray, affine: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(np.asarray(array_xyz), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))
    return path


def pairs_case(tmp: Path, image: Path, label: Path, problem: str, names: list[str] | None = None,
               extra: list[str] | None = None) -> Expect:
    """fvlm preprocess --pairs with one good row (the real CT) and the faulty one."""
    out = tmp / "out"
    (tmp / "pairs.csv").write_text(f"volume,image,label\ngood,{CT},{LABEL}\nbad,{image},{label}\n", encoding="utf-8")
    return Expect(["preprocess", "--pairs", str(tmp / "pairs.csv"), "--out", str(out), *PRE_CFG, *(extra or [])],
                  names or [str(image)], problem, out=out, forbidden=[out / "valid" / "bad"],
                  required=[out / "valid" / "good" / "meta.json"])


def bad_image(tmp: Path, fn: Callable[[np.ndarray], np.ndarray], dtype=np.float32) -> Path:
    ct, _, aff = ct_arrays()
    return save_nifti(tmp / "bad_ct.nii.gz", fn(ct.astype(dtype)), aff)


def bad_label(tmp: Path, fn: Callable[[np.ndarray], np.ndarray]) -> Path:
    _, lab, aff = ct_arrays()
    return save_nifti(tmp / "bad_label.nii.gz", fn(lab), aff)


# --- CT-RATE roots
GOOD_V2, BAD_V1 = "valid_1_a_1", "valid_2_a_1"


def _metadata_template() -> tuple[list[str], dict[str, str]]:
    with open(REAL / "ct_rate" / "valid_metadata.csv", newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), next(reader)


def ctrate_root(tmp: Path, edit_rows: Callable[[list[dict[str, str]]], list[dict[str, str]]] | None = None,
                drop_columns: tuple[str, ...] = (), reports_without: str = "", texts_without: str = "",
                v1: bool = True) -> Path:
    """A CT-RATE-format root from the real CT: GOOD_V2 (fixed volume, true header, in valid_fixed) and BAD_V1
    (the v1 layout: stored values HU + 1024 under an identity header, geometry in the metadata; ``v1=False``:
    a second fixed volume)."""
    from fvlm.data import ctrate

    root = tmp / "ct_rate root"
    ct, lab, aff = ct_arrays()
    save_nifti(ctrate.volume_path(root, GOOD_V2, fixed=True), ct, aff)
    if v1:
        save_nifti(ctrate.volume_path(root, BAD_V1, fixed=False), (ct.astype(np.int32) + 1024).astype(np.int16),
                   np.eye(4))
    else:
        save_nifti(ctrate.volume_path(root, BAD_V1, fixed=True), ct, aff)
    for v in (GOOD_V2, BAD_V1):
        save_nifti(ctrate.mask_path(root, v), lab, aff)
    header, template = _metadata_template()
    lps_origin = [-aff[0, 3], -aff[1, 3], aff[2, 3]]
    rows = []
    for v in (GOOD_V2, BAD_V1):
        rows.append({**template, "VolumeName": f"{v}.nii.gz", "XYSpacing": "[3.0, 3.0]", "ZSpacing": "3.0",
                     "ImagePositionPatient": "[" + ", ".join(f"{x:.6f}" for x in lps_origin) + "]",
                     "ImageOrientationPatient": "[-1, 0, 0, 0, -1, 0]", "RescaleIntercept": "-1024",
                     "RescaleSlope": "1", "Rows": str(ct.shape[1]), "Columns": str(ct.shape[0]),
                     "NumberofSlices": str(ct.shape[2])})
    if edit_rows:
        rows = edit_rows(rows)
    fields = [c for c in header if c not in drop_columns]
    (root / "metadata").mkdir(parents=True)
    with open(root / "metadata" / "validation_metadata.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    with open(REAL / "ct_rate" / "valid_labels.csv", newline="") as f:
        reader = csv.DictReader(f)
        label_row = next(reader)
        label_fields = reader.fieldnames or []
    (root / "multi_abnormality_labels").mkdir()
    with open(ctrate.labels_path(root, "valid"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=label_fields)
        w.writeheader()
        w.writerows([{**label_row, "VolumeName": f"{v}.nii.gz"} for v in (GOOD_V2, BAD_V1)])
    (root / "radiology_text_reports").mkdir()
    with open(root / "radiology_text_reports" / "validation_reports.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["VolumeName", "ClinicalInformation_EN", "Technique_EN", "Findings_EN", "Impressions_EN"])
        for v in (GOOD_V2, BAD_V1):
            if v != reports_without:
                w.writerow([f"{v}.nii.gz", "Not given.", "Chest CT.", "Lungs are clear.", "Normal."])
    (root / "anatomy_texts").mkdir()
    texts = {v[:-2]: {"lung": "Lungs are clear.", "heart": "Heart size is normal.", "esophagus": "Normal.",
                      "aorta": "Normal calibre."} for v in (GOOD_V2, BAD_V1) if v[:-2] != texts_without}
    for n in ("desc_info.json", "conc_info.json"):
        (root / "anatomy_texts" / n).write_text(json.dumps(texts if n == "desc_info.json" else {k: {} for k in texts}))
    return root


def ctrate_case(tmp: Path, root: Path, problem: str, names: list[str]) -> Expect:
    out = tmp / "out"
    return Expect(["preprocess", "--data", str(root), "--split", "valid", "--out", str(out), *PRE_CFG], names,
                  problem, out=out, forbidden=[out / "valid" / BAD_V1],
                  required=[out / "valid" / GOOD_V2 / "meta.json"])


def meta_path(root: Path) -> str:
    return str(root / "metadata" / "validation_metadata.csv")


def with_bad(column: str, value: str):
    def edit(rows):
        rows[1][column] = value
        return rows
    return edit


# --- metrics inputs
def labels_csv(path: Path, rows: dict[str, list[Any]]) -> Path:
    from fvlm.labels import CT_RATE_LABELS

    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["VolumeName", *CT_RATE_LABELS])
        for v, vals in rows.items():
            w.writerow([v, *vals])
    return path


def metrics_case(tmp: Path, bad_cell: Any = None, scores_names: tuple[str, ...] = ()) -> tuple[list[str], Path, Path]:
    from fvlm.labels import CT_RATE_LABELS

    tmp.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    vols = [f"valid_{i}_a_1.nii.gz" for i in range(1, 9)]
    truth = {v: [int(x) for x in rng.integers(0, 2, len(CT_RATE_LABELS))] for v in vols}
    truth[vols[0]] = [0] * len(CT_RATE_LABELS)
    truth[vols[1]] = [1] * len(CT_RATE_LABELS)
    if bad_cell is not None:
        truth[vols[3]][2] = bad_cell
    labels = labels_csv(tmp / "labels.csv", truth)
    scores = tmp / "scores.csv"
    with open(scores, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["VolumeName", *CT_RATE_LABELS])
        for v in scores_names or vols:
            w.writerow([v, *np.round(rng.random(len(CT_RATE_LABELS)), 4)])
    out = tmp / "metrics.json"
    return ["metrics", str(scores), "--labels", str(labels), "--json", str(out)], labels, out


# --- DICOM
def write_dicom(folder: Path, hu: np.ndarray, spacing, origin, series_uid: str, skip: tuple[int, ...] = ()) -> None:
    import SimpleITK as sitk

    folder.mkdir(parents=True, exist_ok=True)
    img = sitk.GetImageFromArray(hu.astype(np.int16))
    img.SetSpacing([float(s) for s in spacing])
    img.SetOrigin([float(o) for o in origin])
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for i in range(img.GetDepth()):
        if i in skip:
            continue
        s = img[:, :, i]
        position = "\\".join(f"{x:.6f}" for x in img.TransformIndexToPhysicalPoint((0, 0, i)))
        for tag, value in (("0008|0060", "CT"), ("0020|000d", "1.2.826.0.1.3680043.2.1125.9"),
                           ("0020|000e", series_uid), ("0020|0037", "1\\0\\0\\0\\1\\0"), ("0020|0032", position),
                           ("0020|0013", str(i + 1)), ("0018|0050", f"{spacing[2]:g}")):
            s.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{series_uid[-3:]}_{i:04d}.dcm"))
        writer.Execute(s)


def dicom_of_real_ct(folder: Path, uid: str, skip: tuple[int, ...] = ()) -> None:
    from fvlm.data.volume import read_nifti, reorient_lps

    v = reorient_lps(read_nifti(CT))
    write_dicom(folder, v.array, v.geometry.spacing, v.geometry.origin, uid, skip)


def predict_case(tmp: Path, res: Resources, scan: Path, mask: Path | None, names: list[str], problem: str) -> Expect:
    out, png = tmp / "pred.json", tmp / "pred.png"
    argv = ["predict", str(scan), "--checkpoint", str(res.run), "--out", str(out), "--png", str(png),
            "--device", "cpu"]
    if mask is not None:
        argv += ["--mask", str(mask)]
    return Expect(argv, names, problem, out=tmp, forbidden=[out, png])


# ----------------------------------------------------------------------------------------------- the cases
def c_zero_byte(tmp, res):
    p = tmp / "zero.nii.gz"
    p.write_bytes(b"")
    return pairs_case(tmp, p, LABEL, r"too short|empty|not a readable NIfTI")


def c_truncated(tmp, res):
    p = tmp / "truncated.nii.gz"
    data = CT.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    return pairs_case(tmp, p, LABEL, r"truncated")


def c_not_nifti(tmp, res):
    p = tmp / "report.nii.gz"
    p.write_bytes(gzip.compress(b"This is a PDF report, not an image. " * 40))
    return pairs_case(tmp, p, LABEL, r"not a readable NIfTI|too short|NIfTI header")


def c_nan(tmp, res):
    def f(a):
        a[10, 10, 5] = np.nan
        return a
    p = bad_image(tmp, f)
    return pairs_case(tmp, p, LABEL, r"NaN")


def c_inf(tmp, res):
    def f(a):
        a[20, 30, 7] = np.inf
        return a
    p = bad_image(tmp, f)
    return pairs_case(tmp, p, LABEL, r"infinite")


def c_2d(tmp, res):
    ct, _, aff = ct_arrays()
    p = save_nifti(tmp / "slice.nii.gz", ct[:, :, 10], aff)
    return pairs_case(tmp, p, LABEL, r"expected a 3D volume")


def c_shape_mismatch(tmp, res):
    p = bad_label(tmp, lambda a: a[:, :, :-2])
    return pairs_case(tmp, CT, p, r"shape mismatch", names=[str(p)])


def c_no_anatomy(tmp, res):
    from fvlm.totalseg import CLASS_IDS

    p = bad_label(tmp, lambda a: np.where(a > 0, CLASS_IDS["spleen"], 0).astype(np.uint8))
    return pairs_case(tmp, CT, p, r"no voxel of any configured anatomy", names=[str(p)])


def c_float_label(tmp, res):
    p = bad_label(tmp, lambda a: a.astype(np.float32) + np.float32(0.25) * (a > 0))
    return pairs_case(tmp, CT, p, r"non-integer", names=[str(p)])


def c_shifted_label(tmp, res):
    _, lab, aff = ct_arrays()
    shifted = aff.copy()
    shifted[:3, 3] += aff[:3, :3] @ np.array([0.0, 2.0, 0.0])
    p = save_nifti(tmp / "shifted_label.nii.gz", lab, shifted)
    return pairs_case(tmp, CT, p, r"origin mismatch.*shifted by", names=[str(p)])


def c_odd_path(tmp, res):
    d = tmp / "Patient Müller ✓ scans"
    d.mkdir()
    p = d / "CT Thorax – Überweisung.nii.gz"
    data = CT.read_bytes()
    p.write_bytes(data[: len(data) // 3])
    return pairs_case(tmp, p, LABEL, r"truncated")


def c_meta_missing_column(tmp, res):
    root = ctrate_root(tmp, drop_columns=("ZSpacing",))
    return ctrate_case(tmp, root, r"ZSpacing", [meta_path(root)])


def c_meta_empty_spacing(tmp, res):
    root = ctrate_root(tmp, edit_rows=with_bad("XYSpacing", ""))
    return ctrate_case(tmp, root, r"empty or invalid XYSpacing", [meta_path(root)])


def c_meta_non_numeric_spacing(tmp, res):
    root = ctrate_root(tmp, edit_rows=with_bad("ZSpacing", "three"))
    return ctrate_case(tmp, root, r"ZSpacing.*'three'", [meta_path(root)])


def c_meta_conflicting_duplicate(tmp, res):
    def edit(rows):
        return rows + [{**rows[1], "ZSpacing": "5.0"}]
    root = ctrate_root(tmp, edit_rows=edit)
    return ctrate_case(tmp, root, r"listed 2 times .* different values .*ZSpacing", [meta_path(root)])


def c_reports_missing_scan(tmp, res):
    root = ctrate_root(tmp, reports_without=BAD_V1, v1=False)
    p = str(root / "radiology_text_reports" / "validation_reports.csv")
    return Expect(["check-data", str(root), "--strict", "--sample", "0"], [p], r"no reports row", out=root)


def c_texts_missing_scan(tmp, res):
    root = ctrate_root(tmp, texts_without=BAD_V1[:-2], v1=False)
    return Expect(["check-data", str(root), "--strict", "--sample", "0"], [str(root / "anatomy_texts")],
                  r"no anatomy texts", out=root)


def c_label_value_2(tmp, res):
    argv, labels, out = metrics_case(tmp, bad_cell=2)
    return Expect(argv, [str(labels)], r"is 2\.0, expected 0 or 1", forbidden=[out], out=tmp)


def c_label_yes(tmp, res):
    argv, labels, out = metrics_case(tmp, bad_cell="yes")
    return Expect(argv, [str(labels)], r"is 'yes', expected 0 or 1", forbidden=[out], out=tmp)


def c_label_empty(tmp, res):
    argv, labels, out = metrics_case(tmp, bad_cell="")
    return Expect(argv, [str(labels)], r"is empty, expected 0 or 1", forbidden=[out], out=tmp)


def c_scores_names(tmp, res):
    argv, labels, out = metrics_case(tmp, scores_names=tuple(f"train_{i}_a_1.nii.gz" for i in range(1, 9)))
    return Expect(argv, [str(labels)], r"no label row for 8 scored volume", forbidden=[out], out=tmp)


def c_scores_zero_byte(tmp, res):
    argv, labels, out = metrics_case(tmp)
    Path(argv[1]).write_bytes(b"")
    return Expect(argv, [argv[1]], r"not a readable CSV", forbidden=[out], out=tmp)


def c_dicom_two_series(tmp, res):
    folder = tmp / "dicom"
    dicom_of_real_ct(folder / "a", "1.2.826.0.1.3680043.2.1125.9.101")
    dicom_of_real_ct(folder / "b", "1.2.826.0.1.3680043.2.1125.9.202")
    return predict_case(tmp, res, folder, LABEL, [str(folder)], r"2 DICOM series.*--series")


def c_dicom_missing_slice(tmp, res):
    folder = tmp / "dicom"
    dicom_of_real_ct(folder, "1.2.826.0.1.3680043.2.1125.9.303", skip=(12,))
    return predict_case(tmp, res, folder, LABEL, [str(folder)], r"1 slice\(s\) missing")


def c_predict_nan_scan(tmp, res):
    def f(a):
        a[5, 5, 5] = np.nan
        return a
    p = bad_image(tmp, f)
    return predict_case(tmp, res, p, LABEL, [str(p)], r"NaN")


def c_set_unknown_key(tmp, res):
    out = tmp / "run"
    return Expect(["train", "--config", "tiny", "--data", str(tmp), "--out", str(out),
                   "--set", "train.learning_rate=1"], ["learning_rate"], r"unknown key", out=tmp, forbidden=[out])


def c_set_wrong_type(tmp, res):
    out = tmp / "run"
    return Expect(["train", "--config", "tiny", "--data", str(tmp), "--out", str(out), "--set", "train.lr=fast"],
                  ["train.lr"], r"expected a number, got 'fast'", out=tmp, forbidden=[out])


def c_set_out_of_range(tmp, res):
    out = tmp / "run"
    return Expect(["train", "--config", "tiny", "--data", str(tmp), "--out", str(out), "--set", "train.batch_size=0"],
                  ["train.batch_size"], r"must be >= 1", out=tmp, forbidden=[out])


def c_set_spacing_string(tmp, res):
    out = tmp / "processed"
    return Expect(["preprocess", "--pairs", str(tmp / "none.csv"), "--out", str(out), "--config", "tiny",
                   "--set", 'data.spacing="abc"'], ["data.spacing"], r"expected a list, got 'abc'", out=tmp,
                  forbidden=[out])


def c_config_syntax(tmp, res):
    cfg = tmp / "my config.json"
    cfg.write_text('{"train": {"lr": 1e-4,}}')
    out = tmp / "run"
    return Expect(["train", "--config", str(cfg), "--data", str(tmp), "--out", str(out)], [str(cfg)],
                  r"not valid JSON.*line 1", out=tmp, forbidden=[out])


def c_anatomy_unknown_class(tmp, res):
    from fvlm.anatomy import load_anatomy_table

    table = load_anatomy_table("released").to_dict()
    table["anatomies"][1]["classes"].append("hearts")
    p = tmp / "my_table.json"
    p.write_text(json.dumps(table))
    e = pairs_case(tmp, CT, LABEL, r"unknown TotalSegmentator class 'hearts'", names=[str(p)],
                   extra=["--set", f"data.anatomy_table={p}"])
    e.required = []  # the table is refused before any volume (nothing can be processed with it)
    e.forbidden.append(tmp / "out" / "preprocess_config.json")
    return e


def c_reports_zero_byte(tmp, res):
    p = tmp / "reports.csv"
    p.write_bytes(b"")
    out = tmp / "texts"
    return Expect(["decompose", "--reports", str(p), "--out", str(out)], [str(p)], r"empty file", out=tmp,
                  forbidden=[out / "desc_info.json"])


def c_reports_binary(tmp, res):
    p = tmp / "reports.csv"
    p.write_bytes(bytes(range(256)) * 64)
    out = tmp / "texts"
    return Expect(["decompose", "--reports", str(p), "--out", str(out)], [str(p)], r"not a readable CSV|UTF-8",
                  out=tmp, forbidden=[out / "desc_info.json"])


CASES: dict[str, tuple[str, str, Callable[[Path, Resources], Expect]]] = {
    "zero_byte_nifti": ("zero-byte .nii.gz image", "preprocess --pairs", c_zero_byte),
    "truncated_nifti": ("truncated .nii.gz image", "preprocess --pairs", c_truncated),
    "not_nifti": ("gzip file that is not NIfTI", "preprocess --pairs", c_not_nifti),
    "nan_voxels": ("NaN voxels in the image", "preprocess --pairs", c_nan),
    "inf_voxels": ("infinite voxels in the image", "preprocess --pairs", c_inf),
    "image_2d": ("2-D image", "preprocess --pairs", c_2d),
    "label_shape_mismatch": ("label map shape differs from the CT", "preprocess --pairs", c_shape_mismatch),
    "label_no_anatomy": ("label map with no anatomy voxels", "preprocess --pairs", c_no_anatomy),
    "label_float_values": ("label map with non-integer values", "preprocess --pairs", c_float_label),
    "label_shifted_grid": ("label map on a shifted grid", "preprocess --pairs", c_shifted_label),
    "path_spaces_non_ascii": ("truncated file under a path with spaces and non-ASCII characters",
                              "preprocess --pairs", c_odd_path),
    "metadata_missing_column": ("metadata CSV without the ZSpacing column", "preprocess --data",
                                c_meta_missing_column),
    "metadata_empty_spacing": ("metadata CSV with an empty XYSpacing", "preprocess --data", c_meta_empty_spacing),
    "metadata_non_numeric_spacing": ("metadata CSV with a non-numeric ZSpacing", "preprocess --data",
                                     c_meta_non_numeric_spacing),
    "metadata_conflicting_duplicate": ("metadata CSV listing a volume twice with different values",
                                       "preprocess --data", c_meta_conflicting_duplicate),
    "reports_missing_scan": ("reports CSV missing a scan", "check-data --strict", c_reports_missing_scan),
    "anatomy_texts_missing_scan": ("anatomy texts missing a scan", "check-data --strict", c_texts_missing_scan),
    "label_csv_value_2": ("label CSV value 2", "metrics", c_label_value_2),
    "label_csv_value_yes": ("label CSV value 'yes'", "metrics", c_label_yes),
    "label_csv_value_empty": ("label CSV empty cell", "metrics", c_label_empty),
    "scores_names_mismatch": ("scores CSV whose volume names do not match the labels", "metrics", c_scores_names),
    "scores_csv_zero_byte": ("zero-byte scores CSV", "metrics", c_scores_zero_byte),
    "dicom_two_series": ("DICOM folder with two series of equal length", "predict", c_dicom_two_series),
    "dicom_missing_slice": ("DICOM series with a missing slice", "predict", c_dicom_missing_slice),
    "predict_nan_scan": ("NaN voxels in the scan", "predict", c_predict_nan_scan),
    "set_unknown_key": ("--set with an unknown key", "train", c_set_unknown_key),
    "set_wrong_type": ("--set train.lr=fast (wrong type)", "train", c_set_wrong_type),
    "set_out_of_range": ("--set train.batch_size=0 (out of range)", "train", c_set_out_of_range),
    "set_spacing_string": ("--set data.spacing='\"abc\"'", "preprocess", c_set_spacing_string),
    "config_json_syntax": ("JSON config with a syntax error", "train", c_config_syntax),
    "anatomy_table_unknown_class": ("anatomy table naming an unknown class", "preprocess --pairs",
                                    c_anatomy_unknown_class),
    "reports_csv_zero_byte": ("zero-byte reports CSV", "decompose", c_reports_zero_byte),
    "reports_csv_binary": ("binary reports CSV", "decompose", c_reports_binary),
}


# ----------------------------------------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def resources(tmp_path_factory) -> Resources:
    return Resources(tmp_path_factory.mktemp("bad_inputs_shared"))


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name, tmp_path, resources):
    r = run_case(name, tmp_path / "case", resources)
    detail = json.dumps(r.to_dict(), indent=1, ensure_ascii=False)
    assert isinstance(r.exit_code, int) and r.exit_code != 0, detail
    assert r.names_file, detail
    assert r.names_problem, detail
    assert not r.partial_files, detail
    assert r.good_items_done, detail


def test_matrix_is_large_and_distinct():
    assert len(CASES) >= 20 and len({c[0] for c in CASES.values()}) == len(CASES)


def test_controls_succeed(tmp_path, resources):
    """The same inputs without the fault succeed: the failures above come from the faults."""
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "ok.csv").write_text(f"volume,image,label\ngood,{CT},{LABEL}\n")
    code, err = run_fvlm(["preprocess", "--pairs", str(tmp_path / "p" / "ok.csv"), "--out", str(tmp_path / "p" / "o"),
                          *PRE_CFG])
    assert code == 0, err
    root = ctrate_root(tmp_path / "r")
    code, err = run_fvlm(["preprocess", "--data", str(root), "--split", "valid", "--out", str(tmp_path / "r" / "o"),
                          *PRE_CFG])
    assert code == 0, err  # both the v2 and the v1 volume of the root are fine
    code, err = run_fvlm(["check-data", str(ctrate_root(tmp_path / "c", v1=False)), "--strict", "--sample", "0"])
    assert code == 0, err
    argv, _, out = metrics_case(tmp_path / "m")
    assert run_fvlm(argv)[0] == 0 and out.exists()
    folder = tmp_path / "d" / "dicom"
    dicom_of_real_ct(folder, "1.2.826.0.1.3680043.2.1125.9.404")
    code, err = run_fvlm(["predict", str(folder), "--checkpoint", str(resources.run), "--mask", str(LABEL),
                          "--out", str(tmp_path / "d" / "p.json"), "--device", "cpu"])
    assert code == 0, err


def test_verify_detects_mid_file_damage(tmp_path):
    """--verify: a store array damaged in the middle (headers intact) is found by its content hash and redone."""
    from fvlm.data import store

    out = tmp_path / "out"
    (tmp_path / "pairs.csv").write_text(f"volume,image,label\ngood,{CT},{LABEL}\n")
    argv = ["preprocess", "--pairs", str(tmp_path / "pairs.csv"), "--out", str(out), *PRE_CFG]
    assert run_fvlm(argv)[0] == 0
    image = out / "valid" / "good" / store.IMAGE
    original = image.read_bytes()
    meta = json.loads((out / "valid" / "good" / "meta.json").read_text())
    assert meta["storage"]["image"]["sha256"] == store.file_sha256(image)
    damaged = bytearray(original)
    mid = len(damaged) // 2
    damaged[mid : mid + 16] = bytes(16)  # zeroes inside a compressed chunk, trailer untouched
    image.write_bytes(bytes(damaged))
    assert store.is_complete(out, "valid", "good")  # the header checks cannot see it
    assert not store.is_complete(out, "valid", "good", verify=True)
    code, err = run_fvlm(argv)
    assert code == 0 and image.read_bytes() == bytes(damaged)  # without --verify: skipped as complete
    code, err = run_fvlm(argv + ["--verify"])
    assert code == 0 and "content hash differs" in err
    assert image.read_bytes() == original  # redone, bit-equal


def test_constant_image_warns(tmp_path):
    p = bad_image(tmp_path, lambda a: np.full_like(a, -1024), dtype=np.int16)
    (tmp_path / "pairs.csv").write_text(f"volume,image,label\nconst,{p},{LABEL}\n")
    code, err = run_fvlm(["preprocess", "--pairs", str(tmp_path / "pairs.csv"), "--out", str(tmp_path / "o"),
                          *PRE_CFG])
    assert re.search(r"WARNING .*constant \(every voxel -1024\)", err), err


def test_check_data_reports_duplicates(tmp_path):
    """Identical duplicate rows are reported (one kept); conflicting ones are reported as refused."""
    from fvlm.data.check import check_data

    def edit(rows):
        return rows + [dict(rows[0]), {**rows[1], "RescaleIntercept": "-8192"}]
    root = ctrate_root(tmp_path, edit_rows=edit)
    rep = check_data(root, splits=["valid"], sample=0).splits["valid"]
    dups = {d["volume"]: d for d in rep.metadata["duplicates"]}
    assert dups[GOOD_V2]["conflicting"] is False and dups[GOOD_V2]["lines"] == [2, 4]
    assert dups[BAD_V1]["conflicting"] is True and dups[BAD_V1]["columns"] == ["RescaleIntercept"]
    assert any("DIFFERENT values" in p for p in rep.problems)
    assert any("identical values" in p for p in rep.problems)


def test_dicom_gap_rule_units():
    from fvlm.data.dicom import check_slice_positions

    z = np.arange(10, dtype=np.float64) * 2.5
    normal = np.array([0.0, 0.0, 1.0])
    pos = np.stack([np.zeros(10), np.zeros(10), z], axis=1)
    check_slice_positions(pos, normal, "ok")  # evenly spaced
    with pytest.raises(ValueError, match=r"2 slice\(s\) missing \(10\.00 -> 17\.50 mm"):
        check_slice_positions(np.delete(pos, [5, 6], axis=0), normal, "gap")
    with pytest.raises(ValueError, match="same position"):
        check_slice_positions(np.concatenate([pos, pos[:1]]), normal, "dup")



def test_global_baseline_reports_keep_non_empty_duplicate(tmp_path):
    """Training's whole-report texts: an empty duplicate row never replaces a report; a bad CSV names the file."""
    from fvlm.data.dataset import _report_texts

    (tmp_path / "reports").mkdir()
    p = tmp_path / "reports" / "train_reports.csv"
    p.write_text("VolumeName,Findings_EN,Impressions_EN\ntrain_1_a_1.nii.gz,Emphysema.,Emphysema.\n"
                 "train_1_a_2.nii.gz,,Not given.\n")
    assert _report_texts(tmp_path, "train") == {"train_1_a": "Emphysema. Emphysema."}
    p.write_bytes(b"")
    with pytest.raises(ValueError, match="train_reports.csv: not a readable CSV"):
        _report_texts(tmp_path, "train")
