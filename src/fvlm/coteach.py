"""Co-teaching: two fVLM models trained alternately, each softening the other's targets of abnormal samples.

    fvlm train --config demo --data processed/ --out runs/ct --set loss.co_teaching=true

The paper (fVLM, ICLR 2025) reduces false negatives among *abnormal* samples by co-teaching: two models with
different initialisations, data orders and augmentations are trained alternately, and each one's predicted
similarities soften the other's targets (weight alpha = 0.5). No public code implements it; this module is our
reading of that description (docs/co-teaching.md lists the equations and every choice the paper leaves open):

- the *main* model uses ``train.seed``; the *peer* uses ``train.seed + PEER_SEED_OFFSET`` for its random
  initialisation (the pretrained text encoder is shared), its data order and its augmentations (crops,
  flips, reconstruction choice);
- one optimizer step = one step of the main model on its batch, then one step of the peer on its own batch;
- for a model's batch, the other model encodes the same batch (eval mode, no gradient) and its similarities
  ``P = softmax(I' T'^T / temp')`` replace a share alpha of the target rows of abnormal samples:
  ``S_i <- (1 - alpha) S_i + alpha P_i`` (image->text and text->image each with its own direction of P);
- under DDP the peer's features are gathered exactly like the main features, so P is the global batch's.

Run layout: ``RUN/`` is the main model's run directory (what ``fvlm eval RUN`` evaluates); ``RUN/peer/`` is
the peer's, with its own config (its seed), log and checkpoints. A checkpoint step is complete when both
exist: the peer's is written first, the main model's last, and ``--resume`` loads the peer's checkpoint of the
main model's latest step.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from fvlm import distributed as dist
from fvlm import engine
from fvlm.checkpoint import checkpoint_dir, is_complete, load_training_state
from fvlm.config import Config, config_from_dict
from fvlm.data.compat import check_store
from fvlm.data.dataset import Collate, TrainDataset
from fvlm.loss import anatomy_contrastive_loss
from fvlm.model.fvlm import FVLM, load_weights, param_groups
from fvlm.plots import plot_loss
from fvlm.runtime import autocast_context, seed_torch

log = logging.getLogger(__name__)

PEER_SEED_OFFSET = 1000  # the peer's train.seed = the main model's + this (initialisation, data order, augmentation)
PEER_DIR = "peer"


def peer_config(cfg: Config) -> Config:
    """The peer's configuration: the main one with ``train.seed + PEER_SEED_OFFSET``."""
    peer = config_from_dict(cfg.to_dict())
    peer.train.seed = cfg.train.seed + PEER_SEED_OFFSET
    return peer


