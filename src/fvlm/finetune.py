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
per ``data.flip_prob`` (:mod:`fvlm.finetune_data`; all a pure function of ``(seed, epoch, index)``, so resume
is exact). Scoring uses the evaluation crops of zero-shot (:func:`fvlm.zeroshot.anatomy_embeddings`):
anatomy-centred, ``eval_crop_size``.

Training machinery is pre-training's (:mod:`fvlm.engine`): AdamW with the same weight-decay rule, warm-up +
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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from fvlm import distributed as dist
from fvlm import engine
from fvlm.anatomy import AnatomyTable, alignment
from fvlm.checkpoint import load_model, load_run_config, resolve_checkpoint
from fvlm.config import Config, apply_overrides, config_from_dict
from fvlm.data import store
from fvlm.data.compat import check_store
from fvlm.finetune_data import FinetuneDataset, collate, prepare_labels
from fvlm.io import atomic_write_text
from fvlm.model.fvlm import _NO_DECAY_NAMES, FVLM, load_weights
from fvlm.paths import safe_component
from fvlm.plots import plot_loss
from fvlm.probe import label_anatomies, scores_frame, write_scores
from fvlm.runtime import autocast_context, resolve_device, seed_torch
from fvlm.zeroshot import anatomy_embeddings

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
    return list(alignment(cfg, table).names)


def layer_decay_groups(model: FinetuneModel, lr: float, weight_decay: float, layer_decay: float,
                       head_lr_scale: float) -> list[dict[str, Any]]:
    """AdamW groups: pre-training's weight-decay rule; per-layer learning rates (see the module docstring)."""
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


