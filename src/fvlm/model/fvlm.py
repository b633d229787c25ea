"""The fVLM model: 3D ViT + anatomy pooling on the image side, BERT [CLS] + projection on the text side.

Parameter names follow the released checkpoint: ``visual_encoder.*`` (MONAI ViT), ``text_encoder.*`` (HF
BERT), ``text_proj`` (shared ``Linear(text hidden, E)``), ``vision_projs.{k}`` (per-anatomy ``Linear(W, E)``),
``query_tokens`` (1, A, W), ``attention.*`` (``nn.MultiheadAttention``: ``in_proj_weight``,
``in_proj_bias``, ``out_proj``) and ``temp`` (the softmax temperature; logits = similarity / temp).

The CT-CLIP-style global baseline is the same model with A = 1: the one "anatomy" is the whole crop (a
mask of ones) and its text the whole report.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin
from safetensors.torch import load_file, save_file
from torch import nn

from fvlm.config import Config
from fvlm.hub import is_hub_id, offline, snapshot
from fvlm.io import atomic_path
from fvlm.model.anatomy_pooling import anatomy_attention, project_anatomies, token_membership
from fvlm.model.text_encoder import FrozenPrefixCache, build_text_encoder, encode_cls, frozen_text_modules
from fvlm.model.vit3d import ViT3D, load_mae_weights

log = logging.getLogger(__name__)


class FVLM(nn.Module, PyTorchModelHubMixin, library_name="fvlm", license="apache-2.0",
           repo_url="https://github.com/alibaba-damo-academy/fvlm",
           tags=["fvlm", "medical-imaging", "computed-tomography", "vision-language", "zero-shot"]):
    """Anatomy-level CT-report model.

    Args:
        cfg: full configuration (``model.*`` sizes; ``data.crop_size`` fixes the position-embedding grid).
        num_anatomies: A, the anatomies of the anatomy table (1 for the global baseline).

    ``FVLM.from_pretrained(folder_or_hub_id)`` loads an exported model folder (``fvlm export``), a run or
    checkpoint directory, or a Hub id from the local cache (:mod:`fvlm.hub`); ``save_pretrained(folder)``
    writes the same self-contained folder as a checkpoint (needs ``anatomy_table``, which loading sets).
    """

    anatomy_table: Any = None  # the AnatomyTable of a loaded model (fvlm.checkpoint.load_model sets it)

    def __init__(self, cfg: Config, num_anatomies: int):
        super().__init__()
        if num_anatomies < 1:
            raise ValueError(f"num_anatomies must be >= 1, got {num_anatomies}")
        m = cfg.model
        width = m.vision.width
        self.num_anatomies = num_anatomies
        self.temp_min, self.temp_max = m.temp_min, m.temp_max
        self.visual_encoder = ViT3D(m.vision, cfg.data.crop_size, in_channels=len(cfg.input_windows))
        # extra input windows are computed from the [0, 1] image here, in one vectorised step, so the data
        # pipeline always ships one channel: x * (high - low) + low recovers the (clipped) HU exactly
        low, high = cfg.data.hu_window
        windows = torch.tensor(cfg.data.input_windows, dtype=torch.float32).reshape(-1, 2)
        self.register_buffer("_window_scale", ((high - low) / (windows[:, 1] - windows[:, 0])).reshape(1, -1, 1, 1, 1),
                             persistent=False)
        self.register_buffer("_window_shift", ((low - windows[:, 0]) / (windows[:, 1] - windows[:, 0])
                                               ).reshape(1, -1, 1, 1, 1), persistent=False)
        if m.vision.pretrained:
            load_mae_weights(self.visual_encoder, m.vision.pretrained)
        self.text_encoder, self.tokenizer = build_text_encoder(m.text)
        self.text_proj = nn.Linear(self.text_encoder.config.hidden_size, m.embed_dim)
        self.vision_projs = nn.ModuleList(nn.Linear(width, m.embed_dim) for _ in range(num_anatomies))
        self.query_tokens = nn.Parameter(torch.zeros(1, num_anatomies, width))  # zero init, as released
        if m.query_init_std > 0:
            nn.init.normal_(self.query_tokens, std=m.query_init_std)
        self.attention = nn.MultiheadAttention(width, m.pool_heads, dropout=m.pool_dropout, batch_first=True)
        self.temp = nn.Parameter(torch.tensor(float(m.temp_init)))
        self._frozen_text = frozen_text_modules(self.text_encoder, m.text.freeze_layers)
        self.text_pooling = m.text.pooling
        self.text_cache = (FrozenPrefixCache(self.text_encoder, m.text.freeze_layers, m.text.cache_frozen)
                           if m.text.cache_frozen else None)

    # ------------------------------------------------------------------ Hugging Face (huggingface_hub mixin)
    def _save_pretrained(self, save_directory: Path) -> None:
        from fvlm.export import save_pretrained_folder  # here: fvlm.export imports this module (a cycle at the top)

        save_pretrained_folder(self, Path(save_directory))

    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision: str | None = None, cache_dir: Any = None,
                         force_download: bool = False, local_files_only: bool = False, token: Any = None,
                         map_location: str = "cpu", **model_kwargs: Any) -> FVLM:
        from fvlm.checkpoint import load_model  # here: fvlm.checkpoint imports this module (a cycle at the top)

        source: str | Path = model_id
        if is_hub_id(model_id):
            source = snapshot(model_id, revision=revision, cache_dir=cache_dir,
                              local_files_only=local_files_only or offline(), token=token)
        model, _, _ = load_model(source, device=map_location)
        return model

    def train(self, mode: bool = True) -> FVLM:
        """Frozen text layers stay in eval mode (no dropout): they are fixed feature extractors."""
        super().train(mode)
        for module in self._frozen_text:
            module.eval()
        return self

    @property
    def patch_size(self) -> tuple[int, int, int]:
        return self.visual_encoder.patch_size

    def temperature(self) -> torch.Tensor:
        """The softmax temperature, a 0-d tensor kept in [temp_min, temp_max].

        As released, the parameter itself is clamped in place (no gradient) before use, so it can never
        leave the range and get stuck where a clamp in the graph would give it zero gradient.
        """
        with torch.no_grad():
            self.temp.clamp_(self.temp_min, self.temp_max)
        return self.temp

    def encode_image(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Anatomy features of a batch of volumes.

        Args:
            image: float (B, 1, D, H, W), HU windowed by ``data.hu_window`` to [0, 1] (with
                ``data.input_windows`` the model expands it to one channel per window); D, H, W multiples of the
                patch size (any multiple: the position embedding is interpolated).
            mask: integer (B, D, H, W), 0 background, k + 1 = anatomy k.
        Returns:
            features (B, A, E), L2-normalised, 0 where the anatomy has no token; present bool (B, A).
        """
        if mask.shape[0] != image.shape[0] or tuple(mask.shape[1:]) != tuple(image.shape[2:]):
            raise ValueError(f"mask {tuple(mask.shape)} does not match image {tuple(image.shape)}")
        if self._window_scale.numel():
            if image.shape[1] != 1:
                raise ValueError(f"expected a 1-channel image windowed by data.hu_window, got {tuple(image.shape)}")
            image = (image * self._window_scale + self._window_shift).clamp_(0.0, 1.0)
        levels = self.visual_encoder(image)
        membership = token_membership(mask, self.num_anatomies, self.patch_size)
        pooled, present = anatomy_attention(levels, membership, self.query_tokens, self.attention)
        return project_anatomies(pooled, present, self.vision_projs), present

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Text features (U, E), L2-normalised, of token ids and attention mask (U, L)."""
        if self.text_cache is not None:
            state = self.text_cache.encode(input_ids, attention_mask, self.text_pooling)
        else:
            state = encode_cls(self.text_encoder, input_ids, attention_mask, pooling=self.text_pooling)
        return F.normalize(self.text_proj(state), dim=-1)

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Encode a training batch (keys: ``image``, ``mask``, ``text_input_ids``, ``text_attention_mask``,
        ``text_index``; see docs/architecture.md).

        Returns:
            ``image_features`` (B, A, E), ``text_features`` (B, A, E) (the U distinct texts gathered by
            ``text_index``; entries without a text are whatever row index they hold, masked by ``valid`` in
            the loss), ``temperature`` () .
        """
        image_features, _ = self.encode_image(batch["image"], batch["mask"])
        texts = self.encode_text(batch["text_input_ids"], batch["text_attention_mask"])
        index = batch["text_index"]
        if index.shape != image_features.shape[:2]:
            raise ValueError(f"text_index {tuple(index.shape)} does not match (B, A) = "
                             f"{tuple(image_features.shape[:2])}")
        text_features = texts[index.clamp(min=0)]
        return {"image_features": image_features, "text_features": text_features, "temperature": self.temperature()}


