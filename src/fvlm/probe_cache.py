"""The embeddings cache of ``fvlm probe`` (:mod:`fvlm.probe`): the frozen anatomy embeddings of a split, computed
once with the evaluation crops of :func:`fvlm.zeroshot.anatomy_embeddings` and stored in
``OUT/cache/embeddings_{split}.safetensors`` in ``fvlm embed``'s layout (``image/{anatomy}``, ``valid/{anatomy}``,
metadata ``volumes``/``anatomies``/...; no text tensors), keyed by a hash of the checkpoint's weights, config and
anatomy table and of the processed split: a changed checkpoint or changed data recomputes them.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from fvlm import zeroshot  # the module, not the function: tests replace zeroshot.anatomy_embeddings
from fvlm.anatomy import alignment
from fvlm.data import store
from fvlm.data.compat import check_store
from fvlm.io import atomic_path
from fvlm.paths import safe_component

log = logging.getLogger(__name__)



def _file_digest(path: Path, h: Any) -> None:
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)


def cache_key(ckpt: Path, data: Path, split: str) -> str:
    """Hash of what the embeddings depend on: the checkpoint's weights, config and anatomy table, and the
    processed split (its preprocessing config and every volume's meta.json)."""
    h = hashlib.sha256()
    for name in ("model.safetensors", "config.json", "anatomy_table.json"):
        _file_digest(ckpt / name, h)
    p = data / "preprocess_config.json"
    if p.is_file():
        _file_digest(p, h)
    for v in store.list_volumes(data, split):
        h.update(v.encode() + b"\0")
        _file_digest(store.volume_dir(data, split, v) / "meta.json", h)
    h.update(split.encode())
    return h.hexdigest()


def _read_cache(path: Path, key: str) -> tuple[list[str], list[str], np.ndarray] | None:
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            if meta.get("cache_key") != key:
                log.info("%s was computed from another checkpoint or other data: recomputing", path)
                return None
            volumes, anatomies = json.loads(meta["volumes"]), json.loads(meta["anatomies"])
            feats = np.stack([f.get_tensor(f"image/{a}") for a in anatomies], axis=1)
    except (OSError, KeyError, ValueError) as e:  # unreadable / foreign file: recompute, never trust it
        log.warning("ignoring unreadable embeddings cache %s (%s)", path, e)
        return None
    return volumes, anatomies, feats


def split_embeddings(ckpt: Path, data: Path, split: str, cache_dir: Path, model_bundle: Any, device: Any,
                     batch_size: int = 0) -> tuple[list[str], list[str], np.ndarray]:
    """(volumes, anatomies, float32 (N, A, E) with NaN where absent) of a split, from the cache or computed.

    ``model_bundle``: a callable returning ``(model, cfg, table)`` (loaded only when needed).
    """
    safe_component(split, "split")  # part of the cache file name: checked before any file is read or written
    key = cache_key(ckpt, data, split)
    path = cache_dir / f"embeddings_{split}.safetensors"
    cached = _read_cache(path, key)
    if cached is not None:
        log.info("embeddings of %s/%s from cache %s", data, split, path)
        return cached
    model, cfg, table = model_bundle()
    check_store(cfg, table, data)
    volumes, feats = zeroshot.anatomy_embeddings(model, cfg, table, data, split, device, batch_size)
    anatomies = list(alignment(cfg, table).names)
    tensors = {}
    for k, a in enumerate(anatomies):
        img = np.ascontiguousarray(feats[:, k], dtype=np.float32)
        tensors[f"image/{a}"] = img
        tensors[f"valid/{a}"] = np.isfinite(img).all(axis=1)
    metadata = {"volumes": json.dumps(volumes), "anatomies": json.dumps(anatomies), "checkpoint": str(ckpt),
                "split": split, "mode": cfg.loss.mode, "embed_dim": str(feats.shape[2]), "cache_key": key,
                "texts": "none (image embeddings only: fvlm probe cache)"}
    with atomic_path(path, suffix=".safetensors") as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    log.info("cached %d x %d embeddings of %s/%s -> %s", len(volumes), len(anatomies), data, split, path)
    return volumes, anatomies, feats


__all__ = ["cache_key", "split_embeddings"]
