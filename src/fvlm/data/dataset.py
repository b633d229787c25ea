"""Training and evaluation datasets over a processed data directory (see docs/architecture.md).

Training items are *scans*: each time an item is drawn, one of the scan's reconstructions is chosen at
random (as released), a random crop of ``data.crop_size`` is read from the chunked store (only the chunks
it touches are decoded), flipped at random per axis, and every anatomy is marked valid when it is intact
in the crop (the one rule in :func:`fvlm.anatomy.intact_anatomies`) and the scan has anatomy texts.
Randomness is a pure function of ``(seed, epoch, index)``, so runs are reproducible and resumable whatever
the number of loader workers.

Texts are tokenised in the collate function: each distinct text of the batch once, padded to the longest
(not to ``max_length``), and the batch carries ``text_index`` into that list plus integer text ids and
normal flags for the loss.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from fvlm.anatomy import TEXTS_REPORT, AnatomyTable, alignment, intact_anatomies
from fvlm.config import Config
from fvlm.data import store
from fvlm.text import AnatomyTexts, clean_text, scan_id, text_id
from fvlm.tokenization import tokenize_unique

log = logging.getLogger(__name__)

#: the global baseline's one entry as train logs name it (log.csv columns loss/volume, n/volume): kept so logs
#: of older runs and new ones compare; elsewhere the entry is fvlm.anatomy.GLOBAL_ANATOMY
_LOGGED_WHOLE_CROP = "volume"


def _report_texts(root: Path, split: str) -> dict[str, str]:
    """scan id -> whole report text (findings + impression) from the copied reports CSV."""
    path = root / "reports" / f"{split}_reports.csv"
    if not path.exists():
        raise FileNotFoundError(f"global baseline needs the reports: {path} not found (re-run fvlm preprocess "
                                f"on a data set with radiology_text_reports/)")
    try:
        df = pd.read_csv(path, keep_default_na=False, dtype=str)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as e:
        raise ValueError(f"reports CSV {path}: not a readable CSV ({type(e).__name__}: "
                         f"{' '.join(str(e).split())[:200]})") from None
    if "VolumeName" not in df.columns:
        raise ValueError(f"reports CSV {path}: no VolumeName column")
    out: dict[str, str] = {}
    for row in df.itertuples(index=False):
        parts = [getattr(row, c, "") for c in ("Findings_EN", "Impressions_EN")]
        parts = [clean_text(p) for p in parts if p and p.strip() != "Not given."]
        text = " ".join(parts)
        key = scan_id(row.VolumeName)
        if text or key not in out:  # an empty duplicate row never replaces a report
            out[key] = text
    return out


@dataclass
class Sample:
    image: np.ndarray  # float32 (1, D, H, W): HU windowed by data.hu_window to [0, 1]
    mask: np.ndarray  # uint8 (D, H, W)
    valid: np.ndarray  # bool (A,)
    is_normal: np.ndarray  # bool (A,)
    texts: list[str]  # (A,)
    volume: str
    text_ids: list[int] | None = None  # (A,) identical-text ids (AnatomyText.id); None = text_id of texts


def random_crop_flip(image: np.ndarray, mask: np.ndarray, size: Sequence[int], flip_prob: float,
                     rng: np.random.Generator, pad_value: int) -> tuple[np.ndarray, np.ndarray]:
    """Random crop of ``size`` (D, H, W) (padding if the volume is smaller) and random flips per axis.

    ``image`` and ``mask`` may be lazily decoded store arrays: only the crop window is read.
    """
    starts, pads = [], []
    for s, n in zip(size, image.shape):
        if n >= s:
            starts.append(int(rng.integers(0, n - s + 1)))
            pads.append((0, 0))
        else:
            starts.append(0)
            before = int(rng.integers(0, s - n + 1))
            pads.append((before, s - n - before))
    window = tuple(slice(st, st + min(s, n)) for st, s, n in zip(starts, size, image.shape))
    img = np.asarray(image[window])
    msk = np.asarray(mask[window])
    if any(p != (0, 0) for p in pads):
        img = np.pad(img, pads, constant_values=pad_value)
        msk = np.pad(msk, pads, constant_values=0)
    axes = tuple(ax for ax in range(3) if rng.random() < flip_prob)
    if axes:
        img = np.flip(img, axes)
        msk = np.flip(msk, axes)
    return np.ascontiguousarray(img), np.ascontiguousarray(msk)


class TrainDataset(torch.utils.data.Dataset):
    """Scans of one split. Index with ``(index, epoch)`` pairs (see :class:`EpochSampler`).

    Args:
        root: processed data directory.
        split: split name (``train``).
        cfg: the run configuration (``data`` section: crop size, window, flips; ``loss.mode``).
        table: anatomy table the data was processed with.
        texts: anatomy texts (anatomy mode); ``None`` loads ``data.texts`` or ``root/texts``.

    What each sample aligns comes from :func:`fvlm.anatomy.alignment`: the table's anatomies with their anatomy
    texts, or (global baseline) the whole crop (a mask of ones) with the whole report.
    """

    def __init__(self, root: str | Path, split: str, cfg: Config, table: AnatomyTable,
                 texts: AnatomyTexts | None = None, seed: int = 0):
        self.root = Path(root)
        self.split = split
        self.cfg = cfg
        self.table = table
        self.seed = seed
        self.alignment = alignment(cfg, table)
        manifest = store.read_manifest(self.root)
        ok = manifest[(manifest["split"] == split) & (manifest["status"] == "ok")]
        if ok.empty:
            raise ValueError(f"{self.root}: no successfully preprocessed volumes of split {split!r}")
        self.scans: list[tuple[str, list[str]]] = [
            (scan, sorted(group["volume"].tolist())) for scan, group in ok.groupby("scan", sort=True)
        ]
        if self.alignment.texts == TEXTS_REPORT:
            self.reports = _report_texts(self.root, split)
            self.texts = None
        else:
            self.reports = None
            self.texts = texts if texts is not None else AnatomyTexts.load(
                Path(cfg.data.texts) if cfg.data.texts else self.root / "texts", rule=cfg.data.text_rule)
            missing = [s for s, _ in self.scans if not self.texts.has_scan(s)]
            if missing:
                log.warning("%d of %d scans of %s have no anatomy texts (their anatomies never enter the loss), "
                            "e.g. %s", len(missing), len(self.scans), split, missing[:3])
        self.pad_value = int(cfg.data.hu_window[0])

    @property
    def anatomy_names(self) -> tuple[str, ...]:
        """The model's entries, as the loss terms and train logs name them."""
        return tuple(_LOGGED_WHOLE_CROP if a.whole_crop else a.name for a in self.alignment.table.anatomies)

    def __len__(self) -> int:
        return len(self.scans)

    def __getitem__(self, key: tuple[int, int]) -> Sample:
        index, epoch = key
        rng = np.random.default_rng([self.seed, epoch, index])
        scan, volumes = self.scans[index]
        volume = volumes[int(rng.integers(len(volumes)))]
        vol = store.open_volume(self.root, self.split, volume)
        image, mask = random_crop_flip(vol.image, vol.mask, self.cfg.data.crop_size, self.cfg.data.flip_prob, rng,
                                       self.pad_value)
        image = store.window(image, self.cfg.data.hu_window)[None]
        if self.alignment.whole_crop:  # the one entry: the whole crop and the whole report
            report = self.reports.get(scan, "")
            mask = np.ones_like(mask)
            return Sample(image, mask, np.array([bool(report)]), np.zeros(1, bool), [report or "."], volume)
        a = len(self.table)
        valid = intact_anatomies(mask, a)
        has_texts = self.texts.has_scan(scan)
        texts, normal, ids = [], [], []
        for name in self.table.names:
            t = self.texts.get(scan, name)
            texts.append(t.text)
            normal.append(t.is_normal)
            ids.append(t.id)
        return Sample(image, mask, valid & has_texts, np.array(normal), texts, volume, ids)


