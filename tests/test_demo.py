"""The main job end to end (tiny preset): synthesise -> preprocess -> train -> eval -> metrics -> plots."""

from __future__ import annotations

import json

import pandas as pd
from safetensors.numpy import load_file

from fvlm.cli import main


def test_demo_end_to_end_tiny(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--config", "tiny", "--train", "6", "--valid", "3",
                 "--set", "train.max_steps=3"]) == 0
    printed = capsys.readouterr().out
    assert "macro (16 labels)" in printed and "macro AUC" in printed
    metrics = json.loads((out / "metrics.json").read_text())  # strict JSON (NaN written as null)
    assert set(metrics) >= {"labels", "macro", "scored", "missing"}
    assert len(metrics["scored"]) == 16 and set(metrics["labels"]["Emphysema"]) >= {
        "auc", "acc", "sens", "spec", "f1", "precision", "threshold", "n", "positives"}
    for png in ("roc.png", "loss.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["seconds"]) >= {"synthesise", "preprocess", "train", "zero-shot eval", "embed + retrieval",
                                       "metrics"}
    # embeddings and retrieval of the validation split are part of the main job
    assert "volume-to-report" in printed and "R@5" in printed
    retrieval = json.loads((out / "retrieval.json").read_text())
    assert retrieval["n_volumes"] == len(pd.read_csv(out / "scores.csv"))
    assert 0.0 <= retrieval["mean"]["image_to_text"]["recall@5"] <= 1.0
    assert summary["retrieval_mean_recall"]["text_to_image"]["recall@5"] == retrieval["mean"]["text_to_image"][
        "recall@5"]
    assert set(load_file(str(out / "embeddings.safetensors"))) >= {"image/lung", "text/lung", "valid/lung"}
    # a rerun reuses every finished stage (resumable main job) and gives the same scores
    scores = (out / "scores.csv").read_text()
    assert main(["demo", "--out", str(out), "--config", "tiny", "--train", "6", "--valid", "3",
                 "--set", "train.max_steps=3"]) == 0
    assert (out / "scores.csv").read_text() == scores


def test_demo_from_decomposed_texts(tmp_path, capsys):
    """``--texts decomposed``: the anatomy texts come from fvlm decompose of the reports, not the generator."""
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--config", "tiny", "--train", "4", "--valid", "2",
                 "--set", "train.max_steps=2", "--texts", "decomposed"]) == 0
    decomposed = out / "data" / "anatomy_texts_decomposed"
    desc = json.loads((decomposed / "desc_info.json").read_text())
    assert desc and all(set(v) <= {"lung", "heart", "esophagus", "aorta"} for v in desc.values())
    saved = json.loads((out / "run" / "config.json").read_text())
    assert saved["data"]["texts"] == str(decomposed)  # training read the decomposed texts
    assert json.loads((out / "summary.json").read_text())["texts"] == "decomposed"
    assert "macro AUC" in capsys.readouterr().out
