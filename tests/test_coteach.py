"""Co-teaching: the softened targets by hand, alpha = 0 is the plain rule, DDP (gloo) equals one process,
and a short two-model training run works and resumes exactly."""

from __future__ import annotations

import csv
import math
import os
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from fvlm.checkpoint import latest_checkpoint
from fvlm.config import load_config
from fvlm.coteach import PEER_DIR, PEER_SEED_OFFSET
from fvlm.loss import anatomy_contrastive_loss, co_teaching_targets, false_negative_targets
from fvlm.train import train


def test_targets_equal_hand_computation():
    # 3 samples of one anatomy: 0 normal, 1 and 2 abnormal; all valid. Plain targets: identity (switches off).
    s = torch.eye(3)[None]
    peer_logits = torch.tensor([[[0.0, 0.0, 0.0], [1.0, 2.0, 0.0], [0.0, math.log(3.0), 0.0]]])
    valid = torch.ones(1, 3, dtype=torch.bool)
    normal = torch.tensor([[True, False, False]])
    t = co_teaching_targets(s, peer_logits, valid, normal, alpha=0.5)
    e = math.e
    z1 = 1 + e + e * e
    # row 1: half the identity row (0, 1, 0) + half of softmax(1, 2, 0) = (e, e^2, 1) / z1
    # row 2: half of (0, 0, 1) + half of softmax(0, log 3, 0) = (1, 3, 1) / 5
    expected = torch.tensor([
        [1.0, 0.0, 0.0],  # normal: unchanged
        [0.5 * e / z1, 0.5 + 0.5 * e * e / z1, 0.5 / z1],
        [0.1, 0.3, 0.6],
    ])
    assert torch.allclose(t, expected[None], atol=1e-6)
    assert torch.allclose(t.sum(-1), torch.ones(1, 3))


def test_targets_ignore_invalid_columns_and_rows():
    s = torch.eye(3)[None]
    s[0, 2, 2] = 0.0  # sample 2 invalid: its row and column are 0 in the plain targets
    valid = torch.tensor([[True, True, False]])
    normal = torch.zeros(1, 3, dtype=torch.bool)
    t = co_teaching_targets(s, torch.tensor([[[0.0, 0.0, 9.0], [0.0, 0.0, 9.0], [9.0, 9.0, 9.0]]]), valid, normal,
                            alpha=1.0)
    assert torch.allclose(t[0, :2, :2], torch.full((2, 2), 0.5)) and t[0, :, 2].abs().sum() == 0
    assert t[0, 2].abs().sum() == 0
    with pytest.raises(ValueError, match="alpha"):
        co_teaching_targets(s, s, valid, normal, alpha=1.5)


def _batch(b=6, a=2, e=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(b, a, e, generator=g), dim=-1)
    txt = F.normalize(torch.randn(b, a, e, generator=g), dim=-1)
    valid = torch.ones(b, a, dtype=torch.bool)
    valid[1, 0] = False
    normal = torch.tensor([[True, False], [False, False], [True, True], [False, True], [True, False],
                           [False, False]])[:b]
    text_id = torch.arange(b * a).reshape(b, a)
    text_id[2, 1] = text_id[3, 1]
    return img, txt, valid, normal, text_id


def test_alpha_zero_equals_plain_rule_and_alpha_changes_the_loss():
    img, txt, valid, normal, ids = _batch()
    pimg, ptxt, *_ = _batch(seed=1)
    plain = anatomy_contrastive_loss(img, txt, valid, normal, ids, 0.1)
    zero = anatomy_contrastive_loss(img, txt, valid, normal, ids, 0.1, peer_image_features=pimg,
                                    peer_text_features=ptxt, peer_temperature=0.2, co_teaching_alpha=0.0)
    half = anatomy_contrastive_loss(img, txt, valid, normal, ids, 0.1, peer_image_features=pimg,
                                    peer_text_features=ptxt, peer_temperature=0.2, co_teaching_alpha=0.5)
    assert torch.equal(plain["loss"], zero["loss"])
    assert not torch.allclose(plain["loss"], half["loss"])


