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

import csv
import json
import logging
import math
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from fvlm import distributed as dist
from fvlm.anatomy import AnatomyTable, load_anatomy_table
from fvlm.checkpoint import (
    STATE,
    build_config,
    clean_stale,
    latest_checkpoint,
    load_run_config,
    load_training_state,
    save_checkpoint,
)
from fvlm.config import Config
from fvlm.data.dataset import Collate, EpochSampler, TrainDataset

log = logging.getLogger(__name__)


def lr_at(step: int, cfg: Config, total_steps: int, steps_per_epoch: int = 0) -> float:
    """Learning rate at optimizer step ``step`` (0-based): linear warm-up, then cosine to ``min_lr``.

    ``train.lr_schedule="epoch"`` (needs ``steps_per_epoch``) is the released LAVIS ``linear_warmup_cosine_lr``:
    in epoch 0, ``min(lr, warmup_lr + (lr - warmup_lr) * i / warmup_steps)`` at its step i (so constant ``lr``
    after the warm-up, to the end of epoch 0); from epoch e >= 1 on, ``min_lr + (lr - min_lr) (1 + cos(pi e /
    epochs)) / 2``, the same for every step of the epoch.
    """
    t = cfg.train
    if t.lr_schedule == "epoch":
        if steps_per_epoch <= 0:
            raise ValueError("train.lr_schedule='epoch' needs the number of optimizer steps per epoch")
        epoch, i = divmod(step, steps_per_epoch)
        if epoch == 0:
            return min(t.lr, t.warmup_lr + (t.lr - t.warmup_lr) * i / max(1, t.warmup_steps))
        # past train.epochs (max_steps longer than the epochs) it stays at min_lr instead of rising again
        return t.min_lr + 0.5 * (t.lr - t.min_lr) * (1.0 + math.cos(math.pi * min(1.0, epoch / max(1, t.epochs))))
    if step < t.warmup_steps:
        return t.warmup_lr + (t.lr - t.warmup_lr) * step / max(1, t.warmup_steps)
    progress = (step - t.warmup_steps) / max(1, total_steps - t.warmup_steps)
    return t.min_lr + 0.5 * (t.lr - t.min_lr) * (1.0 + math.cos(math.pi * min(1.0, progress)))


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", dist.local_rank())
        return torch.device("cpu")
    d = torch.device(device)
    if d.type == "cuda" and d.index is None:
        d = torch.device("cuda", dist.local_rank())
    return d


def autocast_context(cfg: Config, device: torch.device):
    use = cfg.train.amp == "bf16" or (cfg.train.amp == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16) if use else nullcontext()


def check_data_config(cfg: Config, table: AnatomyTable, data: Path) -> None:
    """Refuse data preprocessed with another spacing/window/anatomy table than the run's config."""
    p = data / "preprocess_config.json"
    if not p.exists():
        raise FileNotFoundError(f"{p} not found: is {data} a directory written by fvlm preprocess?")
    with open(p) as f:
        saved = json.load(f)
    d = saved.get("data", saved)
    problems = []
    for key in ("spacing", "hu_window"):
        if key in d and [float(x) for x in d[key]] != [float(x) for x in getattr(cfg.data, key)]:
            problems.append(f"data.{key}: preprocessed {d[key]} vs config {list(getattr(cfg.data, key))}")
    saved_table = saved.get("anatomy_table")
    if isinstance(saved_table, dict) and [a["name"] for a in saved_table.get("anatomies", [])] != list(table.names):
        problems.append(f"anatomies: preprocessed {[a['name'] for a in saved_table['anatomies']]} vs "
                        f"config {list(table.names)}")
    if problems:
        raise ValueError(f"{data} was preprocessed with a different configuration: " + "; ".join(problems)
                         + "; fvlm train without --config takes the data settings from the store; otherwise pass the "
                         "--config it was preprocessed with (or --set data.KEY=VALUE); a trained model needs data "
                         "preprocessed its way: fvlm preprocess --config RUN/config.json --out NEW_DIR")


