"""The training loop: one readable function, single process or DDP under torchrun.

    fvlm train --config demo --data processed/ --out runs/demo
    torchrun --nproc_per_node=4 -m fvlm train --config paper_vitb --data processed/ --out runs/paper

Per optimizer step: ``grad_accum`` micro-batches, each: forward (bf16 autocast on GPU), anatomy-wise
contrastive loss over the global batch, backward of ``loss * world_size / grad_accum`` (DDP averages
gradients over ranks; the scaling makes them equal to one process on the concatenated batch); then
gradient clipping, AdamW (weight decay on weights only), warm-up + cosine schedule. Every rank runs the
same collectives and calls backward every step, even when its own crops hold no intact anatomy.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from fvlm import distributed as dist
from fvlm import engine
from fvlm import loss as losses  # the module: tests replace losses.anatomy_contrastive_loss
from fvlm.checkpoint import build_config
from fvlm.config import Config
from fvlm.coteach import train_coteaching
from fvlm.data.compat import check_store
from fvlm.data.dataset import Collate, TrainDataset
from fvlm.markers import clear_marker, write_marker
from fvlm.model.fvlm import FVLM, load_weights, param_groups
from fvlm.plots import plot_loss
from fvlm.runtime import autocast_context, seed_torch

log = logging.getLogger(__name__)


def train(cfg: Config, data: str | Path, out: str | Path, resume: bool = False, device: str = "auto",
          stop_after_steps: int | None = None) -> Path:
    """Train a model; returns the run directory.

    Args:
        cfg: resolved configuration.
        data: processed data directory (``fvlm preprocess`` output).
        out: run directory.
        resume: continue exactly from the latest checkpoint in ``out``.
        device: ``auto``, ``cpu``, ``cuda``, ...
        stop_after_steps: stop (with a checkpoint) after this optimizer step although the schedule is longer
            (simulates an interrupted job in tests; the schedule still uses the configured length).
    """
    if cfg.loss.co_teaching:  # two models trained alternately: fvlm.coteach
        return train_coteaching(cfg, data, out, resume=resume, device=device, stop_after_steps=stop_after_steps)
    data, run = Path(data), Path(out)
    session = engine.start(device)
    dev, rank, world = session.device, session.rank, session.world
    ckpt = engine.resume_point(run, resume)
    cfg, table = engine.run_config(cfg, ckpt)
    check_store(cfg, table, data)
    # the "train" marker is set again only when this run completes its schedule
    engine.write_run_files(run, cfg, table, extra=lambda r: clear_marker(r, "train"))
    dist.barrier()

    seed_torch(cfg.train.seed + rank)
    dataset = TrainDataset(data, "train", cfg, table, seed=cfg.train.seed)
    names = list(dataset.anatomy_names)
    # on resume the text encoder is rebuilt from the checkpoint's own text/ files: the run may have moved
    model = FVLM(build_config(cfg, ckpt) if ckpt is not None else cfg, num_anatomies=len(names))
    sampler, loader = engine.train_loader(dataset, cfg, session, Collate(model.tokenizer, cfg.model.text.max_length))
    micro_per_epoch = sampler.batches_per_epoch
    total_steps = engine.total_steps(cfg, micro_per_epoch)
    model.to(dev)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.train.weight_decay, cfg.train.lr, cfg.train.text_lr_scale,
                                               decay_all=cfg.train.weight_decay_all),
                                  lr=cfg.train.lr, betas=cfg.train.betas)
    scheduler = engine.schedule(optimizer, cfg, total_steps, max(1, micro_per_epoch // cfg.train.grad_accum))

    # the loop's maths: the anatomy-wise contrastive loss over the global batch, per micro-batch
    sums: dict[str, float] = {}
    last: dict[str, Any] = {}

    def micro_step(batch: dict[str, Any], epoch: int, step: int) -> None:
        tensors = {k: v.to(dev, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        with autocast_context(cfg, dev):
            outputs = trainer.ddp(tensors)
        terms = losses.anatomy_contrastive_loss(
            outputs["image_features"].float(), outputs["text_features"].float(), tensors["valid"],
            tensors["is_normal"], tensors["text_id"], outputs["temperature"].float(),
            normal_positives=cfg.loss.normal_positives,
            same_text_positives=cfg.loss.same_text_positives, anatomy_names=names)
        loss = terms["loss"]
        if not torch.isfinite(loss):
            detail = {k: float(v.detach()) for k, v in terms.items() if k.startswith("loss")}
            raise FloatingPointError(f"non-finite loss at step {step} (epoch {epoch}): {detail}; "
                                     f"try a lower train.lr or train.amp=off")
        (loss * world / cfg.train.grad_accum).backward()
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach()) / cfg.train.grad_accum
        last["temperature"] = outputs["temperature"]

    def log_row(rate: float) -> dict[str, Any]:
        row = {"lr": scheduler.get_last_lr()[0], "temperature": float(last["temperature"].detach()),
               "samples_per_s": rate, **sums}
        sums.clear()
        return row

    trainer = engine.Trainer("model", cfg, run, session, model, optimizer, scheduler, sampler, loader, micro_step,
                             log_row)
    step = 0
    if ckpt is not None:
        load_weights(model, ckpt / "model.safetensors")
        step = trainer.restore(ckpt)
        log.info("resumed from %s at step %d", ckpt, step)
    trainer.open([f"loss/{n}" for n in names] + [f"n/{n}" for n in names], step if ckpt is not None else None)
    log.info("training %s mode on %s x %d: %d scans, %d batches/epoch/rank, %d optimizer steps, anatomies %s",
             cfg.loss.mode, dev, world, len(dataset), micro_per_epoch, total_steps, names)
    step = engine.fit([trainer], table, step, total_steps, stop_after_steps, "train")
    if dist.is_main():
        plot_loss(run / "log.csv", run / "loss.png")
        if step >= total_steps:  # the whole schedule ran: the run is complete (marker written last, atomically)
            write_marker(run, "train", config=cfg.to_dict(), steps=step, checkpoint=f"checkpoints/step_{step:07d}")
    engine.finish()
    return run
