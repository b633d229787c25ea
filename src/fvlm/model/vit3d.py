"""3D vision transformer: MONAI's ``ViT`` (the released encoder's parameter layout) returning 4 token levels.

The parameters are those of stock ``monai.networks.nets.ViT`` (conv patch embedding, learnable position
embedding, no CLS token, qkv bias), so checkpoints of the released code load by name:
``patch_embedding.patch_embeddings``, ``patch_embedding.position_embeddings``,
``blocks.{i}.{norm1,attn.qkv,attn.out_proj,norm2,mlp.linear1,mlp.linear2}``, ``norm``.

The forward pass is our own, for three reasons:

- it returns the token levels the anatomy pooling needs (outputs of the 1-based blocks in
  ``vision.levels``, not normed, plus the final LayerNorm output);
- it interpolates the position embedding when the input's token grid differs from the training grid
  (evaluation crops are larger);
- attention runs through ``F.scaled_dot_product_attention`` with dropout only in training. MONAI 1.6's
  ``SABlock(use_flash_attention=True)`` passes ``dropout_p=dropout_rate`` to SDPA unconditionally, so
  evaluation would drop attention weights at random with the released dropout 0.1 (and ``ViT`` does not
  expose the flag). The block computation below is otherwise MONAI's ``TransformerBlock`` exactly
  (pre-norm attention and MLP, same submodules), which the tests check.

MAE initialisation (:func:`load_mae_weights`) follows the released code: ImageNet MAE ViT-B/16 blocks and
final norm; the 2D patch embedding, CLS token, mask token and decoder are skipped; the 14 x 14 grid of the
2D position embedding is resized bilinearly to (gh, gw) and repeated over the gd depth positions.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from monai.networks.nets import ViT
from torch import nn
from torch.utils.checkpoint import checkpoint

from fvlm.config import VisionConfig

log = logging.getLogger(__name__)


class ViT3D(ViT):
    """MONAI ViT (1 input channel, conv patches, learnable position embedding) with a multi-level forward.

    Args:
        cfg: vision settings (patch size, width, depth, heads, MLP size, dropout, levels, checkpointing).
        crop_size: training input size (D, H, W) in voxels; fixes the stored position-embedding grid
            ``crop_size / patch_size``.
    """

    def __init__(self, cfg: VisionConfig, crop_size: Sequence[int], in_channels: int = 1):
        if len(crop_size) != 3 or any(s % p for s, p in zip(crop_size, cfg.patch_size)):
            raise ValueError(f"crop size {tuple(crop_size)} is not a multiple of patch size {cfg.patch_size}")
        super().__init__(
            in_channels=in_channels,
            img_size=tuple(crop_size),
            patch_size=tuple(cfg.patch_size),
            hidden_size=cfg.width,
            mlp_dim=cfg.mlp_dim,
            num_layers=cfg.depth,
            num_heads=cfg.heads,
            proj_type="conv",
            pos_embed_type="learnable",
            classification=False,
            dropout_rate=cfg.dropout,
            spatial_dims=3,
            qkv_bias=True,
        )
        for blk in self.blocks:
            # MONAI 1.6 builds a LayerNorm for cross-attention even when there is none; it never gets a
            # gradient, which DDP (find_unused_parameters=False) treats as an error. Not in the released model.
            if not blk.with_cross_attention:
                blk.norm_cross_attn = nn.Identity()
                # MONAI 1.4 also builds the cross-attention itself: without this its parameters would be in
                # the state dict, and checkpoints would not load across MONAI versions (tests/test_checkpoint.py)
                blk.cross_attn = nn.Identity()
        self.patch_size: tuple[int, int, int] = tuple(cfg.patch_size)  # type: ignore[assignment]
        self.grid_size: tuple[int, int, int] = tuple(s // p for s, p in zip(crop_size, cfg.patch_size))  # type: ignore
        self.width = cfg.width
        self.heads = cfg.heads
        self.levels = tuple(cfg.levels)
        if any(not 1 <= lv <= cfg.depth for lv in self.levels):
            raise ValueError(f"vision levels {self.levels} must lie in 1..depth={cfg.depth}")
        self.grad_checkpointing = cfg.grad_checkpointing
        self.in_channels = in_channels
        if cfg.stem_channels:
            self._build_stem(cfg)

    def _build_stem(self, cfg: VisionConfig) -> None:
        """Replace the linear patch embedding by stride-2 convs + a patchify conv of the remaining factor."""
        factor = 2 ** len(cfg.stem_channels)
        if any(p % factor for p in cfg.patch_size):
            raise ValueError(f"model.vision.patch_size={cfg.patch_size} must be divisible by 2^len(stem_channels)"
                             f"={factor}")
        layers: list[nn.Module] = []
        c = self.patch_embedding.patch_embeddings.in_channels
        for ch in cfg.stem_channels:
            layers += [nn.Conv3d(c, ch, kernel_size=3, stride=2, padding=1), nn.GroupNorm(min(8, ch), ch), nn.GELU()]
            c = ch
        rest = tuple(p // factor for p in cfg.patch_size)
        self.patch_embedding.stem = nn.Sequential(*layers)
        self.patch_embedding.patch_embeddings = nn.Conv3d(c, cfg.width, kernel_size=rest, stride=rest)

    @property
    def num_levels(self) -> int:
        """Token levels returned by :meth:`forward` (the configured blocks plus the final norm)."""
        return len(self.levels) + 1

    def token_grid(self, spatial: Sequence[int]) -> tuple[int, int, int]:
        """Token grid (gd, gh, gw) of an input of spatial size (D, H, W); errors if not a patch multiple."""
        if any(s % p for s, p in zip(spatial, self.patch_size)):
            raise ValueError(f"input size {tuple(spatial)} is not a multiple of the patch size {self.patch_size}")
        return tuple(s // p for s, p in zip(spatial, self.patch_size))  # type: ignore[return-value]

    def position_embedding(self, grid: Sequence[int]) -> torch.Tensor:
        """Position embedding (1, gd*gh*gw, W) for a token grid; trilinear interpolation off the training grid."""
        pos = self.patch_embedding.position_embeddings
        if tuple(grid) == self.grid_size:
            return pos
        gd, gh, gw = self.grid_size
        vol = pos.reshape(1, gd, gh, gw, self.width).permute(0, 4, 1, 2, 3)
        vol = F.interpolate(vol, size=tuple(grid), mode="trilinear", align_corners=False)
        return vol.flatten(2).transpose(1, 2)

    def _block(self, blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """MONAI ``TransformerBlock.forward`` (no cross-attention) with SDPA attention. x: (B, N, W)."""
        attn = blk.attn
        b, n, w = x.shape
        qkv = attn.qkv(blk.norm1(x)).view(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        # dropout on the attention weights only while training (see the module docstring)
        h = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2],
                                           dropout_p=attn.dropout_rate if self.training else 0.0)
        x = x + attn.drop_output(attn.out_proj(h.transpose(1, 2).reshape(b, n, w)))
        return x + blk.mlp(blk.norm2(x))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:  # type: ignore[override]
        """Encode a batch of volumes.

        Args:
            x: float (B, C, D, H, W) (C = input windows), D, H, W multiples of the patch size.
        Returns:
            ``len(levels) + 1`` tensors (B, N, W), N = gd * gh * gw tokens in (z, y, x) raster order:
            the outputs of the blocks in ``levels`` (not normed) and the final LayerNorm output.
        """
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected an image batch (B, {self.in_channels}, D, H, W), got shape {tuple(x.shape)}")
        grid = self.token_grid(x.shape[2:])
        pe = self.patch_embedding
        if hasattr(pe, "stem"):
            x = pe.stem(x)
        h = pe.patch_embeddings(x).flatten(2).transpose(1, 2)  # (B, N, W)
        h = pe.dropout(h + self.position_embedding(grid))
        out = []
        for i, blk in enumerate(self.blocks, start=1):
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                h = checkpoint(self._block, blk, h, use_reentrant=False)
            else:
                h = self._block(blk, h)
            if i in self.levels:
                out.append(h)
        out.append(self.norm(h))
        return out


# ------------------------------------------------------------------------------------------ MAE init
_MAE_BLOCK = re.compile(r"^blocks\.(\d+)\.(norm1|attn\.qkv|attn\.proj|norm2|mlp\.fc1|mlp\.fc2)\.(weight|bias)$")
_MAE_RENAME = {"norm1": "norm1", "attn.qkv": "attn.qkv", "attn.proj": "attn.out_proj", "norm2": "norm2",
               "mlp.fc1": "mlp.linear1", "mlp.fc2": "mlp.linear2"}
_MAE_SKIP_PREFIX = ("decoder", "mask_token", "cls_token", "patch_embed.")


def inflate_position_embedding(pos_2d: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """2D ViT position embedding -> 3D token grid (the released MAE inflation).

    Args:
        pos_2d: (1, 1 + g*g, W) with a CLS position first, or (1, g*g, W) without.
        grid: target token grid (gd, gh, gw).
    Returns:
        (1, gd*gh*gw, W): the g x g grid resized bilinearly (align_corners=False) to (gh, gw) and repeated
        over the gd depth positions, in (z, y, x) raster order.
    """
    if pos_2d.ndim != 3 or pos_2d.shape[0] != 1:
        raise ValueError(f"expected a position embedding (1, L, W), got shape {tuple(pos_2d.shape)}")
    n, width = pos_2d.shape[1], pos_2d.shape[2]
    g = math.isqrt(n - 1)
    if g * g == n - 1:
        pos_2d = pos_2d[:, 1:]  # drop the CLS position
    else:
        g = math.isqrt(n)
        if g * g != n:
            raise ValueError(f"position embedding with {n} positions is not a square grid (with or without CLS)")
    gd, gh, gw = grid
    img = pos_2d.reshape(1, g, g, width).permute(0, 3, 1, 2).float()
    img = F.interpolate(img, size=(gh, gw), mode="bilinear", align_corners=False)  # (1, W, gh, gw)
    vol = img.unsqueeze(2).expand(1, width, gd, gh, gw)
    return vol.flatten(2).transpose(1, 2).contiguous()


def load_mae_weights(model: ViT3D, path: str | Path) -> dict[str, list[str]]:
    """Initialise ``model`` from a local ImageNet MAE checkpoint (``mae_pretrain_vit_base.pth`` layout).

    The file holds ``{"model": state_dict}`` (or the state dict itself) with timm/MAE names: ``cls_token``,
    ``pos_embed`` (1, 1 + 14*14, W), ``patch_embed.proj.*``, ``blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,
    mlp.fc1,mlp.fc2}.*``, ``norm.*`` and possibly ``decoder_*`` / ``mask_token``.

    Returns ``{"loaded": [...], "inflated": [...], "skipped": [...], "missing": [...]}`` (model names for
    loaded/missing, file names for skipped). Raises ``ValueError`` if a block weight of the model is not in the
    file or a shape differs, ``FileNotFoundError`` if the file does not exist.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"MAE checkpoint {path} not found (model.vision.pretrained)")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    sd = obj.get("model", obj) if isinstance(obj, dict) else None
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: expected a state dict or {{'model': state_dict}}, got {type(obj).__name__}")

    target = model.state_dict()
    new: dict[str, torch.Tensor] = {}
    report: dict[str, list[str]] = {"loaded": [], "inflated": [], "skipped": [], "missing": []}
    for key, value in sd.items():
        m = _MAE_BLOCK.match(key)
        if m:
            name = f"blocks.{m.group(1)}.{_MAE_RENAME[m.group(2)]}.{m.group(3)}"
        elif key in ("norm.weight", "norm.bias"):
            name = key
        elif key == "pos_embed":
            name = "patch_embedding.position_embeddings"
            value = inflate_position_embedding(value, model.grid_size)
            report["inflated"].append(name)
        else:
            report["skipped"].append(key)  # decoder, mask/cls tokens, 2D patch embedding, anything else
            continue
        if name not in target:
            report["skipped"].append(key)  # e.g. blocks beyond the model's depth
            continue
        if tuple(value.shape) != tuple(target[name].shape):
            raise ValueError(f"{path}: {key} has shape {tuple(value.shape)}, model {name} expects "
                             f"{tuple(target[name].shape)}")
        new[name] = value.to(target[name].dtype)
        if name != "patch_embedding.position_embeddings":
            report["loaded"].append(name)

    report["missing"] = [k for k in target if k not in new]
    missing_blocks = [k for k in report["missing"] if k.startswith(("blocks.", "norm."))]
    if missing_blocks:
        raise ValueError(f"{path}: MAE checkpoint lacks {len(missing_blocks)} block/norm weight(s) of the model, "
                         f"e.g. {missing_blocks[:5]}")
    model.load_state_dict(new, strict=False)
    skipped_kinds = sorted({k.split(".")[0] for k in report["skipped"]})
    log.info("MAE init from %s: %d tensors loaded, %s inflated; skipped %d (%s); not in file (trained from "
             "scratch): %s", path, len(report["loaded"]), report["inflated"] or "no position embedding",
             len(report["skipped"]), ", ".join(skipped_kinds), report["missing"])
    return report
