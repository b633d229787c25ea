"""Zero-shot diagnosis: the released (CT-CLIP) protocol, batched.

For every volume of a split and every anatomy present in it: a crop centred on the anatomy's bounding
box, of size ``max(data.eval_crop_size, bbox extent)`` rounded up to the patch size, kept inside the
volume (padded where the volume is smaller); the mask keeps only that anatomy. ``data.eval_window=
"released"`` takes the released eval.py window instead (:func:`released_window`: one voxel short of the
extent, inside the volume, padded at the end). The crop is encoded and
pooled to the anatomy's embedding, which is compared with each prompt pair of that anatomy:
``p = softmax([sim(negative), sim(positive)] / temperature)[positive]``.

``scores.csv`` has ``VolumeName`` (CT-RATE style, with ``.nii.gz``) and one column per scored label; a
volume whose anatomy is absent gets an empty cell, never a silent 0 (the missing-score policy belongs to
:mod:`fvlm.metrics`). Crops of equal shape from different volumes share a forward pass.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from fvlm.anatomy import AnatomyTable, alignment, global_table, load_anatomy_table
from fvlm.checkpoint import load_model
from fvlm.config import Config, apply_overrides, config_from_dict
from fvlm.data import store
from fvlm.data.compat import check_store
from fvlm.io import atomic_path
from fvlm.labels import CT_RATE_LABELS
from fvlm.runtime import autocast_context, resolve_device

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CropSpec:
    """One anatomy-centred crop: which volume, which entry of the model's table (0-based; -1 = the whole crop,
    the one entry of the global baseline's table: its mask is all ones), where."""

    volume: str
    anatomy: int
    start: tuple[int, int, int]  # may be negative / exceed the volume: the outside is padded
    size: tuple[int, int, int]
    # voxels of the volume the window holds from ``start`` (the rest of ``size`` is padding); None = all of size.
    # The released window ends inside the volume and is padded at its end (see :func:`released_window`)
    extent: tuple[int, int, int] | None = None

    @property
    def row(self) -> int:
        """Index of the crop's entry among the model's embeddings (the whole crop is the only entry: 0)."""
        return max(self.anatomy, 0)


