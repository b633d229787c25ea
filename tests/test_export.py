"""Models people can share: a run that moved and lost its text model still scores the same; ``fvlm export``
writes a Hugging Face folder with a model card that loads offline, from a path or a Hub id in the local
cache; the authors' converted checkpoint goes the same way; ``fvlm train`` takes the store's settings."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

import fvlm
from fvlm.checkpoint import load_model
from fvlm.cli import main
from fvlm.config import load_config
from fvlm.model.fvlm import FVLM
from fvlm.model.text_encoder import resolve_text_path
from fvlm.train import train

DATA = Path(__file__).resolve().parent / "data"
CT, MASK = DATA / "real_ct" / "ct.nii.gz", DATA / "real_ct" / "totalseg_v2.nii.gz"
TEXT_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.txt",
              "special_tokens_map.json")
REVISION = "0123456789abcdef0123456789abcdef01234567"


def outputs(checkpoint: str | Path, data: Path | None, out: Path) -> dict:
    """What a user gets from a model: predict (CLI and Python) and, with ``data``, eval scores and embeddings."""
    out.mkdir(parents=True, exist_ok=True)
    assert main(["predict", str(CT), "--mask", str(MASK), "--checkpoint", str(checkpoint), "--out",
                 str(out / "pred.json"), "--device", "cpu"]) == 0
    pred = fvlm.load(checkpoint).predict(CT, mask=MASK)
    result = {"cli": json.loads((out / "pred.json").read_text())["probabilities"],
              "load": pred.to_dict()["probabilities"]}
    if data is not None:
        assert main(["eval", "--checkpoint", str(checkpoint), "--data", str(data), "--split", "valid", "--out",
                     str(out / "scores.csv"), "--device", "cpu"]) == 0
        assert main(["embed", "--checkpoint", str(checkpoint), "--data", str(data), "--split", "valid", "--out",
                     str(out / "emb.safetensors"), "--device", "cpu"]) == 0
        result["scores"] = pd.read_csv(out / "scores.csv")
        result["scores_csv"] = out / "scores.csv"
        result["embed"] = load_file(str(out / "emb.safetensors"))
    return result


def assert_same(a: dict, b: dict) -> None:
    assert a["cli"] == b["cli"] and a["load"] == b["load"]
    assert any(v is not None for v in a["load"].values())
    if "scores" in b:
        pd.testing.assert_frame_equal(a["scores"], b["scores"])
        assert a["embed"].keys() == b["embed"].keys()
        for k in a["embed"]:
            assert torch.equal(a["embed"][k], b["embed"][k]), k


@pytest.fixture(scope="module")
def moved(tiny_data, tmp_path_factory):
    """Train with the text model in a temporary copy, record the outputs, delete the copy, move the run."""
    src = resolve_text_path("builtin:minilm")
    text = tmp_path_factory.mktemp("textmodel") / "minilm-copy"
    text.mkdir()
    for name in TEXT_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, text / name)
    run = tmp_path_factory.mktemp("here") / "run"
    cfg = load_config("tiny", [f"model.text.pretrained={text}", "model.text.random_init=null",
                               "model.text.num_layers=1", "train.max_steps=1"])
    train(cfg, tiny_data, run)
    before = outputs(run, tiny_data, tmp_path_factory.mktemp("before"))
    shutil.rmtree(text)
    new = tmp_path_factory.mktemp("elsewhere") / "moved-run"
    shutil.move(str(run), str(new))
    return new, before, text


@pytest.mark.slow
def test_moved_run_without_its_text_model_scores_the_same(moved, tiny_data, tmp_path):
    run, before, text = moved
    ckpt = run / "checkpoints" / "step_0000001"
    saved = json.loads((ckpt / "config.json").read_text())
    assert saved["model"]["text"]["pretrained"] == str(text) and not text.exists()  # provenance only
    assert {"preprocessing.json", "text", "manifest.json"} <= {p.name for p in ckpt.iterdir()}
    spec = json.loads((ckpt / "preprocessing.json").read_text())
    assert spec["spacing_xyz_mm"] == list(load_config("tiny").data.spacing)
    assert [a["name"] for a in spec["anatomies"]] == ["lung", "heart", "esophagus", "aorta"]
    assert_same(before, outputs(run, tiny_data, tmp_path / "after"))
    # training resumes there too (the text encoder is rebuilt from the checkpoint, not the deleted copy)
    train(load_config("tiny"), tiny_data, run, resume=True)
    # what made it work: without the text/ files the deleted text model would be needed (the old behaviour)
    old = tmp_path / "old-style"
    shutil.copytree(ckpt, old)
    shutil.rmtree(old / "text")
    (old / "manifest.json").unlink()
    with pytest.raises(FileNotFoundError, match="minilm-copy"):
        load_model(old)


def _card(folder: Path):
    from huggingface_hub import ModelCard

    return ModelCard.load(folder / "README.md")


def hub_cache(folder: Path, cache: Path, repo_id: str) -> Path:
    """The Hugging Face cache layout: blobs, snapshots/<revision>/ (symlinks to blobs) and refs/main."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / REVISION
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            blob = repo / "blobs" / hashlib.sha256(p.read_bytes()).hexdigest()
            blob.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(p, blob)
            link = snap / p.relative_to(folder)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(REVISION)
    return snap


