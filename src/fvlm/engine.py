"""The training machinery shared by pre-training (:mod:`fvlm.train`), co-teaching (:mod:`fvlm.coteach`) and
fine-tuning (:mod:`fvlm.finetune`); each of those keeps only its own model, data and loss.

- :func:`start` / :func:`finish`: device, process group (DDP under torchrun), and its end.
- :func:`resume_point`: the newest intact checkpoint to resume from, or the refusal to overwrite a run;
  :func:`run_config`: the run's saved configuration on resume; :func:`write_run_files`: ``config.json`` and
  ``anatomy_table.json`` of a run directory.
- :func:`train_loader`: the :class:`~fvlm.data.dataset.EpochSampler` and a data loader with its own generator;
  :func:`total_steps`, :func:`lr_at` and :func:`schedule`: the optimizer-step budget and the learning rate.
- :class:`Trainer`: one model being trained (optimizer, schedule, data position, log, checkpoints); the
  loop's maths comes in as two callables: ``micro_step(batch, epoch, step)`` (forward, loss, backward of one
  micro-batch, accumulating what it logs) and ``log_row(rate)`` (the ``log.csv`` row of the optimizer step
  just made, which also resets those sums).
- :func:`fit`: the loop. Per optimizer step and per trainer (co-teaching has two, trained alternately):
  ``grad_accum`` micro-batches (DDP synchronises gradients on the last only), gradient clipping, AdamW step,
  schedule step, ``zero_grad``; the log row every ``train.log_every`` steps and at the end; a checkpoint
  (weights, optimizer, schedule, position, every rank's RNG states) every ``train.ckpt_every`` steps and at
  the end, written in reverse trainer order (the first trainer's last: it marks the step complete).

Exact resume: data order and augmentation are pure functions of ``(seed, epoch, index)``; the position is the
number of micro-batches consumed; the global RNG (dropout) is restored from the checkpoint; data loaders draw
from their own generators only.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from fvlm import distributed as dist
from fvlm.anatomy import AnatomyTable, load_anatomy_table
from fvlm.checkpoint import STATE, clean_stale, latest_checkpoint, load_run_config, load_training_state, save_checkpoint
from fvlm.config import Config
from fvlm.data.dataset import EpochSampler
from fvlm.runtime import loader_generator, resolve_device, restore_rng_states, rng_states

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ set-up
@dataclass(frozen=True)
class Session:
    """Where a training job runs: its device and its place in the (torchrun) world."""

    device: torch.device
    rank: int
    world: int


def start(device: str) -> Session:
    """Resolve the device, start the process group under torchrun (a world of one otherwise)."""
    dev = resolve_device(device)
    dist.init_distributed(dev)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    return Session(dev, dist.rank(), dist.world_size())


def finish() -> None:
    """Every rank waits for the others, then the process group ends."""
    dist.barrier()
    dist.destroy_distributed()


def resume_point(run: Path, resume: bool) -> Path | None:
    """The checkpoint to resume from: the newest whose manifest checks out and that holds a training state
    (damaged ones are skipped with a warning naming the files). Without ``resume``: None, and a run directory
    that already holds checkpoints is refused."""
    if resume:
        ckpt = latest_checkpoint(run, require=(STATE,))
        if ckpt is None:
            raise FileNotFoundError(f"--resume: no checkpoint (intact, with {STATE}) in {run}/checkpoints")
        return ckpt
    if run.exists() and latest_checkpoint(run, verify=False) is not None:
        raise FileExistsError(f"{run} already holds checkpoints: pass --resume or choose another --out")
    return None


def run_config(cfg: Config, ckpt: Path | None) -> tuple[Config, AnatomyTable]:
    """The configuration and anatomy table a run trains with: ``cfg`` and its table, or on resume (``ckpt``) the
    run's saved ones (a warning when ``cfg`` differs: the saved one wins)."""
    if ckpt is None:
        return cfg, load_anatomy_table(cfg.data.anatomy_table)
    saved_cfg, table = load_run_config(ckpt)
    if saved_cfg.to_dict() != cfg.to_dict():
        log.warning("--resume: using the run's saved config (%s), not the one given", ckpt / "config.json")
    return saved_cfg, table