# --------------------------------------------------------------------------------------- optimizer groups
_NO_DECAY_NAMES = ("temp", "query_tokens", "position_embeddings")


def param_groups(model: nn.Module, weight_decay: float, lr: float | None = None,
                 text_lr_scale: float = 1.0, decay_all: bool = False) -> list[dict[str, Any]]:
    """AdamW parameter groups: weight decay on weight matrices/kernels only (``decay_all``: on every parameter,
    as the released optimizer, ``AdamW(model.parameters())`` with its default 0.01, does).

    No decay on 1-d parameters (norms, biases), the temperature, the anatomy queries and position
    embeddings (the ViT's and BERT's). Frozen parameters are left out. Works on a DDP-wrapped model too.
    With ``lr`` given, the pretrained text encoder's groups get ``lr * text_lr_scale`` (fine-tuning a
    pretrained BERT at a from-scratch ViT's learning rate can collapse its features); empty groups are
    dropped.
    """
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        leaf = name.split(".")
        no_decay = not decay_all and (p.ndim <= 1 or any(part in _NO_DECAY_NAMES for part in leaf))
        is_text = "text_encoder" in leaf
        groups.setdefault((no_decay, is_text), []).append(p)
    out = []
    for (no_decay, is_text), params in sorted(groups.items()):
        group: dict[str, Any] = {"params": params, "weight_decay": 0.0 if no_decay else weight_decay}
        if lr is not None:
            group["lr"] = lr * (text_lr_scale if is_text else 1.0)
        out.append(group)
    return out


