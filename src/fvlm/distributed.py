"""Distributed helpers: torchrun environment, process group set-up, rank-0 logging, fixed-shape gathers.

Launch with ``torchrun --nproc_per_node=G -m fvlm train ...``: torchrun sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; :func:`init_distributed` reads them (NCCL on CUDA, gloo
on CPU). A plain ``python`` run is a world of one and needs no process group.

:func:`gather_features` concatenates tensors of all ranks with ``all_gather`` on tensors (no pickling): the
local slice is the caller's own tensor, so gradients flow into it, while the other ranks' slices are
constants. Every rank must call it with the same number of tensors, in the same order, every step.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    """Process placement from the torchrun environment (a world of one without it)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer") from None


def dist_env() -> DistEnv:
    """Read ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (torchrun); defaults 0, 1, 0. Errors on inconsistent values."""
    env = DistEnv(rank=_env_int("RANK", 0), world_size=_env_int("WORLD_SIZE", 1),
                  local_rank=_env_int("LOCAL_RANK", 0))
    if env.world_size < 1 or not 0 <= env.rank < env.world_size or env.local_rank < 0:
        raise ValueError(f"inconsistent torchrun environment: RANK={env.rank}, WORLD_SIZE={env.world_size}, "
                         f"LOCAL_RANK={env.local_rank}")
    return env


def init_distributed(device: str | torch.device | None = None, timeout_s: float = 1800.0) -> DistEnv:
    """Initialise the default process group from the torchrun environment (no-op for a world of one).

    Args:
        device: ``cuda`` -> NCCL and ``torch.cuda.set_device(LOCAL_RANK)``; ``cpu`` -> gloo; ``None`` = cuda
            when available.
        timeout_s: collective timeout (a rank that never arrives fails the job instead of hanging forever).
    Returns:
        the :class:`DistEnv`.
    """
    env = dist_env()
    if not env.distributed or dist.is_initialized():
        return env
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(env.local_rank)
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend=backend, init_method="env://", rank=env.rank, world_size=env.world_size,
                            timeout=timedelta(seconds=timeout_s))
    log.info("process group %s: rank %d of %d (local rank %d)", backend, env.rank, env.world_size, env.local_rank)
    return env


def destroy_distributed() -> None:
    """Tear down the default process group if one exists."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """Global rank (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """Number of processes (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def local_rank() -> int:
    """Rank on this machine (torchrun's ``LOCAL_RANK``; 0 without it): the CUDA device index to use."""
    return dist_env().local_rank


def is_main() -> bool:
    """True on rank 0 (and in a single process)."""
    return rank() == 0


def log_main(logger: logging.Logger, msg: str, *args: object, level: int = logging.INFO) -> None:
    """Log on rank 0 only (other ranks would repeat the same line)."""
    if is_main():
        logger.log(level, msg, *args)


def setup_logging(level: int | str = logging.INFO) -> None:
    """Configure root logging with the rank in every line; ranks other than 0 log warnings and errors only."""
    r = rank() if dist.is_available() and dist.is_initialized() else dist_env().rank
    logging.basicConfig(level=level if r == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {r}] %(levelname)s %(name)s: %(message)s", force=True)


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def wrap_ddp(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``DistributedDataParallel`` around ``model`` (already on ``device``) in a process group; else ``model``.

    ``find_unused_parameters`` stays off: every parameter of fVLM receives a gradient every step (the loss
    is always connected to the graph), which the two-process test checks.
    """
    if not is_distributed():
        return model
    ids = [device.index if device.index is not None else local_rank()] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def all_gather_tensor(t: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
    """Stack a same-shape tensor of every rank: (world, *t.shape), on ``t``'s device, no gradient.

    ``device`` is where the collective runs (a CUDA device for NCCL; default ``t.device``). Bool tensors
    travel as uint8. A single process returns ``t[None]``.
    """
    if not is_distributed():
        return t[None]
    send = t.detach().to(device or t.device)
    if send.dtype == torch.bool:
        send = send.to(torch.uint8)
    recv = [torch.empty_like(send) for _ in range(world_size())]
    dist.all_gather(recv, send.contiguous())
    return torch.stack(recv).to(device=t.device, dtype=t.dtype)


def gather_features(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Concatenate tensors of all ranks along dim 0, keeping the gradient of the local slice.

    Each tensor may have a different first dimension on each rank (e.g. a short last batch): the sizes are
    exchanged first, every rank pads to the largest, ``all_gather``s fixed-shape tensors and trims the
    padding. Bool tensors travel as uint8. The local slice of the result is the input tensor itself
    (autograd flows into it); the other slices carry no gradient. A single process returns the inputs.

    Returns:
        one tensor (sum of the ranks' sizes, ...) per input, in rank order.
    """
    if not is_distributed():
        return tensors
    world, me = dist.get_world_size(), dist.get_rank()
    device = tensors[0].device
    sizes_local = torch.tensor([t.shape[0] for t in tensors], dtype=torch.int64, device=device)
    sizes_all = [torch.empty_like(sizes_local) for _ in range(world)]
    dist.all_gather(sizes_all, sizes_local)
    sizes = torch.stack(sizes_all).cpu()  # (world, n_tensors)
    out = []
    for i, t in enumerate(tensors):
        n_max = int(sizes[:, i].max())
        send = t.detach()
        if send.dtype == torch.bool:
            send = send.to(torch.uint8)
        if send.shape[0] < n_max:
            send = torch.cat([send, send.new_zeros((n_max - send.shape[0], *send.shape[1:]))])
        recv = [torch.empty_like(send) for _ in range(world)]
        dist.all_gather(recv, send.contiguous())
        parts = [r[: int(sizes[j, i])].to(t.dtype) for j, r in enumerate(recv)]
        parts[me] = t
        out.append(torch.cat(parts))
    return tuple(out)
