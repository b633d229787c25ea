"""Anatomy pooling: which tokens belong to which anatomy, and one attention query per anatomy over them.

The released rule: a token belongs to anatomy k if any voxel of its patch does (max-pooling the binary
mask with kernel = stride = patch size). Each anatomy has a learnable query (zero init); ONE shared
``nn.MultiheadAttention`` attends from it to the anatomy's tokens of all token levels concatenated; a
per-anatomy ``Linear(W, E)`` projects the result, which is L2-normalised.

The computation is vectorised over the batch and the anatomies: all anatomies are the queries of one
scaled-dot-product attention call per batch, with a per-query key mask. Keys and values are projected once
per volume, and only for tokens that belong to some anatomy (gathered, padded to the batch maximum);
repeating keys/values per anatomy was measured 3x slower. The parameters keep ``nn.MultiheadAttention``'s
names and layout, so the result equals a per-sample, per-anatomy loop over ``nn.MultiheadAttention`` (tested).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def token_membership(mask: torch.Tensor, num_anatomies: int, patch_size: Sequence[int]) -> torch.Tensor:
    """Token membership of each anatomy.

    Args:
        mask: integer (B, D, H, W) anatomy mask (0 background, k + 1 = anatomy k), D, H, W multiples of the
            patch size.
        num_anatomies: A.
        patch_size: (pd, ph, pw) voxels.
    Returns:
        bool (B, A, N), N = (D/pd)(H/ph)(W/pw) tokens in (z, y, x) raster order: True where any voxel of the
        token's patch belongs to the anatomy (max-pooling with kernel = stride = patch size).
    """
    if mask.ndim != 4:
        raise ValueError(f"expected a mask batch (B, D, H, W), got shape {tuple(mask.shape)}")
    b, d, h, w = mask.shape
    pd, ph, pw = patch_size
    if d % pd or h % ph or w % pw:
        raise ValueError(f"mask size {(d, h, w)} is not a multiple of the patch size {tuple(patch_size)}")
    patches = mask.view(b, d // pd, pd, h // ph, ph, w // pw, pw)
    # one anatomy at a time: a bool (B, D, H, W) temporary instead of a float one-hot of the whole batch
    out = [(patches == k + 1).any(dim=6).any(dim=4).any(dim=2).flatten(1) for k in range(num_anatomies)]
    return torch.stack(out, dim=1)


def anatomy_attention(levels: Sequence[torch.Tensor], membership: torch.Tensor, query_tokens: torch.Tensor,
                      attention: nn.MultiheadAttention) -> tuple[torch.Tensor, torch.Tensor]:
    """Attend from each anatomy's query to that anatomy's tokens of all levels.

    Args:
        levels: L tensors (B, N, W), the vision encoder's token levels.
        membership: bool (B, A, N) from :func:`token_membership`.
        query_tokens: (1, A, W), one query per anatomy.
        attention: ``nn.MultiheadAttention(W, heads, dropout, batch_first=...)`` with a packed
            ``in_proj_weight`` (3W, W), ``in_proj_bias`` and ``out_proj``; its dropout applies to the attention
            weights while ``attention.training``.
    Returns:
        pooled (B, A, W) (0 where the anatomy has no token), present bool (B, A).
    """
    b, a, n = membership.shape
    width = query_tokens.shape[-1]
    heads = attention.num_heads
    hd = width // heads
    if query_tokens.shape != (1, a, width):
        raise ValueError(f"query_tokens {tuple(query_tokens.shape)} do not match {a} anatomies of width {width}")
    if attention.in_proj_weight is None or attention.embed_dim != width:
        raise ValueError("attention must be an nn.MultiheadAttention with a packed in_proj_weight of the token width")
    present = membership.any(dim=2)  # (B, A)

    # gather the tokens that belong to any anatomy (stable order), padded to the batch maximum m
    member = membership.any(dim=1)  # (B, N)
    counts = member.sum(dim=1)
    m = max(int(counts.max()), 1) if b else 1
    order = torch.argsort((~member).to(torch.uint8), dim=1, stable=True)[:, :m]  # member tokens first
    in_range = torch.arange(m, device=member.device) < counts[:, None]  # (B, m) False = padding
    keys = torch.cat([torch.gather(x, 1, order[..., None].expand(-1, -1, width)) for x in levels], dim=1)
    key_mask = torch.gather(membership, 2, order[:, None, :].expand(-1, a, -1)) & in_range[:, None, :]
    key_mask = key_mask.repeat(1, 1, len(levels))  # (B, A, L*m), same key order as `keys`
    # anatomies without tokens attend to everything (finite), then are zeroed: no fully masked softmax rows
    key_mask = key_mask | ~present[..., None]

    w_q, w_kv = attention.in_proj_weight[:width], attention.in_proj_weight[width:]
    b_q = b_kv = None
    if attention.in_proj_bias is not None:
        b_q, b_kv = attention.in_proj_bias[:width], attention.in_proj_bias[width:]
    q = F.linear(query_tokens, w_q, b_q).view(1, a, heads, hd).transpose(1, 2).expand(b, -1, -1, -1).contiguous()
    kv = F.linear(keys, w_kv, b_kv).view(b, -1, 2, heads, hd).permute(2, 0, 3, 1, 4)  # projected once
    dropout = attention.dropout if attention.training else 0.0
    out = F.scaled_dot_product_attention(q, kv[0], kv[1], attn_mask=key_mask[:, None], dropout_p=dropout)
    out = attention.out_proj(out.transpose(1, 2).reshape(b, a, width))
    return out * present[..., None].to(out.dtype), present


def project_anatomies(pooled: torch.Tensor, present: torch.Tensor, projections: nn.ModuleList) -> torch.Tensor:
    """Per-anatomy ``Linear(W, E)`` and L2 normalisation, vectorised over anatomies.

    Args:
        pooled: (B, A, W); present: bool (B, A); projections: A ``nn.Linear(W, E)``.
    Returns:
        (B, A, E), unit length where present, 0 elsewhere.
    """
    weight = torch.stack([p.weight for p in projections])  # (A, E, W)
    bias = torch.stack([p.bias for p in projections])  # (A, E)
    feats = torch.einsum("baw,aew->bae", pooled, weight.to(pooled.dtype)) + bias.to(pooled.dtype)
    return F.normalize(feats, dim=-1) * present[..., None].to(feats.dtype)