class EpochSampler(torch.utils.data.Sampler):
    """Yields this rank's ``(index, epoch)`` keys, batch-aligned, from a permutation seeded by (seed, epoch).

    Every rank sees the same number of full batches per epoch (the tail is dropped), so DDP steps stay in
    lock-step. ``start_batch`` skips the batches already consumed when resuming mid-epoch.
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start_batch = 0, 0
        if self.batches_per_epoch == 0:
            raise ValueError(f"{n} scans are fewer than one global batch ({batch_size} x {world_size} processes)")

    @property
    def batches_per_epoch(self) -> int:
        return self.n // (self.batch_size * self.world_size)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.batch_size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        perm = np.random.default_rng([self.seed, self.epoch, 7919]).permutation(self.n)
        per_rank = self.batches_per_epoch * self.batch_size
        mine = perm[: per_rank * self.world_size][self.rank :: self.world_size]
        for i in mine[self.start_batch * self.batch_size :]:
            yield int(i), self.epoch


class Collate:
    """Stack samples; tokenise each distinct text of the batch once, padded to the longest."""

    def __init__(self, tokenizer: Any, max_length: int):
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __call__(self, samples: list[Sample]) -> dict[str, Any]:
        tok = tokenize_unique(self.tokenizer, [s.texts for s in samples], self.max_length)
        return {
            "image": torch.from_numpy(np.stack([s.image for s in samples])),
            "mask": torch.from_numpy(np.stack([s.mask for s in samples])),
            "valid": torch.from_numpy(np.stack([s.valid for s in samples])),
            "is_normal": torch.from_numpy(np.stack([s.is_normal for s in samples])),
            "text_id": torch.tensor([s.text_ids if s.text_ids is not None else [text_id(t) for t in s.texts]
                                     for s in samples], dtype=torch.int64),
            "text_index": tok["text_index"],
            "text_input_ids": tok["input_ids"],
            "text_attention_mask": tok["attention_mask"],
            "volume": [s.volume for s in samples],
        }
