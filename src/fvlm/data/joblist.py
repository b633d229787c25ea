"""Which volumes a batch command processes: job lists from a CT-RATE root or a ``--pairs`` CSV, shards and the
choice of reconstructions per scan. Shared by ``fvlm preprocess`` and ``fvlm segment`` (no torch needed here).
"""

from __future__ import annotations

import csv
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fvlm.data import ctrate
from fvlm.data.ctrate import VolumeMetadata, natural_key, parse_volume_name
from fvlm.paths import safe_component

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------- jobs
@dataclass
class VolumeJob:
    """One volume to process or segment (picklable, sent to worker processes); ``label`` is the label map
    preprocessing reads and segmentation writes."""

    split: str
    volume: str
    scan: str
    image: str
    label: str
    version: str = "auto"  # auto | v1 | v2 (CT-RATE), hu (--pairs: already HU, header trusted)
    metadata: VolumeMetadata | None = None
    metadata_file: str = ""


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/N"`` -> (i, N) with 0 <= i < N."""
    try:
        i, n = (int(x) for x in str(text).split("/"))
    except ValueError:
        raise ValueError(f"--shard must look like i/N (e.g. 0/4), got {text!r}") from None
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"--shard {text!r}: need 0 <= i < N")
    return i, n


def parse_reconstructions(text: str | int | None) -> int | None:
    """``"all"`` -> None, ``"2"`` -> 2."""
    if text is None or str(text).lower() == "all":
        return None
    try:
        k = int(text)
    except ValueError:
        raise ValueError(f"--reconstructions must be 'all' or a positive number, got {text!r}") from None
    if k < 1:
        raise ValueError(f"--reconstructions must be 'all' or >= 1, got {k}")
    return k


def ctrate_jobs(root: str | Path, splits: Sequence[str], version: str = "auto",
                reconstructions: int | None = None, exclude_no_chest: bool = True) -> list[VolumeJob]:
    """Jobs for the volumes of a CT-RATE-format root found on disk (natural order, per split).

    Volumes listed in ``metadata/no_chest_{split}.txt`` (CT-RATE's non-chest CTs, even head scans) are
    left out unless ``exclude_no_chest=False``.
    """
    root = Path(root)
    if not (root / "dataset").is_dir():
        raise FileNotFoundError(f"{root}/dataset not found: --data must be a CT-RATE-format root "
                                f"(dataset/, metadata/, ...)")
    jobs = []
    for split in splits:
        files = ctrate.find_volumes(root, split)
        mpath = ctrate.metadata_path(root, split)
        if mpath.exists():
            metadata = ctrate.read_metadata(mpath)
        elif version == "v2":
            metadata = {}
        else:
            raise FileNotFoundError(f"metadata CSV {mpath} not found (needed to fix and check CT-RATE volumes; "
                                    f"--version v2 processes fixed volumes without it)")
        if not files:
            log.warning("no volumes under %s/dataset/%s[_fixed]", root, split)
            continue
        if exclude_no_chest and ctrate.no_chest_path(root, split).exists():
            listed = set(ctrate.read_volume_list(ctrate.no_chest_path(root, split)))
            excluded = [n for n in files if n in listed]
            files = {n: f for n, f in files.items() if n not in listed}
            log.info("%s: left out %d non-chest volume(s) listed in %s (--include-no-chest keeps them)", split,
                     len(excluded), ctrate.no_chest_path(root, split))
        names = select_reconstructions(files, metadata, reconstructions)
        if len(names) < len(files):
            log.info("%s: keeping %d of %d reconstructions (at most %d per scan)", split, len(names), len(files),
                     reconstructions)
        not_on_disk = sum(1 for n in metadata if n not in files)
        if not_on_disk:
            log.info("%s: %d volumes of the metadata are not on disk (not downloaded?)", split, not_on_disk)
        for n in names:
            v = ctrate.parse_volume_name(n)
            jobs.append(VolumeJob(split, n, v.scan_id, str(files[n]), str(ctrate.mask_path(root, n)), version,
                                  metadata.get(n), str(mpath)))
    return jobs


