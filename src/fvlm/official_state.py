"""The authors' released checkpoint as tensors (the key table in :mod:`fvlm.convert`): loading it safely, mapping
its keys onto fvlm's, and the vision / text architecture and config differences its shapes imply."""

from __future__ import annotations

import logging
import math
import pickle
import re
from pathlib import Path
from typing import Any

import torch
import yaml

from fvlm.config import Config

log = logging.getLogger(__name__)

_LAYER = re.compile(r"^text_encoder\.encoder\.layer\.(\d+)\.")
_HF_TEXT_PREFIXES = ("bert.",)


def load_official_state(path: str | Path, trust_pickle: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read the released file: ``(model state dict, info)``; info has ``top_level_keys`` and ``epoch``.

    Loads with ``torch.load(weights_only=True)``; when the file needs more than tensors and plain containers,
    the error says so, and ``trust_pickle=True`` (only for a trusted file: unpickling runs code) loads it anyway.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError) as e:
        if not trust_pickle:
            first = " ".join(str(e).split())[:400]
            raise ValueError(
                f"{path}: torch.load(weights_only=True) refused the file: it holds pickled Python objects besides "
                f"tensors (LAVIS may store its config or run arguments as objects). Reason: {first}. If the file comes "
                f"from a source you trust, rerun with --trust-pickle (Python: trust_pickle=True), which unpickles it "
                f"fully (this can run code from the file); only the model tensors are kept") from None
        log.warning("%s: weights_only load failed; unpickling it fully because trust_pickle is set", path)
        obj = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        state, top = obj["model"], sorted(str(k) for k in obj)
    elif isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        state, top = obj, []
    else:
        keys = sorted(str(k) for k in obj)[:10] if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(f"{path}: expected {{'model': state_dict, ...}} or a state dict, got {keys}")
    tensors = {str(k): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ValueError(f"{path}: the 'model' entry holds no tensors")
    epoch = obj.get("epoch") if isinstance(obj, dict) else None
    return tensors, {"top_level_keys": top, "epoch": epoch if isinstance(epoch, int) else None,
                     "non_tensor_model_entries": sorted(str(k) for k, v in state.items()
                                                        if not isinstance(v, torch.Tensor))}


def strip_module(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove a ``module.`` prefix that DDP-wrapped saves put on every key."""
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module."):]: v for k, v in state.items()}
    return state


def map_official_keys(state: dict[str, torch.Tensor], target: dict[str, torch.Tensor]
                      ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Rename and reshape released tensors onto the model's state dict ``target`` (name -> tensor).

    Returns ``(mapped, report)``: mapped = {model name: tensor}; report lists ``renamed`` {released: ours},
    ``reshaped`` {ours: [from, to]}, ``unmapped`` (released keys with no place in the model) and
    ``shape_mismatch``. Two released keys that land on the same model key raise ``ValueError``.
    """
    state = strip_module(state)
    mapped: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    report: dict[str, Any] = {"renamed": {}, "reshaped": {}, "unmapped": [], "shape_mismatch": []}
    for key, value in state.items():
        name = key
        if key.startswith("text_encoder."):
            rest = key[len("text_encoder."):]
            for prefix in _HF_TEXT_PREFIXES:
                if rest.startswith(prefix):
                    name = "text_encoder." + rest[len(prefix):]
        if name not in target:
            report["unmapped"].append(key)
            continue
        want = tuple(target[name].shape)
        if tuple(value.shape) != want:
            if value.numel() == target[name].numel() and name in ("query_tokens", "temp"):
                report["reshaped"][name] = [list(value.shape), list(want)]
                value = value.reshape(want)
            else:
                report["shape_mismatch"].append(f"{key}: file {tuple(value.shape)} vs model {name} {want}")
                continue
        if name in mapped:
            raise ValueError(f"released keys {origin[name]!r} and {key!r} both map onto {name!r}")
        if name != key:
            report["renamed"][key] = name
        mapped[name] = value.detach().to(target[name].dtype).clone()
        origin[name] = key
    return mapped, report


def infer_text_config(state: dict[str, torch.Tensor], heads: int | None = None,
                      fallback: dict[str, Any] | None = None) -> dict[str, Any]:
    """BertConfig fields of the text encoder in a (mapped) state dict: vocab_size, hidden_size, num_hidden_layers,
    intermediate_size, max_position_embeddings, type_vocab_size (from tensor shapes), num_attention_heads
    (``heads``, else ``fallback``'s, else width / 64).

    ``fallback`` (a text model's config.json fields) supplies what absent tensors cannot tell, e.g. the
    vocabulary size when LAVIS left out frozen embeddings.
    """
    fields = {k: v for k, v in (fallback or {}).items()
              if k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                       "max_position_embeddings", "type_vocab_size", "layer_norm_eps", "hidden_act")}
    shapes = {"vocab_size": ("embeddings.word_embeddings.weight", 0), "hidden_size": ("embeddings.LayerNorm.weight", 0),
              "max_position_embeddings": ("embeddings.position_embeddings.weight", 0),
              "type_vocab_size": ("embeddings.token_type_embeddings.weight", 0)}
    layers = sorted({int(m.group(1)) for k in state if (m := _LAYER.match(k))})
    if layers:
        fields["num_hidden_layers"] = layers[-1] + 1
        width = state.get(f"text_encoder.encoder.layer.{layers[-1]}.output.LayerNorm.weight")
        if width is not None:
            fields["hidden_size"] = int(width.shape[0])
        inter = next((state[k] for k in sorted(state) if k.endswith(".intermediate.dense.weight")
                      and k.startswith("text_encoder.encoder.layer.")), None)
        if inter is not None:
            fields["intermediate_size"] = int(inter.shape[0])
    for name, (key, dim) in shapes.items():
        if f"text_encoder.{key}" in state:
            fields[name] = int(state[f"text_encoder.{key}"].shape[dim])
    unknown = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size",
                           "max_position_embeddings", "type_vocab_size") if k not in fields]
    if unknown:
        raise ValueError(f"cannot tell the text encoder's {unknown} from the checkpoint (its text_encoder tensors "
                         f"are missing): pass --text-model with the text model it was trained from")
    fields["num_attention_heads"] = heads or fields.get("num_attention_heads") or max(1, fields["hidden_size"] // 64)
    if fields["hidden_size"] % fields["num_attention_heads"]:
        raise ValueError(f"text width {fields['hidden_size']} is not divisible by {fields['num_attention_heads']} "
                         f"attention heads")
    return fields


def infer_vision_fields(state: dict[str, torch.Tensor], heads: int | None = None) -> dict[str, Any]:
    """``model.vision`` sizes of a released state dict: width, depth, MLP size and patch size from the tensor
    shapes; heads (not in any shape) from ``heads``, else width / 64 (the released ViT-B: 768 / 12).

    Empty when the file holds no ``visual_encoder`` tensors.
    """
    fields: dict[str, Any] = {}
    norm = state.get("visual_encoder.norm.weight")
    if norm is None:
        return fields
    fields["width"] = int(norm.shape[0])
    blocks = {int(k.split(".")[2]) for k in state if k.startswith("visual_encoder.blocks.")}
    if blocks:
        fields["depth"] = max(blocks) + 1
    mlp = state.get("visual_encoder.blocks.0.mlp.linear1.weight")
    if mlp is not None:
        fields["mlp_dim"] = int(mlp.shape[0])
    kernel = state.get("visual_encoder.patch_embedding.patch_embeddings.weight")
    if kernel is not None and kernel.ndim == 5:
        fields["patch_size"] = [int(k) for k in kernel.shape[2:]]
    fields["heads"] = int(heads) if heads else max(1, fields["width"] // 64)
    if fields["width"] % fields["heads"]:
        raise ValueError(f"vision width {fields['width']} is not divisible by {fields['heads']} attention heads")
    return fields


def read_lavis_config(path: str | Path) -> dict[str, Any]:
    """The settings of a LAVIS run config (``model_config.yaml`` / ``pretrain_ct.yaml``) that fix the model:
    ``vit_hidden_size``, ``vit_mlp_dim``, ``vit_num_heads``, ``vit_num_layers``, ``max_txt_len``, ``embed_dim``
    (``model:`` section), and the run's ``amp``. Missing keys are left out (the released ViT-B sizes are
    MONAI's defaults and not in its YAML)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LAVIS config {path} not found")
    try:
        with open(path) as f:
            doc = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not a readable YAML file: {e}") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: expected a mapping with 'model:' and 'run:' sections")
    model = doc.get("model") or {}
    run = doc.get("run") or {}
    keys = ("vit_hidden_size", "vit_mlp_dim", "vit_num_heads", "vit_num_layers", "max_txt_len", "embed_dim")
    out = {k: model[k] for k in keys if k in model}
    if "amp" in run:
        out["amp"] = bool(run["amp"])
    return out


def config_differences(state: dict[str, torch.Tensor], cfg: Config, num_anatomies: int) -> list[str]:
    """What the released tensors say about the model's sizes, where the configuration says otherwise (checked
    before a model is built, so a wrong preset fails fast and by name rather than by tensor shapes)."""
    diffs = []

    def shape(key: str) -> tuple[int, ...] | None:
        return tuple(state[key].shape) if key in state else None

    v = cfg.model.vision
    width = shape("visual_encoder.norm.weight")
    if width and width[0] != v.width:
        diffs.append(f"vision width {width[0]} vs model.vision.width={v.width}")
    blocks = {int(k.split(".")[2]) for k in state if k.startswith("visual_encoder.blocks.")}
    if blocks and len(blocks) != v.depth:
        diffs.append(f"{len(blocks)} vision blocks vs model.vision.depth={v.depth}")
    kernel = shape("visual_encoder.patch_embedding.patch_embeddings.weight")
    if kernel and tuple(kernel[2:]) != tuple(v.patch_size):
        diffs.append(f"patch size {list(kernel[2:])} vs model.vision.patch_size={list(v.patch_size)}")
    mlp = shape("visual_encoder.blocks.0.mlp.linear1.weight")
    if mlp and mlp[0] != v.mlp_dim:
        diffs.append(f"vision MLP size {mlp[0]} vs model.vision.mlp_dim={v.mlp_dim}")
    pos = shape("visual_encoder.patch_embedding.position_embeddings")
    grid = math.prod(cfg.grid_size)
    if pos and pos[1] != grid:
        diffs.append(f"{pos[1]} position embeddings vs the {grid} tokens of data.crop_size="
                     f"{list(cfg.data.crop_size)} / patch size")
    proj = shape("text_proj.weight")
    if proj and proj[0] != cfg.model.embed_dim:
        diffs.append(f"embedding size {proj[0]} vs model.embed_dim={cfg.model.embed_dim}")
    queries = state.get("query_tokens")
    if queries is not None and width and queries.numel() != num_anatomies * width[0]:
        diffs.append(f"{queries.numel() // width[0]} anatomy queries vs {num_anatomies} anatomies")
    positions = (cfg.model.text.random_init or {}).get("max_position_embeddings")
    if positions and cfg.model.text.max_length > positions:
        diffs.append(f"text model has {positions} positions < model.text.max_length={cfg.model.text.max_length}")
    return diffs


__all__ = ["config_differences", "infer_text_config", "infer_vision_fields", "load_official_state",
           "map_official_keys", "read_lavis_config", "strip_module"]
