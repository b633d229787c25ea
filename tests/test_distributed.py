"""Distributed helpers and the two-process (gloo, CPU) equivalence of DDP training with one process.

Two ranks with B samples each, DDP, loss = the global-batch anatomy loss, backward of ``loss * world_size``:
loss and gradients must equal one process on the concatenated 2B batch. Tolerance: rtol 1e-4, atol 1e-6
(float32; each rank pads its texts to its own longest, and the all-reduce sums in another order).
Steps: a normal batch (identical texts across ranks), a step where rank 1 has no valid anatomy at all, and a
step where no anatomy of the global batch is abnormal (loss 0 everywhere). None may hang: the test has a
deadline and the process group a short timeout.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest
import torch

from fvlm.distributed import DistEnv, dist_env, gather_features

B = 2  # samples per rank
WORLD = 2
TEXTS = ["lung clear.", "emphysema.", "heart normal.", "cardiomegaly.", "aortic calcification."]
NORMAL = {"lung clear.", "heart normal."}


def test_dist_env(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    assert dist_env() == DistEnv(0, 1, 0) and dist_env().is_main and not dist_env().distributed
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert dist_env() == DistEnv(3, 4, 1) and not dist_env().is_main
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ValueError, match="inconsistent"):
        dist_env()
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(ValueError, match="RANK"):
        dist_env()


def test_gather_single_process_is_identity():
    t = torch.ones(2, 3, requires_grad=True)
    (out,) = gather_features(t)
    assert out is t


def _steps():
    """Three global batches of WORLD * B samples, 2 anatomies (deterministic)."""
    g = torch.Generator().manual_seed(0)
    n, a, crop = WORLD * B, 2, (16, 32, 32)
    out = []
    for step in range(3):
        mask = torch.zeros(n, *crop, dtype=torch.uint8)
        for i in range(n):
            for k in range(a):
                z, y, x = (int(torch.randint(0, s // 2, (1,), generator=g)) for s in crop)
                mask[i, z:z + 8, y:y + 10, x:x + 10] = k + 1
        if step == 2:
            texts = [["lung clear.", "heart normal."] for _ in range(n)]  # nothing abnormal anywhere
        else:
            texts = [[TEXTS[int(torch.randint(0, len(TEXTS), (1,), generator=g))] for _ in range(a)] for _ in range(n)]
            texts[0][0], texts[B][0] = "emphysema.", "emphysema."  # identical abnormal texts across ranks
        valid = torch.ones(n, a, dtype=torch.bool)
        valid[0, 1] = False
        if step == 1:
            valid[B:] = False  # rank 1: no valid anatomy at all
        out.append({"image": torch.rand(n, 1, *crop, generator=g), "mask": mask, "valid": valid,
                    "is_normal": torch.tensor([[t in NORMAL for t in row] for row in texts]),
                    "text_id": torch.tensor([[TEXTS.index(t) for t in row] for row in texts]), "texts": texts})
    return out


def _tokenized(batch, tokenizer, lo, hi):
    from fvlm.model.text_encoder import tokenize_unique

    sub = {k: v[lo:hi] for k, v in batch.items()}
    tok = tokenize_unique(tokenizer, sub.pop("texts"), max_length=64)
    sub.update(text_input_ids=tok["input_ids"], text_attention_mask=tok["attention_mask"],
               text_index=tok["text_index"])
    return sub


def _model():
    from fvlm.config import load_config
    from fvlm.model import FVLM

    # dropout off everywhere (the tiny preset leaves BERT's default 0.1): ranks and reference must agree
    cfg = load_config("tiny", overrides=["model.text.random_init.hidden_dropout_prob=0.0",
                                         "model.text.random_init.attention_probs_dropout_prob=0.0"])
    torch.manual_seed(0)
    return FVLM(cfg, num_anatomies=2)


def _train_step(model, forward, batch, world):
    from fvlm.loss import anatomy_contrastive_loss

    out = forward(batch)
    loss = anatomy_contrastive_loss(out["image_features"], out["text_features"], batch["valid"], batch["is_normal"],
                                    batch["text_id"], out["temperature"], anatomy_names=["lung", "heart"])
    (loss["loss"] * world).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return loss["loss"].detach(), grads


def _worker(rank: int, port: int, out_dir: str) -> None:
    from torch.nn.parallel import DistributedDataParallel

    from fvlm import distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank))
    env = dist.init_distributed("cpu", timeout_s=60)
    assert env.world_size == dist.world_size() == WORLD and env.rank == dist.rank() == rank
    # gathers: ranks of different sizes (padding path), bool and int64 dtypes, the local slice keeps its gradient
    x = torch.full((rank + 1, 2), float(rank), requires_grad=True)
    flags = torch.tensor([rank == 0] * (rank + 1))
    gx, gflags = dist.gather_features(x, flags)
    gx.sum().backward()
    stacked = dist.all_gather_tensor(torch.tensor([rank, 10 + rank]))
    gathers = {"x": gx.detach(), "flags": gflags, "x_grad": x.grad, "stacked": stacked}

    model = _model()
    ddp = dist.wrap_ddp(model, torch.device("cpu"))
    assert isinstance(ddp, DistributedDataParallel)
    results = []
    for batch in _steps():
        local = _tokenized(batch, model.tokenizer, rank * B, (rank + 1) * B)
        results.append(_train_step(model, ddp, local, WORLD))
    torch.save({"steps": results, "gathers": gathers}, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_distributed()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_equals_one_process_on_the_concatenated_batch(tmp_path):
    import torch.multiprocessing as mp

    import fvlm.model.fvlm  # noqa: F401  (imported before forking: the ranks start without re-importing)

    # fork: a spawned rank re-imports torch, MONAI and transformers (10-20 s on a loaded 2-core machine);
    # torch resets its CPU thread pool in forked children, and the process group is created after the fork
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    ctx = mp.start_processes(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=False,
                             start_method=method)
    # single-process reference while the ranks run
    torch.manual_seed(0)
    model = _model()
    model.train()
    reference = [_train_step(model, model, _tokenized(batch, model.tokenizer, 0, WORLD * B), 1)
                 for batch in _steps()]
    deadline = time.monotonic() + 120
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail("two-process gloo run did not finish within 120 s (hang?)")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
    saved = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    for r, s in enumerate(saved):
        g = s["gathers"]
        assert torch.equal(g["x"], torch.tensor([[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]))
        assert g["flags"].dtype == torch.bool and g["flags"].tolist() == [True, False, False]
        assert torch.equal(g["x_grad"], torch.ones(r + 1, 2))
        assert g["stacked"].tolist() == [[0, 10], [1, 11]]
    ranks = [s["steps"] for s in saved]
    assert reference[0][0] > 0 and reference[1][0] > 0 and reference[2][0] == 0
    for step, (ref_loss, ref_grads) in enumerate(reference):
        for r in range(WORLD):
            loss, grads = ranks[r][step]
            torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6, msg=f"step {step} rank {r} loss")
            assert grads.keys() == ref_grads.keys()
            for n, g in ref_grads.items():
                torch.testing.assert_close(grads[n], g, rtol=1e-4, atol=1e-6, msg=f"step {step} rank {r} {n}")
    assert ref_grads["temp"] == 0 and reference[0][1]["temp"] != 0
