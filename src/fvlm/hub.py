"""Hugging Face Hub ids as model sources, offline first; and quiet library output while loading.

``fvlm.load("org/name")``, ``fvlm predict --checkpoint org/name`` and ``FVLM.from_pretrained("org/name")``
resolve a Hub id through ``huggingface_hub.snapshot_download``: with ``HF_HUB_OFFLINE=1`` (the ``fvlm``
command's default) only the local cache is read (``HF_HUB_CACHE``, else ``HF_HOME/hub``, else
``~/.cache/huggingface/hub``; the ``models--org--name/snapshots/<revision>/`` + ``refs/main`` layout), and
nothing is downloaded. The cache location is read from the environment at call time.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

from huggingface_hub import snapshot_download
from transformers.utils import logging as tlog

log = logging.getLogger(__name__)

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")
_TRUE = {"1", "true", "yes", "on"}


def is_hub_id(text: str) -> bool:
    """``org/name`` that is not an existing local path."""
    return bool(_HUB_ID.match(text)) and ".." not in text and not Path(text).exists()


def hub_cache_dir() -> Path:
    """The Hugging Face Hub cache that ``huggingface_hub`` would use, from the current environment."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "huggingface" / "hub"


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def snapshot(repo_id: str, revision: str | None = None, cache_dir: str | Path | None = None,
             local_files_only: bool | None = None, token: str | bool | None = None) -> Path:
    """Local folder of a Hub model (cached snapshot; downloaded only when online and allowed)."""
    cache = Path(cache_dir) if cache_dir else hub_cache_dir()
    local_only = offline() if local_files_only is None else local_files_only
    try:
        folder = snapshot_download(repo_id, revision=revision, cache_dir=str(cache), local_files_only=local_only,
                                   token=token)
    except Exception as e:  # LocalEntryNotFoundError, RepositoryNotFoundError, connection errors, ...
        where = f"the Hugging Face cache {cache}"
        raise FileNotFoundError(f"{repo_id}: not a local path, and not found in {where}"
                                f"{' (HF_HUB_OFFLINE=1: nothing is downloaded)' if local_only else ''}: "
                                f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    log.info("Hub model %s -> %s", repo_id, folder)
    return Path(folder)


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' loading chatter (load-report tables, "Loading weights" bars) inside the block.

    fvlm reports what matters itself in one log line (e.g. how many checkpoint tensors were unused).
    """
    level = tlog.get_verbosity()
    bars = tlog.is_progress_bar_enabled()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        tlog.set_verbosity(level)
        if bars:
            tlog.enable_progress_bar()


__all__ = ["hub_cache_dir", "is_hub_id", "offline", "quiet_transformers", "snapshot"]
