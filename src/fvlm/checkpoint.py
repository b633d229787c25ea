"""Run directories and checkpoints.

A run directory ``RUN/`` holds ``config.json`` (the resolved configuration), ``anatomy_table.json``,
``log.csv``, ``tb/`` (TensorBoard) and ``checkpoints/step_{n:07d}/`` each with

- ``model.safetensors``: the weights (safetensors: no pickle),
- ``training_state.pt``: optimizer, scheduler, step, epoch position and the RNG states of every rank,
  loadable with ``torch.load(weights_only=True)``,
- ``config.json`` and ``anatomy_table.json``: what is needed to rebuild the model from this directory alone.

A checkpoint directory is written under a temporary name and renamed when complete, so a killed job never
leaves a checkpoint that looks valid but is not; ``checkpoints/latest`` names the newest one.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from fvlm.anatomy import AnatomyTable, load_anatomy_table
from fvlm.config import Config, config_from_dict
from fvlm.io import atomic_write_text

log = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
STATE = "training_state.pt"


def checkpoint_dir(run: str | Path, step: int) -> Path:
    return Path(run) / "checkpoints" / f"step_{step:07d}"


def is_complete(ckpt: Path) -> bool:
    return all((ckpt / f).is_file() for f in (WEIGHTS, "config.json", "anatomy_table.json"))


def latest_checkpoint(run: str | Path) -> Path | None:
    """The newest complete checkpoint of a run directory, or ``None``."""
    root = Path(run) / "checkpoints"
    if not root.is_dir():
        return None
    pointer = root / "latest"
    if pointer.is_file():
        ckpt = root / pointer.read_text().strip()
        if is_complete(ckpt):
            return ckpt
    candidates = sorted(p for p in root.glob("step_*") if p.is_dir() and is_complete(p))
    return candidates[-1] if candidates else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or a run directory (-> its latest checkpoint)."""
    p = Path(path)
    if is_complete(p):
        return p
    ckpt = latest_checkpoint(p)
    if ckpt is None:
        raise FileNotFoundError(f"{p}: neither a checkpoint directory (with {WEIGHTS}, config.json, "
                                f"anatomy_table.json) nor a run directory with checkpoints/")
    return ckpt


def save_checkpoint(run: str | Path, step: int, model: torch.nn.Module, cfg: Config, table: AnatomyTable,
                    training_state: dict[str, Any] | None = None) -> Path:
    """Write ``checkpoints/step_{step}`` atomically (temp dir + rename) and point ``latest`` at it."""
    from fvlm.model.fvlm import save_weights

    final = checkpoint_dir(run, step)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        save_weights(model, tmp / WEIGHTS)
        cfg.save(tmp / "config.json")
        (tmp / "anatomy_table.json").write_text(json.dumps(table.to_dict(), indent=2) + "\n")
        if training_state is not None:
            torch.save(training_state, tmp / STATE)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_text(final.parent / "latest", final.name + "\n")
    log.info("checkpoint %s", final)
    return final


def load_run_config(ckpt: Path) -> tuple[Config, AnatomyTable]:
    with open(ckpt / "config.json") as f:
        cfg = config_from_dict(json.load(f))
    table = load_anatomy_table(ckpt / "anatomy_table.json")
    return cfg, table


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, Config, AnatomyTable]:
    """Rebuild the model of a run or checkpoint directory, in eval mode on ``device``."""
    from fvlm.model.fvlm import FVLM, load_weights

    ckpt = resolve_checkpoint(path)
    cfg, table = load_run_config(ckpt)
    # the weights replace everything: do not spend time loading pretrained initialisations
    cfg.model.vision.pretrained = ""
    num_anatomies = 1 if cfg.loss.mode == "global" else len(table)
    model = FVLM(cfg, num_anatomies=num_anatomies)
    load_weights(model, ckpt / WEIGHTS)
    model.to(device).eval()
    log.info("loaded %s (%s mode, anatomies %s)", ckpt, cfg.loss.mode, table.names)
    return model, cfg, table


def clean_stale(run: str | Path) -> None:
    """Remove temporary checkpoint directories left by a killed job."""
    root = Path(run) / "checkpoints"
    for p in root.glob(".tmp-step_*"):
        shutil.rmtree(p, ignore_errors=True)
