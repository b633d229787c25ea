import json

import pytest

from fvlm.config import Config, apply_overrides, load_config


def test_presets_load_and_derive_grid():
    paper = load_config("paper_vitb")
    assert paper.data.crop_size == (112, 256, 352)
    assert paper.model.vision.patch_size == (16, 16, 32)
    assert paper.grid_size == (7, 16, 11)  # 1232 tokens, derived not configured
    assert paper.train.batch_size == 14 and paper.train.warmup_steps == 377 and paper.train.epochs == 20
    assert paper.model.vision.levels == (4, 7, 10)
    for name in ("demo", "tiny"):
        cfg = load_config(name)
        assert all(s % p == 0 for s, p in zip(cfg.data.crop_size, cfg.model.vision.patch_size))


def test_defaults_equal_paper_preset_except_paths():
    a, b = Config().to_dict(), load_config("paper_vitb").to_dict()
    for d in (a, b):
        d["model"]["vision"].pop("pretrained")
        d["model"]["text"].pop("pretrained")
        d["train"].pop("num_workers")
        d["eval"].pop("num_workers")
        d["train"].pop("log_every")
    assert a == b


def test_overrides_typed_and_nested():
    cfg = load_config("tiny", ["train.lr=0.5", "data.crop_size=[32, 32, 32]", "loss.mode=global",
                               "model.text.random_init={\"hidden_size\": 16}"])
    assert cfg.train.lr == 0.5 and cfg.data.crop_size == (32, 32, 32) and cfg.loss.mode == "global"
    assert cfg.model.text.random_init == {"hidden_size": 16}  # replaced, not merged


@pytest.mark.parametrize("override, err", [
    ("train.lrr=1", KeyError),
    ("bogus.x=1", KeyError),
    ("train.batch_size=1.5", TypeError),
    ("data.crop_size=[16, 32]", ValueError),
    ("data.crop_size=[17, 32, 32]", ValueError),  # not a multiple of the patch size
    ("loss.mode=local", ValueError),
    ("model.vision.levels=[1, 9]", ValueError),
])
def test_bad_overrides_are_errors(override, err):
    with pytest.raises(err):
        load_config("tiny", [override])


def test_unknown_key_in_file_names_the_file(tmp_path):
    p = tmp_path / "cfg.json"
    p.write_text(json.dumps({"train": {"learning_rate": 1}}))
    with pytest.raises(KeyError, match="cfg.json.*learning_rate"):
        load_config(p)


def test_save_roundtrip(tmp_path):
    cfg = load_config("demo", ["train.seed=7"])
    cfg.save(tmp_path / "config.json")
    again = load_config(tmp_path / "config.json")
    assert again == cfg


def test_apply_overrides_does_not_mutate():
    d = {"a": {"b": 1}}
    out = apply_overrides(d, ["a.b=2"])
    assert d == {"a": {"b": 1}} and out == {"a": {"b": 2}}
