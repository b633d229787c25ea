"""fvlm convert-official: a tiny checkpoint in the released (LAVIS) key layout converts into a run that
reproduces the original model's image and text features; missing keys and pickled extras fail clearly."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from fvlm.checkpoint import load_model
from fvlm.cli import main
from fvlm.config import load_config
from fvlm.convert import convert_official
from fvlm.model.fvlm import FVLM
from fvlm.official_state import infer_text_config, map_official_keys


@pytest.fixture(scope="module")
def original():
    cfg = load_config("tiny")
    torch.manual_seed(1)
    model = FVLM(cfg, num_anatomies=4).eval()
    with torch.no_grad():  # released values are trained: no zero queries, temperature moved from its init
        model.query_tokens.normal_()
        model.temp.fill_(0.031)
    return model


def released_layout(model: FVLM, bert_prefix: bool, module_prefix: bool, temp_shape: tuple) -> dict:
    """The model's tensors under the released checkpoint's names and shapes, plus the extras it carries."""
    sd = {}
    for k, v in model.state_dict().items():
        v = v.clone()
        if k.startswith("text_encoder.") and bert_prefix:
            k = "text_encoder.bert." + k[len("text_encoder."):]
        if k == "query_tokens":
            v = v[0]  # released: (A, W)
        if k == "temp":
            v = v.reshape(temp_shape)
        sd[k] = v
    w = model.text_encoder.config.hidden_size
    pre = "text_encoder.bert." if bert_prefix else "text_encoder."
    sd[pre + "pooler.dense.weight"] = torch.randn(w, w)  # BERT pooler (not in our encoder)
    sd["text_encoder.cls.predictions.bias"] = torch.randn(10)  # MLM head
    sd[pre + "encoder.layer.0.crossattention.self.query.weight"] = torch.randn(w, w)  # LAVIS XBert fusion layers
    sd["visual_encoder.blocks.0.norm_cross_attn.weight"] = torch.randn(model.visual_encoder.width)
    if module_prefix:
        sd = {"module." + k: v for k, v in sd.items()}
    return sd


def features(model, cfg):
    g = torch.Generator().manual_seed(0)
    d, h, w = cfg.data.crop_size
    image = torch.rand(2, 1, d, h, w, generator=g)
    mask = torch.zeros(2, d, h, w, dtype=torch.uint8)
    for k in range(4):
        mask[:, 2 * k : 2 * k + 4, 4:20, 8 * k : 8 * k + 8] = k + 1
    tok = model.tokenizer(["Emphysema.", "Not Emphysema.", "heart shows no significant abnormalities."],
                          padding="longest", return_tensors="pt")
    with torch.no_grad():
        img, present = model.encode_image(image, mask)
        txt = model.encode_text(tok["input_ids"], tok["attention_mask"])
    return img, present, txt, model.temperature().detach()


@pytest.mark.parametrize("bert_prefix,module_prefix,temp_shape", [(True, False, ()), (False, True, (1,))])
def test_converted_run_reproduces_the_model(original, tmp_path, bert_prefix, module_prefix, temp_shape):
    sd = released_layout(original, bert_prefix, module_prefix, temp_shape)
    src = tmp_path / "fvlm_released.pth"
    torch.save({"model": sd, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4}]},
                "config": {"run": {"lr": 1e-4}}, "scaler": None, "epoch": 9}, src)
    run = tmp_path / "run"
    assert main(["convert-official", str(src), "--out", str(run), "--config", "tiny",
                 "--tokenizer", "builtin:minilm"]) == 0
    report = json.loads((run / "conversion.json").read_text())
    assert report["mapped"] == report["model_tensors"] == len(original.state_dict())
    assert report["epoch"] == 9 and report["top_level_keys"] == ["config", "epoch", "model", "optimizer", "scaler"]
    assert report["reshaped"]["query_tokens"] == [[4, 32], [1, 4, 32]]
    assert len(report["unmapped"]) == 4 and any("crossattention" in k for k in report["unmapped"])
    assert ("text_encoder.bert.embeddings.word_embeddings.weight" in report["renamed"]) == bert_prefix
    assert report["text_encoder"]["num_hidden_layers"] == 2 and report["text_encoder"]["num_attention_heads"] == 2
    assert (run / "checkpoints" / "step_0000009" / "model.safetensors").is_file()
    assert (run / "config.json").is_file() and (run / "anatomy_table.json").is_file()

    model, cfg, table = load_model(run)
    assert table.names == ("lung", "heart", "esophagus", "aorta") and cfg.model.vision.pretrained == ""
    ours = features(model, cfg)
    ref = features(original, cfg)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert float(ours[3]) == pytest.approx(0.031)


def test_missing_tensor_and_shape_mismatch_are_errors(original, tmp_path):
    sd = released_layout(original, True, False, ())
    del sd["vision_projs.2.bias"]
    src = tmp_path / "incomplete.pth"
    torch.save({"model": sd}, src)
    with pytest.raises(ValueError, match=r"1 model tensor\(s\) missing.*vision_projs\.2\.bias"):
        convert_official(src, tmp_path / "run", tokenizer="builtin:minilm", config="tiny")
    # a frozen text layer LAVIS did not save: named, with the way out
    sd = released_layout(original, True, False, ())
    del sd["text_encoder.bert.encoder.layer.1.output.dense.weight"]
    torch.save({"model": sd}, src)
    with pytest.raises(ValueError, match="--text-model"):
        convert_official(src, tmp_path / "run", tokenizer="builtin:minilm", config="tiny")
    # the vision sizes come from the tensors, but the paper preset's token levels (blocks 4, 7, 10) and crop grid do
    # not fit the tiny checkpoint (4 blocks, 27 positions): named, hint at --config
    sd = released_layout(original, True, False, ())
    torch.save({"model": sd}, src)
    with pytest.raises(ValueError, match=r"does not fit the paper_released config.*model.vision.depth=4.*levels=\(4, "
                                         r"7, 10\) must lie in 1..depth=4.*--config"):
        convert_official(src, tmp_path / "run", tokenizer="builtin:minilm")
    with pytest.raises(ValueError, match=r"does not fit the paper_released config.*27 position embeddings vs the "
                                         r"\d+ tokens of data.crop_size.*--config"):
        convert_official(src, tmp_path / "run", tokenizer="builtin:minilm", overrides=["model.vision.levels=[1, 2, 3]"])
    assert not (tmp_path / "run").exists()


def test_pickled_extras_need_explicit_trust(original, tmp_path):
    sd = released_layout(original, False, False, ())
    src = tmp_path / "with_args.pth"
    torch.save({"model": sd, "args": argparse.Namespace(lr=1e-4)}, src)
    with pytest.raises(ValueError, match="weights_only=True.*--trust-pickle"):
        convert_official(src, tmp_path / "run", tokenizer="builtin:minilm", config="tiny")
    report = convert_official(src, tmp_path / "run", tokenizer="builtin:minilm", config="tiny", trust_pickle=True)
    assert report["mapped"] == len(original.state_dict())


def test_key_mapping_rules(original):
    target = original.state_dict()
    sd = released_layout(original, True, False, (1,))
    sd["text_encoder.embeddings.word_embeddings.weight"] = sd["text_encoder.bert.embeddings.word_embeddings.weight"]
    with pytest.raises(ValueError, match="both map onto"):
        map_official_keys(sd, target)
    mapped, report = map_official_keys(released_layout(original, True, False, (1,)), target)
    assert set(mapped) == set(target) and report["reshaped"]["temp"] == [[1], []]
    fields = infer_text_config(mapped, heads=None)
    assert fields["hidden_size"] == 32 and fields["num_attention_heads"] == 1  # width / 64, at least 1
    assert fields["vocab_size"] == original.text_encoder.config.vocab_size


def test_frozen_text_tensors_come_from_the_text_model(tmp_path):
    """LAVIS does not save frozen parameters: with --text-model they are filled from the pretrained BERT."""
    overrides = ["model.text.random_init=null"]  # the tiny preset with the real (built-in MiniLM) text encoder
    cfg = load_config("tiny", overrides)
    torch.manual_seed(2)
    model = FVLM(cfg, num_anatomies=4).eval()  # text weights = the pretrained ones, as for a frozen encoder
    sd = released_layout(model, True, False, ())
    frozen = [k for k in sd if k.startswith("text_encoder.bert.embeddings.")]
    for k in frozen:
        del sd[k]
    src = tmp_path / "frozen.pth"
    torch.save({"model": sd, "epoch": 3}, src)
    report = convert_official(src, tmp_path / "run", text_model="builtin:minilm", config="tiny", overrides=overrides)
    assert sorted(report["filled_from_text_model"]) == sorted(k.replace(".bert.", ".") for k in frozen)
    assert report["text_encoder"]["num_attention_heads"] == 12  # from the text model's config.json
    loaded, cfg2, _ = load_model(tmp_path / "run")
    for a, b in zip(features(loaded, cfg2), features(model, cfg), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_vision_sizes_come_from_the_tensors(original, tmp_path):
    """The tiny checkpoint converts with a preset of other vision sizes: width, depth, MLP and patch are read from
    the tensors (heads: the LAVIS YAML's vit_num_heads, else width / 64), the rest of the preset is kept."""
    from fvlm.official_state import infer_vision_fields, read_lavis_config

    sd = released_layout(original, True, False, ())
    assert infer_vision_fields(sd) == {"width": 32, "depth": 4, "mlp_dim": 64, "patch_size": [8, 16, 16], "heads": 1}
    assert infer_vision_fields(sd, heads=2)["heads"] == 2
    with pytest.raises(ValueError, match="not divisible by 3"):
        infer_vision_fields(sd, heads=3)
    src = tmp_path / "tiny.pth"
    torch.save({"model": sd}, src)
    yaml_path = tmp_path / "model_config.yaml"
    yaml_path.write_text("run:\n  amp: false\nmodel:\n  vit_num_heads: 2\n  vit_hidden_size: 32\n  max_txt_len: 64\n")
    assert read_lavis_config(yaml_path) == {"vit_num_heads": 2, "vit_hidden_size": 32, "max_txt_len": 64, "amp": False}
    from fvlm.config import preset_path

    preset = json.loads(preset_path("tiny").read_text())
    preset["model"]["vision"].update(width=128, depth=6, mlp_dim=256, heads=4)  # a preset of other vision sizes
    wide = tmp_path / "wide.json"
    wide.write_text(json.dumps(preset))
    report = convert_official(src, tmp_path / "run", tokenizer="builtin:minilm", config=wide, model_config=yaml_path)
    assert "model.vision.heads=2" in report["derived_settings"]
    model, cfg, _ = load_model(tmp_path / "run")
    assert (cfg.model.vision.width, cfg.model.vision.depth, cfg.model.vision.heads) == (32, 4, 2)
    for a, b in zip(features(model, cfg), features(original, cfg), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    yaml_path.write_text("model:\n  vit_hidden_size: 768\n")
    with pytest.raises(ValueError, match="vit_hidden_size=768 but the checkpoint's tensors say 32"):
        convert_official(src, tmp_path / "run2", tokenizer="builtin:minilm", config="tiny", model_config=yaml_path)


def test_import_released_volumes_reports_every_bad_file(tmp_path):
    """Released processed volumes (float [0, 1] + masks) enter the store as integer HU; bad files are named
    together at the end and the good ones are still stored."""
    import nibabel as nib
    import numpy as np

    from fvlm.convert import import_released_volumes
    from fvlm.data import store

    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    rng = np.random.default_rng(0)
    hu = rng.integers(-1150, 351, size=(8, 10, 12)).astype(np.float64)
    mask = np.zeros((8, 10, 12), np.float32)
    mask[2:5, 3:7, 4:9] = 2
    for name, image in (("valid_1_a_1", (hu + 1150) / 1500), ("valid_2_a_1", (hu + 1150.3) / 1500)):
        nib.save(nib.Nifti1Image(image.astype(np.float32), np.eye(4)), images / f"{name}.nii.gz")
        nib.save(nib.Nifti1Image(mask, np.eye(4)), masks / f"{name}.nii.gz")
    nib.save(nib.Nifti1Image(hu.astype(np.float32), np.eye(4)), images / "valid_3_a_1.nii.gz")  # no mask
    with pytest.raises(ValueError, match=r"2 of 3 volume\(s\).*valid_2_a_1.nii.gz: values are not integer HU.*"
                                         r"valid_3_a_1.nii.gz: mask .* not found"):
        import_released_volumes(images, masks, tmp_path / "out", "valid")
    assert store.list_volumes(tmp_path / "out", "valid") == ["valid_1_a_1"]
    vol = store.open_volume(tmp_path / "out", "valid", "valid_1_a_1")
    np.testing.assert_array_equal(np.asarray(vol.image[:]), hu.astype(np.int16))
    meta = store.read_meta(tmp_path / "out", "valid", "valid_1_a_1")
    assert meta["anatomies"]["heart"] == {"voxels": 60, "bbox": [2, 5, 3, 7, 4, 9]}
    assert meta["anatomies"]["lung"]["voxels"] == 0
