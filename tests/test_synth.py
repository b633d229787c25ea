"""fvlm.synth: the synthetic CT-RATE-format data set (formats, determinism, geometry, signatures, texts)."""

from __future__ import annotations

import csv
import json
import logging
import re
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from fvlm.anatomy import AnatomyTable, load_anatomy_table
from fvlm.labels import CT_RATE_LABELS
from fvlm.synth import SIGNATURES, generate_case, label_rows, synthesize
from fvlm.synth.case import build_scene, patient_anatomy, rng_for
from fvlm.synth.metadata import METADATA_COLUMNS, PROFILES, plan_scan, recon_grid
from fvlm.synth.reports import anatomy_texts, build_report
from fvlm.totalseg import CLASS_IDS

log = logging.getLogger(__name__)

SEED = 3  # with 2 + 2 patients this seed gives both RescaleIntercept -1024 and -8192 scans
SPLIT_FILES = {"train": ("train_metadata.csv", "train_reports.csv", "train_predicted_labels.csv"),
               "valid": ("validation_metadata.csv", "validation_reports.csv", "valid_predicted_labels.csv")}


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as f:
        r = csv.DictReader(f)
        return list(r.fieldnames), list(r)


def _rel(name: str) -> Path:
    split, pid, scan, _ = name.removesuffix(".nii.gz").split("_")
    return Path(f"{split}_{pid}") / f"{split}_{pid}_{scan}" / name


def _floats(s: str) -> list[float]:
    return [float(v) for v in s.strip("[]").split(",")]


def _sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=\.) (?=[A-Z0-9])", text) if s]


