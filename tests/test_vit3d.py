"""3D ViT: equality with stock MONAI ViT, levels, eval determinism, position interpolation, MAE init."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from monai.networks.nets import ViT

from fvlm.config import VisionConfig
from fvlm.model.vit3d import ViT3D, inflate_position_embedding, load_mae_weights

CROP = (16, 32, 32)
CFG = VisionConfig(patch_size=(8, 8, 8), width=32, depth=4, heads=2, mlp_dim=64, dropout=0.1, levels=(1, 2, 3))


def _model(**kw) -> ViT3D:
    torch.manual_seed(0)
    return ViT3D(dataclasses.replace(CFG, **kw), CROP)


def test_parameter_names_are_monai_and_released():
    names = set(_model().state_dict())
    for n in ("patch_embedding.patch_embeddings.weight", "patch_embedding.position_embeddings",
              "blocks.0.norm1.weight", "blocks.0.attn.qkv.weight", "blocks.0.attn.qkv.bias",
              "blocks.0.attn.out_proj.weight", "blocks.0.norm2.bias", "blocks.3.mlp.linear1.weight",
              "blocks.3.mlp.linear2.bias", "norm.weight"):
        assert n in names, n
    assert not any("norm_cross_attn" in n or "cls_token" in n for n in names)


def test_levels_equal_stock_monai_forward_in_eval_mode():
    model = _model().eval()
    x = torch.rand(2, 1, *CROP)
    with torch.no_grad():
        levels = model(x)
        final, hidden = ViT.forward(model, x)  # MONAI's own forward (einsum attention) on the same weights
    assert len(levels) == 4 and all(t.shape == (2, 2 * 4 * 4, 32) for t in levels)
    for got, lv in zip(levels[:3], CFG.levels):
        torch.testing.assert_close(got, hidden[lv - 1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(levels[3], final, rtol=1e-5, atol=1e-5)
    # eval is deterministic despite dropout 0.1 (MONAI's SDPA option would drop attention weights here)
    with torch.no_grad():
        again = model(x)
    assert all(torch.equal(a, b) for a, b in zip(levels, again))


def test_training_mode_applies_dropout():
    model = _model().train()
    x = torch.rand(1, 1, *CROP)
    with torch.no_grad():
        assert not torch.equal(model(x)[-1], model(x)[-1])


def test_grad_checkpointing_same_outputs_and_gradients():
    x = torch.rand(2, 1, *CROP)
    results = []
    for ckpt in (False, True):
        model = _model(dropout=0.0, grad_checkpointing=ckpt).train()
        out = model(x)
        sum(t.square().mean() for t in out).backward()
        results.append(([t.detach() for t in out], {n: p.grad.clone() for n, p in model.named_parameters()}))
    for a, b in zip(results[0][0], results[1][0]):
        torch.testing.assert_close(a, b)
    for n, g in results[0][1].items():
        torch.testing.assert_close(results[1][1][n], g, rtol=1e-5, atol=1e-6, msg=n)


def test_position_embedding_interpolated_for_larger_inputs():
    model = _model().eval()
    gd, gh, gw = model.grid_size  # (2, 4, 4)
    # position embedding = the token coordinates (channel 0: z index, 1: y, 2: x)
    coords = torch.stack(torch.meshgrid(torch.arange(gd), torch.arange(gh), torch.arange(gw), indexing="ij"), -1)
    with torch.no_grad():
        model.patch_embedding.position_embeddings.zero_()
        model.patch_embedding.position_embeddings[0, :, :3] = coords.reshape(-1, 3).float()
    assert model.position_embedding((gd, gh, gw)) is model.patch_embedding.position_embeddings
    new = (3, 6, 4)
    pe = model.position_embedding(new).reshape(*new, 32)
    # trilinear, align_corners=False: source coordinate (i + 0.5) * g / g' - 0.5, clamped to [0, g - 1]
    for axis, (g, g2) in enumerate(zip((gd, gh, gw), new)):
        src = ((torch.arange(g2) + 0.5) * g / g2 - 0.5).clamp(0, g - 1)
        shape = [1, 1, 1]
        shape[axis] = g2
        torch.testing.assert_close(pe[..., axis], src.view(shape).expand(new), rtol=0, atol=1e-6)
    out = model(torch.rand(1, 1, 24, 48, 32))
    assert all(t.shape == (1, 3 * 6 * 4, 32) for t in out)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        model(torch.rand(1, 1, 20, 32, 32))


# ------------------------------------------------------------------------------------------- MAE init
def _write_mae(path, width=32, depth=5, grid=4, wrap=True, drop=()):
    """A checkpoint in the key layout of mae_pretrain_vit_base.pth (tiny dims: width 32, 4 x 4 grid + cls)."""
    g = torch.Generator().manual_seed(1)
    sd = {"cls_token": torch.randn(1, 1, width, generator=g),
          "pos_embed": torch.randn(1, 1 + grid * grid, width, generator=g),
          "patch_embed.proj.weight": torch.randn(width, 3, 16, 16, generator=g),
          "patch_embed.proj.bias": torch.randn(width, generator=g),
          "mask_token": torch.randn(1, 1, width, generator=g),
          "decoder_embed.weight": torch.randn(16, width, generator=g),
          "decoder_pos_embed": torch.randn(1, 1 + grid * grid, 16, generator=g),
          "norm.weight": torch.randn(width, generator=g), "norm.bias": torch.randn(width, generator=g)}
    shapes = {"norm1": [(width,)], "attn.qkv": [(3 * width, width), (3 * width,)],
              "attn.proj": [(width, width), (width,)], "norm2": [(width,)],
              "mlp.fc1": [(64, width), (64,)], "mlp.fc2": [(width, 64), (width,)]}
    for i in range(depth):
        for name, shp in shapes.items():
            w_shape = shp[0]
            b_shape = shp[1] if len(shp) > 1 else shp[0]
            sd[f"blocks.{i}.{name}.weight"] = torch.randn(*w_shape, generator=g)
            sd[f"blocks.{i}.{name}.bias"] = torch.randn(*b_shape, generator=g)
    for k in drop:
        del sd[k]
    torch.save({"model": sd} if wrap else sd, path)
    return sd


def test_mae_init_loads_blocks_and_inflates_position_embedding(tmp_path):
    path = tmp_path / "mae_pretrain_vit_base.pth"
    sd = _write_mae(path)  # 5 blocks in the file, 4 in the model
    crop = (16, 48, 40)  # grid (2, 6, 5): the 4 x 4 grid must be resized
    torch.manual_seed(0)
    model = ViT3D(CFG, crop)
    conv_before = model.patch_embedding.patch_embeddings.weight.clone()
    report = load_mae_weights(model, path)
    state = model.state_dict()
    rename = {"attn.proj": "attn.out_proj", "mlp.fc1": "mlp.linear1", "mlp.fc2": "mlp.linear2"}
    for key, value in sd.items():
        if key.startswith("blocks.") and int(key.split(".")[1]) < 4:
            i, rest = key.split(".", 2)[1:]
            mod, leaf = rest.rsplit(".", 1)
            assert torch.equal(state[f"blocks.{i}.{rename.get(mod, mod)}.{leaf}"], value), key
    assert torch.equal(state["norm.weight"], sd["norm.weight"])
    assert torch.equal(model.patch_embedding.patch_embeddings.weight, conv_before)  # 2D patch conv skipped
    # inflation: drop cls, bilinear resize of the 4 x 4 grid to (6, 5), repeated over the 2 depth positions
    grid2d = sd["pos_embed"][0, 1:].reshape(4, 4, 32).permute(2, 0, 1)[None]
    resized = F.interpolate(grid2d, size=(6, 5), mode="bilinear", align_corners=False)[0].permute(1, 2, 0)
    pe = model.patch_embedding.position_embeddings.reshape(2, 6, 5, 32)
    for d in range(2):
        torch.testing.assert_close(pe[d], resized, rtol=0, atol=1e-6)
    assert "blocks.4.norm1.weight" in report["skipped"] and "decoder_embed.weight" in report["skipped"]
    assert {"cls_token", "mask_token", "patch_embed.proj.weight"} <= set(report["skipped"])
    assert not [k for k in report["missing"] if k.startswith(("blocks.", "norm."))]
    assert report["inflated"] == ["patch_embedding.position_embeddings"]
    assert inflate_position_embedding(sd["pos_embed"][:, 1:], (2, 6, 5)).shape == (1, 60, 32)  # no-cls layout


def test_mae_init_errors(tmp_path):
    path = tmp_path / "mae.pth"
    _write_mae(path, wrap=False, drop=("blocks.2.attn.qkv.weight",))
    with pytest.raises(ValueError, match="lacks 1 block"):
        load_mae_weights(_model(), path)
    _write_mae(path, width=48)
    with pytest.raises(ValueError, match="shape"):
        load_mae_weights(_model(), path)
    with pytest.raises(FileNotFoundError):
        load_mae_weights(_model(), tmp_path / "nope.pth")