class TrainLog:
    """log.csv + TensorBoard on rank 0; on resume, rows after the checkpoint's step are dropped."""

    def __init__(self, run: Path, keys: list[str], resume_step: int | None):
        self.path = run / "log.csv"
        self.keys = ["step", "epoch", "lr", "temperature", "samples_per_s", "loss"] + keys
        rows: list[dict[str, str]] = []
        if resume_step is not None and self.path.exists():
            with open(self.path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        self.file = open(self.path, "w", newline="")
        self.writer = csv.DictWriter(self.file, fieldnames=self.keys, extrasaction="ignore")
        self.writer.writeheader()
        self.writer.writerows(rows)
        self.file.flush()
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run / "tb"))
        except ImportError:  # tensorboard is a dependency, but logging must never stop training
            self.tb = None

    def write(self, row: dict[str, Any]) -> None:
        self.writer.writerow({k: row.get(k, "") for k in self.keys})
        self.file.flush()
        if self.tb is not None:
            for k, v in row.items():
                if k not in ("step", "epoch") and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, row["step"])

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def plot_loss(log_csv: Path, out_png: Path) -> None:
    """Total and per-anatomy loss curves (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    from fvlm.io import atomic_path

    df = pd.read_csv(log_csv)
    if df.empty:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for col in [c for c in df.columns if c == "loss" or c.startswith("loss/")]:
        series = pd.to_numeric(df[col], errors="coerce")
        ax.plot(df["step"], series, label=col.replace("loss/", ""), lw=2 if col == "loss" else 1)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("contrastive loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(out_png, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def _rng_states(device: torch.device) -> dict[str, torch.Tensor]:
    """This rank's RNG states, gathered to every rank (fixed shapes: no pickling)."""
    states = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return {k: dist.all_gather_tensor(v, device) for k, v in states.items()}


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
    from fvlm.loss import anatomy_contrastive_loss
    from fvlm.model.fvlm import FVLM, load_weights, param_groups

    if cfg.loss.co_teaching:  # two models trained alternately: fvlm.coteach (reuses this module's pieces)
        from fvlm.coteach import train_coteaching

        return train_coteaching(cfg, data, out, resume=resume, device=device, stop_after_steps=stop_after_steps)
    data, run = Path(data), Path(out)
    dev = resolve_device(device)
    dist.init_distributed(dev)
    rank, world = dist.rank(), dist.world_size()
    if dev.type == "cuda":
        torch.cuda.set_device(dev)

    # the newest checkpoint whose manifest checks out; damaged ones are skipped with a warning naming the files
    ckpt = latest_checkpoint(run, require=(STATE,)) if resume else None
    if resume and ckpt is None:
        raise FileNotFoundError(f"--resume: no checkpoint (intact, with {STATE}) in {run}/checkpoints")
    if ckpt is not None:
        saved_cfg, table = load_run_config(ckpt)
        if saved_cfg.to_dict() != cfg.to_dict():
            log.warning("--resume: using the run's saved config (%s), not the one given", ckpt / "config.json")
        cfg = saved_cfg
    else:
        table = load_anatomy_table(cfg.data.anatomy_table)
        if run.exists() and latest_checkpoint(run, verify=False) is not None:
            raise FileExistsError(f"{run} already holds checkpoints: pass --resume or choose another --out")
    check_data_config(cfg, table, data)
    if dist.is_main():
        run.mkdir(parents=True, exist_ok=True)
        clean_stale(run)
        from fvlm.markers import clear_marker

        clear_marker(run, "train")  # set again only when this run completes its schedule
        cfg.save(run / "config.json")
        (run / "anatomy_table.json").write_text(json.dumps(table.to_dict(), indent=2) + "\n")
    dist.barrier()

    torch.manual_seed(cfg.train.seed + rank)
    dataset = TrainDataset(data, "train", cfg, table, seed=cfg.train.seed)
    names = list(dataset.anatomy_names)
    # on resume the text encoder is rebuilt from the checkpoint's own text/ files: the run may have moved
    model = FVLM(build_config(cfg, ckpt) if ckpt is not None else cfg, num_anatomies=len(names))
    sampler = EpochSampler(len(dataset), cfg.train.batch_size, cfg.train.seed, rank, world)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=cfg.train.batch_size, sampler=sampler, drop_last=True,
        collate_fn=Collate(model.tokenizer, cfg.model.text.max_length), num_workers=cfg.train.num_workers,
        pin_memory=dev.type == "cuda", persistent_workers=False,
        # its own generator: a new iterator (every epoch, and on resume mid-epoch) must not draw from the
        # global RNG that dropout uses, or a resumed run would diverge from an uninterrupted one
        generator=torch.Generator().manual_seed(cfg.train.seed + rank))
    micro_per_epoch = sampler.batches_per_epoch
    total_steps = cfg.train.max_steps or cfg.train.epochs * micro_per_epoch // cfg.train.grad_accum
    if total_steps <= 0:
        raise ValueError(f"no optimizer steps: {micro_per_epoch} batches/epoch with grad_accum "
                         f"{cfg.train.grad_accum} and {cfg.train.epochs} epochs")

    model.to(dev)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.train.weight_decay, cfg.train.lr, cfg.train.text_lr_scale,
                                               decay_all=cfg.train.weight_decay_all),
                                  lr=cfg.train.lr, betas=cfg.train.betas)
    steps_per_epoch = max(1, micro_per_epoch // cfg.train.grad_accum)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_at(s, cfg, total_steps, steps_per_epoch) / cfg.train.lr)
    step, micro = 0, 0  # optimizer steps done; micro-batches consumed overall
    if ckpt is not None:
        load_weights(model, ckpt / "model.safetensors")
        state = load_training_state(ckpt)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, micro = int(state["step"]), int(state["micro"])
        if int(state["world_size"]) != world:
            raise ValueError(f"--resume: checkpoint was written by {state['world_size']} processes, now {world}")
        torch.set_rng_state(state["rng"]["torch"][rank])
        if dev.type == "cuda" and "cuda" in state["rng"]:
            torch.cuda.set_rng_state(state["rng"]["cuda"][rank], dev)
        log.info("resumed from %s at step %d", ckpt, step)
    ddp_model = dist.wrap_ddp(model, dev)

    logger = TrainLog(run, [f"loss/{n}" for n in names] + [f"n/{n}" for n in names],
                      step if ckpt is not None else None) if dist.is_main() else None
    last_step = min(total_steps, stop_after_steps) if stop_after_steps else total_steps
    log.info("training %s mode on %s x %d: %d scans, %d batches/epoch/rank, %d optimizer steps, anatomies %s",
             cfg.loss.mode, dev, world, len(dataset), micro_per_epoch, total_steps, names)
    bar = tqdm(total=last_step, initial=step, desc="train", unit="step", disable=not dist.is_main(),
               dynamic_ncols=True, mininterval=1.0 if sys.stderr.isatty() else 30.0)
    model.train()
    t0, seen = time.perf_counter(), 0
    terms_sum: dict[str, float] = {}
    try:
        while step < last_step:
            epoch, start = divmod(micro, micro_per_epoch)
            sampler.set_epoch(epoch, start)
            for batch in loader:
                boundary = (micro + 1) % cfg.train.grad_accum == 0
                tensors = {k: v.to(dev, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
                sync = nullcontext() if boundary or world == 1 else ddp_model.no_sync()
                with sync:
                    with autocast_context(cfg, dev):
                        outputs = ddp_model(tensors)
                    terms = anatomy_contrastive_loss(
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
                micro += 1
                seen += batch["image"].shape[0] * world
                for k, v in terms.items():
                    terms_sum[k] = terms_sum.get(k, 0.0) + float(v.detach()) / cfg.train.grad_accum
                if not boundary:
                    continue
                if cfg.train.clip_grad > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.clip_grad)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                rate = seen / max(1e-9, time.perf_counter() - t0)
                bar.update(1)
                bar.set_postfix(loss=f"{terms_sum.get('loss', 0):.3f}", samples_s=f"{rate:.1f}", refresh=False)
                if logger is not None and (step % cfg.train.log_every == 0 or step == last_step):
                    row = {"step": step, "epoch": epoch, "lr": scheduler.get_last_lr()[0],
                           "temperature": float(outputs["temperature"].detach()), "samples_per_s": rate, **terms_sum}
                    logger.write(row)
                terms_sum = {}
                if step % cfg.train.ckpt_every == 0 or step == last_step:
                    _checkpoint(run, step, micro, model, optimizer, scheduler, cfg, table, dev, world)
                if step >= last_step:
                    break
    finally:
        bar.close()
        if logger is not None:
            logger.close()
    if dist.is_main():
        plot_loss(run / "log.csv", run / "loss.png")
        if step >= total_steps:  # the whole schedule ran: the run is complete (marker written last, atomically)
            from fvlm.markers import write_marker

            write_marker(run, "train", config=cfg.to_dict(), steps=step, checkpoint=f"checkpoints/step_{step:07d}")
    dist.barrier()
    dist.destroy_distributed()
    return run


def _checkpoint(run: Path, step: int, micro: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                scheduler: Any, cfg: Config, table: AnatomyTable, dev: torch.device, world: int) -> None:
    rng = _rng_states(dev)  # a collective: every rank takes part
    if dist.is_main():
        state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": step,
                 "micro": micro, "world_size": world, "rng": rng}
        save_checkpoint(run, step, model, cfg, table, state)
    dist.barrier()