def centred_crop(bbox: tuple[int, int, int, int, int, int], shape: tuple[int, ...], min_size: tuple[int, ...],
                 patch: tuple[int, ...]) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """Start and size of a crop centred on ``bbox`` (z0, z1, y0, y1, x0, x1; end-exclusive).

    size = max(min_size, bbox extent) rounded up to a multiple of the patch size; the window is shifted to
    lie inside the volume where the volume is large enough, else centred on the volume and padded.
    """
    start, size = [], []
    for ax in range(3):
        lo, hi = bbox[2 * ax], bbox[2 * ax + 1]
        s = max(min_size[ax], hi - lo)
        s = -(-s // patch[ax]) * patch[ax]
        n = shape[ax]
        if n >= s:
            st = (lo + hi) // 2 - s // 2
            st = min(max(st, 0), n - s)
        else:
            st = -((s - n) // 2)
        start.append(int(st))
        size.append(int(s))
    return tuple(start), tuple(size)  # type: ignore[return-value]


def released_window(bbox: tuple[int, int, int, int, int, int], shape: tuple[int, ...], min_size: tuple[int, ...],
                    patch: tuple[int, ...]) -> tuple[tuple[int, int, int], tuple[int, int, int], tuple[int, int, int]]:
    """The released eval.py window (``center_crop`` + ``DivisiblePadd(method="end")``) of ``bbox`` (z0, z1, y0, y1,
    x0, x1; end-exclusive, as meta.json stores it).

    Per axis, with ``lo``, ``hi`` the first and last (inclusive) voxel: n = max(min_size, hi - lo) (one less than
    the extent: an anatomy longer than the window loses its last row, as released); centre c = (lo + hi) // 2;
    start = max(0, c - n // 2), end = min(size, start + n), start moved back to fit (max(0, end - n)). The window
    [start, end) holds only volume voxels; it is padded at its end to a multiple of the patch size.

    Returns (start, padded size, extent = end - start).
    """
    start, size, extent = [], [], []
    for ax in range(3):
        lo, hi = bbox[2 * ax], bbox[2 * ax + 1] - 1
        n = max(int(min_size[ax]), hi - lo)
        c = (lo + hi) // 2
        st = max(0, c - n // 2)
        end = min(int(shape[ax]), st + n)
        if end - st < n:
            st = max(0, end - n)
        start.append(int(st))
        extent.append(int(end - st))
        size.append(int(-(-(end - st) // patch[ax]) * patch[ax]))
    return tuple(start), tuple(size), tuple(extent)  # type: ignore[return-value]


def window_spec(volume: str, anatomy: int, bbox: tuple[int, int, int, int, int, int], shape: tuple[int, ...],
                cfg: Config) -> CropSpec:
    """The evaluation window of one box, as ``data.eval_window`` selects (centred, or released)."""
    if cfg.data.eval_window == "released":
        start, size, extent = released_window(bbox, shape, cfg.data.eval_crop_size, cfg.model.vision.patch_size)
        return CropSpec(volume, anatomy, start, size, extent)
    start, size = centred_crop(bbox, shape, cfg.data.eval_crop_size, cfg.model.vision.patch_size)
    return CropSpec(volume, anatomy, start, size)


def read_crop(vol: store.ProcessedVolume, spec: CropSpec, hu_window: tuple[float, float],
              anatomies: tuple[int, ...] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Windowed image ``(1, D, H, W)`` float32 and mask ``(D, H, W)`` uint8 of the window of ``spec``.

    The mask keeps only ``spec.anatomy`` (value ``k + 1``), or every anatomy of ``anatomies`` (0-based) when
    given; a whole-volume spec (``anatomy == -1``) gets a mask of ones. Outside the volume: window low, no anatomy.
    """
    src, dst = [], []
    extent = spec.extent or spec.size
    for st, s, n in zip(spec.start, extent, vol.image.shape):
        a, b = max(st, 0), min(st + s, n)
        src.append(slice(a, b))
        dst.append(slice(a - st, b - st))
    image = np.full(spec.size, hu_window[0], dtype=np.int16)
    mask = np.zeros(spec.size, dtype=np.uint8)
    image[tuple(dst)] = vol.image[tuple(src)]
    keep = (spec.anatomy,) if anatomies is None else anatomies
    if spec.anatomy < 0:
        mask[tuple(dst)] = 1
    else:
        m = np.asarray(vol.mask[tuple(src)])
        mask[tuple(dst)] = np.where(np.isin(m, [k + 1 for k in keep]), m, 0)
    return store.window(image, hu_window)[None], mask


def shared_windows(specs: list[CropSpec]) -> list[list[CropSpec]]:
    """Group the crops of one volume that have the same window.

    When a processed volume is no larger than the evaluation crop, every anatomy gets the same window;
    one forward pass with a mask holding all of them gives each anatomy exactly the feature of its own
    crop (an anatomy's pooling sees only its own tokens), at a fraction of the cost.
    """
    groups: dict[tuple, list[CropSpec]] = {}
    for s in specs:
        groups.setdefault((s.volume, s.start, s.size, s.extent), []).append(s)
    return list(groups.values())


def read_window(vol: store.ProcessedVolume, group: list[CropSpec], hu_window: tuple[float, float]
                ) -> tuple[np.ndarray, np.ndarray]:
    """:func:`read_crop` of a group of crops sharing one window: the mask keeps all of the group's anatomies."""
    return read_crop(vol, group[0], hu_window, tuple(s.anatomy for s in group))


class CropDataset(torch.utils.data.Dataset):
    def __init__(self, root: Path, split: str, windows: list[list[CropSpec]], cfg: Config):
        self.root, self.split, self.windows, self.cfg = root, split, windows, cfg

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray, int]:
        group = self.windows[i]
        image, mask = read_window(store.open_volume(self.root, self.split, group[0].volume), group,
                                  self.cfg.data.hu_window)
        return image, mask, i


def _collate(items):
    images, masks, idx = zip(*items)
    return torch.from_numpy(np.stack(images)), torch.from_numpy(np.stack(masks)), list(idx)


def volume_crop_specs(volume: str, meta: dict, cfg: Config, table: AnatomyTable, global_mode: bool = False
                      ) -> list[CropSpec]:
    """The crops of one processed volume from its ``meta`` (``shape`` and ``anatomies`` {name: {voxels, bbox}}):
    one per entry of the model's ``table`` (:attr:`fvlm.anatomy.Alignment.table`) present in the volume; a
    whole-crop entry (the global baseline's) gets one crop around the union of the anatomies' boxes, with
    ``anatomy = -1`` (a mask of ones), and none when the volume has no anatomy.

    ``global_mode=True`` (older callers) stands for ``table = fvlm.anatomy.global_table(table)``.
    Shared by :func:`crop_specs` (stored volumes) and :mod:`fvlm.predict` (a volume in memory), so a single
    scan is cropped exactly as evaluation crops it.
    """
    if global_mode:
        table = global_table(table)
    shape = tuple(meta["shape"])
    boxes = {name: info.get("bbox") for name, info in meta["anatomies"].items() if info.get("voxels", 0) > 0}
    specs = []
    for k, entry in enumerate(table.anatomies):
        if entry.whole_crop:
            if boxes:
                union = [f(b[i] for b in boxes.values()) for i, f in zip(range(6), (min, max) * 3)]
                specs.append(window_spec(volume, -1, tuple(union), shape, cfg))
        elif entry.name in boxes:
            specs.append(window_spec(volume, k, tuple(boxes[entry.name]), shape, cfg))
    return specs


def crop_specs(root: Path, split: str, cfg: Config, table: AnatomyTable) -> tuple[list[str], list[CropSpec]]:
    """The crops to encode for every ok volume of a split (from the bounding boxes in meta.json); ``table``: the
    model's (:attr:`fvlm.anatomy.Alignment.table`)."""
    volumes = store.list_volumes(root, split)
    if not volumes:
        raise ValueError(f"{root}: no successfully preprocessed volumes of split {split!r}")
    specs = []
    for v in volumes:
        specs.extend(volume_crop_specs(v, store.read_meta(root, split, v), cfg, table))
    return volumes, specs


def _shape_batches(windows: list[list[CropSpec]], batch_size: int) -> list[list[int]]:
    by_shape: dict[tuple[int, int, int], list[int]] = {}
    for i, group in enumerate(windows):
        by_shape.setdefault(group[0].size, []).append(i)
    return [idx[j : j + batch_size] for idx in by_shape.values() for j in range(0, len(idx), batch_size)]


@torch.no_grad()
def anatomy_embeddings(model: torch.nn.Module, cfg: Config, table: AnatomyTable, root: str | Path, split: str,
                       device: torch.device, batch_size: int = 0, num_workers: int | None = None
                       ) -> tuple[list[str], np.ndarray]:
    """Image embeddings of every volume and entry of the model's table (:func:`fvlm.anatomy.alignment`).

    ``table``: the run's anatomy table. Returns:
        volumes: the N volume names;
        features: float32 ``(N, A, E)`` (``A = 1`` for a global-mode model), NaN where the anatomy is absent.
    """
    root = Path(root)
    table = alignment(cfg, table).table
    volumes, specs = crop_specs(root, split, cfg, table)
    features = np.full((len(volumes), len(table), cfg.model.embed_dim), np.nan, dtype=np.float32)
    row = {v: i for i, v in enumerate(volumes)}
    windows = shared_windows(specs)
    batches = _shape_batches(windows, batch_size or cfg.eval.batch_size)
    loader = torch.utils.data.DataLoader(
        CropDataset(root, split, windows, cfg), batch_sampler=batches, collate_fn=_collate,
        num_workers=cfg.eval.num_workers if num_workers is None else num_workers)
    log.info("%s: %d anatomy crops in %d windows", split, len(specs), len(windows))
    for image, mask, idx in tqdm(loader, desc=f"encode {split}", unit="batch", dynamic_ncols=True):
        with autocast_context(cfg, device):
            feats, present = model.encode_image(image.to(device), mask.to(device))
        feats, present = feats.float().cpu().numpy(), present.cpu().numpy()
        for j, i in enumerate(idx):
            for s in windows[i]:
                if present[j, s.row]:
                    features[row[s.volume], s.row] = feats[j, s.row]
    return volumes, features


@torch.no_grad()
def prompt_text_features(model: torch.nn.Module, cfg: Config, table: AnatomyTable, device: torch.device
                         ) -> torch.Tensor:
    """float32 ``(2P, E)`` (CPU) features of the table's P prompt pairs, ordered negative_0, positive_0, ...

    They do not depend on the volumes: callers that score many batches (``fvlm predict``) compute them once.
    """
    prompts = table.prompts
    if not prompts:
        raise ValueError(f"anatomy table {table.name!r} has no prompts to score")
    texts = [t for p in prompts for t in (p.negative, p.positive)]
    tok = model.tokenizer(texts, padding="longest", truncation=True, max_length=cfg.model.text.max_length,
                          return_tensors="pt")
    return model.encode_text(tok["input_ids"].to(device), tok["attention_mask"].to(device)).float().cpu()


@torch.no_grad()
def prompt_probabilities(model: torch.nn.Module, cfg: Config, table: AnatomyTable, features: np.ndarray,
                         device: torch.device, text_features: torch.Tensor | None = None) -> dict[str, np.ndarray]:
    """label -> ``(N,)`` probability of the positive prompt (NaN where the anatomy is absent).

    ``text_features``: the result of :func:`prompt_text_features` for this model and table (computed when None).
    """
    table = alignment(cfg, table).table
    prompts = table.prompts
    text = prompt_text_features(model, cfg, table, device) if text_features is None else text_features
    temperature = float(model.temperature())
    feats = torch.from_numpy(features)
    out = {}
    for j, p in enumerate(prompts):
        k = table.index(p.anatomy)
        sims = feats[:, k] @ text[2 * j : 2 * j + 2].T  # (N, 2): [negative, positive]
        out[p.label] = torch.softmax(sims / temperature, dim=-1)[:, 1].numpy()
    return out


@dataclass
class Evaluation:
    """The result of :func:`evaluate`.

    Attributes:
        scores: the table written to ``path``: ``VolumeName`` + one column per scored label (NaN = anatomy absent).
        path: the scores CSV. missing: {label: volumes without a score}. unscored: labels the table does not score.
    """

    scores: pd.DataFrame
    path: Path
    missing: dict[str, int] = field(default_factory=dict)
    unscored: tuple[str, ...] = ()


def evaluate(checkpoint: str | Path, data: str | Path, split: str, out: str | Path, device: str = "auto",
             batch_size: int = 0, anatomy_table: str | None = None, eval_window: str | None = None) -> Evaluation:
    """Score every volume of ``split``; writes ``out`` (CSV) atomically and returns it with its table.

    ``eval_window``: ``centred`` or ``released`` instead of the model's saved ``data.eval_window``."""
    dev = resolve_device(device)
    model, cfg, table = load_model(checkpoint, dev)
    if eval_window is not None:
        cfg = config_from_dict(apply_overrides(cfg.to_dict(), [f"data.eval_window={eval_window}"]))
    check_store(cfg, table, data, required=False)  # a model needs data preprocessed its way
    if anatomy_table:
        other = load_anatomy_table(anatomy_table)
        if other.names != table.names:
            raise ValueError(f"--anatomy-table {anatomy_table}: anatomies {other.names} differ from the model's "
                             f"{table.names}; only the prompts may change")
        table = other
    volumes, features = anatomy_embeddings(model, cfg, table, data, split, dev, batch_size)
    probs = prompt_probabilities(model, cfg, table, features, dev)
    order = {label: i for i, label in enumerate(CT_RATE_LABELS)}  # columns in the labels CSV's order
    columns = sorted(probs, key=lambda label: (order.get(label, len(order)), label))
    df = pd.DataFrame({"VolumeName": [f"{v}.nii.gz" for v in volumes], **{c: probs[c] for c in columns}})
    with atomic_path(out, suffix=".csv") as tmp:
        df.to_csv(tmp, index=False, na_rep="")
    missing = {k: int(np.isnan(v).sum()) for k, v in probs.items() if np.isnan(v).any()}
    log.info("scored %d volumes x %d labels -> %s%s", len(df), len(probs), out,
             f"; empty cells (anatomy absent): {missing}" if missing else "")
    if table.unscored:
        log.info("not scored by table %r: %s", table.name, ", ".join(table.unscored))
    return Evaluation(df, Path(out), missing, tuple(table.unscored))