def load_finetuned(path: str | Path, device: str | torch.device = "cpu"
                   ) -> tuple[FinetuneModel, Config, AnatomyTable, FinetuneSpec, Path]:
    """A fine-tuned run or checkpoint -> (model in eval mode, config, anatomy table, spec, checkpoint dir)."""
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
    dev = resolve_device(device)
    model, cfg, table, spec, ckpt = load_finetuned(run, dev)
    check_store(cfg, table, data)
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
def finetune(checkpoint: str | Path | None, data: str | Path, labels: Any, out: str | Path,
             overrides: list[str] | None = None, resume: bool = False, device: str = "auto", features: str = "mapped",
             anatomy_map: str | None = None, loss: str = "bce", focal_gamma: float = 2.0, class_weights: bool = True,
             layer_decay: float = 1.0, head_lr_scale: float = 10.0, jitter: float = 0.1, fraction: float = 1.0,
             train_split: str = "train", eval_split: str | None = "valid", columns: list[str] | None = None,
             stop_after_steps: int | None = None) -> Path:
    """Fine-tune ``checkpoint`` on ``labels``; returns the run directory ``out`` (see the module docstring).

    ``checkpoint`` and ``labels`` may be empty with ``resume`` (the run's own are used)."""
    data, run = Path(data), Path(out)
    if not checkpoint and not resume:
        raise ValueError("--checkpoint (the pre-trained run) is required unless --resume or --score-only")
    if not labels and not resume:
        raise ValueError("--labels is required unless --resume or --score-only")
    if loss not in LOSSES:
        raise ValueError(f"--loss must be one of {LOSSES}, got {loss!r}")
    if not 0 < layer_decay <= 1:
        raise ValueError(f"--layer-decay must be in (0, 1], got {layer_decay}")
    session = engine.start(device)
    dev, rank, world = session.device, session.rank, session.world
    ckpt = engine.resume_point(run, resume)
    if ckpt is not None:
        cfg, table = load_run_config(ckpt)
        spec = FinetuneSpec.load(ckpt / SPEC)
        log.info("--resume: using the run's saved config and %s", ckpt / SPEC)
    else:
        source = resolve_checkpoint(checkpoint)
        src_cfg, table = load_run_config(source)
        cfg = config_from_dict(apply_overrides(apply_overrides(src_cfg.to_dict(), FINETUNE_DEFAULTS), overrides))
        cfg.model.vision.pretrained = ""  # the source weights replace any initialisation
        names, _, skipped, counts = prepare_labels(labels, data, train_split, store.list_volumes(data, train_split),
                                                   fraction, cfg.train.seed, columns)
        use, _ = label_anatomies(names, model_anatomies(cfg, table), table, features, anatomy_map)
        pos_weight = [min(MAX_POS_WEIGHT, n / p) if class_weights else 1.0 for p, n in (counts[k] for k in names)]
        spec = FinetuneSpec(labels=names, anatomies=use, features=features, loss=loss, focal_gamma=focal_gamma,
                            class_weights=class_weights, pos_weight=pos_weight, layer_decay=layer_decay,
                            head_lr_scale=head_lr_scale, jitter=jitter, fraction=fraction, train_split=train_split,
                            source_checkpoint=str(source), skipped=skipped, train_counts=counts,
                            labels_files=[str(Path(p.strip()).resolve()) for p in
                                          (labels.split(",") if isinstance(labels, str) else labels)])
    check_store(cfg, table, data)
    volumes_ok = store.list_volumes(data, spec.train_split)
    kept, per_volume, _, _ = prepare_labels(spec.labels_files, data, spec.train_split, volumes_ok, spec.fraction,
                                            cfg.train.seed, spec.labels)
    if kept != spec.labels:
        raise ValueError(f"--resume: the labels in {spec.labels_files} changed: {kept} vs the run's {spec.labels}")
    engine.write_run_files(run, cfg, table, extra=lambda r: spec.save(r / SPEC))
    dist.barrier()

    seed_torch(cfg.train.seed)  # the same head initialisation on every rank
    anatomies = model_anatomies(cfg, table)
    fvlm = FVLM(cfg, num_anatomies=len(anatomies))
    heads = LabelHeads(select_matrix(spec, anatomies), cfg.model.embed_dim)
    if ckpt is None:
        load_weights(fvlm, Path(spec.source_checkpoint) / "model.safetensors")
    model = FinetuneModel(fvlm, heads)
    seed_torch(cfg.train.seed + rank)
    dataset = FinetuneDataset(data, spec.train_split, cfg, table, per_volume, cfg.train.seed, spec.jitter)
    sampler, loader = engine.train_loader(dataset, cfg, session, collate)
    micro_per_epoch = sampler.batches_per_epoch
    total_steps = engine.total_steps(cfg, micro_per_epoch)
    model.to(dev)
    optimizer = torch.optim.AdamW(layer_decay_groups(model, cfg.train.lr, cfg.train.weight_decay, spec.layer_decay,
                                                     spec.head_lr_scale), lr=cfg.train.lr, betas=cfg.train.betas)
    scheduler = engine.schedule(optimizer, cfg, total_steps)
    pos_weight_t = torch.tensor(spec.pos_weight, dtype=torch.float32, device=dev) if spec.class_weights else None

    # the loop's maths: masked BCE / focal loss of the label heads, a mean over the global batch's known entries
    sums = {"loss": 0.0, "n": 0.0}

    def micro_step(batch: tuple[torch.Tensor, ...], epoch: int, step: int) -> None:
        image, mask, targets = (t.to(dev) for t in batch)
        with autocast_context(cfg, dev):
            logits, usable = trainer.ddp(image, mask)
        known = usable & ~torch.isnan(targets)
        total, count = label_loss(logits.float(), targets, known, pos_weight_t, spec.loss, spec.focal_gamma)
        n_global = count.detach().clone()
        if dist.is_distributed():
            torch.distributed.all_reduce(n_global)
        # mean over the global batch's known entries; DDP averages gradients over ranks
        loss = total * world / n_global.clamp(min=1.0)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss at step {step} (epoch {epoch}); "
                                     f"try a lower train.lr or train.amp=off")
        (loss / cfg.train.grad_accum).backward()
        sums["loss"] += float(total.detach()) / max(1.0, float(count))
        sums["n"] += float(count)

    def log_row(rate: float) -> dict[str, Any]:
        row = {"lr": scheduler.get_last_lr()[-1], "samples_per_s": rate, "loss": sums["loss"] / cfg.train.grad_accum,
               "n_labels": sums["n"]}
        sums.update(loss=0.0, n=0.0)
        return row

    def heads_and_spec(folder: Path) -> None:  # a pre-training checkpoint plus the heads and finetune.json
        save_file({k: v.detach().cpu().contiguous() for k, v in heads.state_dict().items()},
                  str(folder / HEADS), metadata={"labels": json.dumps(spec.labels)})
        spec.save(folder / SPEC)

    trainer = engine.Trainer("finetune", cfg, run, session, model, optimizer, scheduler, sampler, loader, micro_step,
                             log_row, saved=fvlm, extra=heads_and_spec)
    step = 0
    if ckpt is not None:
        load_weights(fvlm, ckpt / "model.safetensors")
        heads.load_state_dict(load_file(str(ckpt / HEADS)))
        step = trainer.restore(ckpt)
        log.info("resumed from %s at step %d", ckpt, step)
    trainer.open(["n_labels"], step if ckpt is not None else None)
    log.info("fine-tuning %d label heads (%s, %s loss, layer decay %g) on %s x %d: %d scans, %d batches/epoch/rank, "
             "%d optimizer steps", len(spec.labels), spec.features, spec.loss, spec.layer_decay, dev, world,
             len(dataset), micro_per_epoch, total_steps)
    step = engine.fit([trainer], table, step, total_steps, stop_after_steps, "finetune")
    if dist.is_main():
        plot_loss(run / "log.csv", run / "loss.png")
    engine.finish()
    if eval_split and dist.is_main() and step >= total_steps:
        score_split(run, data, eval_split, device=device)
    return run


__all__ = ["FinetuneModel", "FinetuneSpec", "LabelHeads", "finetune", "label_loss", "layer_decay_groups",
           "load_finetuned", "score_split"]
