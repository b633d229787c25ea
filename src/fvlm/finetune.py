"""``fvlm finetune``: the image encoder and the anatomy pooling trained end to end with per-label heads.

    fvlm finetune --checkpoint RUN --data PROCESSED --labels train_labels.csv --out RUN2 \\
        [--set train.max_steps=300 --set train.lr=1e-4] [--loss focal] [--layer-decay 0.75]
    torchrun --nproc_per_node=4 -m fvlm finetune ...

Model: the pre-trained fVLM (``RUN``'s latest checkpoint) with a linear head per label on the anatomy
embedding(s) the anatomy table maps the label to (``--features concat``: all anatomies; see
:func:`fvlm.probe.label_anatomies`). The text side (text encoder, projection, temperature) is frozen and carried
unchanged, so the fine-tuned run is a complete fVLM run (``fvlm eval``/``embed``/``predict`` load it).

Loss: binary cross-entropy with logits per (volume, label), with ``pos_weight = negatives / positives`` of the
training labels (``--no-class-weights`` turns it off) or the focal loss (``--loss focal``, ``--focal-gamma``);
missing labels (empty cells) and labels whose anatomies are absent from the crop are masked out; the loss is
the mean over the unmasked entries of the global batch (so N processes equal one on the concatenated batch).
A label never positive (or never negative) in the training labels gets no head: logged and listed in
``finetune.json``.

Data: per scan, one reconstruction with labels at random; a training crop of ``data.crop_size`` centred on the
union of the anatomies' boxes, shifted at random by up to ``--jitter`` of the crop size per axis and flipped
per ``data.flip_prob`` (all a pure function of ``(seed, epoch, index)``, so resume is exact). Scoring uses the
evaluation crops of zero-shot (:func:`fvlm.zeroshot.anatomy_embeddings`): anatomy-centred, ``eval_crop_size``.

Training machinery is pre-training's (:mod:`fvlm.train`): AdamW with the same weight-decay rule, warm-up +
cosine schedule (``train.*`` settings), gradient accumulation and clipping, DDP under torchrun, ``log.csv`` +
TensorBoard, checkpoints (``checkpoints/step_n/`` with ``model.safetensors`` (the whole fVLM),
``heads.safetensors``, ``finetune.json``, ``config.json``, ``anatomy_table.json``, ``training_state.pt``)
and exact resume (``--resume``). ``--layer-decay d < 1``: layer-wise learning-rate decay, block ``i`` of ``L``
gets ``lr * d^(L + 1 - i)``, the patch embedding ``lr * d^(L + 1)``, the pooling ``lr``; heads get
``lr * --head-lr-scale``.

At the end the evaluated split is scored into ``RUN2/scores_{split}.csv`` (the ``fvlm eval`` format, read by
``fvlm metrics``); ``--score-only`` scores an existing fine-tuned run.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from fvlm import distributed as dist
from fvlm.anatomy import AnatomyTable
from fvlm.config import Config
from fvlm.paths import safe_component

log = logging.getLogger(__name__)

HEADS = "heads.safetensors"
SPEC = "finetune.json"
#: applied before the user's --set overrides: a short fine-tuning schedule rather than pre-training's
FINETUNE_DEFAULTS = ["train.lr=1e-4", "train.warmup_lr=1e-6", "train.min_lr=1e-6", "train.warmup_steps=20",
                     "train.epochs=5", "train.max_steps=0", "train.ckpt_every=100", "train.log_every=5"]
LOSSES = ("bce", "focal")
MAX_POS_WEIGHT = 100.0


@dataclass
class FinetuneSpec:
    """Everything beyond ``config.json`` that defines a fine-tuning run (saved as ``finetune.json``)."""

    labels: list[str]
    anatomies: dict[str, list[str]]  # label -> anatomies its head reads
    features: str = "mapped"
    loss: str = "bce"
    focal_gamma: float = 2.0
    class_weights: bool = True
    pos_weight: list[float] = field(default_factory=list)
    layer_decay: float = 1.0
    head_lr_scale: float = 10.0
    jitter: float = 0.1
    fraction: float = 1.0
    train_split: str = "train"
    source_checkpoint: str = ""
    labels_files: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    train_counts: dict[str, list[int]] = field(default_factory=dict)  # label -> [positives, negatives]

    def save(self, path: Path) -> None:
        from fvlm.io import atomic_write_text

        atomic_write_text(path, json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> FinetuneSpec:
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: not a fine-tuned run (fvlm finetune)")
        return cls(**json.loads(path.read_text()))


# ------------------------------------------------------------------------------------------------ model
class LabelHeads(nn.Module):
    """One linear head per label over the concatenated embeddings of its anatomies.

    ``weight`` (L, A, E) is masked by the fixed ``select`` (L, A): label ``l`` reads anatomy ``a`` iff
    ``select[l, a]``. Absent anatomies have zero features (fVLM's ``encode_image``), so they add nothing.
    """

    def __init__(self, select: torch.Tensor, embed_dim: int):
        super().__init__()
        n_labels, n_anat = select.shape
        self.register_buffer("select", select.to(torch.float32), persistent=False)
        self.weight = nn.Parameter(torch.empty(n_labels, n_anat, embed_dim))
        self.bias = nn.Parameter(torch.zeros(n_labels))
        fan_in = select.sum(dim=1, keepdim=True).clamp(min=1).to(torch.float32) * embed_dim
        with torch.no_grad():
            self.weight.normal_().mul_((1.0 / fan_in).sqrt()[..., None])

    def forward(self, features: torch.Tensor, present: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """features (B, A, E), present bool (B, A) -> logits (B, L), usable bool (B, L) (some anatomy present)."""
        w = self.weight * self.select[..., None]
        logits = torch.einsum("bae,lae->bl", features, w.to(features.dtype)) + self.bias.to(features.dtype)
        usable = (present.to(torch.float32) @ self.select.T) > 0
        return logits, usable


class FinetuneModel(nn.Module):
    """fVLM's image side + label heads; the text side is carried frozen (no gradient, not in the optimizer)."""

    def __init__(self, fvlm: nn.Module, heads: LabelHeads):
        super().__init__()
        self.fvlm = fvlm
        self.heads = heads
        for module in (fvlm.text_encoder, fvlm.text_proj):
            module.requires_grad_(False)
        fvlm.temp.requires_grad_(False)

    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats, present = self.fvlm.encode_image(image, mask)
        return self.heads(feats, present)


def select_matrix(spec: FinetuneSpec, anatomy_names: list[str]) -> torch.Tensor:
    sel = torch.zeros(len(spec.labels), len(anatomy_names), dtype=torch.bool)
    for i, label in enumerate(spec.labels):
        for a in spec.anatomies[label]:
            sel[i, anatomy_names.index(a)] = True
    return sel


def model_anatomies(cfg: Config, table: AnatomyTable) -> list[str]:
    from fvlm.probe import GLOBAL

    return [GLOBAL] if cfg.loss.mode == "global" else list(table.names)


def layer_decay_groups(model: FinetuneModel, lr: float, weight_decay: float, layer_decay: float,
                       head_lr_scale: float) -> list[dict[str, Any]]:
    """AdamW groups: pre-training's weight-decay rule; per-layer learning rates (see the module docstring)."""
    from fvlm.model.fvlm import _NO_DECAY_NAMES

    depth = len(model.fvlm.visual_encoder.blocks)
    groups: dict[tuple[bool, float], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        parts = name.split(".")
        no_decay = p.ndim <= 1 or any(part in _NO_DECAY_NAMES for part in parts)
        if parts[0] == "heads":
            scale = head_lr_scale
        elif parts[1] == "visual_encoder":
            if parts[2] == "blocks":
                layer = int(parts[3]) + 1
            elif parts[2] == "norm":
                layer = depth + 1
            else:  # patch embedding, position embedding, convolutional stem
                layer = 0
            scale = layer_decay ** (depth + 1 - layer)
        else:  # anatomy queries, attention pooling, per-anatomy projections
            scale = 1.0
        groups.setdefault((no_decay, scale), []).append(p)
    return [{"params": ps, "weight_decay": 0.0 if nd else weight_decay, "lr": lr * scale}
            for (nd, scale), ps in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0]))]