def train_coteaching(cfg: Config, data: str | Path, out: str | Path, resume: bool = False, device: str = "auto",
                     stop_after_steps: int | None = None) -> Path:
    """Co-teaching training of a main and a peer model (arguments as :func:`fvlm.train.train`); returns RUN."""

    data, run = Path(data), Path(out)
    peer_run = run / PEER_DIR
    session = engine.start(device)
    dev, rank, world = session.device, session.rank, session.world
    ckpt = engine.resume_point(run, resume)
    cfg, table = engine.run_config(cfg, ckpt)
    if not cfg.loss.co_teaching:
        raise ValueError("train_coteaching needs loss.co_teaching=true")
    check_store(cfg, table, data)
    pcfg = peer_config(cfg)
    for r, c in ((run, cfg), (peer_run, pcfg)):
        engine.write_run_files(r, c, table)
    dist.barrier()

    trainers: dict[str, engine.Trainer] = {}
    alpha = cfg.loss.co_teaching_alpha
    for name, c, r in (("main", cfg, run), ("peer", pcfg, peer_run)):
        seed_torch(c.train.seed + rank)  # this member's initialisation
        dataset = TrainDataset(data, "train", c, table, seed=c.train.seed)
        model = FVLM(c, num_anatomies=len(dataset.anatomy_names)).to(dev)
        sampler, loader = engine.train_loader(dataset, c, session, Collate(model.tokenizer, c.model.text.max_length))
        optimizer = torch.optim.AdamW(param_groups(model, c.train.weight_decay, c.train.lr, c.train.text_lr_scale),
                                      lr=c.train.lr, betas=c.train.betas)
        trainers[name] = engine.Trainer(name, c, r, session, model, optimizer, None, sampler, loader, None, None)
    main, peer = trainers["main"], trainers["peer"]
    seed_torch(cfg.train.seed + rank)  # the global RNG (dropout) of the whole run
    names = list(main.loader.dataset.anatomy_names)
    micro_per_epoch = main.sampler.batches_per_epoch
    total_steps = engine.total_steps(cfg, micro_per_epoch)
    for m, other in ((main, peer), (peer, main)):
        m.scheduler = engine.schedule(m.optimizer, m.cfg, total_steps)
        m.micro_step, m.log_row = _loop_maths(m, other, cfg, names, alpha)
    step = 0
    if ckpt is not None:
        step = int(load_training_state(ckpt)["step"])
        peer_ckpt = checkpoint_dir(peer_run, step)
        if not is_complete(peer_ckpt):
            raise FileNotFoundError(f"--resume: the peer's checkpoint of step {step} ({peer_ckpt}) is missing")
        for m, c in ((main, ckpt), (peer, peer_ckpt)):
            load_weights(m.model, c / "model.safetensors")
            m.restore(c, rng=m is main)
        log.info("co-teaching: resumed from %s and %s at step %d", ckpt, peer_ckpt, step)
    for m in (main, peer):
        m.open([f"loss/{n}" for n in names] + [f"n/{n}" for n in names], step if ckpt is not None else None)
    log.info("co-teaching (alpha %.2f) %s mode on %s x %d: %d batches/epoch/rank, %d optimizer steps per model, "
             "peer seed %d", alpha, cfg.loss.mode, dev, world, micro_per_epoch, total_steps, pcfg.train.seed)
    engine.fit([main, peer], table, step, total_steps, stop_after_steps, "co-teach")
    if dist.is_main():
        for m in (main, peer):
            plot_loss(m.run / "log.csv", m.run / "loss.png")
    engine.finish()
    return run


def _loop_maths(m: engine.Trainer, other: engine.Trainer, cfg: Config, names: list[str], alpha: float):
    """``micro_step`` and ``log_row`` of model ``m``: the contrastive loss with targets softened by ``other``."""
    dev, world = m.session.device, m.session.world
    sums: dict[str, float] = {}
    last: dict[str, Any] = {}

    def micro_step(batch: dict[str, Any], epoch: int, step: int) -> None:
        tensors = {k: v.to(dev, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        other.model.eval()
        with torch.no_grad(), autocast_context(cfg, dev):
            peer_out = other.model(tensors)  # the raw module: no DDP hooks for a no-grad pass
        other.model.train()
        with autocast_context(cfg, dev):
            outputs = m.ddp(tensors)
        terms = anatomy_contrastive_loss(
            outputs["image_features"].float(), outputs["text_features"].float(), tensors["valid"],
            tensors["is_normal"], tensors["text_id"], outputs["temperature"].float(),
            normal_positives=cfg.loss.normal_positives,
            same_text_positives=cfg.loss.same_text_positives, anatomy_names=names,
            peer_image_features=peer_out["image_features"].float(),
            peer_text_features=peer_out["text_features"].float(),
            peer_temperature=peer_out["temperature"].float(), co_teaching_alpha=alpha)
        loss = terms["loss"]
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss of the {m.name} model at step {step}: "
                                     f"try a lower train.lr or train.amp=off")
        (loss * world / cfg.train.grad_accum).backward()
        last["temperature"] = outputs["temperature"].detach()
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach()) / cfg.train.grad_accum

    def log_row(rate: float) -> dict[str, Any]:
        row = {"lr": m.scheduler.get_last_lr()[0], "temperature": float(last["temperature"]), "samples_per_s": rate,
               **sums}
        sums.clear()
        return row

    return micro_step, log_row