@pytest.mark.slow
def test_export_loads_offline_from_a_folder_and_from_the_hub_cache(moved, tiny_data, tmp_path, monkeypatch):
    run, before, _ = moved
    metrics = tmp_path / "metrics.json"
    assert main(["metrics", str(before["scores_csv"]),
                 "--labels", str(tiny_data / "labels" / "valid_labels.csv"), "--json", str(metrics)]) == 0
    out = tmp_path / "fvlm-tiny"
    assert main(["export", str(run), str(out), "--metrics", str(metrics), "--training-data",
                 "Synthetic CT-RATE-format data (fvlm synth), 6 training patients.", "--dataset", "someorg/synth"]) == 0
    names = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert {"config.json", "model.safetensors", "README.md", "preprocessing.json", "anatomy_table.json",
            "manifest.json", "text/config.json", "text/tokenizer.json"} <= names
    assert not any(n.endswith((".pt", ".bin", ".pth", ".pkl")) for n in names)  # safetensors only
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "fvlm" and config["num_anatomies"] == 4 and "cfg" in config
    card = _card(out)
    assert card.data.license == "apache-2.0" and card.data.library_name == "fvlm"
    assert "fvlm" in card.data.tags and card.data.datasets == ["someorg/synth"]
    m = json.loads(metrics.read_text())
    label, vals = next((k, v) for k, v in m["labels"].items() if v["auc"] is not None)
    assert f"| {label} | {vals['auc']:.3f} |" in card.text and "| **macro (" in card.text
    for section in ("## Training data", "## Intended use and limits", "Synthetic CT-RATE-format", "## Preprocessing"):
        assert section in card.text
    assert main(["export", str(run), str(out)]) == 2  # exists: refuses without --force

    # one line, offline, from the folder: fvlm.load, FVLM.from_pretrained, the commands
    assert fvlm.load(out).predict(CT, mask=MASK).to_dict()["probabilities"] == before["load"]
    reference = load_file(str(run / "checkpoints" / "step_0000001" / "model.safetensors"))
    model = FVLM.from_pretrained(out)
    assert isinstance(model, FVLM) and not model.training
    assert model.state_dict().keys() == reference.keys()
    for k, v in reference.items():
        assert torch.equal(model.state_dict()[k], v), k
    # save_pretrained (the huggingface_hub mixin) writes the same kind of folder
    model.save_pretrained(tmp_path / "again")
    again = FVLM.from_pretrained(tmp_path / "again")
    assert all(torch.equal(again.state_dict()[k], v) for k, v in reference.items())

    # a Hub id through the local cache, nothing downloaded
    cache = tmp_path / "hf" / "hub"
    hub_cache(out, cache, "someorg/fvlm-tiny")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert_same(before, outputs("someorg/fvlm-tiny", None, tmp_path / "hub"))
    from_hub = FVLM.from_pretrained("someorg/fvlm-tiny", cache_dir=cache)
    assert all(torch.equal(from_hub.state_dict()[k], v) for k, v in reference.items())
    with pytest.raises(FileNotFoundError, match=rf"someorg/absent: .*{cache}.*HF_HUB_OFFLINE=1"):
        fvlm.load("someorg/absent")


