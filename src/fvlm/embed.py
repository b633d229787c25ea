"""``fvlm embed``: per-volume, per-anatomy image and text embeddings of a processed split, as safetensors.

Image embeddings come from :func:`fvlm.zeroshot.anatomy_embeddings` (the evaluation crops); text embeddings
are the anatomy texts of each volume's scan under the released rule (:class:`fvlm.text.AnatomyTexts` over
``DATA/texts``: impression + findings when abnormal, findings alone or the normal template when normal),
each distinct text encoded once. A global-mode (CT-CLIP-style) run has the one entry of its table
(:func:`fvlm.anatomy.alignment`), ``global``: the crop around all anatomies and the whole report (findings +
impression, from ``DATA/reports``).

The file (read by :func:`fvlm.retrieval.read_embeddings` / ``fvlm metrics --retrieval``)::

    image/{anatomy}  float32 (N, E)   L2-normalised; NaN where the anatomy is absent from the volume
    text/{anatomy}   float32 (N, E)   L2-normalised; NaN where the volume's scan has no text
    valid/{anatomy}  bool (N,)        image and text both present
    metadata: volumes (JSON list of N names), anatomies (JSON list), checkpoint, split, mode, embed_dim, texts

Written atomically (temporary file + rename).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save_file

from fvlm.anatomy import GLOBAL_ANATOMY, TEXTS_REPORT, alignment
from fvlm.checkpoint import load_model
from fvlm.data.compat import check_store
from fvlm.data.dataset import _report_texts
from fvlm.io import atomic_path
from fvlm.runtime import autocast_context, resolve_device
from fvlm.text import AnatomyTexts, scan_id
from fvlm.zeroshot import anatomy_embeddings

log = logging.getLogger(__name__)

GLOBAL = GLOBAL_ANATOMY  # the global baseline's one entry, as the file names its tensors
#: the ``texts`` metadata of the file, per text source
_TEXTS_METADATA = {TEXTS_REPORT: "whole report (findings + impression)"}


def _scan_of(volume: str) -> str:
    try:
        return scan_id(volume)
    except ValueError:  # not CT-RATE style (e.g. --pairs names): the volume is its own scan
        return volume


@torch.no_grad()
def encode_texts(model: torch.nn.Module, texts: list[str], max_length: int, device: torch.device,
                 chunk: int = 256) -> np.ndarray:
    """float32 (len(texts), E) L2-normalised text embeddings, in chunks of ``chunk`` texts."""
    out = []
    for i in range(0, len(texts), chunk):
        tok = model.tokenizer(texts[i : i + chunk], padding="longest", truncation=True, max_length=max_length,
                              return_tensors="pt")
        feats = model.encode_text(tok["input_ids"].to(device), tok["attention_mask"].to(device))
        out.append(feats.float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, model.text_proj.out_features), dtype=np.float32)


def volume_texts(volumes: list[str], anatomies: list[str], root: Path, split: str, global_mode: bool,
                 texts_dir: str | Path | None = None, rule: str = "fvlm") -> list[list[str | None]]:
    """The text of each volume (rows) and anatomy (columns); ``None`` where the scan has none.

    ``global_mode``: the texts are the whole reports (:attr:`fvlm.anatomy.Alignment.texts` is ``report``).
    ``rule``: the run's ``data.text_rule`` (``released``: texts built as the released CaptionDataset does)."""
    if global_mode:
        reports = _report_texts(root, split)
        return [[reports.get(_scan_of(v)) or None] for v in volumes]
    texts = AnatomyTexts.load(Path(texts_dir) if texts_dir else root / "texts", rule=rule)
    rows = []
    for v in volumes:
        scan = _scan_of(v)
        if texts.has_scan(scan):
            rows.append([texts.get(scan, a).text for a in anatomies])
        else:
            rows.append([None] * len(anatomies))
    return rows


def embed(checkpoint: str | Path, data: str | Path, split: str = "valid", out: str | Path = "embeddings.safetensors",
          device: str = "auto", batch_size: int = 0, texts: str | Path | None = None) -> Path:
    """Embed every volume of ``split`` of the processed directory ``data``; returns the written file.

    Args:
        checkpoint: run or checkpoint directory. texts: directory with desc_info.json / conc_info.json
            (default ``data/texts``). batch_size: crops per forward pass (0 = the run's eval.batch_size).
    """
    root = Path(data)
    dev = resolve_device(device)
    model, cfg, table = load_model(checkpoint, dev)
    ckpt = model.source
    check_store(cfg, table, root)
    aligned = alignment(cfg, table)
    anatomies = list(aligned.names)
    reports = aligned.texts == TEXTS_REPORT

    volumes, image = anatomy_embeddings(model, cfg, table, root, split, dev, batch_size)  # (N, A, E)
    rows = volume_texts(volumes, anatomies, root, split, reports, texts, rule=cfg.data.text_rule)
    unique = sorted({t for row in rows for t in row if t})
    index = {t: i for i, t in enumerate(unique)}
    log.info("encoding %d distinct texts of %d volumes x %d anatomies", len(unique), len(volumes), len(anatomies))
    with autocast_context(cfg, dev):
        encoded = encode_texts(model, unique, cfg.model.text.max_length, dev)

    n, e = len(volumes), cfg.model.embed_dim
    tensors: dict[str, np.ndarray] = {}
    counts = {}
    for k, a in enumerate(anatomies):
        text = np.full((n, e), np.nan, dtype=np.float32)
        has_text = np.zeros(n, dtype=bool)
        for i, row in enumerate(rows):
            if row[k]:
                text[i] = encoded[index[row[k]]]
                has_text[i] = True
        img = np.ascontiguousarray(image[:, k], dtype=np.float32)
        valid = np.isfinite(img).all(axis=1) & has_text
        tensors[f"image/{a}"] = img
        tensors[f"text/{a}"] = text
        tensors[f"valid/{a}"] = valid
        counts[a] = int(valid.sum())
    metadata = {"volumes": json.dumps(volumes), "anatomies": json.dumps(anatomies), "checkpoint": str(ckpt),
                "split": split, "mode": cfg.loss.mode, "embed_dim": str(e),
                "texts": _TEXTS_METADATA.get(aligned.texts, "anatomy texts, released rule (fvlm.text.anatomy_text)")}
    out = Path(out)
    with atomic_path(out, suffix=".safetensors") as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    no_text = sum(1 for row in rows if not any(row))
    log.info("embedded %d volumes of %s/%s -> %s; valid per anatomy %s%s", n, root, split, out, counts,
             f"; {no_text} volume(s) without texts" if no_text else "")
    return out


__all__ = ["embed", "encode_texts", "volume_texts"]