@pytest.fixture(scope="session")
def v1_set(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth_v1")
    synthesize(out, n_train=2, n_valid=2, seed=SEED, workers=1)
    return out


@pytest.fixture(scope="session")
def v2_set(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth_v2")
    synthesize(out, n_train=1, n_valid=1, seed=SEED, v2=True, workers=2)
    return out


def _metadata(root: Path) -> dict[str, list[dict[str, str]]]:
    return {split: _read_csv(root / "metadata" / files[0])[1] for split, files in SPLIT_FILES.items()}


# ------------------------------------------------------------------------------------------- layout
def test_layout_and_csv_columns(v1_set: Path, real_data: Path):
    real_header, _ = _read_csv(real_data / "ct_rate" / "valid_metadata.csv")
    assert list(METADATA_COLUMNS) == real_header and len(real_header) == 44
    for split, (meta_f, rep_f, lab_f) in SPLIT_FILES.items():
        cols, meta = _read_csv(v1_set / "metadata" / meta_f)
        assert cols == real_header
        names = [m["VolumeName"] for m in meta]
        assert names and all(re.fullmatch(rf"{split}_\d+_[a-b]_[1-3]\.nii\.gz", n) for n in names)
        for n in names:
            assert (v1_set / "dataset" / split / _rel(n)).is_file()
            assert (v1_set / "dataset" / f"{split}_mask" / _rel(n)).is_file()
        cols, reps = _read_csv(v1_set / "radiology_text_reports" / rep_f)
        assert cols == ["VolumeName", "ClinicalInformation_EN", "Technique_EN", "Findings_EN", "Impressions_EN"]
        assert [r["VolumeName"] for r in reps] == names
        by_scan: dict[str, set] = {}
        for r in reps:  # one report per scan, identical across its reconstructions
            by_scan.setdefault(r["VolumeName"].rsplit("_", 1)[0], set()).add(tuple(r.values())[1:])
            assert all(r[c] for c in cols)  # empty sections are "Not given."
        assert all(len(v) == 1 for v in by_scan.values())
        cols, labs = _read_csv(v1_set / "multi_abnormality_labels" / lab_f)
        assert cols == ["VolumeName", *CT_RATE_LABELS]
        assert [r["VolumeName"] for r in labs] == names
    # some scans have several reconstructions
    all_names = [m["VolumeName"] for rows in _metadata(v1_set).values() for m in rows]
    scans = {n.rsplit("_", 1)[0] for n in all_names}
    assert len(all_names) > len(scans)
    info = json.loads((v1_set / "synth_info.json").read_text())
    assert info["seed"] == SEED and info["size"] == "demo" and info["v2"] is False
    assert info["counts"]["train"]["patients"] == 2


def test_metadata_values(v1_set: Path):
    intercepts = set()
    for split, rows in _metadata(v1_set).items():
        for r in rows:
            img = nib.load(v1_set / "dataset" / split / _rel(r["VolumeName"]))
            x, y, z = img.shape
            assert (int(r["Columns"]), int(r["Rows"]), int(r["NumberofSlices"])) == (x, y, z)
            sx, sy = _floats(r["XYSpacing"])
            assert sx == sy and 1.8 <= sx <= 2.6 and 128 <= x <= 192
            assert 4 <= float(r["ZSpacing"]) <= 6 and 35 <= z <= 90
            assert len(_floats(r["ImagePositionPatient"])) == 3
            assert _floats(r["ImageOrientationPatient"]) == [1, 0, 0, 0, 1, 0]
            assert r["RescaleSlope"] == "1" and r["PatientPosition"] == "HFS"
            assert re.fullmatch(r"\d{3}Y", r["PatientAge"]) and re.fullmatch(r"20\d{6}", r["StudyDate"])
            assert r["Manufacturer"] in {p.manufacturer for p in PROFILES}
            intercepts.add(int(r["RescaleIntercept"]))
    assert intercepts == {-1024, -8192}


def test_full_size_grids():
    an = patient_anatomy(5, (0, 1))
    for k in range(6):
        plan = plan_scan(np.random.default_rng(k), an, "full", 3)
        for rec in range(3):
            grid, cols = recon_grid(plan, an, rec)
            d, h, w = grid.shape
            assert (h, w) == (512, 512) and 200 <= d <= 400
            assert 0.6 <= grid.spacing[0] <= 0.8 and 0.75 <= grid.spacing[2] <= 1.5
            assert _floats(cols["XYSpacing"])[0] == grid.spacing[0]  # the CSV parses back exactly


# ------------------------------------------------------------------------------------------- determinism
def test_same_seed_identical_files_whatever_workers(v2_set: Path, tmp_path: Path):
    other = tmp_path / "again"
    synthesize(other, n_train=1, n_valid=1, seed=SEED, v2=True, workers=1)
    files = sorted(p.relative_to(v2_set) for p in v2_set.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(other) for p in other.rglob("*") if p.is_file())
    assert len([f for f in files if f.suffix == ".gz"]) >= 4
    for f in files:
        assert (v2_set / f).read_bytes() == (other / f).read_bytes(), f


def test_labels_are_real_rows(v1_set: Path):
    rows, counts = label_rows()
    assert rows.shape == (6514, 18) and int(counts.sum()) == 47149
    real = {tuple(r) for r in rows.tolist()}
    for files in SPLIT_FILES.values():
        _, labs = _read_csv(v1_set / "multi_abnormality_labels" / files[2])
        for r in labs:
            assert tuple(int(r[k]) for k in CT_RATE_LABELS) in real


# ------------------------------------------------------------------------------------------- geometry
def _fix_v1(path: Path, row: dict[str, str]) -> sitk.Image:
    """CT-RATE's fix: voxel array as is, HU = stored * slope + intercept, geometry from the metadata."""
    raw = sitk.GetArrayFromImage(sitk.ReadImage(str(path))).astype(np.int32)
    img = sitk.GetImageFromArray((raw * int(row["RescaleSlope"]) + int(row["RescaleIntercept"])).astype(np.int16))
    sx, sy = _floats(row["XYSpacing"])
    img.SetSpacing((sx, sy, float(row["ZSpacing"])))
    img.SetOrigin(tuple(_floats(row["ImagePositionPatient"])))
    o = np.array(_floats(row["ImageOrientationPatient"]))
    img.SetDirection(tuple(np.stack([o[:3], o[3:], np.cross(o[:3], o[3:])], 1).ravel()))
    return img


def test_v1_needs_rescale_and_fixing_gives_v2(v1_set: Path, v2_set: Path):
    v2_meta = _metadata(v2_set)
    checked = set()
    for split, rows in _metadata(v1_set).items():
        for r in rows:
            name = r["VolumeName"]
            raw = nib.load(v1_set / "dataset" / split / _rel(name))
            assert np.allclose(raw.affine, np.eye(4))  # a default header: the geometry is only in the CSV
            stored = np.asarray(raw.dataobj)
            assert stored.dtype == np.int16
            if r["RescaleIntercept"] == "-1024":
                assert stored.min() >= 0
            else:
                assert stored.min() >= 8192 - 1024
            fixed = _fix_v1(v1_set / "dataset" / split / _rel(name), r)
            hu = sitk.GetArrayFromImage(fixed)
            assert abs(np.median(hu[:, :3, :3]) + 1000) < 40  # air in the corners
            assert np.mean((hu > -130) & (hu < -70)) > 0.01  # fat
            assert np.mean((hu > 20) & (hu < 70)) > 0.02  # soft tissue
            mask = sitk.ReadImage(str(v1_set / "dataset" / f"{split}_mask" / _rel(name)))
            assert np.allclose(mask.GetSpacing(), fixed.GetSpacing(), atol=1e-4)
            assert np.allclose(mask.GetOrigin(), fixed.GetOrigin(), atol=1e-3)
            assert np.allclose(mask.GetDirection(), fixed.GetDirection())
            if name not in {m["VolumeName"] for m in v2_meta[split]}:
                continue
            assert r == next(m for m in v2_meta[split] if m["VolumeName"] == name)
            v2 = sitk.ReadImage(str(v2_set / "dataset" / split / _rel(name)))
            assert np.array_equal(sitk.GetArrayFromImage(v2), hu)
            assert np.allclose(v2.GetSpacing(), fixed.GetSpacing(), atol=1e-4)
            assert np.allclose(v2.GetOrigin(), fixed.GetOrigin(), atol=1e-3)
            assert np.allclose(v2.GetDirection(), np.eye(3).ravel())
            checked.add(r["RescaleIntercept"])
    assert checked == {"-1024", "-8192"}


def test_label_maps_hold_the_classes(v1_set: Path):
    seen: set[int] = set()
    for split, rows in _metadata(v1_set).items():
        for r in rows:
            m = np.asarray(nib.load(v1_set / "dataset" / f"{split}_mask" / _rel(r["VolumeName"])).dataobj)
            assert m.dtype == np.uint8
            present = set(np.unique(m).tolist())
            assert {10, 11, 12, 13, 14, 15, 51, 52, 61} <= present, r["VolumeName"]
            seen |= present
    assert seen <= set(CLASS_IDS.values()) | {0}
    used = set(load_anatomy_table("released").class_ids)
    unused = {CLASS_IDS[c] for c in ("trachea", "liver", "spinal_cord", "superior_vena_cava", "pulmonary_vein",
                                     "sternum", "vertebrae_T6", "rib_left_5", "autochthon_left")}
    assert len((seen - used) & unused) >= 5


# ------------------------------------------------------------------------------------------- signatures
SEEDS = (21, 22, 23)


@pytest.fixture(scope="session")
def normals():
    return {s: generate_case(s, labels=[]) for s in SEEDS}


def _lobes(lab: np.ndarray) -> np.ndarray:
    return (lab >= 10) & (lab <= 14)


def _ctr(case) -> float:
    """Cardiothoracic ratio from the label map: widest heart / widest lungs-plus-heart extent (x)."""
    def widest(m):
        cols = m.any(axis=1)  # (D, W)
        return max((np.ptp(np.nonzero(c)[0]) + 1) if c.any() else 0 for c in cols)
    heart = case.label_map == 51
    return widest(heart) / widest(heart | _lobes(case.label_map))


def test_cardiomegaly_enlarges_the_heart(normals):
    for s in SEEDS:
        n, c = normals[s], generate_case(s, labels=["Cardiomegaly"])
        frac = [np.sum(x.label_map == 51) / np.sum((x.label_map == 51) | _lobes(x.label_map)) for x in (n, c)]
        assert frac[1] > 1.2 * frac[0]
        assert _ctr(c) > 0.5 > _ctr(n)


def test_emphysema_lowers_lung_attenuation(normals):
    for s in SEEDS:
        n, c = normals[s], generate_case(s, labels=["Emphysema"])
        low = [np.mean(x.hu[_lobes(x.label_map)] < -950) for x in (n, c)]
        assert low[1] > 2 * low[0] + 0.001


def test_pleural_effusion_is_posterior_basal_fluid_outside_the_lungs(normals):
    for s in SEEDS:
        n, c = normals[s], generate_case(s, labels=["Pleural effusion"])
        lung = _lobes(n.label_map)
        fluid = lung & (c.label_map == 0)  # lung in the normal scan, no lung label with the effusion
        assert fluid.sum() * np.prod(c.spacing) > 20_000  # > 20 mL
        assert -15 < np.median(c.hu[fluid]) < 35
        k, j, _ = np.nonzero(fluid)
        lk, lj, _ = np.nonzero(lung)
        assert j.mean() > lj.mean() and k.mean() < lk.mean()  # behind and below the lungs' centre


def test_nodules_add_soft_tissue_inside_lobes(normals):
    for s in SEEDS:
        n, c = normals[s], generate_case(s, labels=["Lung nodule"])
        dense = [np.sum(_lobes(x.label_map) & (x.hu > -300)) for x in (n, c)]
        size = c.findings[0].details["sizes_mm"][0]
        assert dense[1] > dense[0] + 0.2 * (np.pi / 6 * size**3) / np.prod(c.spacing)


def test_hiatal_hernia_enlarges_the_oesophagus_above_the_diaphragm(normals):
    s = SEEDS[0]
    n, c = normals[s], generate_case(s, labels=["Hiatal hernia"])
    gained = (c.label_map == CLASS_IDS["esophagus"]) & (n.label_map != CLASS_IDS["esophagus"])
    assert gained.sum() * np.prod(c.spacing) > 3000  # > 3 mL more oesophagus
    k = np.nonzero(gained)[0]
    liver_top = np.nonzero((n.label_map == CLASS_IDS["liver"]).any(axis=(1, 2)))[0].max()
    assert np.median(k) >= liver_top - 2  # at the hiatus or above it


def test_every_other_label_changes_the_image():
    """Each remaining label leaves a visible mark (voxels changed by > 100 HU) on the same patient."""
    spacing = (3.0, 3.0, 6.0)
    base = generate_case(31, labels=[], spacing=spacing)
    tested_above = {"Cardiomegaly", "Emphysema", "Pleural effusion", "Lung nodule", "Hiatal hernia"}
    for label in sorted(set(CT_RATE_LABELS) - tested_above):
        c = generate_case(31, labels=[label], spacing=spacing)
        assert c.hu.shape == base.hu.shape
        changed = np.sum(np.abs(c.hu.astype(np.int32) - base.hu) > 100)
        assert changed >= 3, (label, changed, c.findings[0].severity)
    assert set(SIGNATURES) == set(CT_RATE_LABELS)


# ------------------------------------------------------------------------------------------- texts
def test_anatomy_json_agrees_with_labels_and_reports(v1_set: Path):
    table = load_anatomy_table("released")
    desc = json.loads((v1_set / "anatomy_texts" / "desc_info.json").read_text())
    conc = json.loads((v1_set / "anatomy_texts" / "conc_info.json").read_text())
    seen = set()
    for files in SPLIT_FILES.values():
        _, labs = _read_csv(v1_set / "multi_abnormality_labels" / files[2])
        _, reps = _read_csv(v1_set / "radiology_text_reports" / files[1])
        for lab, rep in zip(labs, reps):
            scan = lab["VolumeName"].removesuffix(".nii.gz").rsplit("_", 1)[0]
            seen.add(scan)
            abnormal = {p.anatomy for p in table.prompts if lab[p.label] == "1"}
            assert set(conc.get(scan, {})) == abnormal, scan
            for text in conc.get(scan, {}).values():
                assert all(s in rep["Impressions_EN"] for s in _sentences(text))
            for text in desc[scan].values():
                assert all(s in rep["Findings_EN"] for s in _sentences(text))
            assert set(desc[scan]) == set(table.names)
    assert seen == set(desc)


#: words of each scored label's zero-shot prompt that its impression sentences must contain
PROMPT_WORDS = {"Emphysema": "emphysema", "Atelectasis": "atelecta", "Lung nodule": "nodule", "Lung opacity": "opacit",
                "Pulmonary fibrotic sequela": "fibrotic", "Pleural effusion": "pleural effusion",
                "Mosaic attenuation pattern": "mosaic attenuation",
                "Peribronchial thickening": "peribronchial thickening",
                "Consolidation": "consolidation", "Bronchiectasis": "bronchiectasis",
                "Interlobular septal thickening": "interlobular septal thickening", "Cardiomegaly": "cardiomegaly",
                "Pericardial effusion": "pericardial effusion", "Coronary artery wall calcification": "coronary artery",
                "Hiatal hernia": "hiatal hernia", "Arterial wall calcification": "calcification"}


def test_texts_of_a_case_with_every_label_and_none():
    table = load_anatomy_table("released")
    assert set(PROMPT_WORDS) == set(table.scored_labels)
    full = generate_case(41, labels=list(CT_RATE_LABELS), spacing=(3.0, 3.0, 6.0))
    desc, conc = full.anatomy_texts(table)
    assert set(conc) == set(table.names) and set(desc) == set(table.names)
    # impression sentences use the prompts' vocabulary, whatever wording the RNG picks
    for k in range(15):
        rep = build_report(rng_for(41, 0, k), full.scene)
        for s in rep.sentences:
            if s.section == "impression" and s.label in PROMPT_WORDS:
                assert PROMPT_WORDS[s.label] in s.text.lower(), s.text
    # with the extended table every label is scored: the anatomies with a positive prompt label are abnormal
    ext = load_anatomy_table("extended")
    _, conc_ext = full.anatomy_texts(ext)
    assert set(conc_ext) == {p.anatomy for p in ext.prompts}
    # sentences of unscored labels stay in the report but in no anatomy of the released table
    lymph = [s for s in full.report.sentences if s.label == "Lymphadenopathy"]
    assert lymph and all(s.text in full.report.findings + full.report.impression for s in lymph)
    assert not any(s.text in " ".join(conc.values()) for s in lymph)
    none = generate_case(41, labels=[], spacing=(3.0, 3.0, 6.0))
    d0, c0 = none.anatomy_texts(table)
    assert c0 == {} and set(d0) == set(table.names)
    assert all(s.label is None for s in none.report.sentences)


def test_a_larger_anatomy_table_gets_texts_without_code_changes():
    base = load_anatomy_table("released").to_dict()
    base["name"] = "bigger"
    base["anatomies"] += [{"name": "mediastinum", "classes": ["superior_vena_cava", "brachiocephalic_vein_left"]},
                          {"name": "airway", "classes": ["trachea"]}, {"name": "liver", "classes": ["liver"]}]
    table = AnatomyTable.from_dict(base)
    case = generate_case(42, labels=["Lymphadenopathy", "Lung nodule"])
    desc, conc = anatomy_texts(case.report, table)
    assert {"mediastinum", "airway", "liver"} <= set(desc)
    assert set(conc) == {"lung", "mediastinum"}


def test_reports_vary_and_reflect_findings():
    an = patient_anatomy(50, (9, 1))
    scene = build_scene(50, (9, 1, 1, 0), {"Cardiomegaly": 1, "Lung nodule": 1}, an)
    nodule = next(f for f in scene.findings if f.label == "Lung nodule")
    texts = {"Cardiomegaly": set(), "Lung nodule": set(), None: set()}
    for k in range(30):
        rep = build_report(rng_for(50, 9, 1, k), scene)
        for s in rep.sentences:
            if s.section == "findings" and s.label in texts:
                texts[s.label].add(s.text)
        nod = [s for s in rep.sentences if s.label == "Lung nodule" and s.section == "findings"]
        assert any(f"{nodule.details['sizes_mm'][0]} mm" in s.text for s in nod) or "up to" in nod[0].text \
            or "nodules" in nod[0].text.lower()
    assert len(texts["Cardiomegaly"]) >= 3 and len(texts["Lung nodule"]) >= 2 and len(texts[None]) >= 20


def test_generate_case_api():
    c = generate_case(np.random.default_rng(1), labels={"Emphysema": 1}, spacing=(3.0, 3.0, 6.0))
    assert c.hu.dtype == np.int16 and c.label_map.dtype == np.uint8 and c.hu.shape == c.label_map.shape
    assert c.spacing == (3.0, 3.0, 6.0) and len(c.origin) == 3
    assert c.labels["Emphysema"] == 1 and sum(c.labels.values()) == 1
    assert np.allclose(np.abs(np.diag(c.affine_ras))[:3], c.spacing)
    drawn = generate_case(2, labels=None)
    assert tuple(drawn.labels[k] for k in CT_RATE_LABELS) in {tuple(r) for r in label_rows()[0].tolist()}
    with pytest.raises(KeyError):
        generate_case(1, labels=["Not a label"])


def test_demo_volume_size():
    """One demo volume (scene + render) has the demo grid's size; its time is logged (speed lives in benchmarks)."""
    from fvlm.synth.case import default_grid, render_volume

    an = patient_anatomy(60, (9, 2))
    t0 = time.perf_counter()
    scene = build_scene(60, (9, 2, 1, 0), {"Lung nodule": 1, "Arterial wall calcification": 1}, an)
    t1 = time.perf_counter()
    grid = default_grid(scene.anatomy, "demo")
    hu, lab = render_volume(scene, grid, "sharp", np.random.default_rng(0))
    t2 = time.perf_counter()
    log.info("synth demo volume %s: scene %.2f s, render %.2f s", hu.shape, t1 - t0, t2 - t1)
    assert 1e6 <= hu.size <= 2.5e6 and hu.shape == lab.shape
