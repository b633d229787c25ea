"""Completion markers: a stage or run is done only when a marker, written last and atomically, says so.

    from fvlm.markers import write_marker, is_done, clear_marker

    if not is_done(run, "train", config=cfg.to_dict()):
        clear_marker(run, "train")           # an older marker must not vouch for a redo that is killed
        train(...)
        write_marker(run, "train", config=cfg.to_dict(), steps=n)

A marker is ``DIR/{stage}.done.json``::

    {"stage": ..., "done": true, "command": "fvlm demo --out ...", "version": fvlm.__version__,
     "config_hash": sha256 of the canonical JSON of ``config`` (or null), "time": ISO 8601 UTC,
     "host": ..., "pid": ..., "id": a random id (later stages may record it to chain on this one), **info}

It is written with a temporary file + rename after everything the stage produced, so a killed job leaves
either no marker (the stage is redone) or a complete one. :func:`is_done` also compares ``config_hash`` when
a ``config`` is given: a marker of other settings does not count.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import socket
import sys
import uuid
from pathlib import Path
from typing import Any

from fvlm.io import atomic_write_text

SUFFIX = ".done.json"


def marker_path(directory: str | Path, stage: str) -> Path:
    if not stage or "/" in stage or "\\" in stage or stage.startswith("."):
        raise ValueError(f"bad marker stage name {stage!r}")
    return Path(directory) / f"{stage}{SUFFIX}"


def config_hash(config: Any) -> str:
    """sha256 (hex) of the canonical JSON of ``config`` (a dict, list or anything ``json`` serialises)."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _version() -> str:
    try:
        from fvlm import __version__

        return str(__version__)
    except ImportError:  # pragma: no cover
        return "unknown"


def producer_info(config: Any = None) -> dict[str, Any]:
    """What produced an output: command line, fvlm version, config hash, UTC time, host, process id."""
    argv = list(sys.argv)
    if argv and argv[0].endswith(("__main__.py", "/fvlm")):
        argv[0] = "fvlm"
    return {"command": " ".join(argv), "version": _version(),
            "config_hash": None if config is None else config_hash(config),
            "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "host": socket.gethostname(), "pid": os.getpid(), "id": uuid.uuid4().hex}


def write_marker(directory: str | Path, stage: str, *, config: Any = None, **info: Any) -> Path:
    """Write ``DIR/{stage}.done.json`` atomically (call it after the stage's last output); returns its path."""
    path = marker_path(directory, stage)
    record = {"stage": stage, "done": True, **producer_info(config), **info}
    atomic_write_text(path, json.dumps(record, indent=1, default=str) + "\n")
    return path


def read_marker(directory: str | Path, stage: str) -> dict[str, Any] | None:
    """The marker's record, or ``None`` when there is none or it is unreadable (= not done)."""
    try:
        with open(marker_path(directory, stage)) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("stage") != stage or record.get("done") is not True:
        return None
    return record


def is_done(directory: str | Path, stage: str, *, config: Any = None) -> bool:
    """True when a valid marker exists (and, with ``config``, was written for the same config hash)."""
    record = read_marker(directory, stage)
    if record is None:
        return False
    return config is None or record.get("config_hash") == config_hash(config)


def clear_marker(directory: str | Path, stage: str) -> None:
    """Remove the marker (before redoing a stage, so a kill during the redo leaves it not done)."""
    marker_path(directory, stage).unlink(missing_ok=True)


__all__ = ["SUFFIX", "clear_marker", "config_hash", "is_done", "marker_path", "producer_info", "read_marker",
           "write_marker"]