def write_run_files(run: Path, cfg: Config, table: AnatomyTable, extra: Callable[[Path], None] | None = None) -> None:
    """On rank 0: create ``run``, drop stale temporaries, write ``config.json`` and ``anatomy_table.json`` (and
    what ``extra(run)`` writes). The caller holds the barrier."""
    if not dist.is_main():
        return
    run.mkdir(parents=True, exist_ok=True)
    clean_stale(run)
    if extra is not None:
        extra(run)
    cfg.save(run / "config.json")
    (run / "anatomy_table.json").write_text(json.dumps(table.to_dict(), indent=2) + "\n")


def train_loader(dataset: torch.utils.data.Dataset, cfg: Config, session: Session, collate: Callable[[list], Any]
                 ) -> tuple[EpochSampler, torch.utils.data.DataLoader]:
    """This rank's epoch sampler (``train.seed``) and data loader (full batches of ``train.batch_size``)."""
    sampler = EpochSampler(len(dataset), cfg.train.batch_size, cfg.train.seed, session.rank, session.world)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=cfg.train.batch_size, sampler=sampler, drop_last=True, collate_fn=collate,
        num_workers=cfg.train.num_workers, pin_memory=session.device.type == "cuda", persistent_workers=False,
        generator=loader_generator(cfg.train.seed + session.rank))
    return sampler, loader


# ------------------------------------------------------------------------------------------------ schedule
def total_steps(cfg: Config, micro_per_epoch: int) -> int:
    """Optimizer steps of the schedule: ``train.max_steps``, else ``train.epochs`` epochs."""
    total = cfg.train.max_steps or cfg.train.epochs * micro_per_epoch // cfg.train.grad_accum
    if total <= 0:
        raise ValueError(f"no optimizer steps: {micro_per_epoch} batches/epoch with grad_accum "
                         f"{cfg.train.grad_accum} and {cfg.train.epochs} epochs")
    return total


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


