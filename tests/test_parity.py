"""Parity with the authors' released code, on outputs of the released code itself (tests/data/parity/, see its
README.md): a tiny seeded LAVIS checkpoint, two processed volumes, the released eval.py scores, text and anatomy
features, crop windows, and a training batch with the released forward()'s loss, targets, logits and gradients.

``fvlm convert-official`` (paper_released preset) must give the released numbers through our own code paths:
zero-shot probabilities, text and anatomy features within 1e-5, identical windows and token ids, the training
loss (and per anatomy) within 1e-5 relative, the temperature and query gradients within 1e-4 relative.

``FVLM_PARITY_SET="key=value;key=value"`` passes config overrides to the conversion (e.g.
``model.text.type_embeddings=true`` or ``data.eval_window=centred``): a deliberately wrong setting must make
these tests fail. The sensitivity tests at the end check the same thing automatically for each released switch.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from fvlm.anatomy import intact_anatomies
from fvlm.checkpoint import load_model
from fvlm.cli import main
from fvlm.config import load_config
from fvlm.convert import import_released_volumes
from fvlm.data import store
from fvlm.loss import anatomy_contrastive_loss
from fvlm.model.anatomy_pooling import token_membership
from fvlm.model.text_encoder import tokenize_unique
from fvlm.text import AnatomyTexts, anatomy_text, released_anatomy_text
from fvlm.zeroshot import anatomy_embeddings, prompt_text_features, read_crop, volume_crop_specs

FIX = Path(__file__).resolve().parent / "data" / "parity"
ANATOMIES = ("lung", "heart", "esophagus", "aorta")
OVERRIDES = [x for x in os.environ.get("FVLM_PARITY_SET", "").split(";") if x.strip()]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The fixture checkpoint converted by ``fvlm convert-official``, and its volumes in our store."""
    tmp = tmp_path_factory.mktemp("parity")
    run, data = tmp / "run", tmp / "data"
    sets = [a for o in ["eval.num_workers=0", *OVERRIDES] for a in ("--set", o)]  # no worker processes in a test
    assert main(["convert-official", str(FIX / "checkpoint.pth"), "--out", str(run),
                 "--model-config", str(FIX / "model_config.yaml"), "--text-model", str(FIX / "tiny_bert"), *sets]) == 0
    assert import_released_volumes(FIX / "volumes" / "images", FIX / "volumes" / "masks", data, "valid") == [
        "valid_1_a_1", "valid_2_a_1"]
    torch.manual_seed(0)
    model, cfg, table = load_model(run)
    return {"run": run, "data": data, "model": model, "cfg": cfg, "table": table, "tmp": tmp}


@pytest.fixture(scope="module")
def windows():
    return json.loads((FIX / "zero_shot" / "windows.json").read_text())


@pytest.fixture(scope="module")
def evaluated(converted):
    """``fvlm eval`` on the converted run; the anatomy features it computed are recorded on the way (one encode)."""
    import fvlm.zeroshot as zs

    seen = {}

    def recording(*args, **kwargs):
        seen["features"] = anatomy_embeddings(*args, **kwargs)
        return seen["features"]

    out = converted["tmp"] / "scores.csv"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(zs, "anatomy_embeddings", recording)
        assert main(["eval", "--checkpoint", str(converted["run"]), "--data", str(converted["data"]),
                     "--split", "valid", "--out", str(out), "--device", "cpu"]) == 0
    return {"scores": out, "features": seen["features"]}


# ----------------------------------------------------------------------------------------------- conversion
def test_fixture_is_intact():
    """Every fixture file has the size and sha256 of MANIFEST.json (a damaged or LFS-pointer copy fails here)."""
    import hashlib

    manifest = json.loads((FIX / "MANIFEST.json").read_text())
    for name, entry in manifest.items():
        data = (FIX / name).read_bytes()
        assert len(data) == entry["bytes"] and hashlib.sha256(data).hexdigest() == entry["sha256"], name
    assert len(manifest) >= 20


