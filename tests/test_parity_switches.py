"""benchmarks/parity_switches.py: released training switches at the same step budget, both evaluation windows,
seed-paired statistics, finished runs skipped on rerun."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
from conftest import load_benchmark


def test_paired_differences_by_hand():
    ps = load_benchmark("parity_switches")

    def arm(c, r):
        return {"centred": {"macro_auc": c}, "released": {"macro_auc": r}}

    results = {0: {"ours": arm(0.60, 0.61), "released": arm(0.58, 0.57)},
               1: {"ours": arm(0.70, 0.70), "released": arm(0.74, 0.75)},
               2: {"ours": arm(0.65, 0.64)}}  # seed 2 unfinished for the released arm: left out of its pairs
    got = {c["comparison"]: c for c in ps.paired_differences(results)}
    sw = got["released training switches"]
    assert sw["seeds"] == [0, 1] and sw["diffs"] == [-0.02, 0.04] and sw["mean"] == pytest.approx(0.01)
    assert (sw["wins"], sw["losses"]) == (1, 1) and sw["sign_test_p"] == 1.0
    # t interval with 1 degree of freedom: mean +- 12.706 * sd / sqrt(2)
    half = 12.7062 * math.sqrt(((-0.03) ** 2 + 0.03 ** 2) / 1) / math.sqrt(2)
    assert sw["ci95_t"] == pytest.approx([0.01 - half, 0.01 + half], abs=1e-3)
    win = got["released evaluation window"]
    assert win["seeds"] == [0, 1, 2] and win["diffs"] == [0.01, 0.0, -0.01] and win["mean"] == 0.0
    assert got["all released switches"]["diffs"] == [-0.03, 0.05]


@pytest.mark.slow
def test_parity_switches_on_tiny_data(tiny_data, tmp_path, monkeypatch):
    ps = load_benchmark("parity_switches")
    from fvlm.data import store

    out, results = tmp_path / "out", tmp_path / "parity_switches.json"
    argv = ["--out", str(out), "--processed", str(tiny_data), "--config", "tiny", "--seeds", "2",
            "--results", str(results)]
    assert ps.main(argv) == 0
    r = json.loads(results.read_text())
    # the released schedule gets the preset's step budget, its per-epoch cosine over the epochs that budget spans
    per_epoch = len(store.list_volumes(tiny_data, "train")) // 4
    assert r["released_training_overrides"][-2:] == ["train.max_steps=4", f"train.epochs={math.ceil(4 / per_epoch)}"]
    assert "data.text_rule=released" in r["released_training_overrides"]
    assert r["seeds"] == [0, 1]
    for s in ("0", "1"):
        for arm in ("ours", "released"):
            run = out / "runs" / f"{arm}-seed{s}"
            assert (run / "DONE.json").is_file()
            saved = json.loads((run / "config.json").read_text())
            assert saved["train"]["seed"] == int(s)
            assert saved["data"]["text_rule"] == ("released" if arm == "released" else "fvlm")
            assert saved["train"]["lr_schedule"] == ("epoch" if arm == "released" else "step")
            assert 0.0 <= r["runs"][s][arm]["centred"]["macro_auc"] <= 1.0
    # the evaluation window reaches the scores exactly when some window differs on this split
    a = pd.read_csv(out / "scores" / "ours-seed0_centred.csv")
    b = pd.read_csv(out / "scores" / "ours-seed0_released.csv")
    assert (r["windows"]["differ"] > 0) == (not a.equals(b))
    pair = {c["comparison"]: c for c in r["paired"]}["released evaluation window"]
    assert pair["diffs"] == [round(r["runs"][s]["ours"]["released"]["macro_auc"]
                                   - r["runs"][s]["ours"]["centred"]["macro_auc"], 4) for s in ("0", "1")]
    # a rerun trains nothing (finished runs are skipped) and gives the same results
    monkeypatch.setattr("fvlm.train.train", lambda *a, **k: pytest.fail("a finished run was trained again"))
    assert ps.main(argv) == 0
    assert json.loads(results.read_text())["runs"] == r["runs"]
