"""FVLM composition: output contract, parameter names, temperature, optimizer groups, weights IO, global mode."""

from __future__ import annotations

import pytest
import torch

from fvlm.config import load_config
from fvlm.loss import anatomy_contrastive_loss
from fvlm.model import FVLM, load_weights, param_groups, save_weights
from fvlm.model.text_encoder import tokenize_unique

TEXTS = ["lung clear.", "emphysema in both lungs.", "heart normal.", "cardiomegaly.", "esophagus normal.",
         "hiatal hernia.", "aorta normal.", "aortic calcification."]


def make_batch(model: FVLM, b: int, crop, seed: int = 0, num_anatomies: int = 4) -> dict:
    """Random image, masks with one box per anatomy, texts from a small pool (so some repeat)."""
    g = torch.Generator().manual_seed(seed)
    d, h, w = crop
    mask = torch.zeros(b, d, h, w, dtype=torch.uint8)
    for i in range(b):
        for k in range(num_anatomies):
            z, y, x = (int(torch.randint(0, s // 2, (1,), generator=g)) for s in (d, h, w))
            mask[i, z:z + d // 2, y:y + h // 3, x:x + w // 3] = k + 1
    texts = [[TEXTS[int(torch.randint(0, len(TEXTS), (1,), generator=g))] for _ in range(num_anatomies)]
             for _ in range(b)]
    tok = tokenize_unique(model.tokenizer, texts, max_length=64)
    is_normal = torch.tensor([[t.endswith("normal.") or t == "lung clear." for t in row] for row in texts])
    text_id = torch.tensor([[TEXTS.index(t) for t in row] for row in texts])
    return {"image": torch.rand(b, 1, d, h, w, generator=g), "mask": mask,
            "valid": torch.ones(b, num_anatomies, dtype=torch.bool), "is_normal": is_normal, "text_id": text_id,
            "text_index": tok["text_index"], "text_input_ids": tok["input_ids"],
            "text_attention_mask": tok["attention_mask"], "texts": texts}


@pytest.fixture(scope="module")
def cfg():
    return load_config("tiny")


@pytest.fixture(scope="module")
def model(cfg):
    torch.manual_seed(0)
    return FVLM(cfg, num_anatomies=4)


def test_forward_contract(model, cfg):
    batch = make_batch(model, 3, cfg.data.crop_size)
    model.eval()
    with torch.no_grad():
        out = model(batch)
        texts = model.encode_text(batch["text_input_ids"], batch["text_attention_mask"])
        feats, present = model.encode_image(batch["image"], batch["mask"])
    assert set(out) == {"image_features", "text_features", "temperature"}
    assert out["image_features"].shape == out["text_features"].shape == (3, 4, cfg.model.embed_dim)
    assert out["temperature"].ndim == 0 and out["temperature"].item() == pytest.approx(cfg.model.temp_init)
    assert present.all()
    torch.testing.assert_close(out["image_features"].norm(dim=-1), torch.ones(3, 4))
    torch.testing.assert_close(out["image_features"], feats)
    for i in range(3):
        for k in range(4):
            torch.testing.assert_close(out["text_features"][i, k], texts[batch["text_index"][i, k]])
    # an anatomy missing from a volume: zero feature, present False
    batch["mask"][1][batch["mask"][1] == 3] = 0
    with torch.no_grad():
        feats, present = model.encode_image(batch["image"], batch["mask"])
    assert not present[1, 2] and torch.all(feats[1, 2] == 0) and present.sum() == 11
    # larger evaluation crop: position embedding interpolated
    d, h, w = cfg.data.crop_size
    with torch.no_grad():
        feats, _ = model.encode_image(torch.rand(1, 1, d + 8, h + 16, w), torch.ones(1, d + 8, h + 16, w,
                                                                                      dtype=torch.uint8))
    assert feats.shape == (1, 4, cfg.model.embed_dim)


def test_parameter_names_match_released_checkpoint(model):
    names = {n for n, _ in model.named_parameters()}
    for n in ("visual_encoder.patch_embedding.position_embeddings",
              "visual_encoder.patch_embedding.patch_embeddings.weight", "visual_encoder.blocks.0.attn.qkv.weight",
              "visual_encoder.blocks.3.mlp.linear2.bias", "visual_encoder.norm.weight",
              "text_encoder.embeddings.word_embeddings.weight", "text_encoder.encoder.layer.1.output.dense.weight",
              "text_proj.weight", "vision_projs.0.weight", "vision_projs.3.bias", "query_tokens",
              "attention.in_proj_weight", "attention.in_proj_bias", "attention.out_proj.weight", "temp"):
        assert n in names, n
    assert not any("pooler" in n or "norm_cross_attn" in n for n in names)
    assert torch.all(model.query_tokens == 0) and model.query_tokens.shape == (1, 4, 32)


def test_temperature_is_clamped(cfg):
    torch.manual_seed(0)
    m = FVLM(cfg, num_anatomies=2)
    with torch.no_grad():
        m.temp.fill_(5.0)
    assert m.temperature().item() == pytest.approx(cfg.model.temp_max) and m.temp.item() == cfg.model.temp_max
    with torch.no_grad():
        m.temp.fill_(0.0)
    assert m.temperature().item() == pytest.approx(cfg.model.temp_min)


def test_param_groups(model):
    groups = param_groups(model, 0.05)
    # (decay, text) groups: vision/pooling weights, text weights, then the same two without decay
    assert sorted(g["weight_decay"] for g in groups) == [0.0, 0.0, 0.05, 0.05]
    assert all("lr" not in g for g in groups)  # no lr given: every group uses the optimizer's
    name_of = {id(p): n for n, p in model.named_parameters()}
    decay = {name_of[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    no_decay = {name_of[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert decay | no_decay == set(name_of.values()) and not decay & no_decay
    for n in ("temp", "query_tokens", "visual_encoder.patch_embedding.position_embeddings",
              "text_encoder.embeddings.position_embeddings.weight", "visual_encoder.norm.weight",
              "visual_encoder.blocks.0.norm1.bias", "visual_encoder.blocks.0.attn.qkv.bias", "attention.in_proj_bias",
              "text_proj.bias", "text_encoder.embeddings.LayerNorm.weight"):
        assert n in no_decay, n
    for n in ("visual_encoder.blocks.0.attn.qkv.weight", "visual_encoder.patch_embedding.patch_embeddings.weight",
              "attention.in_proj_weight", "attention.out_proj.weight", "vision_projs.0.weight", "text_proj.weight",
              "text_encoder.encoder.layer.0.attention.self.query.weight"):
        assert n in decay, n
    assert all(p.ndim >= 2 for g in groups if g["weight_decay"] > 0 for p in g["params"])


@pytest.mark.parametrize("any_valid", [True, False])
def test_every_parameter_gets_a_gradient(model, cfg, any_valid):
    """DDP (find_unused_parameters=False) needs a gradient for every parameter, even with nothing to learn."""
    model.train()
    model.zero_grad(set_to_none=True)
    batch = make_batch(model, 3, cfg.data.crop_size, seed=1)
    if not any_valid:
        batch["valid"][:] = False
    out = model(batch)
    loss = anatomy_contrastive_loss(out["image_features"], out["text_features"], batch["valid"],
                                    batch["is_normal"], batch["text_id"], out["temperature"])
    assert (loss["loss"].item() > 0) == any_valid
    loss["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_global_baseline_is_one_anatomy_with_a_mask_of_ones(cfg):
    torch.manual_seed(0)
    m = FVLM(cfg, num_anatomies=1)
    reports = ["emphysema. heart normal.", "cardiomegaly. lung clear.", "no abnormality."]
    tok = tokenize_unique(m.tokenizer, [[r] for r in reports], max_length=64)
    b = len(reports)
    batch = {"image": torch.rand(b, 1, *cfg.data.crop_size), "mask": torch.ones(b, *cfg.data.crop_size,
             dtype=torch.uint8), "text_index": tok["text_index"], "text_input_ids": tok["input_ids"],
             "text_attention_mask": tok["attention_mask"]}
    out = m(batch)
    assert out["image_features"].shape == (3, 1, cfg.model.embed_dim)
    loss = anatomy_contrastive_loss(out["image_features"], out["text_features"], torch.ones(b, 1, dtype=torch.bool),
                                    torch.tensor([[False], [False], [True]]), torch.arange(b)[:, None],
                                    out["temperature"], anatomy_names=["global"])
    assert loss["loss"].item() > 0 and loss["n/global"].item() == 3
    loss["loss"].backward()


def test_save_and_load_weights(model, cfg, tmp_path):
    path = tmp_path / "w" / "model.safetensors"
    save_weights(model, path)
    assert path.is_file() and not list(path.parent.glob(".*tmp*"))
    torch.manual_seed(1)
    other = FVLM(cfg, num_anatomies=4)
    assert not torch.equal(other.visual_encoder.norm.weight, model.visual_encoder.norm.weight) or not torch.equal(
        other.attention.in_proj_weight, model.attention.in_proj_weight)
    report = load_weights(other, path)
    assert report == {"missing": [], "unexpected": []}
    for (n, p), (_, q) in zip(model.state_dict().items(), other.state_dict().items()):
        assert torch.equal(p, q), n
    # a model with a different anatomy count: loud errors naming the keys
    two = FVLM(cfg, num_anatomies=2)
    with pytest.raises(ValueError, match="query_tokens"):
        load_weights(two, path)
    del two.vision_projs[1]
    two.query_tokens = torch.nn.Parameter(torch.zeros(1, 4, 32))
    with pytest.raises(ValueError, match=r"unexpected.*vision_projs\.2"):
        load_weights(two, path)
    report = load_weights(two, path, strict=False)
    assert "vision_projs.2.weight" in report["unexpected"]
