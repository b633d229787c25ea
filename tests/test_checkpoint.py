"""Checkpoint integrity and format stability: manifest, damaged files named, resume fallback, the committed
format-1 folder, and quiet text-model loading."""

from __future__ import annotations

import json
import logging
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fvlm.anatomy import load_anatomy_table
from fvlm.checkpoint import (
    MANIFEST,
    STATE,
    WEIGHTS,
    CheckpointError,
    latest_checkpoint,
    load_model,
    load_training_state,
    save_checkpoint,
    verify_folder,
)
from fvlm.cli import main
from fvlm.config import load_config
from fvlm.model.fvlm import FVLM
from fvlm.train import train

DATA = Path(__file__).resolve().parent / "data"


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.fixture()
def ckpt(tmp_path) -> Path:
    cfg = load_config("tiny")
    torch.manual_seed(0)
    model = FVLM(cfg, num_anatomies=4)
    state = {"step": 3, "optimizer": {"x": torch.arange(10.0)}}
    return save_checkpoint(tmp_path / "run", 3, model, cfg, load_anatomy_table("released"), state)


def test_manifest_lists_every_file_with_size_and_hash(ckpt):
    manifest = json.loads((ckpt / MANIFEST).read_text())
    files = manifest["files"]
    assert {WEIGHTS, STATE, "config.json", "anatomy_table.json", "preprocessing.json", "text/config.json",
            "text/tokenizer_config.json"} <= set(files)
    assert files[WEIGHTS]["bytes"] == (ckpt / WEIGHTS).stat().st_size and len(files[WEIGHTS]["sha256"]) == 64
    assert manifest["format_version"] == 1 and "torch" in manifest["written_by"]
    assert verify_folder(ckpt) == []
    # one flipped byte in the middle keeps the size: only the hash sees it
    data = bytearray((ckpt / WEIGHTS).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (ckpt / WEIGHTS).write_bytes(bytes(data))
    assert verify_folder(ckpt, hashes=False) == []
    problems = verify_folder(ckpt)
    assert len(problems) == 1 and WEIGHTS in problems[0] and "SHA-256" in problems[0]


def test_truncated_weights_error_names_the_file(ckpt, capfd):
    _truncate(ckpt / WEIGHTS)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: \d+ bytes, manifest.json says \d+ \(truncated"):
        load_model(ckpt)
    # the command line: one error line naming the file, exit code 2, no traceback
    capfd.readouterr()
    rc = main(["predict", str(DATA / "real_ct" / "ct.nii.gz"), "--mask", str(DATA / "real_ct" / "totalseg_v2.nii.gz"),
               "--checkpoint", str(ckpt), "--device", "cpu"])
    err = capfd.readouterr().err
    assert rc == 2 and f"{ckpt / WEIGHTS}: " in err and "Traceback" not in err
    # without a manifest (a folder from before format 1) the safetensors error is still tied to the file
    (ckpt / MANIFEST).unlink()
    with pytest.raises(CheckpointError, match=rf"{WEIGHTS}: cannot read the weights .*truncated or damaged"):
        load_model(ckpt)


def test_truncated_training_state_error_names_the_file(ckpt):
    assert load_training_state(ckpt)["step"] == 3
    _truncate(ckpt / STATE)
    (ckpt / MANIFEST).unlink()  # no manifest: the read itself must fail clearly
    with pytest.raises(CheckpointError, match=rf"{STATE}: cannot read the training state .*truncated or damaged"):
        load_training_state(ckpt)


def test_latest_checkpoint_skips_damaged_ones(tmp_path, caplog):
    cfg = load_config("tiny")
    model, table = FVLM(cfg, num_anatomies=4), load_anatomy_table("released")
    run = tmp_path / "run"
    for step in (2, 4, 6):
        save_checkpoint(run, step, model, cfg, table, {"step": step})
    assert latest_checkpoint(run).name == "step_0000006"
    _truncate(run / "checkpoints" / "step_0000006" / STATE)
    (run / "checkpoints" / "step_0000004" / "text" / "tokenizer.json").unlink()
    with caplog.at_level(logging.WARNING, logger="fvlm.checkpoint"):
        assert latest_checkpoint(run).name == "step_0000002"
    assert "step_0000006/training_state.pt" in caplog.text and "tokenizer.json: missing" in caplog.text
    for p in (run / "checkpoints").glob("step_*"):
        _truncate(p / WEIGHTS)
    with pytest.raises(CheckpointError, match="no intact checkpoint among"):
        load_model(run)


def test_resume_falls_back_to_the_previous_complete_checkpoint(tiny_data, tmp_path, caplog):
    cfg = load_config("tiny", ["train.max_steps=2", "train.ckpt_every=1"])
    straight = train(cfg, tiny_data, tmp_path / "straight")
    final = load_file(str(straight / "checkpoints" / "step_0000002" / WEIGHTS))
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    _truncate(run / "checkpoints" / "step_0000002" / STATE)  # killed while the disk filled up, say
    with caplog.at_level(logging.INFO):
        train(cfg, tiny_data, run, resume=True)
    assert "step_0000002/training_state.pt" in caplog.text and "trying the next older one" in caplog.text
    assert "resumed from" in caplog.text and "step_0000001 at step 1" in caplog.text
    again = load_file(str(run / "checkpoints" / "step_0000002" / WEIGHTS))
    for k in final:  # the fallback continued exactly: same weights as the uninterrupted run
        assert torch.equal(final[k], again[k]), k
    assert verify_folder(run / "checkpoints" / "step_0000002") == []


def test_committed_format_1_folder_loads_and_reproduces_its_outputs():
    """tests/data/checkpoint_v1 was written by format version 1 (tests/data/make_checkpoint_v1.py): the current
    code and libraries must load it and compute the same tokens and features."""
    sys.path.insert(0, str(DATA))
    try:
        from make_checkpoint_v1 import outputs
    finally:
        sys.path.remove(str(DATA))
    saved = json.loads((DATA / "checkpoint_v1" / "config.json").read_text())
    assert not Path(saved["model"]["text"]["pretrained"]).exists()  # its text model is long gone
    model, cfg, table = load_model(DATA / "checkpoint_v1")
    assert table.names == ("lung", "heart", "esophagus", "aorta")
    expected = load_file(str(DATA / "checkpoint_v1_expected.safetensors"))
    got = outputs(model, cfg)
    assert torch.equal(got["input_ids"], expected["input_ids"])
    assert torch.equal(got["present"], expected["present"])
    for k in ("image_features", "text_features", "temperature"):
        torch.testing.assert_close(got[k], expected[k], rtol=1e-5, atol=1e-6, msg=k)


def test_text_model_loading_is_one_log_line(capfd, caplog):
    """transformers' LOAD REPORT table (the pooler weights MiniLM has and our encoder does not) and its
    'Loading weights' bar are replaced by one fvlm log line."""
    from transformers.utils import logging as tlog

    from fvlm.model.text_encoder import build_text_encoder

    verbosity, bars = tlog.get_verbosity(), tlog.is_progress_bar_enabled()
    cfg = load_config("demo")
    with caplog.at_level(logging.INFO):
        build_text_encoder(cfg.model.text)
    out, err = capfd.readouterr()
    assert "LOAD REPORT" not in out + err and "UNEXPECTED" not in out + err and "Loading weights" not in out + err
    lines = [r.getMessage() for r in caplog.records if "unused checkpoint tensors" in r.getMessage()]
    assert len(lines) == 1 and "2 unused" in lines[0] and "pooler" in lines[0]
    # and transformers' own settings are restored afterwards
    assert tlog.is_progress_bar_enabled() == bars and tlog.get_verbosity() == verbosity
