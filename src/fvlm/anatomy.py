"""Anatomy groups: TotalSegmentator classes merged into the anatomies fVLM aligns with text.

An *anatomy table* is data (``configs/anatomy/*.json``): the ordered anatomy groups (group ``k`` gets
mask value ``k + 1``; 0 is background), the TotalSegmentator v2 classes each group merges, and the
zero-shot prompt pairs that score CT-RATE labels from each anatomy. This module also holds the one
definition of an *intact* anatomy, shared by training (random crops) and evaluation, and the one place that
resolves what a model aligns with text (:func:`alignment`): the data's table (fVLM), or for the CT-CLIP-style
global baseline (``loss.mode = "global"``) a table with one entry, the whole crop, read against the whole report.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fvlm.labels import CT_RATE_LABELS
from fvlm.totalseg import CLASS_IDS, MAX_CLASS_ID, class_id

if TYPE_CHECKING:
    from fvlm.config import Config

TABLE_DIR = Path(__file__).resolve().parent / "configs" / "anatomy"


@dataclass(frozen=True)
class Anatomy:
    """One anatomy group: its name and the TotalSegmentator v2 classes it merges.

    ``whole_crop``: the entry is the whole crop (the global baseline's one entry): its evaluation crop is centred
    on the union of the boxes of the data's anatomies, and its mask is all ones.
    """

    name: str
    classes: tuple[str, ...]
    whole_crop: bool = False

    @property
    def class_ids(self) -> tuple[int, ...]:
        return tuple(class_id(c) for c in self.classes)


@dataclass(frozen=True)
class Prompt:
    """A zero-shot item: score ``label`` from ``anatomy`` with the prompt pair (negative, positive)."""

    anatomy: str
    label: str
    negative: str
    positive: str


@dataclass(frozen=True)
class AnatomyTable:
    """Ordered anatomy groups plus the prompt table that scores CT-RATE labels from them."""

    name: str
    anatomies: tuple[Anatomy, ...]
    prompts: tuple[Prompt, ...] = ()
    unscored: tuple[str, ...] = ()
    description: str = ""
    source: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        names = [a.name for a in self.anatomies]
        where = f"anatomy table {self.source or self.name!r}"
        if not names:
            raise ValueError(f"{where}: no anatomies")
        if len(set(names)) != len(names):
            raise ValueError(f"{where}: duplicate anatomy names {names}")
        if len(names) > 254:
            raise ValueError(f"{where}: at most 254 anatomies fit a uint8 mask")
        seen: dict[int, str] = {}
        for a in self.anatomies:
            if not a.classes:
                raise ValueError(f"{where}: anatomy {a.name!r} lists no classes")
            for c in a.classes:
                if c not in CLASS_IDS:
                    raise ValueError(f"{where}: anatomy {a.name!r}: unknown TotalSegmentator class {c!r}")
                if CLASS_IDS[c] in seen:
                    raise ValueError(f"{where}: class {c!r} is in both {seen[CLASS_IDS[c]]!r} and {a.name!r}")
                seen[CLASS_IDS[c]] = a.name
        for p in self.prompts:
            if p.anatomy not in names:
                raise ValueError(f"{where}: prompt for {p.label!r} names unknown anatomy {p.anatomy!r}")
            if p.label not in CT_RATE_LABELS:
                raise ValueError(f"{where}: prompt label {p.label!r} is not a CT-RATE label")
        scored = [p.label for p in self.prompts]
        if len(set(scored)) != len(scored):
            raise ValueError(f"{where}: a label is scored twice: {scored}")
        for u in self.unscored:
            if u not in CT_RATE_LABELS:
                raise ValueError(f"{where}: unscored label {u!r} is not a CT-RATE label")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.anatomies)

    def __len__(self) -> int:
        return len(self.anatomies)

    def index(self, anatomy: str) -> int:
        """0-based position of ``anatomy`` (its mask value is ``index + 1``)."""
        try:
            return self.names.index(anatomy)
        except ValueError:
            raise KeyError(f"anatomy {anatomy!r} not in table {self.name!r} {self.names}") from None

    @property
    def scored_labels(self) -> tuple[str, ...]:
        return tuple(p.label for p in self.prompts)

    @property
    def class_ids(self) -> tuple[int, ...]:
        """Every TotalSegmentator class id some anatomy needs (e.g. TotalSegmentator's ``roi_subset``)."""
        return tuple(sorted(i for a in self.anatomies for i in a.class_ids))

    @cached_property
    def lut(self) -> np.ndarray:
        """uint8 look-up table of length 256: TotalSegmentator id -> anatomy mask value (0 = background)."""
        lut = np.zeros(256, dtype=np.uint8)
        for k, a in enumerate(self.anatomies):
            lut[list(a.class_ids)] = k + 1
        return lut

    def merge(self, label_map: np.ndarray) -> np.ndarray:
        """Merge a TotalSegmentator v2 label map into an anatomy mask (uint8, same shape).

        Raises ``ValueError`` if the map holds ids outside 0..117 (not a v2 ``total`` map).
        """
        if label_map.dtype.kind not in "iu":
            if not np.all(np.isfinite(label_map)) or np.any(label_map != np.round(label_map)):
                raise ValueError("label map holds non-integer values")
        lo, hi = int(label_map.min()), int(label_map.max())
        if lo < 0 or hi > MAX_CLASS_ID:
            bad = np.unique(label_map[(label_map < 0) | (label_map > MAX_CLASS_ID)])[:10]
            raise ValueError(f"label map holds class ids outside 0..{MAX_CLASS_ID} (TotalSegmentator v2 total): "
                             f"{bad.astype(int).tolist()}")
        return self.lut[label_map.astype(np.uint8, copy=False)]

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "description": self.description,
            "anatomies": [{"name": a.name, "classes": list(a.classes)} for a in self.anatomies],
            "prompts": [vars(p).copy() for p in self.prompts],
            "unscored": list(self.unscored),
        }

    @classmethod
    def from_dict(cls, d: dict, source: str = "") -> AnatomyTable:
        known = {"name", "description", "anatomies", "prompts", "unscored"}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"anatomy table {source or d.get('name')!r}: unknown keys {sorted(unknown)}")
        return cls(
            name=d.get("name", Path(source).stem if source else "custom"),
            description=d.get("description", ""),
            anatomies=tuple(Anatomy(a["name"], tuple(a["classes"])) for a in d["anatomies"]),
            prompts=tuple(Prompt(**p) for p in d.get("prompts", ())),
            unscored=tuple(d.get("unscored", ())),
            source=source,
        )


