"""fvlm.metrics: the CT-CLIP protocol by hand, its variants, and `fvlm metrics` end to end."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import f1_score, roc_auc_score

from fvlm.cli import main
from fvlm.labels import CT_RATE_LABELS
from fvlm.metrics import (
    LABEL_KEYS,
    METRIC_KEYS,
    THRESHOLDS,
    bootstrap_counts,
    compute_metrics,
    format_table,
    label_metrics,
    predict,
    resampled_metrics,
    roc_corner_threshold,
)
from fvlm.plots import plot_roc

# The hand case: 6 volumes, one label. Positives score 0.9, 0.8, 0.4; negatives 0.6, 0.3, 0.1.
HAND_SCORES = [0.9, 0.8, 0.6, 0.4, 0.3, 0.1]
HAND_TRUTH = [1, 1, 0, 1, 0, 0]
VOLS = [f"valid_{i}_a_1" for i in range(1, 7)]


def frames(scores: dict[str, list[float]], truth: dict[str, list[int]], volumes: list[str] = VOLS,
           suffix: str = ".nii.gz") -> tuple[pd.DataFrame, pd.DataFrame]:
    """scores.csv-like frame (names without suffix) and a full 18-label CT-RATE frame (names with suffix)."""
    s = pd.DataFrame({"VolumeName": volumes, **scores})
    y = pd.DataFrame({"VolumeName": [v + suffix for v in volumes]})
    for label in CT_RATE_LABELS:
        y[label] = truth.get(label, [0] * len(volumes))
    return s, y


def test_hand_computed_protocol():
    s, y = frames({"Cardiomegaly": HAND_SCORES}, {"Cardiomegaly": HAND_TRUTH})
    m = compute_metrics(s, y)
    c = m["labels"]["Cardiomegaly"]
    # AUC: of the 9 (positive, negative) pairs, only (0.4, 0.6) is ordered wrongly.
    assert c["auc"] == pytest.approx(8 / 9)
    # ROC corner: threshold in [0.3, 0.4) gives (1-TPR, FPR) = (0, 1/3), in [0.6, 0.8) gives (1/3, 0): equal
    # distances, ties go to the largest grid threshold below 0.8, i.e. 79/99.
    assert c["threshold"] == pytest.approx(79 / 99)
    # predictions 0.9, 0.8 -> positive: TP 2, FN 1, FP 0, TN 3
    assert c["acc"] == pytest.approx(5 / 6)
    assert c["sens"] == pytest.approx(2 / 3)
    assert c["spec"] == pytest.approx(1.0)
    assert c["precision"] == pytest.approx(1.0)
    # weighted F1: F1(pos) = 4/5, F1(neg) = 6/7, supports 3 and 3
    assert c["f1"] == pytest.approx((0.8 + 6 / 7) / 2)
    assert (c["n"], c["positives"]) == (6, 3)
    assert set(c) == set(LABEL_KEYS)
    assert m["macro"]["auc"] == pytest.approx(8 / 9) and m["macro"]["n_labels"] == 1
    assert m["scored"] == ["Cardiomegaly"]
    assert "Medical material" in m["unscored"] and len(m["unscored"]) == 17
    assert m["missing"] == {"Cardiomegaly": 0}


def test_threshold_ties_go_to_largest():
    # perfectly separated: every threshold in [0.1, 0.9) reaches the corner (distance 0)
    assert roc_corner_threshold(np.array([0.9, 0.1]), np.array([1, 0])) == THRESHOLDS[89]
    # scores exactly on grid points: '>' and '>=' differ by one grid step
    s, t = np.array([THRESHOLDS[50], THRESHOLDS[20]]), np.array([1, 0])
    assert roc_corner_threshold(s, t, comparison=">") == THRESHOLDS[49]
    assert roc_corner_threshold(s, t, comparison=">=") == THRESHOLDS[50]
    # without positives nothing can be missed: the largest threshold (1.0) minimises the false positives
    assert roc_corner_threshold(np.array([0.2, 0.7]), np.array([0, 0])) == 1.0


def test_prediction_comparison_is_strict_by_default():
    s = np.array([0.0, 0.5, 1.0])
    assert predict(s, 0.5).tolist() == [0, 0, 1]
    assert predict(s, 0.5, ">=").tolist() == [0, 1, 1]
    # a missing score counted as 0 is never positive at threshold 0 under the released '>' rule
    assert label_metrics(np.array([0.0, 0.0]), np.array([1, 0]), 0.0)["sens"] == 0.0


def test_auc_and_f1_match_sklearn_on_random_data():
    rng = np.random.default_rng(1)
    n = 300
    truth = {lab: rng.integers(0, 2, n).tolist() for lab in CT_RATE_LABELS[1:6]}
    # rounded scores create ties, which AUC must count as 1/2
    scores = {lab: np.round(rng.random(n) * 0.5 + 0.3 * np.array(t), 2).tolist() for lab, t in truth.items()}
    vols = [f"valid_{i}_a_1" for i in range(n)]
    s, y = frames(scores, truth, vols)
    m = compute_metrics(s, y, macro_f1=True)
    for lab in truth:
        assert m["labels"][lab]["auc"] == pytest.approx(roc_auc_score(truth[lab], scores[lab]), abs=1e-12)
        pred = predict(np.array(scores[lab]), m["labels"][lab]["threshold"])
        assert m["labels"][lab]["f1"] == pytest.approx(f1_score(truth[lab], pred, average="weighted"))
        assert m["labels"][lab]["f1_macro"] == pytest.approx(f1_score(truth[lab], pred, average="macro"))
    assert m["macro"]["auc"] == pytest.approx(np.mean([m["labels"][lab]["auc"] for lab in truth]))


@pytest.mark.parametrize("comparison", [">", ">="])
def test_vectorised_bootstrap_equals_expanded_resamples(comparison):
    """resampled_metrics on multiplicities == label_metrics (sklearn) on each explicitly expanded resample."""
    rng = np.random.default_rng(7)
    n = 60
    truth = rng.integers(0, 2, n)
    truth[:3] = [1, 1, 0]
    # scores on the threshold grid and repeated values: exercises ties in AUC and in the comparison
    scores = np.where(rng.random(n) < 0.3, THRESHOLDS[rng.integers(0, 100, n)], np.round(rng.random(n), 1))
    counts = bootstrap_counts(rng, n, 40)
    counts[0] = 0
    counts[0, truth == 0] = 1  # a resample without positives: AUC and sensitivity undefined
    for threshold in (None, 0.37):
        fast = resampled_metrics(scores, truth, counts, threshold=threshold, comparison=comparison)
        for b in range(len(counts)):
            s, t = np.repeat(scores, counts[b]), np.repeat(truth, counts[b])
            thr = roc_corner_threshold(s, t, comparison=comparison) if threshold is None else threshold
            ref = label_metrics(s, t, thr, comparison=comparison, macro_f1=True)
            for key in (*METRIC_KEYS, "f1_macro"):
                if math.isnan(ref[key]):
                    assert math.isnan(fast[key][b]), (b, key)
                else:
                    assert fast[key][b] == pytest.approx(ref[key], abs=1e-12), (b, key, threshold)


def test_missing_policy_zero_vs_drop():
    vols = VOLS[:5]
    s, y = frames({"Emphysema": [0.9, np.nan, 0.2, 0.7, 0.1]}, {"Emphysema": [1, 1, 0, 1, 0]}, vols)
    zero = compute_metrics(s, y, missing="zero")
    drop = compute_metrics(s, y, missing="drop")
    # zero: positives 0.9, 0.0, 0.7 vs negatives 0.2, 0.1 -> 4 of 6 pairs; drop: 0.9, 0.7 vs 0.2, 0.1 -> all
    assert zero["labels"]["Emphysema"]["auc"] == pytest.approx(4 / 6)
    assert drop["labels"]["Emphysema"]["auc"] == pytest.approx(1.0)
    assert zero["labels"]["Emphysema"]["n"] == 5 and drop["labels"]["Emphysema"]["n"] == 4
    assert zero["missing"] == drop["missing"] == {"Emphysema": 1}
    assert (zero["policy"]["missing"], drop["policy"]["missing"]) == ("zero", "drop")


def test_thresholds_from_another_split():
    s, y = frames({"Cardiomegaly": HAND_SCORES}, {"Cardiomegaly": HAND_TRUTH})
    fit_vols = [f"train_{i}_a_1" for i in range(4)]
    fs, fy = frames({"Cardiomegaly": [0.95, 0.85, 0.15, 0.05]}, {"Cardiomegaly": [1, 1, 0, 0]}, fit_vols)
    m = compute_metrics(s, y, threshold_source=(fs, fy))
    c = m["labels"]["Cardiomegaly"]
    # fitted on the other split: separation for thresholds in [0.15, 0.85) -> largest grid point 84/99
    assert c["threshold"] == pytest.approx(84 / 99)
    # only 0.9 is now positive: TP 1, FN 2, FP 0, TN 3; F1(pos) = 1/2, F1(neg) = 3/4
    assert (c["acc"], c["sens"], c["spec"], c["precision"]) == pytest.approx((4 / 6, 1 / 3, 1.0, 1.0))
    assert c["f1"] == pytest.approx(0.625)
    assert c["auc"] == pytest.approx(8 / 9)  # AUC does not depend on the threshold
    assert "another split" in m["policy"]["threshold"]
    given = compute_metrics(s, y, threshold_source={"Cardiomegaly": 84 / 99})
    assert given["labels"]["Cardiomegaly"] == c
    with pytest.raises(ValueError, match="no threshold for"):
        compute_metrics(s, y, threshold_source={"Emphysema": 0.5})


def test_bootstrap_ci_contains_estimate_and_is_seeded():
    rng = np.random.default_rng(2)
    n = 200
    truth = {lab: rng.integers(0, 2, n).tolist() for lab in CT_RATE_LABELS[7:10]}
    scores = {lab: np.clip(rng.random(n) * 0.6 + 0.3 * np.array(t), 0, 1).tolist() for lab, t in truth.items()}
    s, y = frames(scores, truth, [f"valid_{i}_a_1" for i in range(n)])
    a = compute_metrics(s, y, bootstrap=200, seed=5, macro_f1=True)
    for lab in truth:
        lo, hi = a["labels"][lab]["auc_ci95"]
        assert lo < a["labels"][lab]["auc"] < hi
    for key in (*METRIC_KEYS, "f1_macro"):
        lo, hi = a["macro"][f"{key}_ci95"]
        assert lo <= a["macro"][key] <= hi, key
        assert hi - lo > 0
    assert compute_metrics(s, y, bootstrap=200, seed=5, macro_f1=True) == a
    b = compute_metrics(s, y, bootstrap=200, seed=6, macro_f1=True)
    assert b["macro"]["auc_ci95"] != a["macro"]["auc_ci95"]
    assert b["macro"]["auc"] == a["macro"]["auc"]


def test_errors_and_single_class():
    s, y = frames({"Cardiomegaly": HAND_SCORES}, {"Cardiomegaly": HAND_TRUTH})
    with pytest.raises(ValueError, match=r"no label row for 1 scored volume\(s\): valid_6_a_1"):
        compute_metrics(s, y.iloc[:5])
    # label rows without scores are ignored (and counted)
    assert compute_metrics(s.iloc[:5], y)["policy"]["label_rows_without_scores"] == 1
    with pytest.raises(ValueError, match="outside"):
        compute_metrics(s.assign(Cardiomegaly=[2.0] + HAND_SCORES[1:]), y)
    with pytest.raises(ValueError, match="no column is a CT-RATE label"):
        compute_metrics(s.rename(columns={"Cardiomegaly": "heart"}), y)
    with pytest.raises(ValueError, match="duplicate volumes"):
        compute_metrics(pd.concat([s, s.iloc[:1]]), y)
    # a label without positives: AUC undefined and left out of the macro mean
    s2, y2 = frames({"Cardiomegaly": HAND_SCORES, "Emphysema": HAND_SCORES}, {"Cardiomegaly": HAND_TRUTH})
    m = compute_metrics(s2, y2)
    assert math.isnan(m["labels"]["Emphysema"]["auc"]) and math.isnan(m["labels"]["Emphysema"]["sens"])
    assert m["macro"]["auc"] == pytest.approx(8 / 9)
    assert "Emphysema" in format_table(m)


def write_csvs(tmp_path, scores, truth, volumes=VOLS, name="eval"):
    s, y = frames(scores, truth, volumes)
    sp, lp = tmp_path / f"{name}_scores.csv", tmp_path / f"{name}_labels.csv"
    s.to_csv(sp, index=False)
    y.to_csv(lp, index=False)
    return sp, lp


def test_cli_end_to_end(tmp_path):
    rng = np.random.default_rng(3)
    n = 40
    vols = [f"valid_{i}_a_{1 + i % 2}" for i in range(n)]
    labs = ["Arterial wall calcification", "Emphysema", "Lung nodule"]
    truth = {lab: rng.integers(0, 2, n).tolist() for lab in labs}
    scores = {lab: (rng.random(n) * 0.7 + 0.3 * np.array(t)).tolist() for lab, t in truth.items()}
    scores["Emphysema"][3] = np.nan  # an absent anatomy: empty cell
    sp, lp = write_csvs(tmp_path, scores, truth, vols)
    out, png = tmp_path / "m.json", tmp_path / "roc.png"
    assert main(["metrics", str(sp), "--labels", str(lp), "--json", str(out), "--plot", str(png)]) == 0
    m = json.loads(out.read_text())
    assert set(m) == {"labels", "macro", "scored", "unscored", "missing", "policy"}
    assert m["scored"] == labs
    assert all(set(v) == set(LABEL_KEYS) for v in m["labels"].values())
    assert set(m["macro"]) == {*METRIC_KEYS, "n_labels"}
    assert m["missing"] == {"Arterial wall calcification": 0, "Emphysema": 1, "Lung nodule": 0}
    assert m["policy"]["missing"] == "zero" and m["policy"]["prediction"] == "score > threshold"
    ref = compute_metrics(pd.read_csv(sp), pd.read_csv(lp))
    assert m["macro"]["auc"] == pytest.approx(ref["macro"]["auc"])
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000

    # honest variants together
    fp, fl = write_csvs(tmp_path, scores, truth, [v.replace("valid", "train") for v in vols], name="fit")
    out2 = tmp_path / "m2.json"
    argv = ["metrics", str(sp), "--labels", str(lp), "--json", str(out2), "--bootstrap", "20", "--macro-f1",
            "--missing", "drop", "--thresholds-from", str(fp), str(fl), "--seed", "1"]
    assert main(argv) == 0
    m2 = json.loads(out2.read_text())
    assert set(m2["labels"]["Emphysema"]) == {*LABEL_KEYS, "f1_macro", "auc_ci95"}
    assert {"f1_macro", "auc_ci95", "f1_ci95", "f1_macro_ci95"} <= set(m2["macro"])
    assert m2["labels"]["Emphysema"]["n"] == n - 1 and m2["policy"]["bootstrap"]["threshold"] == "fixed"

    # a scored volume without a label row: one clear error, exit code 2, no output written
    pd.read_csv(lp).iloc[1:].to_csv(lp, index=False)
    out3 = tmp_path / "m3.json"
    assert main(["metrics", str(sp), "--labels", str(lp), "--json", str(out3)]) == 2
    assert not out3.exists()
    assert main(["metrics", str(sp)]) == 2  # --labels missing


def test_real_ct_rate_labels_and_plot(real_data, tmp_path):
    """Scores for 300 volumes of the official validation labels (names with .nii.gz there, without here)."""
    labels = pd.read_csv(real_data / "ct_rate" / "valid_labels.csv")
    sub = labels.iloc[:300]
    scored = [lab for lab in CT_RATE_LABELS if lab not in ("Medical material", "Lymphadenopathy")]
    rng = np.random.default_rng(4)
    scores = pd.DataFrame({"VolumeName": sub["VolumeName"].str.removesuffix(".nii.gz")})
    for lab in scored:
        scores[lab] = np.clip(0.3 * sub[lab].to_numpy() + 0.7 * rng.random(len(sub)), 0, 1)
    m = compute_metrics(scores, labels)
    assert m["scored"] == scored and m["unscored"] == ["Medical material", "Lymphadenopathy"]
    assert m["policy"]["label_rows_without_scores"] == len(labels) - 300
    assert all(m["labels"][lab]["positives"] == int(sub[lab].sum()) for lab in scored)
    assert 0.6 < m["macro"]["auc"] < 0.95  # informative scores
    png = plot_roc(scores, labels, tmp_path / "sub" / "roc.png")
    assert png.stat().st_size > 10_000
    assert not [p for p in png.parent.iterdir() if p.name.startswith(".")]  # no temp file left


def test_labels_file_with_fewer_labels_scores_the_common_ones(caplog):
    """An external set (e.g. Rad-ChestCT mapped to 16 labels) lacks some columns: those are left out, loudly."""
    rng = np.random.default_rng(3)
    vols = [f"valid_{i}_a_1" for i in range(40)]
    scores = pd.DataFrame({"VolumeName": vols, "Emphysema": rng.random(40), "Cardiomegaly": rng.random(40)})
    labels = pd.DataFrame({"VolumeName": vols, "Emphysema": rng.integers(0, 2, 40)})
    with caplog.at_level("WARNING"):
        m = compute_metrics(scores, labels)
    assert m["scored"] == ["Emphysema"] and "Cardiomegaly" not in m["labels"]
    assert "Cardiomegaly" in caplog.text
    with pytest.raises(ValueError, match="no label column"):
        compute_metrics(scores[["VolumeName", "Cardiomegaly"]], labels)
