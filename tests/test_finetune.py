"""fvlm finetune: a few steps on the tiny preset, exact resume, scores that fvlm metrics reads, a run that loads
like any other (text side unchanged), never-positive labels reported, the loss masks, layer-wise lr decay."""

from __future__ import annotations

import csv
import json

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from fvlm.anatomy import load_anatomy_table
from fvlm.checkpoint import latest_checkpoint, load_model, save_checkpoint
from fvlm.cli import main
from fvlm.config import load_config
from fvlm.finetune import FinetuneModel, LabelHeads, finetune, label_loss, layer_decay_groups
from fvlm.labels import read_label_table
from fvlm.model.fvlm import FVLM

STEPS = ["train.max_steps=4", "train.ckpt_every=2", "train.batch_size=2", "train.warmup_steps=1", "train.log_every=1",
         "model.vision.dropout=0.1"]  # dropout on: the RNG state must be restored too


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """An (untrained) tiny pre-trained run."""
    path = tmp_path_factory.mktemp("ft") / "pretrained"
    torch.manual_seed(0)
    cfg = load_config("tiny")
    model = FVLM(cfg, num_anatomies=4)
    with torch.no_grad():
        model.query_tokens.normal_()
    save_checkpoint(path, 1, model, cfg, load_anatomy_table("released"))
    return path


def _weights(run):
    ckpt = latest_checkpoint(run)
    return {**load_file(str(ckpt / "model.safetensors")), **{f"heads.{k}": v for k, v in
                                                            load_file(str(ckpt / "heads.safetensors")).items()}}


