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

import json
import logging
import sys
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from fvlm import distributed as dist
from fvlm.anatomy import AnatomyTable, load_anatomy_table
from fvlm.checkpoint import STATE, checkpoint_dir, clean_stale, is_complete, latest_checkpoint, load_run_config
from fvlm.config import Config, config_from_dict
from fvlm.data.dataset import Collate, EpochSampler, TrainDataset
from fvlm.train import TrainLog, _checkpoint, autocast_context, check_data_config, lr_at, plot_loss, resolve_device

log = logging.getLogger(__name__)

PEER_SEED_OFFSET = 1000  # the peer's train.seed = the main model's + this (initialisation, data order, augmentation)
PEER_DIR = "peer"


@dataclass
class _Member:
    """One of the two co-taught models with its own data order, optimizer and schedule."""

    name: str
    cfg: Config
    run: Path
    model: torch.nn.Module
    ddp: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    sampler: EpochSampler
    loader: torch.utils.data.DataLoader
    micro: int = 0
    logger: TrainLog | None = None
    terms_sum: dict[str, float] = field(default_factory=dict)
    batches: Iterator[tuple[int, dict[str, Any]]] | None = None

    def next_batch(self) -> tuple[int, dict[str, Any]]:
        if self.batches is None:
            self.batches = self._iterate()
        return next(self.batches)

    def _iterate(self) -> Iterator[tuple[int, dict[str, Any]]]:
        per_epoch = self.sampler.batches_per_epoch
        while True:
            epoch, start = divmod(self.micro, per_epoch)
            self.sampler.set_epoch(epoch, start)
            for batch in self.loader:
                yield epoch, batch


def peer_config(cfg: Config) -> Config:
    """The peer's configuration: the main one with ``train.seed + PEER_SEED_OFFSET``."""
    peer = config_from_dict(cfg.to_dict())
    peer.train.seed = cfg.train.seed + PEER_SEED_OFFSET
    return peer


def _build(name: str, cfg: Config, run: Path, data: Path, table: AnatomyTable, dev: torch.device, rank: int,
           world: int) -> _Member:
    from fvlm.model.fvlm import FVLM, param_groups

    torch.manual_seed(cfg.train.seed + rank)  # this member's initialisation
    dataset = TrainDataset(data, "train", cfg, table, seed=cfg.train.seed)
    model = FVLM(cfg, num_anatomies=len(dataset.anatomy_names)).to(dev)
    sampler = EpochSampler(len(dataset), cfg.train.batch_size, cfg.train.seed, rank, world)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=cfg.train.batch_size, sampler=sampler, drop_last=True,
        collate_fn=Collate(model.tokenizer, cfg.model.text.max_length), num_workers=cfg.train.num_workers,
        pin_memory=dev.type == "cuda", persistent_workers=False,
        generator=torch.Generator().manual_seed(cfg.train.seed + rank))
    optimizer = torch.optim.AdamW(param_groups(model, cfg.train.weight_decay, cfg.train.lr, cfg.train.text_lr_scale),
                                  lr=cfg.train.lr, betas=cfg.train.betas)
    return _Member(name, cfg, run, model, model, optimizer, None, sampler, loader)


