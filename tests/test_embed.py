"""fvlm embed: the safetensors layout fvlm.retrieval reads, per-anatomy image/text embeddings, validity flags."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from fvlm.anatomy import load_anatomy_table
from fvlm.checkpoint import load_model, save_checkpoint
from fvlm.cli import main
from fvlm.config import load_config
from fvlm.data import store
from fvlm.data.preprocess import preprocess
from fvlm.model.fvlm import FVLM
from fvlm.retrieval import read_embeddings, retrieval_from_file
from fvlm.synth import synthesize
from fvlm.text import AnatomyTexts, scan_id


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A synthetic validation split preprocessed with the tiny preset, and an untrained tiny run."""
    root = tmp_path_factory.mktemp("embed")
    cfg = load_config("tiny")
    table = load_anatomy_table("released")
    synthesize(root / "ct", n_train=0, n_valid=3, seed=11, v2=True)
    assert preprocess(root / "ct", root / "proc", cfg, splits=["valid"], version="v2").ok
    torch.manual_seed(0)
    model = FVLM(cfg, num_anatomies=4)
    with torch.no_grad():
        model.query_tokens.normal_()
    save_checkpoint(root / "run", 1, model, cfg, table)
    return root


def test_embed_file_layout_and_retrieval(setup, tmp_path):
    out = tmp_path / "emb.safetensors"
    assert main(["embed", "--checkpoint", str(setup / "run"), "--data", str(setup / "proc"), "--split", "valid",
                 "--out", str(out), "--device", "cpu"]) == 0
    volumes, anatomies, t = read_embeddings(out)
    n = len(volumes)
    assert n >= 3 and anatomies == ["lung", "heart", "esophagus", "aorta"]
    for a in anatomies:
        assert t[f"image/{a}"].shape == t[f"text/{a}"].shape == (n, 16)
        assert t[f"valid/{a}"].dtype == bool and t[f"valid/{a}"].all()
        for kind in ("image", "text"):
            rows = t[f"{kind}/{a}"][t[f"valid/{a}"]]
            assert np.isfinite(rows).all()
            np.testing.assert_allclose(np.linalg.norm(rows, axis=1), 1.0, atol=1e-5)
    # text rows are the released-rule texts of each volume's scan, encoded by the model
    model, cfg, _ = load_model(setup / "run")
    texts = AnatomyTexts.load(setup / "proc" / "texts")
    want = [texts.get(scan_id(volumes[i]), "heart").text for i in range(n)]
    tok = model.tokenizer(want, padding="longest", return_tensors="pt")
    with torch.no_grad():
        direct = model.encode_text(tok["input_ids"], tok["attention_mask"]).numpy()
    np.testing.assert_allclose(t["text/heart"], direct, atol=5e-4)  # padding lengths differ: float noise only
    # image rows differ between volumes (real embeddings, not a constant)
    assert np.ptp(t["image/lung"], axis=0).max() > 1e-3
    result = retrieval_from_file(out, ks=(1, 5))
    assert set(result["anatomies"]) == set(anatomies) and result["n_volumes"] == n
    assert 0 <= result["mean"]["image_to_text"]["recall@1"] <= 1
    meta = json.loads(json.dumps(read_meta(out)))
    assert meta["split"] == "valid" and meta["mode"] == "anatomy"


def read_meta(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


def test_scans_without_texts_and_absent_anatomies_are_not_valid(setup, tmp_path):
    from fvlm.embed import embed

    texts = tmp_path / "texts"
    shutil.copytree(setup / "proc" / "texts", texts)
    desc, conc = (json.loads((texts / f).read_text()) for f in ("desc_info.json", "conc_info.json"))
    dropped = sorted(desc)[0]
    desc.pop(dropped, None)
    conc.pop(dropped, None)
    (texts / "desc_info.json").write_text(json.dumps(desc))
    (texts / "conc_info.json").write_text(json.dumps(conc))
    # one volume loses its oesophagus in the store
    proc = tmp_path / "proc"
    shutil.copytree(setup / "proc", proc)
    name = store.list_volumes(proc, "valid")[-1]
    vol = store.open_volume(proc, "valid", name, mmap=False)
    mask = np.where(vol.mask == 3, 0, vol.mask).astype(np.uint8)
    meta = dict(vol.meta)
    meta["anatomies"] = {**meta["anatomies"], "esophagus": {"voxels": 0, "bbox": None}}
    store.write_volume(proc, "valid", name, np.asarray(vol.image), mask, meta)

    out = embed(setup / "run", proc, "valid", tmp_path / "emb.safetensors", device="cpu", texts=texts)
    volumes, anatomies, t = read_embeddings(out)
    no_text = [i for i, v in enumerate(volumes) if scan_id(v) == dropped]
    assert no_text
    for a in anatomies:
        assert not t[f"valid/{a}"][no_text].any() and np.isnan(t[f"text/{a}"][no_text]).all()
    i = volumes.index(name)
    assert not t["valid/esophagus"][i] and np.isnan(t["image/esophagus"][i]).all()
    assert t["valid/lung"][i] == (scan_id(name) != dropped)
    retrieval_from_file(out, ks=(1,))  # invalid rows (NaN) are ignored by the reader


def test_volume_texts_follow_the_runs_text_rule(tmp_path):
    """A converted run (``data.text_rule=released``) embeds the texts the released code builds: a scan missing
    from the anatomy-text files is all-normal (template), not left out as under our rule."""
    import json

    from fvlm.embed import volume_texts

    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "desc_info.json").write_text(json.dumps({"valid_1_a": {"lung": "Nodule in the lung"}}))
    (tmp_path / "texts" / "conc_info.json").write_text(json.dumps({"valid_1_a": {"lung": "Lung nodule"}}))
    vols = ["valid_1_a_1", "valid_2_a_1"]
    ours = volume_texts(vols, ["lung", "heart"], tmp_path, "valid", False)
    released = volume_texts(vols, ["lung", "heart"], tmp_path, "valid", False, rule="released")
    assert ours[1] == [None, None]
    assert released[1] == ["lung shows no significant abnormalities.", "heart shows no significant abnormalities."]
    assert released[0][0] == "Lung nodule.Nodule in the lung." and ours[0][0] == "Lung nodule Nodule in the lung"