def test_loss_with_peer_equals_a_direct_computation():
    """One anatomy, by hand: soft CE of both directions with the co-taught targets."""
    img, txt, valid, normal, ids = _batch()
    pimg, ptxt, *_ = _batch(seed=1)
    k, temp, ptemp, alpha = 1, 0.1, 0.2, 0.5
    out = anatomy_contrastive_loss(img, txt, valid, normal, ids, temp, peer_image_features=pimg,
                                   peer_text_features=ptxt, peer_temperature=ptemp, co_teaching_alpha=alpha)
    s = false_negative_targets(normal[:, k], ids[:, k])  # anatomy 1: all valid
    logits = img[:, k] @ txt[:, k].T / temp
    plog = pimg[:, k] @ ptxt[:, k].T / ptemp
    ab = ~normal[:, k]

    def soften(p):
        return torch.where(ab[:, None], (1 - alpha) * s + alpha * p.softmax(-1), s)

    i2t = -(soften(plog) * logits.log_softmax(-1)).sum(-1).mean()
    t2i = -(soften(plog.T) * logits.T.log_softmax(-1)).sum(-1).mean()
    assert torch.allclose(out["loss/1"], (i2t + t2i) / 2, atol=1e-5)


def test_peer_needs_its_features():
    img, txt, valid, normal, ids = _batch()
    with pytest.raises(ValueError, match="peer"):
        anatomy_contrastive_loss(img, txt, valid, normal, ids, 0.1, peer_image_features=img, co_teaching_alpha=0.5)


WORLD = 2


def _ddp_worker(rank: int, port: int, out_dir: str) -> None:
    from fvlm import distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank))
    dist.init_distributed("cpu", timeout_s=60)
    img, txt, valid, normal, ids = _batch()
    pimg, ptxt, *_ = _batch(seed=1)
    sl = slice(rank * 3, (rank + 1) * 3)
    img = img[sl].clone().requires_grad_(True)
    out = anatomy_contrastive_loss(img, txt[sl], valid[sl], normal[sl], ids[sl], 0.1, peer_image_features=pimg[sl],
                                   peer_text_features=ptxt[sl], peer_temperature=0.2, co_teaching_alpha=0.5)
    (out["loss"] * WORLD).backward()
    grads = dist.all_gather_tensor(img.grad.contiguous())
    torch.save({"loss": out["loss"].detach(), "grad": grads}, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_distributed()


def test_two_process_gloo_equals_one_process(tmp_path):
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    ctx = mp.start_processes(_ddp_worker, args=(port, str(tmp_path)), nprocs=WORLD, join=False, start_method=method)
    img, txt, valid, normal, ids = _batch()
    pimg, ptxt, *_ = _batch(seed=1)
    img = img.clone().requires_grad_(True)
    ref = anatomy_contrastive_loss(img, txt, valid, normal, ids, 0.1, peer_image_features=pimg,
                                   peer_text_features=ptxt, peer_temperature=0.2, co_teaching_alpha=0.5)
    ref["loss"].backward()
    deadline = time.monotonic() + 90
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail("two-process gloo run did not finish within 90 s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
    for r in range(WORLD):
        saved = torch.load(tmp_path / f"rank{r}.pt", weights_only=True)
        assert torch.allclose(saved["loss"], ref["loss"].detach(), atol=1e-6)
        # the gradient of world * loss on a rank's own slice, averaged over the ranks as DDP does for parameters,
        # equals the single-process gradient of that slice
        assert torch.allclose(saved["grad"][r] / WORLD, img.grad[r * 3:(r + 1) * 3], atol=1e-5)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(latest_checkpoint(run) / "model.safetensors"))


@pytest.mark.slow
def test_coteaching_training_runs_and_resumes_exactly(tiny_data, tmp_path):
    cfg = load_config("tiny", ["train.max_steps=4", "train.ckpt_every=2", "loss.co_teaching=true"])
    straight = train(cfg, tiny_data, tmp_path / "straight")
    peer = straight / PEER_DIR
    rows = list(csv.DictReader(open(straight / "log.csv")))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert [int(r["step"]) for r in csv.DictReader(open(peer / "log.csv"))] == [1, 2, 3, 4]
    assert load_config(peer / "config.json").train.seed == cfg.train.seed + PEER_SEED_OFFSET
    a, p = _weights(straight), _weights(peer)
    assert any(not torch.equal(a[k], p[k]) for k in a)  # different initialisation / data: different models
    # resume after an interruption at step 2 gives the same two models
    train(cfg, tiny_data, tmp_path / "resumed", stop_after_steps=2)
    train(cfg, tiny_data, tmp_path / "resumed", resume=True)
    b, q = _weights(tmp_path / "resumed"), _weights(tmp_path / "resumed" / PEER_DIR)
    for k in a:
        assert torch.equal(a[k], b[k]), k
        assert torch.equal(p[k], q[k]), k