def test_conversion_reads_sizes_from_tensors_and_selects_released_switches(converted):
    report = json.loads((converted["run"] / "conversion.json").read_text())
    assert report["mapped"] == report["model_tensors"] == 201 and report["filled_from_text_model"] == []
    assert {"model.vision.width=64", "model.vision.depth=12", "model.vision.mlp_dim=128", "model.vision.heads=4",
            "model.text.max_length=384"} <= set(report["derived_settings"])
    # the released text encoder never reads its token-type table; the LAVIS MLM head has no place in ours
    assert set(report["unmapped"]) == {"text_encoder.embeddings.position_ids",
                                       "text_encoder.embeddings.token_type_embeddings.weight",
                                       "text_encoder.cls.predictions.decoder.weight",
                                       "text_encoder.cls.predictions.decoder.bias"}
    assert report["text_encoder"]["hidden_size"] == 32 and report["text_encoder"]["num_hidden_layers"] == 2
    cfg = load_config(converted["run"] / "config.json")
    if not OVERRIDES:
        assert (cfg.data.eval_window, cfg.data.text_rule, cfg.model.text.type_embeddings, cfg.train.amp,
                cfg.train.lr_schedule, list(cfg.data.margin_after)) == ("released", "released", False, "off", "epoch",
                                                                        [4, 19, 19])
    assert float(converted["model"].temp.detach()) == pytest.approx(0.05)