# --------------------------------------------------------------------------------------------- weights
def save_weights(model: nn.Module, path: str | Path) -> None:
    """Write the model's state dict to a safetensors file (atomically)."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path, suffix=".safetensors") as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})


def load_weights(model: nn.Module, path: str | Path, strict: bool = True) -> dict[str, list[str]]:
    """Load a safetensors state dict into ``model``.

    Returns ``{"missing": [...], "unexpected": [...]}``; logs both. With ``strict`` (default) any missing
    or unexpected key, or a shape mismatch, raises ``ValueError`` naming the keys and the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} not found")
    state = load_file(str(path))
    own = model.state_dict()
    missing = sorted(k for k in own if k not in state)
    unexpected = sorted(k for k in state if k not in own)
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in state if k in own and state[k].shape != own[k].shape]
    if shapes:
        raise ValueError(f"{path}: shape mismatch for {len(shapes)} tensor(s): {shapes[:5]}")
    if missing or unexpected:
        msg = f"{path}: {len(missing)} missing key(s) {missing[:8]}, {len(unexpected)} unexpected {unexpected[:8]}"
        if strict:
            raise ValueError(msg)
        log.warning(msg)
    model.load_state_dict(state, strict=False)
    log.info("loaded %d tensors from %s", len(state) - len(unexpected), path)
    return {"missing": missing, "unexpected": unexpected}