@dataclass
class RejectedRow:
    """A row of an input CSV refused before any work (its names are kept only to be reported)."""

    source: str
    line: int
    split: str
    volume: str
    error: str

    def record(self) -> dict[str, Any]:
        return {"key": f"{Path(self.source).stem}-line{self.line}", "split": self.split, "volume": self.volume,
                "scan": "", "error": self.error, "seconds": 0.0, "version": ""}


def pairs_jobs(csv_path: str | Path, default_split: str = "valid",
               rejected: list[RejectedRow] | None = None) -> list[VolumeJob]:
    """Jobs from a CSV with columns ``volume,image,label[,split]`` (paths relative to the CSV's folder).

    The images must already be HU with a correct header (like CT-RATE v2); no v1 fix is applied. Volume and
    split names must be single safe path components (:func:`fvlm.paths.safe_component`): a row with ``/``,
    ``..`` or a leading dot in either, or listed twice, raises ``ValueError`` naming the file and line, or,
    when ``rejected`` is a list, is appended to it and left out (the batch goes on and reports it).
    """
    csv_path = Path(csv_path)
    if not csv_path.exists():
        raise FileNotFoundError(f"--pairs CSV {csv_path} not found")
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        missing = [c for c in ("volume", "image", "label") if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{csv_path}: missing column(s) {missing}; expected volume,image,label[,split]")
        jobs, seen = [], set()
        for i, row in enumerate(reader, start=2):
            name = (row["volume"] or "").strip()
            split = (row.get("split") or "").strip() or default_split
            try:
                safe_component(name, "volume name", f"{csv_path} line {i}")
                safe_component(split, "split", f"{csv_path} line {i}")
                if (split, name) in seen:
                    raise ValueError(f"{csv_path} line {i}: volume {name!r} listed twice in split {split!r}")
            except ValueError as e:
                if rejected is None:
                    raise
                rejected.append(RejectedRow(str(csv_path), i, split, name, str(e)))
                continue
            seen.add((split, name))
            try:
                scan = ctrate.parse_volume_name(name).scan_id
            except ValueError:
                scan = name
            img, lab = (Path(row[c].strip()) for c in ("image", "label"))
            img, lab = (p if p.is_absolute() else csv_path.parent / p for p in (img, lab))
            jobs.append(VolumeJob(split, name, scan, str(img), str(lab), "hu"))
    return jobs


# ----------------------------------------------------------------------------------------------- reconstructions
_LUNG_WORDS = ("lung", "hrct", "parankim", "parenchym", "pulmo")
_THORAX_WORDS = ("thorax", "toraks", "chest", "torax")
_LUNG_KERNEL = re.compile(r"^(l|lung.*|y[a-d]|bl\d+.*|br[5-9]\d.*|b[6-9]\d.*|i[5-9]\d.*)$", re.IGNORECASE)


def reconstruction_preference(meta: VolumeMetadata | None) -> int:
    """2 = lung reconstruction (lung/HRCT description or a sharp lung kernel), 1 = thorax, 0 = other/unknown."""
    if meta is None:
        return 0
    desc = (meta.series_description or "").lower()
    if any(w in desc for w in _LUNG_WORDS) or (meta.kernel and _LUNG_KERNEL.match(meta.kernel)):
        return 2
    if any(w in desc for w in _THORAX_WORDS):
        return 1
    return 0


def select_reconstructions(names: Iterable[str], metadata: Mapping[str, VolumeMetadata], k: int | None) -> list[str]:
    """Keep at most ``k`` reconstructions per scan (``None`` = all): lung/thorax reconstructions first
    (:func:`reconstruction_preference`), then the larger volume, then the lower reconstruction number.
    Returns the kept names in natural order."""
    names = list(names)
    if k is None:
        return sorted(names, key=natural_key)
    if k < 1:
        raise ValueError(f"--reconstructions must be 'all' or >= 1, got {k}")
    by_scan: dict[str, list[str]] = {}
    for n in names:
        try:
            scan = parse_volume_name(n).scan_id
        except ValueError:
            scan = n
        by_scan.setdefault(scan, []).append(n)
    kept = []
    for group in by_scan.values():
        group.sort(key=lambda n: (-reconstruction_preference(metadata.get(n)),
                                  -(metadata[n].n_voxels if n in metadata else 0), natural_key(n)))
        kept.extend(group[:k])
    return sorted(kept, key=natural_key)