# --------------------------------------------------------------------------------------------------- text
def test_prompt_token_ids_and_text_features(converted, windows):
    ref = load_file(str(FIX / "zero_shot" / "text_features.safetensors"))
    model, cfg, table = converted["model"], converted["cfg"], converted["table"]
    items = windows["test_items"]
    assert [(p.anatomy, p.label, p.negative, p.positive) for p in table.prompts] == [tuple(i) for i in items]
    texts = [t for it in items for t in (it[2], it[3])]
    tok = model.tokenizer(texts, padding="max_length", truncation=True, max_length=cfg.model.text.max_length,
                          return_tensors="pt")
    assert torch.equal(tok["input_ids"].int(), ref["input_ids"].reshape(-1, 384))
    assert torch.equal(tok["attention_mask"].int(), ref["attention_mask"].reshape(-1, 384))
    ours = prompt_text_features(model, cfg, table, torch.device("cpu"))  # padded to the longest, not to 384
    torch.testing.assert_close(ours, ref["text_feat"].reshape(-1, 256), rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------------ windows
def test_eval_windows_equal_the_released_ones(converted, windows):
    cfg, table, data = converted["cfg"], converted["table"], converted["data"]
    patch = cfg.model.vision.patch_size
    checked = 0
    for volume in ("valid_1_a_1", "valid_2_a_1"):
        meta = store.read_meta(data, "valid", volume)
        vol = store.open_volume(data, "valid", volume)
        specs = {table.names[s.anatomy]: s for s in volume_crop_specs(volume, meta, cfg, table, False)}
        ref = {w["anatomy"]: w for w in windows["windows"] if w["file_name"] == f"{volume}.nii.gz"}
        assert sorted(specs) == sorted(ref)
        for name, w in ref.items():
            s = specs[name]
            extent = s.extent or s.size
            got = {"start": list(s.start), "end": [a + b for a, b in zip(s.start, extent)], "padded": list(s.size),
                   "grid": [n // p for n, p in zip(s.size, patch)]}
            want = {"start": w["window_start"], "end": w["window_end"], "padded": w["padded_window_shape"],
                    "grid": w["token_grid"]}
            assert got == want, f"{volume}/{name}"
            _, mask = read_crop(vol, s, cfg.data.hu_window)
            k = table.index(name)
            tokens = int(token_membership(torch.from_numpy(mask)[None], len(table), patch)[0, k].sum())
            assert tokens == w["anatomy_tokens"], f"{volume}/{name}"
            assert int((mask == k + 1).sum()) == w["anatomy_voxels_in_window"], f"{volume}/{name}"
            checked += 1
    assert checked == 7


# --------------------------------------------------------------------------------------------- zero-shot
def test_anatomy_features_equal_the_released_ones(converted, evaluated):
    ref = load_file(str(FIX / "zero_shot" / "image_features.safetensors"))
    volumes, feats = evaluated["features"]
    table = converted["table"]
    for key, want in ref.items():
        volume, name = key.split("/")
        got = torch.from_numpy(feats[volumes.index(volume), table.index(name)])
        torch.testing.assert_close(got, want[0], rtol=0, atol=1e-5, msg=lambda m, key=key: f"{key}: {m}")
    assert np.isnan(feats[volumes.index("valid_2_a_1"), table.index("esophagus")]).all()
    assert len(ref) == 7


def test_zero_shot_scores_equal_released_eval_csv(evaluated):
    ours = pd.read_csv(evaluated["scores"]).set_index("VolumeName")
    ref = pd.read_csv(FIX / "zero_shot" / "probs.csv").set_index("file_name")
    labels = {c: c.split("_")[1] for c in ref.columns}  # anatomy_label_negative_positive
    ref = ref.rename(columns=labels)
    ours = ours.loc[ref.index, ref.columns]
    assert (ours.isna().values == ref.isna().values).all()  # esophagus absent from valid_2_a_1: empty cell
    assert ref.isna().values.sum() == 1
    diff = np.nanmax(np.abs(ours.values - ref.values))
    assert diff <= 1e-5, f"largest probability difference {diff:.3g} > 1e-5\n{(ours - ref).T}"


# ----------------------------------------------------------------------------------------- training loss
def _released_texts(rule: str = "released") -> AnatomyTexts:
    desc = json.loads((FIX / "train" / "desc_info.json").read_text())
    conc = json.loads((FIX / "train" / "conc_info.json").read_text())
    return AnatomyTexts(desc, conc, rule=rule)


def test_texts_are_built_as_released():
    batch = json.loads((FIX / "train" / "batch.json").read_text())
    loss = json.loads((FIX / "train" / "loss.json").read_text())
    texts = _released_texts()
    for name in ANATOMIES:
        built = [texts.get(scan, name) for scan in batch["scans"]]
        assert [t.key for t in built] == batch["text_input"][name], name
        assert [not t.is_normal for t in built] == [bool(f[ANATOMIES.index(name)]) for f in
                                                    batch["organ_abnormal_flags"]], name
    for entry in loss["anatomies"]:
        encoded = [texts.get(batch["scans"][i], entry["anatomy"]).text for i in entry["sample_indices"]]
        assert encoded == entry["encoded_texts"], entry["anatomy"]
    # a scan absent from both text files is all-normal with the template (released), not left out
    missing = texts.get("train_99_a", "heart")
    assert texts.has_scan("train_99_a") and missing.is_normal and missing.text == missing.key == \
        "heart shows no significant abnormalities."
    # identical raw strings only: a normal text whose findings equal an abnormal text is not identical to it
    normal = released_anatomy_text("lung", "Emphysema.", None)
    abnormal = released_anatomy_text("lung", None, "Emphysema.")
    assert normal.text == abnormal.text == "Emphysema." and normal.id != abnormal.id


def _training_batch(converted) -> tuple[dict, list[str]]:
    """The fixture's training batch, rebuilt from our store of its volumes as batch.json says."""
    batch = json.loads((FIX / "train" / "batch.json").read_text())
    cfg, table, model = converted["cfg"], converted["table"], converted["model"]
    texts = _released_texts(cfg.data.text_rule)
    d, h, w = batch["crop_size"]
    images, masks, valid, normal, ids, rows = [], [], [], [], [], []
    for crop in batch["crops"]:
        vol = store.open_volume(converted["data"], "valid", crop["source"])
        z, y, x = crop["start"]
        image = store.window(vol.image[z:z + d, y:y + h, x:x + w], cfg.data.hu_window)
        mask = np.asarray(vol.mask[z:z + d, y:y + h, x:x + w])
        for axis in crop["flip"]:
            image, mask = np.flip(image, axis), np.flip(mask, axis)
        image, mask = np.ascontiguousarray(image), np.ascontiguousarray(mask)
        assert float(image.astype(np.float64).sum()) == pytest.approx(crop["image_sum_float64"], rel=1e-7)
        assert [int((mask == k).sum()) for k in range(1, 5)] == list(crop["mask_voxels_per_id"].values())
        built = [texts.get(crop["scan"], name) for name in table.names]
        images.append(image[None])
        masks.append(mask)
        valid.append(intact_anatomies(mask, len(table)) & texts.has_scan(crop["scan"]))
        normal.append([t.is_normal for t in built])
        ids.append([t.id for t in built])
        rows.append([t.text for t in built])
    tok = tokenize_unique(model.tokenizer, rows, cfg.model.text.max_length)
    out = {"image": torch.from_numpy(np.stack(images)), "mask": torch.from_numpy(np.stack(masks)),
           "valid": torch.from_numpy(np.stack(valid)), "is_normal": torch.tensor(normal),
           "text_id": torch.tensor(ids, dtype=torch.int64), "text_index": tok["text_index"],
           "text_input_ids": tok["input_ids"], "text_attention_mask": tok["attention_mask"]}
    return out, [[r[k] for r in rows] for k in range(len(table))]


@pytest.fixture(scope="module")
def training_step(converted):
    model, cfg, table = converted["model"], converted["cfg"], converted["table"]
    batch, _ = _training_batch(converted)
    model.eval()  # dropout off (the fixture's forward ran in eval mode)
    model.zero_grad(set_to_none=True)
    with torch.enable_grad():
        out = model(batch)
        terms = anatomy_contrastive_loss(out["image_features"], out["text_features"], batch["valid"],
                                         batch["is_normal"], batch["text_id"], out["temperature"],
                                         normal_positives=cfg.loss.normal_positives,
                                         same_text_positives=cfg.loss.same_text_positives,
                                         anatomy_names=list(table.names), gather=False)
        terms["loss"].backward()
    return {"batch": batch, "out": {k: v.detach() for k, v in out.items()}, "terms": terms,
            "temp_grad": float(model.temp.grad), "query_grad": model.query_tokens.grad[0].clone()}


def test_training_internals_match(converted, training_step):
    """Localises a loss mismatch: which samples enter, features, targets and logits per anatomy."""
    ref = load_file(str(FIX / "train" / "internals.safetensors"))
    loss = json.loads((FIX / "train" / "loss.json").read_text())
    table = converted["table"]
    step = training_step
    img, txt = step["out"]["image_features"], step["out"]["text_features"]
    temp = float(step["out"]["temperature"])
    for entry in loss["anatomies"]:
        name, idx = entry["anatomy"], entry["sample_indices"]
        k = table.index(name)
        valid = step["batch"]["valid"][:, k]
        assert torch.nonzero(valid).flatten().tolist() == idx, f"{name}: samples in the loss"
        torch.testing.assert_close(img[idx, k], ref[f"{name}/image_feat"], rtol=0, atol=1e-5,
                                   msg=lambda m, name=name: f"{name} image features: {m}")
        torch.testing.assert_close(txt[idx, k], ref[f"{name}/text_feat"], rtol=0, atol=1e-5,
                                   msg=lambda m, name=name: f"{name} text features: {m}")
        normal = step["batch"]["is_normal"][idx, k]
        ids = step["batch"]["text_id"][idx, k]
        pos = torch.eye(len(idx), dtype=torch.bool) | (normal[:, None] & normal[None]) | (ids[:, None] == ids[None])
        targets = pos.float() / pos.float().sum(1, keepdim=True)
        torch.testing.assert_close(targets, ref[f"{name}/sim_targets"], rtol=0, atol=1e-7)
        logits = img[idx, k] @ txt[idx, k].T / temp
        torch.testing.assert_close(logits, ref[f"{name}/sim_i2t"], rtol=1e-5, atol=2e-4)
    # esophagus is cut by every crop: in no sample
    assert not step["batch"]["valid"][:, table.index("esophagus")].any()


def test_training_loss_and_gradients_equal_released(converted, training_step):
    loss = json.loads((FIX / "train" / "loss.json").read_text())
    ref_q = load_file(str(FIX / "train" / "internals.safetensors"))["query_tokens_grad"]
    terms = training_step["terms"]
    assert float(terms["loss"].detach()) == pytest.approx(loss["loss"], rel=1e-5, abs=0)
    assert loss["loss"] == 3.646267890930176
    for name in ANATOMIES:
        want = loss["organ_wise_loss"].get(f"{name}_itc", 0.0)
        assert float(terms[f"loss/{name}"]) == pytest.approx(want, rel=1e-5, abs=1e-12), name
    assert training_step["temp_grad"] == pytest.approx(loss["temp_grad"], rel=1e-4)
    q = training_step["query_grad"]
    rel = float((q - ref_q).norm() / ref_q.norm())
    assert rel <= 1e-4, f"query-token gradient relative difference {rel:.3g}"
    torch.testing.assert_close(q, ref_q, rtol=1e-3, atol=1e-4 * float(ref_q.abs().max()))
    assert int(terms["n/lung"]) == 3 and int(terms["n/heart"]) == 4 and int(terms["n/aorta"]) == 3


# ------------------------------------------------------------------ each released switch matters (sensitivity)
@pytest.mark.skipif(bool(OVERRIDES), reason="sensitivity checks assume the released settings")
def test_token_type_embedding_would_break_parity(converted):
    """HF BertModel adds token-type row 0; the released med.py adds none (fixture: up to 0.31 in probability)."""
    from fvlm.model.fvlm import FVLM

    ref = load_file(str(FIX / "zero_shot" / "text_features.safetensors"))["text_feat"].reshape(-1, 256)
    cfg = load_config(converted["run"] / "config.json", ["model.text.type_embeddings=true"])
    wrong = FVLM(cfg, num_anatomies=4).eval()
    state = dict(converted["model"].state_dict())
    sd = torch.load(FIX / "checkpoint.pth", weights_only=True)["model"]
    key = "text_encoder.embeddings.token_type_embeddings.weight"
    state[key] = sd[key]
    wrong.load_state_dict(state, strict=True)
    feats = prompt_text_features(wrong, cfg, converted["table"], torch.device("cpu"))
    assert float((feats - ref).abs().max()) > 1e-2


@pytest.mark.skipif(bool(OVERRIDES), reason="sensitivity checks assume the released settings")
def test_centred_symmetric_window_would_break_parity(converted, windows):
    """Our centred window (padded on both sides to 288) differs from the released one on every volume whose
    height is below 288 (valid_1_a_1) and wherever the released window is one voxel short."""
    cfg = load_config(converted["run"] / "config.json", ["data.eval_window=centred"])
    data, table = converted["data"], converted["table"]
    differing = 0
    for w in windows["windows"]:
        volume = w["file_name"].removesuffix(".nii.gz")
        meta = store.read_meta(data, "valid", volume)
        spec = next(s for s in volume_crop_specs(volume, meta, cfg, table, False)
                    if table.names[s.anatomy] == w["anatomy"])
        differing += list(spec.start) != w["window_start"] or list(spec.size) != w["padded_window_shape"]
    assert differing >= 5  # all 4 windows of valid_1_a_1 (height 260) and the valid_2_a_1 lung


@pytest.mark.skipif(bool(OVERRIDES), reason="sensitivity checks assume the released settings")
def test_evaluate_eval_window_overrides_the_saved_one(converted, evaluated):
    """``evaluate(eval_window=...)`` (benchmarks/parity_switches.py) changes only the window: ``released`` (the
    converted run's own) reproduces ``fvlm eval``; ``centred`` moves the scores of the volumes whose windows differ."""
    from fvlm.zeroshot import evaluate

    ref = pd.read_csv(evaluated["scores"])
    evaluate(converted["run"], converted["data"], "valid", converted["tmp"] / "released.csv", device="cpu",
             eval_window="released")
    pd.testing.assert_frame_equal(pd.read_csv(converted["tmp"] / "released.csv"), ref)
    evaluate(converted["run"], converted["data"], "valid", converted["tmp"] / "centred.csv", device="cpu",
             eval_window="centred")
    centred = pd.read_csv(converted["tmp"] / "centred.csv")
    labels = [c for c in ref.columns if c != "VolumeName"]
    assert float(np.nanmax(np.abs(centred[labels].to_numpy() - ref[labels].to_numpy()))) > 1e-4
    assert load_model(converted["run"])[1].data.eval_window == "released"  # the saved config is untouched


@pytest.mark.skipif(bool(OVERRIDES), reason="sensitivity checks assume the released settings")
def test_our_text_rule_would_break_parity():
    """Our fvlm rule (space-joined, whitespace-normalised, missing scans left out) differs from the released
    strings on the fixture's texts."""
    batch = json.loads((FIX / "train" / "batch.json").read_text())
    ours = _released_texts("fvlm")
    differ = sum(ours.get(scan, name).text != released_anatomy_text(
        name, ours.desc.get(scan, {}).get(name), ours.conc.get(scan, {}).get(name)).text
        for scan in batch["scans"] for name in ANATOMIES)
    assert differ >= 5
    assert not ours.has_scan("train_99_a")
    assert anatomy_text("heart", None, None).text != "heart shows no significant abnormalities."


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def test_presets_differ_exactly_in_the_documented_switches():
    """paper_released and paper_vitb differ in the README table's rows and nothing else."""
    released, ours = _flat(load_config("paper_released").to_dict()), _flat(load_config("paper_vitb").to_dict())
    differ = {k: (released[k], ours[k]) for k in released if released[k] != ours[k]}
    assert differ == {
        "data.margin_after": ([4, 19, 19], []),
        "data.eval_window": ("released", "centred"),
        "data.text_rule": ("released", "fvlm"),
        "model.text.type_embeddings": (False, True),
        "train.lr_schedule": ("epoch", "step"),
        "train.weight_decay": (0.01, 0.05),
        "train.weight_decay_all": (True, False),
        "train.amp": ("off", "auto"),
    }
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("## What is different from the released code"):]
    for key in differ:
        assert f"`{key}`" in section or key.split(".")[-1] in section, key


def test_released_lr_schedule_is_stepped_per_epoch():
    from fvlm.engine import lr_at

    cfg = load_config("paper_released", ["train.epochs=4", "train.warmup_steps=3", "train.lr=1e-3",
                                         "train.warmup_lr=1e-5", "train.min_lr=1e-6"])
    lrs = [lr_at(s, cfg, 40, steps_per_epoch=10) for s in range(40)]
    assert lrs[0] == pytest.approx(1e-5) and lrs[1] == pytest.approx(1e-5 + (1e-3 - 1e-5) / 3)
    assert lrs[3:10] == [pytest.approx(1e-3)] * 7  # constant through the rest of epoch 0
    for e in (1, 2, 3):  # one value per epoch: cos(pi e / epochs)
        want = 1e-6 + 0.5 * (1e-3 - 1e-6) * (1 + np.cos(np.pi * e / 4))
        assert lrs[10 * e: 10 * e + 10] == [pytest.approx(want)] * 10
    assert lr_at(55, cfg, 60, steps_per_epoch=10) == pytest.approx(1e-6)  # past train.epochs: stays at min_lr
    step_cfg = load_config("paper_vitb", ["train.epochs=4", "train.warmup_steps=3", "train.lr=1e-3"])
    assert lr_at(5, step_cfg, 40, 10) < 1e-3  # ours: cosine per step right after the warm-up
    with pytest.raises(ValueError, match="steps per epoch"):
        lr_at(5, cfg, 40)


def test_released_weight_decay_reaches_every_parameter():
    """The released optimizer is AdamW(model.parameters()) with torch's default weight decay 0.01 on everything."""
    from fvlm.model.fvlm import FVLM, param_groups

    model = FVLM(load_config("tiny"), num_anatomies=4)
    n = sum(1 for p in model.parameters() if p.requires_grad)
    released = load_config("paper_released").train
    groups = param_groups(model, released.weight_decay, decay_all=released.weight_decay_all)
    assert released.weight_decay == 0.01 and sum(len(g["params"]) for g in groups) == n
    assert all(g["weight_decay"] == 0.01 for g in groups)
    ours = load_config("paper_vitb").train
    groups = param_groups(model, ours.weight_decay, decay_all=ours.weight_decay_all)
    no_decay = {id(p) for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
    assert id(model.temp) in no_decay and id(model.query_tokens) in no_decay
    assert id(model.vision_projs[0].weight) not in no_decay


def test_released_margins_are_asymmetric():
    """The released preprocessing slices [min - 5, max + 5) with max inclusive: 5 before, 4 after (20 / 19)."""
    from fvlm.anatomy import load_anatomy_table
    from fvlm.data.prepare import prepare_arrays
    from fvlm.data.store import Geometry
    from fvlm.data.volume import SourceVolume
    from fvlm.totalseg import class_id

    table = load_anatomy_table("released")
    shape = (60, 90, 90)
    label = np.zeros(shape, dtype=np.uint8)
    label[20:30, 30:50, 35:45] = class_id("heart")
    hu = np.full(shape, -1000.0, dtype=np.float32)
    g = Geometry((1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    margins = {}
    for preset in ("paper_released", "paper_vitb"):
        cfg = load_config(preset, ["data.spacing=[1.0, 1.0, 1.0]", "data.crop_size=[16, 16, 32]"])
        _, mask, _ = prepare_arrays(SourceVolume(hu, g), SourceVolume(label, g), cfg.data, table)
        nz = np.nonzero(mask)
        margins[preset] = [(int(a.min()), mask.shape[i] - 1 - int(a.max())) for i, a in enumerate(nz)]
    assert margins["paper_released"] == [(5, 4), (20, 19), (20, 19)]
    assert margins["paper_vitb"] == [(5, 5), (20, 20), (20, 20)]
