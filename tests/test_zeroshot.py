"""Zero-shot evaluation: crop geometry, scores CSV (empty cells for absent anatomies), window sharing."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from fvlm.checkpoint import load_model
from fvlm.cli import main
from fvlm.config import load_config
from fvlm.data import store
from fvlm.labels import CT_RATE_LABELS
from fvlm.train import train
from fvlm.zeroshot import CropSpec, anatomy_embeddings, centred_crop, read_crop, volume_crop_specs


@pytest.fixture(scope="module")
def tiny_run(tiny_data, tmp_path_factory):
    return train(load_config("tiny", ["train.max_steps=2"]), tiny_data, tmp_path_factory.mktemp("zs") / "run")


def test_centred_crop_geometry():
    # bbox fits: min size, centred on the box, shifted to stay inside the volume
    start, size = centred_crop((10, 20, 30, 50, 0, 8), (40, 100, 100), (16, 32, 32), (8, 16, 16))
    assert size == (16, 32, 32) and start == (7, 24, 0)
    # box larger than the minimum: size = extent rounded up to the patch size
    start, size = centred_crop((0, 30, 0, 40, 0, 40), (40, 100, 100), (16, 32, 32), (8, 16, 16))
    assert size == (32, 48, 48) and start == (0, 0, 0)
    # volume smaller than the crop: centred on the volume, negative start = padding
    start, size = centred_crop((2, 8, 2, 8, 2, 8), (10, 10, 10), (16, 32, 32), (8, 16, 16))
    assert size == (16, 32, 32) and start == (-3, -11, -11)


def test_read_crop_pads_and_keeps_only_its_anatomy(tiny_data):
    cfg = load_config("tiny")
    vol_name = store.list_volumes(tiny_data, "valid")[0]
    vol = store.open_volume(tiny_data, "valid", vol_name)
    image, mask = read_crop(vol, CropSpec(vol_name, 1, (-2, 0, 0), (24, 48, 48)), cfg.data.hu_window)
    assert image.shape == (1, 24, 48, 48) and image.dtype == np.float32
    assert set(np.unique(mask)) <= {0, 2}  # only the heart (anatomy 1 -> value 2)
    assert (image[0, :2] == 0).all() and (mask[:2] == 0).all()  # padded slices: window low, no anatomy
    np.testing.assert_array_equal(image[0, 2:], store.window(np.asarray(vol.image[:22]), cfg.data.hu_window))


def test_eval_writes_scores_with_empty_cells_for_absent_anatomies(tiny_data, tiny_run, tmp_path):
    data = tmp_path / "processed"
    shutil.copytree(tiny_data, data)
    # remove the heart from one validation volume: its heart-scored labels must be empty, never 0
    victim = store.list_volumes(data, "valid")[0]
    d = store.volume_dir(data, "valid", victim)
    vol = store.open_volume(data, "valid", victim, mmap=False)
    meta = vol.meta
    mask = np.where(vol.mask == 2, 0, vol.mask).astype(np.uint8)
    meta["anatomies"]["heart"] = {"voxels": 0, "bbox": None}
    shutil.rmtree(d)
    store.write_volume(data, "valid", victim, vol.image, mask, meta)
    out = tmp_path / "scores.csv"
    assert main(["eval", "--checkpoint", str(tiny_run), "--data", str(data), "--split", "valid",
                 "--out", str(out)]) == 0
    df = pd.read_csv(out)
    assert list(df.columns) == ["VolumeName"] + [label for label in CT_RATE_LABELS
                                                 if label not in ("Medical material", "Lymphadenopathy")]
    assert sorted(df["VolumeName"]) == sorted(f"{v}.nii.gz" for v in store.list_volumes(data, "valid"))
    row = df[df["VolumeName"] == f"{victim}.nii.gz"].iloc[0]
    heart_labels = ["Cardiomegaly", "Pericardial effusion", "Coronary artery wall calcification"]
    assert row[heart_labels].isna().all()
    assert row.drop(["VolumeName", *heart_labels]).notna().all()
    assert "Cardiomegaly,Pericardial effusion" in out.read_text().splitlines()[0]
    others = df[df["VolumeName"] != f"{victim}.nii.gz"].drop(columns="VolumeName")
    assert others.notna().all().all() and ((others > 0) & (others < 1)).all().all()
    # metrics run on it with the protocol's missing policy
    assert main(["metrics", str(out), "--labels", str(data / "labels" / "valid_labels.csv"),
                 "--json", str(tmp_path / "m.json")]) == 0
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["missing"]["Cardiomegaly"] == 1


def test_shared_windows_equal_separate_crops(tiny_data, tiny_run):
    """One forward per shared window gives each anatomy exactly its own-crop feature (the protocol)."""
    model, cfg, table = load_model(tiny_run)
    volumes, shared = anatomy_embeddings(model, cfg, table, tiny_data, "valid", torch.device("cpu"))
    v = volumes[0]
    vol = store.open_volume(tiny_data, "valid", v)
    for spec in volume_crop_specs(v, vol.meta, cfg, table, global_mode=False):
        image, mask = read_crop(vol, spec, cfg.data.hu_window)
        with torch.no_grad():
            f, present = model.encode_image(torch.from_numpy(image)[None], torch.from_numpy(mask)[None])
        assert present[0, spec.anatomy]
        np.testing.assert_allclose(shared[0, spec.anatomy], f[0, spec.anatomy].numpy(), rtol=1e-4, atol=1e-5)