def test_finetune_runs_resumes_exactly_and_scores(tiny_data, source, tmp_path):
    labels = str(tiny_data / "labels" / "train_labels.csv")
    straight = tmp_path / "straight"
    assert main(["finetune", "--checkpoint", str(source), "--data", str(tiny_data), "--labels", labels,
                 "--out", str(straight), "--device", "cpu", "--layer-decay", "0.8", "--loss", "focal",
                 *[a for s in STEPS for a in ("--set", s)]]) == 0
    rows = list(csv.DictReader(open(straight / "log.csv")))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert all(np.isfinite(float(r["loss"])) for r in rows)
    spec = json.loads((straight / "finetune.json").read_text())
    y = read_label_table(labels)
    never = sorted(c for c in y.columns if y[c].max() < 1)
    assert never and sorted(spec["skipped"]) == never  # reported, and no head for them
    assert all("never positive" in spec["skipped"][k] for k in never)
    assert set(spec["labels"]) == set(y.columns) - set(never)
    assert spec["loss"] == "focal" and spec["layer_decay"] == 0.8

    # interrupted after 2 steps, resumed: identical weights (encoder, pooling and heads)
    resumed = tmp_path / "resumed"
    cfg_args = dict(overrides=STEPS, device="cpu", layer_decay=0.8, loss="focal")
    finetune(source, tiny_data, labels, resumed, stop_after_steps=2, eval_split=None, **cfg_args)
    assert torch.load(latest_checkpoint(resumed) / "training_state.pt", weights_only=True)["step"] == 2
    assert main(["finetune", "--data", str(tiny_data), "--out", str(resumed), "--resume", "--device", "cpu",
                 "--split", ""]) == 0
    a, b = _weights(straight), _weights(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [int(r["step"]) for r in csv.DictReader(open(resumed / "log.csv"))] == [1, 2, 3, 4]

    # the image side was trained, the text side carried unchanged: the run is a complete fVLM run
    src = load_file(str(latest_checkpoint(source) / "model.safetensors"))
    assert any(not torch.equal(src[k], a[k]) for k in src if k.startswith("visual_encoder."))
    assert all(torch.equal(src[k], a[k]) for k in src if k.startswith(("text_encoder.", "text_proj", "temp")))
    model, cfg, table = load_model(straight)
    assert table.names == ("lung", "heart", "esophagus", "aorta")

    # scores of the evaluated split in the fvlm eval format; fvlm metrics reads them unchanged
    scores = pd.read_csv(straight / "scores_valid.csv")
    assert scores.columns[0] == "VolumeName" and list(scores.columns[1:]) == spec["labels"]
    assert scores["VolumeName"].str.endswith(".nii.gz").all()
    s = scores.iloc[:, 1:].to_numpy(float)
    assert np.isfinite(s).all() and ((s > 0) & (s < 1)).all()
    mj = tmp_path / "metrics.json"
    assert main(["metrics", str(straight / "scores_valid.csv"), "--labels",
                 str(tiny_data / "labels" / "valid_labels.csv"), "--json", str(mj)]) == 0
    assert set(json.loads(mj.read_text())["labels"]) <= set(spec["labels"])
    # --score-only rescoring gives the same file
    again = tmp_path / "again.csv"
    assert main(["finetune", "--data", str(tiny_data), "--out", str(straight), "--score-only", "--scores",
                 str(again), "--device", "cpu"]) == 0
    pd.testing.assert_frame_equal(pd.read_csv(again), scores)


def test_label_loss_masks_missing_and_weights_positives():
    logits = torch.tensor([[0.3, -1.0], [2.0, 0.5]])
    targets = torch.tensor([[1.0, float("nan")], [0.0, 1.0]])
    known = ~torch.isnan(targets)
    total, count = label_loss(logits, targets, known, torch.tensor([3.0, 1.0]))
    sp = torch.nn.functional.softplus
    want = 3.0 * sp(-logits[0, 0]) + sp(logits[1, 0]) + sp(-logits[1, 1])
    assert count == 3 and total == pytest.approx(float(want), rel=1e-6)
    # a masked entry does not move the loss whatever its logit
    logits2 = logits.clone()
    logits2[0, 1] = 50.0
    assert label_loss(logits2, targets, known, torch.tensor([3.0, 1.0]))[0] == pytest.approx(float(total))
    focal, _ = label_loss(logits, targets, known, None, loss="focal", gamma=2.0)
    assert 0 < float(focal) < float(label_loss(logits, targets, known, None)[0])


def test_heads_read_only_their_anatomies_and_layer_decay_groups():
    select = torch.tensor([[True, False, False, False], [False, True, True, False]])
    heads = LabelHeads(select, 16)
    feats = torch.randn(3, 4, 16)
    present = torch.tensor([[True, True, True, True], [False, True, True, True], [True, False, False, True]])
    logits, usable = heads(feats, present)
    changed = feats.clone()
    changed[:, 3] += 5.0  # the aorta feeds neither head
    changed[:, 0] += 5.0  # the lung feeds head 0 only
    logits2, _ = heads(changed, present)
    assert torch.allclose(logits[:, 1], logits2[:, 1]) and not torch.allclose(logits[:, 0], logits2[:, 0])
    assert usable.tolist() == [[True, True], [False, True], [True, False]]

    cfg = load_config("tiny")
    model = FinetuneModel(FVLM(cfg, 4), heads)
    groups = layer_decay_groups(model, lr=1e-3, weight_decay=0.05, layer_decay=0.5, head_lr_scale=10.0)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    depth = cfg.model.vision.depth
    assert lr_of[id(named["heads.weight"])] == pytest.approx(1e-2)
    assert lr_of[id(named["fvlm.query_tokens"])] == pytest.approx(1e-3)
    assert lr_of[id(named[f"fvlm.visual_encoder.blocks.{depth - 1}.attn.qkv.weight"])] == pytest.approx(1e-3 * 0.5)
    assert lr_of[id(named["fvlm.visual_encoder.blocks.0.attn.qkv.weight"])] == pytest.approx(1e-3 * 0.5 ** depth)
    assert lr_of[id(named["fvlm.visual_encoder.patch_embedding.position_embeddings"])] == pytest.approx(
        1e-3 * 0.5 ** (depth + 1))
    assert not any(n.startswith(("fvlm.text_encoder", "fvlm.text_proj")) or n == "fvlm.temp"
                   for n, p in named.items() if id(p) in lr_of)


@pytest.mark.slow
def test_finetune_under_torchrun_two_cpu_processes(tiny_data, source, tmp_path):
    """``torchrun --nproc_per_node=2 -m fvlm finetune`` (gloo): one consistent run, both ranks' RNG states, scores."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={port}", "-m", "fvlm", "finetune", "--checkpoint", str(source), "--data", str(tiny_data),
           "--labels", str(tiny_data / "labels" / "train_labels.csv"), "--out", str(run), "--device", "cpu",
           "--set", "train.batch_size=2", "--set", "train.max_steps=2", "--set", "train.log_every=1"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, encoding="utf-8", errors="replace",
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = torch.load(latest_checkpoint(run) / "training_state.pt", weights_only=True)
    assert state["world_size"] == 2 and state["step"] == 2 and state["rng"]["torch"].shape[0] == 2
    assert [int(r["step"]) for r in csv.DictReader(open(run / "log.csv"))] == [1, 2]
    assert pd.read_csv(run / "scores_valid.csv").shape[0] == len(pd.read_csv(tiny_data / "manifest.csv").query(
        "split == 'valid' and status == 'ok'"))
