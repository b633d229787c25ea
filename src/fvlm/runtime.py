"""Where and how a job runs: the device, bf16 autocast, seeding, and the RNG states an exact resume restores.

Used by training (pre-training, co-teaching, fine-tuning) and by every job that runs a model (eval, embed,
predict, probe).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch

from fvlm import distributed as dist
from fvlm.config import Config


def resolve_device(device: str) -> torch.device:
    """``auto`` (this process's GPU under torchrun, else the CPU), ``cpu``, ``cuda``, ``cuda:N``."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", dist.local_rank())
        return torch.device("cpu")
    d = torch.device(device)
    if d.type == "cuda" and d.index is None:
        d = torch.device("cuda", dist.local_rank())
    return d


def autocast_context(cfg: Config, device: torch.device) -> AbstractContextManager[Any]:
    """bf16 autocast when ``train.amp`` is ``bf16``, or ``auto`` on CUDA; otherwise no autocast."""
    use = cfg.train.amp == "bf16" or (cfg.train.amp == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16) if use else nullcontext()


def seed_torch(seed: int) -> None:
    """Seed the global torch RNG (CPU and every CUDA device): model initialisation and dropout draw from it.

    Data order and augmentation never do: they are pure functions of ``(seed, epoch, index)``
    (:mod:`fvlm.data.dataset`), and each data loader has its own generator (:func:`loader_generator`)."""
    torch.manual_seed(seed)


def loader_generator(seed: int) -> torch.Generator:
    """A data loader's own generator: a new iterator (every epoch, and on resume mid-epoch) must not draw from
    the global RNG that dropout uses, or a resumed run would diverge from an uninterrupted one."""
    return torch.Generator().manual_seed(seed)


def rng_states(device: torch.device) -> dict[str, torch.Tensor]:
    """This rank's RNG states, gathered to every rank (fixed shapes: no pickling); a collective: every rank calls it.

    Returns ``{"torch": (world, n), "cuda": (world, m)}`` (``cuda`` only on a CUDA device)."""
    states = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return {k: dist.all_gather_tensor(v, device) for k, v in states.items()}


def restore_rng_states(states: dict[str, torch.Tensor], rank: int, device: torch.device) -> None:
    """Set this rank's RNG states from :func:`rng_states`' result (as saved in a checkpoint)."""
    torch.set_rng_state(states["torch"][rank])
    if device.type == "cuda" and "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"][rank], device)


__all__ = ["autocast_context", "loader_generator", "resolve_device", "restore_rng_states", "rng_states", "seed_torch"]
