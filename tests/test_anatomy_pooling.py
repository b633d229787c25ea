"""Anatomy pooling: token membership (max-pooling rule) and the vectorised attention vs a per-sample loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fvlm.model.anatomy_pooling import anatomy_attention, project_anatomies, token_membership

PATCH = (2, 4, 4)


def _blob_masks(b: int, shape=(8, 16, 16), num_anatomies: int = 3, seed: int = 0) -> torch.Tensor:
    """uint8 (B, D, H, W) with random boxes per anatomy (later anatomies overwrite earlier ones)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(b, *shape, dtype=torch.uint8)
    for i in range(b):
        for k in range(num_anatomies):
            lo = [int(torch.randint(0, s - 2, (1,), generator=g)) for s in shape]
            hi = [lo_ + int(torch.randint(1, max(2, s // 3), (1,), generator=g)) for lo_, s in zip(lo, shape)]
            mask[i, lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = k + 1
    return mask


def test_membership_is_max_pooling():
    mask = _blob_masks(3)
    got = token_membership(mask, 3, PATCH)
    assert got.dtype == torch.bool and got.shape == (3, 3, 4 * 4 * 4)
    for k in range(3):
        ref = F.max_pool3d((mask == k + 1).float()[:, None], kernel_size=PATCH, stride=PATCH)
        assert torch.equal(got[:, k], ref.flatten(1) > 0)


def test_membership_single_voxel_and_errors():
    mask = torch.zeros(1, 8, 16, 16, dtype=torch.uint8)
    mask[0, 7, 15, 0] = 2  # one voxel in the last z/y patch and the first x patch -> token (3, 3, 0)
    got = token_membership(mask, 2, PATCH)
    assert not got[0, 0].any()
    assert got[0, 1].nonzero().flatten().tolist() == [3 * 16 + 3 * 4 + 0]
    with pytest.raises(ValueError, match="multiple of the patch size"):
        token_membership(torch.zeros(1, 7, 16, 16, dtype=torch.uint8), 2, PATCH)


def _loop_reference(levels, membership, query_tokens, mha, projections):
    """Released structure: per sample, per anatomy, nn.MultiheadAttention over that anatomy's tokens."""
    b, a, _ = membership.shape
    out = torch.zeros(b, a, projections[0].out_features)
    for i in range(b):
        for k in range(a):
            sel = membership[i, k]
            if not sel.any():
                continue
            keys = torch.cat([x[i, sel] for x in levels])[None]  # (1, L * n_k, W)
            pooled, _ = mha(query_tokens[:, k:k + 1], keys, keys, need_weights=False)
            out[i, k] = F.normalize(projections[k](pooled[0, 0]), dim=-1)
    return out


def test_vectorised_pooling_equals_loop_with_multihead_attention():
    torch.manual_seed(0)
    b, a, width, heads, emb = 3, 3, 32, 4, 16
    mask = _blob_masks(b, num_anatomies=a, seed=1)
    mask[1][mask[1] == 2] = 0  # anatomy 1 absent from sample 1
    membership = token_membership(mask, a, PATCH)
    assert not membership[1, 1].any()
    n = membership.shape[-1]
    levels = [torch.randn(b, n, width) for _ in range(4)]
    query_tokens = torch.randn(1, a, width)
    mha = nn.MultiheadAttention(width, heads, dropout=0.1, batch_first=True)
    with torch.no_grad():  # non-zero biases so that their placement is tested
        mha.in_proj_bias.normal_()
        mha.out_proj.bias.normal_()
    projections = nn.ModuleList(nn.Linear(width, emb) for _ in range(a))
    mha.eval()  # dropout off in both paths

    pooled, present = anatomy_attention(levels, membership, query_tokens, mha)
    ours = project_anatomies(pooled, present, projections)
    with torch.no_grad():
        ref = _loop_reference(levels, membership, query_tokens, mha, projections)
    assert torch.equal(present, membership.any(-1))
    assert not present[1, 1] and torch.all(ours[1, 1] == 0)
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    norms = ours.norm(dim=-1)
    torch.testing.assert_close(norms[present], torch.ones(int(present.sum())))


def test_no_token_anywhere_gives_zero_and_finite_gradients():
    width = 16
    membership = torch.zeros(2, 2, 8, dtype=torch.bool)
    membership[0, 0, 3] = True  # one token of one anatomy in the whole batch
    levels = [torch.randn(2, 8, width, requires_grad=True) for _ in range(2)]
    query_tokens = torch.zeros(1, 2, width, requires_grad=True)
    mha = nn.MultiheadAttention(width, 2, batch_first=True)
    projections = nn.ModuleList(nn.Linear(width, 8) for _ in range(2))
    pooled, present = anatomy_attention(levels, membership, query_tokens, mha)
    feats = project_anatomies(pooled, present, projections)
    assert present.tolist() == [[True, False], [False, False]]
    assert torch.all(feats[~present] == 0)
    feats.sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in (*levels, query_tokens))
    # only the member token of sample 0 influences the result
    assert levels[0].grad[0, 3].abs().sum() > 0 and levels[0].grad[1].abs().sum() == 0
    # nothing at all: no NaN either
    membership[:] = False
    pooled, present = anatomy_attention(levels, membership, query_tokens, mha)
    assert not present.any() and torch.all(pooled == 0)