def schedule(optimizer: torch.optim.Optimizer, cfg: Config, total: int, steps_per_epoch: int = 0
             ) -> torch.optim.lr_scheduler.LambdaLR:
    """:func:`lr_at` as a multiplier of every parameter group's own learning rate."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, cfg, total, steps_per_epoch) / cfg.train.lr)


# ------------------------------------------------------------------------------------------------ logging
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
            # here, not at the top: measured 0.3 s (after torch), paid only by rank 0, and an ImportError must not
            # stop training
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


# ------------------------------------------------------------------------------------------------ one model
def _batch_size(batch: Any) -> int:
    return int((batch["image"] if isinstance(batch, dict) else batch[0]).shape[0])


@dataclass
class Trainer:
    """One model being trained: optimizer, schedule, data position, log and checkpoints (see the module docstring).

    ``model`` is what the optimizer updates (and what DDP wraps); ``saved`` what a checkpoint's
    ``model.safetensors`` holds (default ``model``); ``extra(folder)`` writes further files into each checkpoint.
    """

    name: str
    cfg: Config
    run: Path
    session: Session
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    sampler: EpochSampler
    loader: torch.utils.data.DataLoader
    micro_step: Callable[[Any, int, int], None]
    log_row: Callable[[float], dict[str, Any]]
    saved: torch.nn.Module | None = None
    extra: Callable[[Path], None] | None = None
    micro: int = 0  # micro-batches consumed (the data position)
    seen: int = 0  # samples of the global batch seen by this process's run (throughput)
    ddp: torch.nn.Module | None = None
    logger: TrainLog | None = None
    _batches: Iterator[tuple[int, Any]] | None = field(default=None, repr=False)

    def restore(self, ckpt: Path, rng: bool = True) -> int:
        """Optimizer, schedule and data position from ``ckpt`` (the weights are the caller's); with ``rng``, this
        rank's RNG states too. Returns the checkpoint's optimizer step."""
        state = load_training_state(ckpt)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.micro = int(state["micro"])
        if int(state["world_size"]) != self.session.world:
            raise ValueError(f"--resume: checkpoint was written by {state['world_size']} processes, "
                             f"now {self.session.world}")
        if rng:
            restore_rng_states(state["rng"], self.session.rank, self.session.device)
        return int(state["step"])

    def open(self, log_keys: list[str], resume_step: int | None) -> None:
        """DDP-wrap the model; on rank 0, open ``log.csv`` (``resume_step``: where a resumed log continues)."""
        self.ddp = dist.wrap_ddp(self.model, self.session.device)
        if dist.is_main():
            self.logger = TrainLog(self.run, log_keys, resume_step)

    def next_batch(self) -> tuple[int, Any]:
        """(epoch, batch) of the next micro-batch, from the data position on, across epochs."""
        if self._batches is None:
            self._batches = self._iterate()
        return next(self._batches)

    def _iterate(self) -> Iterator[tuple[int, Any]]:
        per_epoch = self.sampler.batches_per_epoch
        while True:
            epoch, start = divmod(self.micro, per_epoch)
            self.sampler.set_epoch(epoch, start)
            for batch in self.loader:
                yield epoch, batch

    def accumulate(self, step: int) -> int:
        """``train.grad_accum`` micro-batches through ``micro_step``; returns the epoch of the last."""
        epoch = 0
        for _ in range(self.cfg.train.grad_accum):
            epoch, batch = self.next_batch()
            boundary = (self.micro + 1) % self.cfg.train.grad_accum == 0
            sync = nullcontext() if boundary or self.session.world == 1 else self.ddp.no_sync()
            with sync:
                self.micro_step(batch, epoch, step)
            self.micro += 1
            self.seen += _batch_size(batch) * self.session.world
        return epoch

    def optimizer_step(self) -> None:
        if self.cfg.train.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.clip_grad)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def save(self, step: int, table: AnatomyTable) -> None:
        """A checkpoint of ``step`` (a collective: every rank gathers its RNG states; rank 0 writes)."""
        rng = rng_states(self.session.device)
        if dist.is_main():
            state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(), "step": step,
                     "micro": self.micro, "world_size": self.session.world, "rng": rng}
            save_checkpoint(self.run, step, self.saved if self.saved is not None else self.model, self.cfg, table,
                            training_state=state, extra=self.extra)
        dist.barrier()

    def close(self) -> None:
        if self._batches is not None:
            self._batches.close()  # ends the data loader's iterator (and its workers)
            self._batches = None
        if self.logger is not None:
            self.logger.close()


# ------------------------------------------------------------------------------------------------ the loop
def fit(trainers: Sequence[Trainer], table: AnatomyTable, step: int, total: int, stop_after_steps: int | None,
        desc: str) -> int:
    """Train from optimizer step ``step`` to ``total`` (or ``stop_after_steps``); returns the step reached."""
    cfg = trainers[0].cfg.train
    last_step = min(total, stop_after_steps) if stop_after_steps else total
    bar = tqdm(total=last_step, initial=step, desc=desc, unit="step", disable=not dist.is_main(),
               dynamic_ncols=True, mininterval=1.0 if sys.stderr.isatty() else 30.0)
    for t in trainers:
        t.model.train()
    t0 = time.perf_counter()
    try:
        while step < last_step:
            for t in trainers:
                epoch = t.accumulate(step)
                t.optimizer_step()
                rate = trainers[0].seen / max(1e-9, time.perf_counter() - t0)
                row = {"step": step + 1, "epoch": epoch, **t.log_row(rate)}
                if t is trainers[0]:
                    bar.set_postfix(loss=f"{row.get('loss', 0):.3f}", samples_s=f"{rate:.1f}", refresh=False)
                if t.logger is not None and ((step + 1) % cfg.log_every == 0 or step + 1 == last_step):
                    t.logger.write(row)
            step += 1
            bar.update(1)
            if step % cfg.ckpt_every == 0 or step == last_step:
                for t in reversed(trainers):
                    t.save(step, table)
    finally:
        bar.close()
        for t in trainers:
            t.close()
    return step


__all__ = ["Session", "TrainLog", "Trainer", "finish", "fit", "lr_at", "resume_point", "run_config", "schedule",
           "start", "total_steps", "train_loader", "write_run_files"]
