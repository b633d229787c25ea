"""The data of ``fvlm finetune`` (:mod:`fvlm.finetune`): the labels each training volume carries, and the
training crops (one reconstruction per scan at random, centred on the union of the anatomies' boxes with a
random shift, flipped per ``data.flip_prob``; all a pure function of ``(seed, epoch, index)``, so resume is
exact).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fvlm.anatomy import AnatomyTable, alignment
from fvlm.config import Config
from fvlm.data import store
from fvlm.labels import order_labels, read_label_table
from fvlm.probe import _aligned_labels, subsample
from fvlm.zeroshot import CropSpec, read_crop

log = logging.getLogger(__name__)


class FinetuneDataset(torch.utils.data.Dataset):
    """Scans of a split that have labels; items are ``(index, epoch)`` keys (:class:`fvlm.data.dataset.EpochSampler`).

    Returns image (1, D, H, W) float32 in [0, 1], mask (D, H, W) uint8 (every anatomy), labels (L,) float32 with
    NaN for missing.
    """

    def __init__(self, root: Path, split: str, cfg: Config, table: AnatomyTable, labels: dict[str, np.ndarray],
                 seed: int, jitter: float):
        self.root, self.split, self.cfg, self.table = root, split, cfg, table
        self.seed, self.jitter = seed, jitter
        manifest = store.read_manifest(root)
        ok = manifest[(manifest["split"] == split) & (manifest["status"] == "ok")]
        self.labels = labels  # volume -> (L,) float32
        self.scans = [(scan, vols) for scan, group in ok.groupby("scan", sort=True)
                      if (vols := sorted(v for v in group["volume"].tolist() if v in labels))]
        if not self.scans:
            raise ValueError(f"{root}: no volume of split {split!r} has labels")
        self.pad_value = int(cfg.data.hu_window[0])

    def __len__(self) -> int:
        return len(self.scans)

    def crop_spec(self, volume: str, rng: np.random.Generator):
        meta = store.read_meta(self.root, self.split, volume)
        shape = tuple(meta["shape"])
        boxes = [info["bbox"] for info in meta["anatomies"].values() if info.get("voxels", 0) > 0 and info.get("bbox")]
        size = tuple(self.cfg.data.crop_size)
        start = []
        for ax in range(3):
            if boxes:
                lo, hi = min(b[2 * ax] for b in boxes), max(b[2 * ax + 1] for b in boxes)
            else:
                lo, hi = 0, shape[ax]
            centre = (lo + hi) / 2 + rng.uniform(-self.jitter, self.jitter) * size[ax]
            st = int(round(centre - size[ax] / 2))
            if shape[ax] >= size[ax]:
                st = min(max(st, 0), shape[ax] - size[ax])
            else:  # smaller than the crop: padded, the volume kept inside the window
                st = min(max(st, shape[ax] - size[ax]), 0)
            start.append(st)
        # the global baseline's one entry is the whole crop (a mask of ones), as in pre-training and zero-shot
        return CropSpec(volume, -1 if alignment(self.cfg, self.table).whole_crop else 0, tuple(start), size)

    def __getitem__(self, key: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        index, epoch = key
        rng = np.random.default_rng([self.seed, epoch, index, 1693])
        _, volumes = self.scans[index]
        volume = volumes[int(rng.integers(len(volumes)))]
        vol = store.open_volume(self.root, self.split, volume)
        spec = self.crop_spec(volume, rng)
        image, mask = read_crop(vol, spec, self.cfg.data.hu_window, tuple(range(len(self.table))))
        axes = tuple(ax for ax in range(3) if rng.random() < self.cfg.data.flip_prob)
        if axes:
            image = np.flip(image, tuple(a + 1 for a in axes))
            mask = np.flip(mask, axes)
        return np.ascontiguousarray(image), np.ascontiguousarray(mask), self.labels[volume]


def collate(items: list[tuple[np.ndarray, np.ndarray, np.ndarray]]
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stack (image, mask, labels) items into a batch."""
    images, masks, labels = zip(*items)
    return (torch.from_numpy(np.stack(images)), torch.from_numpy(np.stack(masks)),
            torch.from_numpy(np.stack(labels)))



def prepare_labels(labels: Any, data: Path, split: str, volumes_ok: list[str], fraction: float, seed: int,
                    columns: list[str] | None) -> tuple[list[str], dict[str, np.ndarray], dict[str, str],
                                                         dict[str, list[int]]]:
    """Labels with both classes in training, per-volume label vectors (NaN = missing / not subsampled)."""
    table = read_label_table(labels, columns)
    frame = _aligned_labels(table, volumes_ok, split)
    kept, skipped, counts = [], {}, {}
    cols = {}
    for label in order_labels(table.columns):
        y = frame[label].to_numpy(dtype=np.float64)
        n_pos, n_neg = int(np.nansum(y == 1)), int(np.nansum(y == 0))
        if n_pos == 0 or n_neg == 0:
            skipped[label] = (f"never {'positive' if n_pos == 0 else 'negative'} in the training labels "
                              f"({n_pos} positive, {n_neg} negative of {n_pos + n_neg} labelled {split} volumes)")
            log.warning("label %r gets no head: %s", label, skipped[label])
            continue
        keep = subsample(y, fraction, seed, label)
        y = np.where(keep, y, np.nan)
        counts[label] = [int(np.nansum(y == 1)), int(np.nansum(y == 0))]
        kept.append(label)
        cols[label] = y
    if not kept:
        raise ValueError(f"no label has both classes in the training labels of split {split!r}: {skipped}")
    matrix = np.stack([cols[label] for label in kept], axis=1).astype(np.float32)
    per_volume = {v: matrix[i] for i, v in enumerate(volumes_ok) if not np.isnan(matrix[i]).all()}
    return kept, per_volume, skipped, counts


__all__ = ["FinetuneDataset", "collate", "prepare_labels"]