def train_coteaching(cfg: Config, data: str | Path, out: str | Path, resume: bool = False, device: str = "auto",
                     stop_after_steps: int | None = None) -> Path:
    """Co-teaching training of a main and a peer model (arguments as :func:`fvlm.train.train`); returns RUN."""
    from fvlm.loss import anatomy_contrastive_loss
    from fvlm.model.fvlm import load_weights

    data, run = Path(data), Path(out)
    peer_run = run / PEER_DIR
    dev = resolve_device(device)
    dist.init_distributed(dev)
    rank, world = dist.rank(), dist.world_size()
    if dev.type == "cuda":
        torch.cuda.set_device(dev)

    ckpt = latest_checkpoint(run) if resume else None
    if resume and ckpt is None:
        raise FileNotFoundError(f"--resume: no checkpoint in {run}/checkpoints")
    if ckpt is not None:
        saved_cfg, table = load_run_config(ckpt)
        if saved_cfg.to_dict() != cfg.to_dict():
            log.warning("--resume: using the run's saved config (%s), not the one given", ckpt / "config.json")
        cfg = saved_cfg
    else:
        table = load_anatomy_table(cfg.data.anatomy_table)
        if run.exists() and latest_checkpoint(run) is not None:
            raise FileExistsError(f"{run} already holds checkpoints: pass --resume or choose another --out")
    if not cfg.loss.co_teaching:
        raise ValueError("train_coteaching needs loss.co_teaching=true")
    check_data_config(cfg, table, data)
    pcfg = peer_config(cfg)
    if dist.is_main():
        for r, c in ((run, cfg), (peer_run, pcfg)):
            r.mkdir(parents=True, exist_ok=True)
            clean_stale(r)
            c.save(r / "config.json")
            (r / "anatomy_table.json").write_text(json.dumps(table.to_dict(), indent=2) + "\n")
    dist.barrier()

    main = _build("main", cfg, run, data, table, dev, rank, world)
    peer = _build("peer", pcfg, peer_run, data, table, dev, rank, world)
    torch.manual_seed(cfg.train.seed + rank)  # the global RNG (dropout) of the whole run
    members = (main, peer)
    names = list(main.loader.dataset.anatomy_names)
    micro_per_epoch = main.sampler.batches_per_epoch
    total_steps = cfg.train.max_steps or cfg.train.epochs * micro_per_epoch // cfg.train.grad_accum
    if total_steps <= 0:
        raise ValueError(f"no optimizer steps: {micro_per_epoch} batches/epoch with grad_accum "
                         f"{cfg.train.grad_accum} and {cfg.train.epochs} epochs")
    for m in members:
        c = m.cfg
        m.scheduler = torch.optim.lr_scheduler.LambdaLR(
            m.optimizer, lambda s, c=c: lr_at(s, c, total_steps) / c.train.lr)
    step = 0
    if ckpt is not None:
        step = int(torch.load(ckpt / STATE, map_location="cpu", weights_only=True)["step"])
        peer_ckpt = checkpoint_dir(peer_run, step)
        if not is_complete(peer_ckpt):
            raise FileNotFoundError(f"--resume: the peer's checkpoint of step {step} ({peer_ckpt}) is missing")
        for m, c in ((main, ckpt), (peer, peer_ckpt)):
            load_weights(m.model, c / "model.safetensors")
            state = torch.load(c / STATE, map_location="cpu", weights_only=True)
            m.optimizer.load_state_dict(state["optimizer"])
            m.scheduler.load_state_dict(state["scheduler"])
            m.micro = int(state["micro"])
            if int(state["world_size"]) != world:
                raise ValueError(f"--resume: checkpoint was written by {state['world_size']} processes, now {world}")
        state = torch.load(ckpt / STATE, map_location="cpu", weights_only=True)
        torch.set_rng_state(state["rng"]["torch"][rank])
        if dev.type == "cuda" and "cuda" in state["rng"]:
            torch.cuda.set_rng_state(state["rng"]["cuda"][rank], dev)
        log.info("co-teaching: resumed from %s and %s at step %d", ckpt, peer_ckpt, step)
    for m in members:
        m.ddp = dist.wrap_ddp(m.model, dev)
        if dist.is_main():
            m.logger = TrainLog(m.run, [f"loss/{n}" for n in names] + [f"n/{n}" for n in names],
                                step if ckpt is not None else None)

    last_step = min(total_steps, stop_after_steps) if stop_after_steps else total_steps
    alpha = cfg.loss.co_teaching_alpha
    log.info("co-teaching (alpha %.2f) %s mode on %s x %d: %d batches/epoch/rank, %d optimizer steps per model, "
             "peer seed %d", alpha, cfg.loss.mode, dev, world, micro_per_epoch, total_steps, pcfg.train.seed)
    bar = tqdm(total=last_step, initial=step, desc="co-teach", unit="step", disable=not dist.is_main(),
               dynamic_ncols=True, mininterval=1.0 if sys.stderr.isatty() else 30.0)
    for m in members:
        m.model.train()
    t0, seen = time.perf_counter(), 0
    try:
        while step < last_step:
            for m, other in ((main, peer), (peer, main)):
                epoch, temperature = 0, torch.zeros(())
                for _ in range(cfg.train.grad_accum):
                    epoch, batch = m.next_batch()
                    boundary = (m.micro + 1) % cfg.train.grad_accum == 0
                    tensors = {k: v.to(dev, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
                    other.model.eval()
                    with torch.no_grad(), autocast_context(cfg, dev):
                        peer_out = other.model(tensors)  # the raw module: no DDP hooks for a no-grad pass
                    other.model.train()
                    sync = nullcontext() if boundary or world == 1 else m.ddp.no_sync()
                    with sync:
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
                    m.micro += 1
                    temperature = outputs["temperature"].detach()
                    if m is main:
                        seen += batch["image"].shape[0] * world
                    for k, v in terms.items():
                        m.terms_sum[k] = m.terms_sum.get(k, 0.0) + float(v.detach()) / cfg.train.grad_accum
                if cfg.train.clip_grad > 0:
                    torch.nn.utils.clip_grad_norm_(m.model.parameters(), cfg.train.clip_grad)
                m.optimizer.step()
                m.scheduler.step()
                m.optimizer.zero_grad(set_to_none=True)
                if m.logger is not None and ((step + 1) % cfg.train.log_every == 0 or step + 1 == last_step):
                    rate = seen / max(1e-9, time.perf_counter() - t0)
                    m.logger.write({"step": step + 1, "epoch": epoch, "lr": m.scheduler.get_last_lr()[0],
                                    "temperature": float(temperature), "samples_per_s": rate, **m.terms_sum})
                m.terms_sum = {}
            step += 1
            bar.update(1)
            if step % cfg.train.ckpt_every == 0 or step == last_step:
                for m in (peer, main):  # the main model's checkpoint last: it marks the step complete
                    _checkpoint(m.run, step, m.micro, m.model, m.optimizer, m.scheduler, m.cfg, table, dev, world)
    finally:
        bar.close()
        for m in members:
            if m.logger is not None:
                m.logger.close()
    if dist.is_main():
        for m in members:
            plot_loss(m.run / "log.csv", m.run / "loss.png")
    dist.barrier()
    dist.destroy_distributed()
    return run