def available_tables() -> list[str]:
    """Names of the anatomy tables shipped with fvlm."""
    return sorted(p.stem for p in TABLE_DIR.glob("*.json"))


def load_anatomy_table(name_or_path: str | Path = "released") -> AnatomyTable:
    """Load a shipped table by name (``released``, ``extended``) or any JSON file by path."""
    p = Path(name_or_path)
    if not p.suffix and not p.exists():
        p = TABLE_DIR / f"{name_or_path}.json"
        if not p.exists():
            raise FileNotFoundError(f"no anatomy table {name_or_path!r}; shipped: {available_tables()}")
    with open(p) as f:
        return AnatomyTable.from_dict(json.load(f), source=str(p))


# ----------------------------------------------------------------------------------------------- alignment
#: the one entry of the global baseline's table (the name of its tensors in ``fvlm embed`` files)
GLOBAL_ANATOMY = "global"
#: where a model's texts come from: the anatomy texts (DATA/texts) or the whole report (DATA/reports)
TEXTS_ANATOMY, TEXTS_REPORT = "anatomy", "report"


@dataclass(frozen=True)
class Alignment:
    """What a model aligns with text: built by :func:`alignment` from the run's config and anatomy table.

    Attributes:
        table: the model's anatomies (one pooled embedding each; ``len(table)`` queries) and the prompts that
            score labels from them.
        data_table: the table the data was processed with (the anatomies located in the label maps and masks).
        texts: :data:`TEXTS_ANATOMY` or :data:`TEXTS_REPORT`.
    """

    table: AnatomyTable
    data_table: AnatomyTable
    texts: str

    @property
    def names(self) -> tuple[str, ...]:
        return self.table.names

    @property
    def whole_crop(self) -> bool:
        """The model sees the whole crop (the global baseline), not anatomies."""
        return any(a.whole_crop for a in self.table.anatomies)


def global_table(table: AnatomyTable) -> AnatomyTable:
    """The global baseline's table: one entry (:data:`GLOBAL_ANATOMY`, the whole crop, merging every class of
    ``table``), scoring every prompt of ``table`` from it. Name, unscored labels and source stay ``table``'s."""
    classes = tuple(c for a in table.anatomies for c in a.classes)
    return AnatomyTable(name=table.name, anatomies=(Anatomy(GLOBAL_ANATOMY, classes, whole_crop=True),),
                        prompts=tuple(replace(p, anatomy=GLOBAL_ANATOMY) for p in table.prompts),
                        unscored=table.unscored, description=table.description, source=table.source)


def alignment(cfg: Config, table: AnatomyTable) -> Alignment:
    """The one place ``loss.mode`` is read: ``anatomy`` aligns ``table``'s anatomies with their anatomy texts;
    ``global`` aligns :func:`global_table` (the whole crop) with the whole report."""
    if cfg.loss.mode == "global":
        return Alignment(global_table(table), table, TEXTS_REPORT)
    return Alignment(table, table, TEXTS_ANATOMY)


def anatomy_counts(mask: np.ndarray, num_anatomies: int) -> np.ndarray:
    """Voxels per anatomy, int64 ``(A,)``, for a mask with values 0..A."""
    return np.bincount(mask.ravel(), minlength=num_anatomies + 1)[1 : num_anatomies + 1].astype(np.int64)


def intact_anatomies(mask: np.ndarray, num_anatomies: int) -> np.ndarray:
    """Which anatomies are intact in a crop: present and touching none of the crop's 6 faces.

    This is the released rule (an anatomy cut by the random crop does not take part in the loss for that
    step) and is the single definition used by training and evaluation.

    Args:
        mask: anatomy mask of the crop, integer ``(D, H, W)`` with values 0..A.
        num_anatomies: A.
    Returns:
        bool ``(A,)``.
    """
    if mask.ndim != 3:
        raise ValueError(f"expected a (D, H, W) mask, got shape {mask.shape}")
    present = anatomy_counts(mask, num_anatomies) > 0
    touching = np.zeros(num_anatomies + 1, dtype=bool)
    for face in (mask[0], mask[-1], mask[:, 0], mask[:, -1], mask[:, :, 0], mask[:, :, -1]):
        touching[np.unique(face)] = True
    return present & ~touching[1:]