def test_converted_official_checkpoint_exports_and_loads(tmp_path):
    """convert-official output -> export -> load reproduces the model the released-format file was made from."""
    cfg = load_config("tiny")
    torch.manual_seed(1)
    original = FVLM(cfg, num_anatomies=4).eval()
    with torch.no_grad():
        original.query_tokens.normal_()
        original.temp.fill_(0.031)
    released = {}
    for k, v in original.state_dict().items():  # the released names and shapes (see tests/test_convert.py)
        if k.startswith("text_encoder."):
            k = "text_encoder.bert." + k[len("text_encoder."):]
        released[k] = v[0].clone() if k == "query_tokens" else v.clone()
    src = tmp_path / "fvlm_released.pth"
    torch.save({"model": released, "epoch": 7}, src)
    assert main(["convert-official", str(src), "--out", str(tmp_path / "converted"), "--tokenizer", "builtin:minilm",
                 "--config", "tiny"]) == 0
    assert main(["export", str(tmp_path / "converted"), str(tmp_path / "exported")]) == 0
    card = _card(tmp_path / "exported")
    assert "convert-official" in card.text and (tmp_path / "exported" / "conversion.json").is_file()
    for source in (tmp_path / "exported", tmp_path / "converted"):
        model, _, table = load_model(source)
        assert table.names == ("lung", "heart", "esophagus", "aorta")
        for k, v in original.state_dict().items():
            assert torch.equal(model.state_dict()[k], v), (source, k)
    tok = FVLM.from_pretrained(tmp_path / "exported").tokenizer(["lung shows emphysema."])["input_ids"]
    assert tok == original.tokenizer(["lung shows emphysema."])["input_ids"]


def test_train_without_config_takes_the_store_settings(tiny_data, tmp_path, capfd):
    """fvlm preprocess --config tiny then fvlm train without --config: the store's data settings, the default
    preset's model; an explicit preset that disagrees is refused with the flags that fix it."""
    run = tmp_path / "run"
    assert main(["train", "--data", str(tiny_data), "--out", str(run), "--set", "train.max_steps=1",
                 "--set", "train.batch_size=2", "--set", "model.text.num_layers=1",
                 "--set", "model.text.freeze_layers=0", "--set", "model.text.cache_frozen=0"]) == 0
    saved = json.loads((run / "config.json").read_text())
    tiny, demo = load_config("tiny"), load_config("demo")
    for key in ("spacing", "margin", "crop_size", "hu_window", "anatomy_table"):
        want = getattr(tiny.data, key)
        assert saved["data"][key] == (list(want) if isinstance(want, tuple) else want), key
    assert saved["model"]["vision"]["width"] == demo.model.vision.width  # the model of the default preset
    capfd.readouterr()
    assert main(["train", "--config", "demo", "--data", str(tiny_data), "--out", str(tmp_path / "r2")]) == 2
    err = capfd.readouterr().err
    assert "data.spacing: preprocessed" in err and "without --config" in err and "--config" in err
    assert not (tmp_path / "r2").exists()


def test_hub_id_rules():
    from fvlm.hub import is_hub_id

    assert is_hub_id("someorg/fvlm-tiny") and is_hub_id("a/b.c_d")
    assert not is_hub_id("runs/../x") and not is_hub_id("/abs/path") and not is_hub_id("one") and not is_hub_id("a/b/c")