# ------------------------------------------------------------------------------------------------ data
class FinetuneDataset(torch.utils.data.Dataset):
    """Scans of a split that have labels; items are ``(index, epoch)`` keys (:class:`fvlm.data.dataset.EpochSampler`).

    Returns image (1, D, H, W) float32 in [0, 1], mask (D, H, W) uint8 (every anatomy), labels (L,) float32 with
    NaN for missing.
    """

    def __init__(self, root: Path, split: str, cfg: Config, table: AnatomyTable, labels: dict[str, np.ndarray],
                 seed: int, jitter: float):
        from fvlm.data import store

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
        from fvlm.data import store
        from fvlm.zeroshot import CropSpec

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
        # global mode: the one "anatomy" is the whole crop (a mask of ones), as in pre-training and zero-shot
        return CropSpec(volume, -1 if self.cfg.loss.mode == "global" else 0, tuple(start), size)

    def __getitem__(self, key: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        from fvlm.data import store
        from fvlm.zeroshot import read_crop

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


def _collate(items):
    images, masks, labels = zip(*items)
    return (torch.from_numpy(np.stack(images)), torch.from_numpy(np.stack(masks)),
            torch.from_numpy(np.stack(labels)))


# ------------------------------------------------------------------------------------------------ loss
def label_loss(logits: torch.Tensor, targets: torch.Tensor, known: torch.Tensor, pos_weight: torch.Tensor | None,
               loss: str = "bce", gamma: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of the per-entry losses over the ``known`` entries, and their count.

    ``targets`` may hold NaN where not known. BCE with ``pos_weight`` (L,), or focal: BCE times ``(1 - p_t)^gamma``.
    """
    y = torch.nan_to_num(targets, nan=0.0)
    per = F.binary_cross_entropy_with_logits(logits, y, reduction="none", pos_weight=pos_weight)
    if loss == "focal":
        p = torch.sigmoid(logits)
        p_t = p * y + (1 - p) * (1 - y)
        per = per * (1 - p_t).pow(gamma)
    w = known.to(per.dtype)
    return (per * w).sum(), w.sum()


# ------------------------------------------------------------------------------------------------ checkpoint
def _save(run: Path, step: int, micro: int, model: FinetuneModel, optimizer: Any, scheduler: Any, cfg: Config,
          table: AnatomyTable, spec: FinetuneSpec, dev: torch.device, world: int) -> None:
    """A pre-training checkpoint (:func:`fvlm.checkpoint.save_checkpoint`) plus the heads and ``finetune.json``."""
    from safetensors.torch import save_file

    from fvlm.checkpoint import save_checkpoint
    from fvlm.train import _rng_states

    rng = _rng_states(dev)  # a collective: every rank takes part

    def heads_and_spec(folder: Path) -> None:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.heads.state_dict().items()},
                  str(folder / HEADS), metadata={"labels": json.dumps(spec.labels)})
        spec.save(folder / SPEC)

    if dist.is_main():
        state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": step,
                 "micro": micro, "world_size": world, "rng": rng}
        save_checkpoint(run, step, model.fvlm, cfg, table, training_state=state, extra=heads_and_spec)
    dist.barrier()


def load_finetuned(path: str | Path, device: str | torch.device = "cpu"
                   ) -> tuple[FinetuneModel, Config, AnatomyTable, FinetuneSpec, Path]:
    """A fine-tuned run or checkpoint -> (model in eval mode, config, anatomy table, spec, checkpoint dir)."""
    from safetensors.torch import load_file

    from fvlm.checkpoint import load_model, resolve_checkpoint

    ckpt = resolve_checkpoint(path)
    spec = FinetuneSpec.load(ckpt / SPEC)
    fvlm, cfg, table = load_model(ckpt, device)
    heads = LabelHeads(select_matrix(spec, model_anatomies(cfg, table)), cfg.model.embed_dim)
    heads.load_state_dict(load_file(str(ckpt / HEADS)))
    model = FinetuneModel(fvlm, heads).to(device).eval()
    return model, cfg, table, spec, ckpt


# ------------------------------------------------------------------------------------------------ scoring
@torch.no_grad()
def score_split(run: str | Path, data: str | Path, split: str, out: str | Path | None = None, device: str = "auto",
                batch_size: int = 0) -> Path:
    """Score every volume of ``split`` with a fine-tuned run -> ``out`` (default ``RUN/scores_{split}.csv``), in the
    ``fvlm eval`` format (empty where none of a label's anatomies is present)."""
    from fvlm.probe import scores_frame, write_scores
    from fvlm.train import check_data_config, resolve_device
    from fvlm.zeroshot import anatomy_embeddings

    dev = resolve_device(device)
    model, cfg, table, spec, ckpt = load_finetuned(run, dev)
    check_data_config(cfg, table, Path(data))
    volumes, feats = anatomy_embeddings(model.fvlm, cfg, table, data, split, dev, batch_size)
    present = torch.from_numpy(np.isfinite(feats).all(axis=2))
    x = torch.from_numpy(np.nan_to_num(feats, nan=0.0)).to(dev)
    logits, usable = model.heads(x, present.to(dev))
    probs = torch.sigmoid(logits.float()).cpu().numpy().astype(np.float64)
    probs[~usable.cpu().numpy()] = np.nan
    out = Path(out) if out else Path(run) / f"scores_{safe_component(split, 'split')}.csv"
    if out.is_dir():
        raise ValueError(f"scores output {out} is a directory")
    write_scores(scores_frame(volumes, {label: probs[:, i] for i, label in enumerate(spec.labels)}), out)
    log.info("scored %d volumes of %s with %s -> %s", len(volumes), split, ckpt, out)
    return out


# ------------------------------------------------------------------------------------------------ training
def _prepare_labels(labels: Any, data: Path, split: str, volumes_ok: list[str], fraction: float, seed: int,
                    columns: list[str] | None) -> tuple[list[str], dict[str, np.ndarray], dict[str, str],
                                                         dict[str, list[int]]]:
    """Labels with both classes in training, per-volume label vectors (NaN = missing / not subsampled)."""
    from fvlm.labels import order_labels, read_label_table
    from fvlm.probe import _aligned_labels, subsample

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


def finetune(checkpoint: str | Path, data: str | Path, labels: Any, out: str | Path, overrides: list[str] | None = None,
             resume: bool = False, device: str = "auto", features: str = "mapped", anatomy_map: str | None = None,
             loss: str = "bce", focal_gamma: float = 2.0, class_weights: bool = True, layer_decay: float = 1.0,
             head_lr_scale: float = 10.0, jitter: float = 0.1, fraction: float = 1.0, train_split: str = "train",
             eval_split: str | None = "valid", columns: list[str] | None = None,
             stop_after_steps: int | None = None) -> Path:
    """Fine-tune ``checkpoint`` on ``labels``; returns the run directory ``out`` (see the module docstring)."""
    from safetensors.torch import load_file

    from fvlm.checkpoint import STATE, clean_stale, latest_checkpoint, load_run_config, resolve_checkpoint
    from fvlm.config import apply_overrides, config_from_dict
    from fvlm.data import store
    from fvlm.data.dataset import EpochSampler
    from fvlm.model.fvlm import FVLM, load_weights
    from fvlm.probe import label_anatomies
    from fvlm.train import TrainLog, autocast_context, check_data_config, lr_at, plot_loss, resolve_device

    data, run = Path(data), Path(out)
    if loss not in LOSSES:
        raise ValueError(f"--loss must be one of {LOSSES}, got {loss!r}")
    if not 0 < layer_decay <= 1:
        raise ValueError(f"--layer-decay must be in (0, 1], got {layer_decay}")
    dev = resolve_device(device)
    dist.init_distributed(dev)
    rank, world = dist.rank(), dist.world_size()
    if dev.type == "cuda":
        torch.cuda.set_device(dev)

    ckpt = latest_checkpoint(run) if resume else None
    if resume and ckpt is None:
        raise FileNotFoundError(f"--resume: no checkpoint in {run}/checkpoints")
    if ckpt is not None:
        cfg, table = load_run_config(ckpt)
        spec = FinetuneSpec.load(ckpt / SPEC)
        log.info("--resume: using the run's saved config and %s", ckpt / SPEC)
    else:
        if run.exists() and latest_checkpoint(run) is not None:
            raise FileExistsError(f"{run} already holds checkpoints: pass --resume or choose another --out")
        source = resolve_checkpoint(checkpoint)
        src_cfg, table = load_run_config(source)
        cfg = config_from_dict(apply_overrides(apply_overrides(src_cfg.to_dict(), FINETUNE_DEFAULTS), overrides))
        cfg.model.vision.pretrained = ""  # the source weights replace any initialisation
        names, _, skipped, counts = _prepare_labels(labels, data, train_split, store.list_volumes(data, train_split),
                                                    fraction, cfg.train.seed, columns)
        use, _ = label_anatomies(names, model_anatomies(cfg, table), table, features, anatomy_map)
        pos_weight = [min(MAX_POS_WEIGHT, n / p) if class_weights else 1.0 for p, n in (counts[k] for k in names)]
        spec = FinetuneSpec(labels=names, anatomies=use, features=features, loss=loss, focal_gamma=focal_gamma,
                            class_weights=class_weights, pos_weight=pos_weight, layer_decay=layer_decay,
                            head_lr_scale=head_lr_scale, jitter=jitter, fraction=fraction, train_split=train_split,
                            source_checkpoint=str(source), skipped=skipped, train_counts=counts,
                            labels_files=[str(Path(p.strip()).resolve()) for p in
                                          (labels.split(",") if isinstance(labels, str) else labels)])
    check_data_config(cfg, table, data)
    volumes_ok = store.list_volumes(data, spec.train_split)
    kept, per_volume, _, _ = _prepare_labels(spec.labels_files, data, spec.train_split, volumes_ok, spec.fraction,
                                             cfg.train.seed, spec.labels)
    if kept != spec.labels:
        raise ValueError(f"--resume: the labels in {spec.labels_files} changed: {kept} vs the run's {spec.labels}")
    if dist.is_main():
        run.mkdir(parents=True, exist_ok=True)
        clean_stale(run)
        cfg.save(run / "config.json")
        (run / "anatomy_table.json").write_text(json.dumps(table.to_dict(), indent=2) + "\n")
        spec.save(run / SPEC)
    dist.barrier()

    torch.manual_seed(cfg.train.seed)  # the same head initialisation on every rank
    anatomies = model_anatomies(cfg, table)
    fvlm = FVLM(cfg, num_anatomies=len(anatomies))
    heads = LabelHeads(select_matrix(spec, anatomies), cfg.model.embed_dim)
    if ckpt is None:
        load_weights(fvlm, Path(spec.source_checkpoint) / "model.safetensors")
    model = FinetuneModel(fvlm, heads)
    torch.manual_seed(cfg.train.seed + rank)
    dataset = FinetuneDataset(data, spec.train_split, cfg, table, per_volume, cfg.train.seed, spec.jitter)
    sampler = EpochSampler(len(dataset), cfg.train.batch_size, cfg.train.seed, rank, world)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=cfg.train.batch_size, sampler=sampler, drop_last=True, collate_fn=_collate,
        num_workers=cfg.train.num_workers, pin_memory=dev.type == "cuda", persistent_workers=False,
        generator=torch.Generator().manual_seed(cfg.train.seed + rank))
    micro_per_epoch = sampler.batches_per_epoch
    total_steps = cfg.train.max_steps or cfg.train.epochs * micro_per_epoch // cfg.train.grad_accum
    if total_steps <= 0:
        raise ValueError(f"no optimizer steps: {micro_per_epoch} batches/epoch with grad_accum "
                         f"{cfg.train.grad_accum} and {cfg.train.epochs} epochs")

    model.to(dev)
    optimizer = torch.optim.AdamW(layer_decay_groups(model, cfg.train.lr, cfg.train.weight_decay, spec.layer_decay,
                                                     spec.head_lr_scale), lr=cfg.train.lr, betas=cfg.train.betas)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, cfg, total_steps) / cfg.train.lr)
    step, micro = 0, 0
    if ckpt is not None:
        load_weights(fvlm, ckpt / "model.safetensors")
        heads.load_state_dict(load_file(str(ckpt / HEADS)))
        state = torch.load(ckpt / STATE, map_location="cpu", weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, micro = int(state["step"]), int(state["micro"])
        if int(state["world_size"]) != world:
            raise ValueError(f"--resume: checkpoint was written by {state['world_size']} processes, now {world}")
        torch.set_rng_state(state["rng"]["torch"][rank])
        if dev.type == "cuda" and "cuda" in state["rng"]:
            torch.cuda.set_rng_state(state["rng"]["cuda"][rank], dev)
        log.info("resumed from %s at step %d", ckpt, step)
    ddp_model = dist.wrap_ddp(model, dev)
    pos_weight = torch.tensor(spec.pos_weight, dtype=torch.float32, device=dev) if spec.class_weights else None

    logger = TrainLog(run, ["n_labels"], step if ckpt is not None else None) if dist.is_main() else None
    last_step = min(total_steps, stop_after_steps) if stop_after_steps else total_steps
    log.info("fine-tuning %d label heads (%s, %s loss, layer decay %g) on %s x %d: %d scans, %d batches/epoch/rank, "
             "%d optimizer steps", len(spec.labels), spec.features, spec.loss, spec.layer_decay, dev, world,
             len(dataset), micro_per_epoch, total_steps)
    bar = tqdm(total=last_step, initial=step, desc="finetune", unit="step", disable=not dist.is_main(),
               dynamic_ncols=True, mininterval=1.0 if sys.stderr.isatty() else 30.0)
    model.train()
    t0, seen = time.perf_counter(), 0
    loss_sum, n_sum = 0.0, 0.0
    try:
        while step < last_step:
            epoch, start = divmod(micro, micro_per_epoch)
            sampler.set_epoch(epoch, start)
            for image, mask, targets in loader:
                boundary = (micro + 1) % cfg.train.grad_accum == 0
                image, mask, targets = image.to(dev), mask.to(dev), targets.to(dev)
                sync = nullcontext() if boundary or world == 1 else ddp_model.no_sync()
                with sync:
                    with autocast_context(cfg, dev):
                        logits, usable = ddp_model(image, mask)
                    known = usable & ~torch.isnan(targets)
                    total, count = label_loss(logits.float(), targets, known, pos_weight, spec.loss, spec.focal_gamma)
                    n_global = count.detach().clone()
                    if dist.is_distributed():
                        torch.distributed.all_reduce(n_global)
                    # mean over the global batch's known entries; DDP averages gradients over ranks
                    loss = total * world / n_global.clamp(min=1.0)
                    if not torch.isfinite(loss):
                        raise FloatingPointError(f"non-finite loss at step {step} (epoch {epoch}); "
                                                 f"try a lower train.lr or train.amp=off")
                    (loss / cfg.train.grad_accum).backward()
                micro += 1
                seen += image.shape[0] * world
                loss_sum += float(total.detach()) / max(1.0, float(count))
                n_sum += float(count)
                if not boundary:
                    continue
                if cfg.train.clip_grad > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.clip_grad)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                rate = seen / max(1e-9, time.perf_counter() - t0)
                bar.update(1)
                bar.set_postfix(loss=f"{loss_sum / cfg.train.grad_accum:.3f}", samples_s=f"{rate:.1f}", refresh=False)
                if logger is not None and (step % cfg.train.log_every == 0 or step == last_step):
                    logger.write({"step": step, "epoch": epoch, "lr": scheduler.get_last_lr()[-1],
                                  "samples_per_s": rate, "loss": loss_sum / cfg.train.grad_accum, "n_labels": n_sum})
                loss_sum, n_sum = 0.0, 0.0
                if step % cfg.train.ckpt_every == 0 or step == last_step:
                    _save(run, step, micro, model, optimizer, scheduler, cfg, table, spec, dev, world)
                if step >= last_step:
                    break
    finally:
        bar.close()
        if logger is not None:
            logger.close()
    if dist.is_main():
        plot_loss(run / "log.csv", run / "loss.png")
    dist.barrier()
    dist.destroy_distributed()
    if eval_split and dist.is_main() and step >= total_steps:
        score_split(run, data, eval_split, device=device)
    return run


def run_finetune_cli(args: Any) -> int:
    columns = [c.strip() for c in args.columns.split(",")] if args.columns else None
    if args.score_only:
        score_split(args.out, args.data, args.split, args.scores or None, device=args.device)
        return 0
    if not args.checkpoint and not args.resume:
        raise ValueError("--checkpoint (the pre-trained run) is required unless --resume or --score-only")
    if not args.labels and not args.resume:
        raise ValueError("--labels is required unless --resume or --score-only")
    finetune(args.checkpoint, args.data, args.labels, args.out, overrides=args.overrides, resume=args.resume,
             device=args.device, features=args.features, anatomy_map=args.anatomy_map or None, loss=args.loss,
             focal_gamma=args.focal_gamma, class_weights=not args.no_class_weights, layer_decay=args.layer_decay,
             head_lr_scale=args.head_lr_scale, jitter=args.jitter, fraction=args.fraction,
             train_split=args.train_split, eval_split=args.split or None, columns=columns)
    return 0


__all__ = ["FinetuneModel", "FinetuneSpec", "LabelHeads", "finetune", "label_loss", "layer_decay_groups",
           "load_finetuned", "score_split"]
