"""Training: the CLI smoke run, exact resume, refusals, non-finite loss, and torchrun with two CPU processes."""

from __future__ import annotations

import csv
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fvlm.checkpoint import latest_checkpoint, load_model
from fvlm.cli import main
from fvlm.config import load_config
from fvlm.engine import lr_at
from fvlm.train import train


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(latest_checkpoint(run) / "model.safetensors"))


def test_train_cli_smoke(tiny_data, tmp_path):
    run = tmp_path / "run"
    assert main(["train", "--config", "tiny", "--data", str(tiny_data), "--out", str(run),
                 "--set", "train.max_steps=3", "--set", "train.ckpt_every=2"]) == 0
    rows = list(csv.DictReader(open(run / "log.csv")))
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    assert all(float(r["loss"]) >= 0 and float(r["loss"]) == float(r["loss"]) for r in rows)
    assert {"loss/lung", "loss/heart", "n/lung"} <= set(rows[0])
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_0000002", "step_0000003"]
    assert (run / "loss.png").stat().st_size > 1000 and (run / "tb").is_dir()
    saved = json.loads((latest_checkpoint(run) / "config.json").read_text())
    assert saved["train"]["max_steps"] == 3  # the resolved config (with overrides) travels with the weights
    state = torch.load(latest_checkpoint(run) / "training_state.pt", weights_only=True)
    assert state["step"] == 3 and state["world_size"] == 1
    model, cfg, table = load_model(run)
    assert table.names == ("lung", "heart", "esophagus", "aorta") and not model.training


def test_resume_reproduces_uninterrupted_training(tiny_data, tmp_path):
    cfg = load_config("tiny", ["train.max_steps=6", "train.ckpt_every=3", "model.vision.dropout=0.1",
                               "model.pool_dropout=0.1"])  # dropout on: the RNG state must be restored too
    straight = train(cfg, tiny_data, tmp_path / "straight")
    part = train(cfg, tiny_data, tmp_path / "resumed", stop_after_steps=3)
    assert torch.load(latest_checkpoint(part) / "training_state.pt", weights_only=True)["step"] == 3
    train(cfg, tiny_data, tmp_path / "resumed", resume=True)
    a, b = _weights(straight), _weights(tmp_path / "resumed")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # and the log continues where it stopped, without duplicate steps
    steps = [int(r["step"]) for r in csv.DictReader(open(tmp_path / "resumed" / "log.csv"))]
    assert steps == list(range(1, 7))
    # a different interruption point changes nothing either; different data order would
    other = load_config("tiny", ["train.max_steps=6", "train.ckpt_every=3", "model.vision.dropout=0.1",
                                 "model.pool_dropout=0.1", "train.seed=43"])
    c = _weights(train(other, tiny_data, tmp_path / "other_seed"))
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_refusals(tiny_data, tmp_path):
    cfg = load_config("tiny", ["train.max_steps=1"])
    run = train(cfg, tiny_data, tmp_path / "run")
    with pytest.raises(FileExistsError, match="--resume"):
        train(cfg, tiny_data, run)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(cfg, tiny_data, tmp_path / "empty", resume=True)
    # data preprocessed with another spacing must not be mixed into a run silently
    with pytest.raises(ValueError, match="spacing"):
        train(load_config("tiny", ["data.spacing=[2.0, 2.0, 4.0]"]), tiny_data, tmp_path / "other")
    # and so does evaluation (fvlm eval, fvlm embed): the model needs the store preprocessed its way
    from fvlm.embed import embed
    from fvlm.zeroshot import evaluate

    store = tmp_path / "store"
    store.mkdir()
    settings = json.loads((tiny_data / "preprocess_config.json").read_text())
    settings["data"]["spacing"] = [2.0, 2.0, 4.0]
    (store / "preprocess_config.json").write_text(json.dumps(settings))
    with pytest.raises(ValueError, match=r"data\.spacing.*--config"):
        evaluate(run, store, "valid", tmp_path / "scores.csv", device="cpu")
    with pytest.raises(ValueError, match=r"data\.spacing"):
        embed(run, store, "valid", tmp_path / "emb.safetensors", device="cpu")
    assert not (tmp_path / "scores.csv").exists() and not (tmp_path / "emb.safetensors").exists()
    with pytest.raises(FileNotFoundError, match="fvlm preprocess"):
        embed(run, tmp_path / "empty", "valid", tmp_path / "emb.safetensors", device="cpu")


def test_non_finite_loss_stops_with_a_clear_error(tiny_data, tmp_path, monkeypatch):
    import fvlm.loss

    real = fvlm.loss.anatomy_contrastive_loss

    def nan_loss(*args, **kwargs):
        out = real(*args, **kwargs)
        out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(fvlm.loss, "anatomy_contrastive_loss", nan_loss)
    with pytest.raises(FloatingPointError, match="non-finite loss at step 0"):
        train(load_config("tiny", ["train.max_steps=2"]), tiny_data, tmp_path / "run")


def test_schedule_warmup_then_cosine():
    cfg = load_config("tiny", ["train.lr=1e-3", "train.warmup_lr=1e-5", "train.min_lr=1e-6", "train.warmup_steps=10"])
    assert lr_at(0, cfg, 110) == pytest.approx(1e-5)
    assert lr_at(5, cfg, 110) == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5)
    assert lr_at(10, cfg, 110) == pytest.approx(1e-3)
    assert lr_at(60, cfg, 110) == pytest.approx(1e-6 + 0.5 * (1e-3 - 1e-6))
    assert lr_at(110, cfg, 110) == pytest.approx(1e-6)


def test_weight_decay_is_really_applied(tiny_data, tmp_path):
    """The released code's 0.05 never reached AdamW; here the groups carry it (and not to norms/biases/temp)."""
    from fvlm.model.fvlm import FVLM, param_groups

    cfg = load_config("tiny", ["train.weight_decay=0.05", "train.text_lr_scale=0.5"])
    model = FVLM(cfg, 4)
    groups = param_groups(model, cfg.train.weight_decay, cfg.train.lr, cfg.train.text_lr_scale)
    by_id = {id(p): g for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert by_id[id(named["visual_encoder.blocks.0.attn.qkv.weight"])]["weight_decay"] == 0.05
    assert by_id[id(named["visual_encoder.blocks.0.norm1.weight"])]["weight_decay"] == 0.0
    assert by_id[id(named["temp"])]["weight_decay"] == 0.0
    assert by_id[id(named["query_tokens"])]["weight_decay"] == 0.0
    text_w = next(n for n in named if n.startswith("text_encoder.") and n.endswith("query.weight"))
    assert by_id[id(named[text_w])]["lr"] == pytest.approx(cfg.train.lr * 0.5)
    assert by_id[id(named["text_proj.weight"])]["lr"] == pytest.approx(cfg.train.lr)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_cpu_processes(tiny_data, tmp_path):
    """``torchrun --nproc_per_node=2 -m fvlm train`` runs on CPU (gloo) and writes one consistent run."""
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", "-m", "fvlm", "train", "--config", "tiny", "--data", str(data),
           "--out", str(run), "--set", "train.batch_size=2", "--set", "train.max_steps=2", "--device", "cpu"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, encoding="utf-8",
                          errors="replace", timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = torch.load(latest_checkpoint(run) / "training_state.pt", weights_only=True)
    assert state["world_size"] == 2 and state["step"] == 2
    assert state["rng"]["torch"].shape[0] == 2  # both ranks' RNG states, for an exact resume
    assert [int(r["step"]) for r in csv.DictReader(open(run / "log.csv"))] == [1, 2]
