"""The machine description every benchmark writes into its results JSON (one definition)."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine(device: Any = None, **extra: Any) -> dict[str, Any]:
    """CPU model, cores, Python/torch versions and threads, load average; the GPU name for a CUDA device."""
    import torch

    out: dict[str, Any] = {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
                           "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                           "load_average_at_start": os.getloadavg()}
    if device is not None and torch.device(device).type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(torch.device(device))
    out.update(extra)
    return out
