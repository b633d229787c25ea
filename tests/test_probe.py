"""fvlm probe: label-carrying embeddings beat chance, a shuffled-label control does not; missing labels are
excluded (never read as 0); never-positive labels are reported, not scored; the scores CSV is fvlm metrics'
input; the embeddings cache is reused and invalidated by another checkpoint; zero-shot equals fvlm eval."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

import fvlm.probe as probe
from fvlm.anatomy import load_anatomy_table
from fvlm.checkpoint import save_checkpoint
from fvlm.cli import main
from fvlm.config import load_config
from fvlm.labels import read_label_table
from fvlm.model.fvlm import FVLM

ANATOMIES = ["lung", "heart", "esophagus", "aorta"]


def _tiny_run(path, seed=0):
    cfg = load_config("tiny")
    torch.manual_seed(seed)
    model = FVLM(cfg, num_anatomies=4)
    with torch.no_grad():
        model.query_tokens.normal_()
    save_checkpoint(path, 1, model, cfg, load_anatomy_table("released"))
    return path


def _synthetic(n: int, seed: int):
    """Unit-norm embeddings (n, 4, 16); Emphysema shifts lung dim 0, Cardiomegaly heart dim 1; balanced classes."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4, 16))
    emph = np.arange(n) % 2
    card = (np.arange(n) // 2) % 2
    x[:, 0, 0] += 2.5 * (2 * emph - 1)
    x[:, 1, 1] += 2.5 * (2 * card - 1)
    x /= np.linalg.norm(x, axis=2, keepdims=True)
    control = rng.permutation(emph)  # same prevalence, no relation to any embedding
    return x.astype(np.float32), emph, card, control


@pytest.fixture()
def synthetic_probe(tmp_path, monkeypatch):
    n_tr, n_ev = 400, 100
    x_tr, e_tr, c_tr, k_tr = _synthetic(n_tr, 1)
    x_ev, e_ev, c_ev, k_ev = _synthetic(n_ev, 2)
    x_ev[3, 1] = np.nan  # valid volume 3 has no heart: its Cardiomegaly score must be empty
    vol_tr = [f"train_{i}_a_1" for i in range(n_tr)]
    vol_ev = [f"valid_{i}_a_1" for i in range(n_ev)]
    missing = np.arange(0, 100)  # 100 training volumes have no Emphysema label...
    e_tr_csv = e_tr.astype(object)
    e_tr_csv[missing] = ""
    # ...and their lung embeddings carry no signal (excluded, they must not count as negatives)
    x_tr[missing, 0, 0] = 0
    train = pd.DataFrame({"VolumeName": [v + ".nii.gz" for v in vol_tr], "Emphysema": e_tr_csv,
                          "Cardiomegaly": c_tr, "Control": k_tr, "Pleural effusion": 0})
    valid = pd.DataFrame({"VolumeName": [v + ".nii.gz" for v in vol_ev], "Emphysema": e_ev, "Cardiomegaly": c_ev,
                          "Control": k_ev, "Pleural effusion": (np.arange(n_ev) % 4 == 0).astype(int)})
    train.to_csv(tmp_path / "train_labels.csv", index=False)
    valid.to_csv(tmp_path / "valid_labels.csv", index=False)
    arrays = {"train": (vol_tr, ANATOMIES, x_tr), "valid": (vol_ev, ANATOMIES, x_ev)}
    monkeypatch.setattr(probe, "split_embeddings", lambda ckpt, data, split, *a, **k: arrays[split])
    return tmp_path, _tiny_run(tmp_path / "run"), missing


def test_probe_beats_chance_on_a_carried_label_and_not_on_a_shuffled_one(synthetic_probe):
    root, run, missing = synthetic_probe
    labels = f"{root / 'train_labels.csv'},{root / 'valid_labels.csv'}"
    assert main(["probe", "--checkpoint", str(run), "--data", str(root), "--labels", labels, "--out",
                 str(root / "out"), "--fractions", "0.1,1", "--seeds", "2", "--device", "cpu"]) == 0
    summary = json.loads((root / "out" / "probe.json").read_text())
    full = [r for r in summary["runs"] if r["fraction"] == 1.0]
    assert len(full) == 2 and len(summary["runs"]) == 4
    for r in summary["runs"]:
        assert r["auc"]["Emphysema"] > 0.9 and r["auc"]["Cardiomegaly"] > 0.9, r["auc"]
        assert abs(r["auc"]["Control"] - 0.5) < 0.15, r["auc"]  # shuffled labels: chance
    # mapping: Emphysema reads the lung, Cardiomegaly the heart; the custom label falls back to all anatomies
    info = summary["label_info"]
    assert info["Emphysema"]["anatomies"] == ["lung"] and info["Cardiomegaly"]["anatomies"] == ["heart"]
    assert info["Control"]["anatomies"] == ANATOMIES and summary["fallback_all_anatomies"] == ["Control"]
    # missing labels are excluded, not read as 0
    assert info["Emphysema"]["train_missing"] == len(missing)
    assert info["Emphysema"]["train_positives"] + info["Emphysema"]["train_negatives"] == 400 - len(missing)
    assert all(r["heads"]["Emphysema"]["train_n"] == 400 - len(missing) for r in full)
    assert all(r["heads"]["Cardiomegaly"]["train_n"] == 400 for r in full)
    # 10 %: stratified subsample of each class
    tenth = [r for r in summary["runs"] if r["fraction"] == 0.1][0]["heads"]["Cardiomegaly"]
    assert tenth["train_n"] == 40 and tenth["train_positives"] == 20
    # never positive in training: reported, not scored
    assert "Pleural effusion" in summary["skipped"] and "never positive" in summary["skipped"]["Pleural effusion"]
    scores = pd.read_csv(root / "out" / "scores" / "probe_f1_seed0.csv")
    assert list(scores.columns) == ["VolumeName", "Cardiomegaly", "Emphysema", "Control"]  # eval's column order
    assert scores["VolumeName"].iloc[0] == "valid_0_a_1.nii.gz"
    assert np.isnan(scores["Cardiomegaly"].iloc[3]) and not scores["Emphysema"].isna().any()
    assert (root / "out" / "probe_auc.png").stat().st_size > 1000
    # fvlm metrics reads the scores unchanged and agrees on the AUCs
    mj = root / "m.json"
    assert main(["metrics", str(root / "out" / "scores" / "probe_f1_seed0.csv"), "--labels",
                 str(root / "valid_labels.csv"), "--json", str(mj)]) == 0
    m = json.loads(mj.read_text())
    assert m["labels"]["Emphysema"]["auc"] == pytest.approx(full[0]["auc"]["Emphysema"], abs=1e-4)
    assert m["labels"]["Cardiomegaly"]["auc"] == pytest.approx(full[0]["auc"]["Cardiomegaly"], abs=1e-4)
    # zero-shot of the (untrained) run is there as the reference line, on the labels both score
    assert summary["zero_shot"]["labels"] == ["Cardiomegaly", "Emphysema"]


def test_concat_features_and_an_explicit_anatomy_map(synthetic_probe):
    root, run, _ = synthetic_probe
    amap = root / "map.json"
    amap.write_text(json.dumps({"Emphysema": "heart", "Cardiomegaly": ["heart", "aorta"], "Control": "lung"}))
    s = probe.run_probe(run, root, [root / "train_labels.csv", root / "valid_labels.csv"], root / "o1",
                        fractions=[1.0], seeds=1, anatomy_map=str(amap), zero_shot=False, device="cpu")
    assert s.label_info["Cardiomegaly"]["anatomies"] == ["heart", "aorta"]
    assert s.runs[0].auc["Emphysema"] < 0.75  # the heart does not carry it: the map is obeyed
    assert s.runs[0].auc["Cardiomegaly"] > 0.9
    s = probe.run_probe(run, root, [root / "train_labels.csv", root / "valid_labels.csv"], root / "o2",
                        fractions=[1.0], seeds=1, features="concat", zero_shot=False, device="cpu")
    assert all(v["anatomies"] == ANATOMIES for v in s.label_info.values())
    assert s.runs[0].auc["Emphysema"] > 0.9


def test_label_table_errors_and_missing_values(tmp_path):
    p = tmp_path / "labels.csv"
    p.write_text("VolumeName,A,B\nv_1.nii.gz,1,\nv_2.nii.gz,0,NA\nv_3.nii.gz,1,1\n")
    t = read_label_table(str(p))
    assert list(t.index) == ["v_1", "v_2", "v_3"]
    assert np.isnan(t.loc["v_1", "B"]) and np.isnan(t.loc["v_2", "B"]) and t.loc["v_3", "B"] == 1.0
    bad = tmp_path / "bad.csv"
    bad.write_text("VolumeName,A\nv_1.nii.gz,1\nv_2.nii.gz,2\n")
    with pytest.raises(ValueError, match=r"bad\.csv.*'A'.*v_2\.nii\.gz='2'"):
        read_label_table(bad)
    bad.write_text("VolumeName,A\nv_1.nii.gz,yes\n")
    with pytest.raises(ValueError, match="bad.csv"):
        read_label_table(bad)
    other = tmp_path / "other.csv"
    other.write_text("VolumeName,A,B\nv_1.nii.gz,0,\n")
    with pytest.raises(ValueError, match="labelled differently"):
        read_label_table([p, other])
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        read_label_table(tmp_path / "nope.csv")


def test_subsample_and_cv_guard():
    y = np.array([1.0] * 3 + [0.0] * 97 + [np.nan] * 10)
    keep = probe.subsample(y, 0.1, 0, "x")
    assert keep.sum() == 11 and y[keep].sum() == 1 and not np.isnan(y[keep]).any()
    assert np.array_equal(keep, probe.subsample(y, 0.1, 0, "x"))
    assert not np.array_equal(keep, probe.subsample(y, 0.1, 1, "x"))
    rng = np.random.default_rng(0)
    head = probe.fit_head(rng.normal(size=(12, 3)), np.array([1] + [0] * 11), seed=0)
    assert head.cv_folds == 0 and head.C == probe.DEFAULT_C  # one positive: nothing to cross-validate
    x = rng.normal(size=(40, 3))
    head = probe.fit_head(x, (x[:, 0] > 0).astype(int), seed=0)
    assert head.cv_folds == 5 and head.C in probe.C_GRID and head.cv_auc > 0.8


def test_probe_on_a_real_tiny_run_caches_embeddings_and_matches_eval(tiny_data, tmp_path, monkeypatch):
    import fvlm.zeroshot

    run = _tiny_run(tmp_path / "run")
    labels = f"{tiny_data / 'labels' / 'train_labels.csv'},{tiny_data / 'labels' / 'valid_labels.csv'}"
    out = tmp_path / "out"
    s = probe.run_probe(run, tiny_data, labels, out, fractions=[1.0], seeds=1, device="cpu")
    cache = out / "cache" / "embeddings_train.safetensors"
    assert cache.is_file() and (out / "cache" / "embeddings_valid.safetensors").is_file()
    # every label without a positive among the tiny training volumes is reported
    y = read_label_table(tiny_data / "labels" / "train_labels.csv")
    never = sorted(c for c in y.columns if y[c].max() < 1)
    assert sorted(k for k, v in s.skipped.items() if "never positive" in v) == never
    assert set(s.scored_labels) == set(y.columns) - set(s.skipped)
    # zero-shot from the cached embeddings = fvlm eval
    ev = fvlm.zeroshot.evaluate(run, tiny_data, "valid", tmp_path / "eval.csv", device="cpu").scores
    zs = pd.read_csv(out / "scores" / "zeroshot.csv")
    assert list(zs.columns) == list(ev.columns)
    np.testing.assert_allclose(zs.iloc[:, 1:].to_numpy(float), ev.iloc[:, 1:].to_numpy(float), atol=1e-5)

    # a rerun reuses the cache (no encoding) ...
    def boom(*a, **k):
        raise AssertionError("embeddings recomputed")

    monkeypatch.setattr(fvlm.zeroshot, "anatomy_embeddings", boom)
    probe.run_probe(run, tiny_data, labels, out, fractions=[1.0], seeds=1, device="cpu")
    # ... and another checkpoint invalidates it
    other = _tiny_run(tmp_path / "other", seed=1)
    with pytest.raises(AssertionError, match="recomputed"):
        probe.run_probe(other, tiny_data, labels, out, fractions=[1.0], seeds=1, device="cpu")


def test_split_names_cannot_leave_the_output_folders(tmp_path):
    """``--split`` becomes part of the embeddings cache file name: one safe name only."""
    from fvlm.probe import split_embeddings

    with pytest.raises(ValueError, match="split"):
        split_embeddings(tmp_path, tmp_path, "../outside", tmp_path / "cache", None, "cpu", 0)
    assert not (tmp_path / "outside.safetensors").exists() and not (tmp_path / "cache").exists()
