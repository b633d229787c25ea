"""The processed store: atomic volume directories, validation, memory-mapped reads, manifest and failures."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fvlm.data import store


def _arrays(shape=(6, 8, 10), seed=0):
    rng = np.random.default_rng(seed)
    image = rng.integers(-1150, 351, size=shape).astype(np.int16)
    mask = rng.integers(0, 5, size=shape).astype(np.uint8)
    return image, mask


def _meta(volume="valid_1_a_1", scan="valid_1_a"):
    return {"format": 1, "split": "valid", "volume": volume, "scan": scan, "spacing": [1.0, 1.0, 3.0],
            "anatomies": {"lung": {"voxels": 3, "bbox": [0, 1, 0, 1, 0, 3]}}, "source": {"version": "v1"},
            "seconds": 0.5}


def test_write_open_roundtrip_memory_mapped(tmp_path):
    image, mask = _arrays()
    d = store.write_volume(tmp_path, "valid", "valid_1_a_1", image, mask, _meta())
    assert d == tmp_path / "valid" / "valid_1_a_1"
    assert sorted(p.name for p in d.iterdir()) == ["image.npy", "mask.npy", "meta.json"]
    vol = store.open_volume(tmp_path, "valid", "valid_1_a_1")
    assert isinstance(vol.image, np.memmap) and isinstance(vol.mask, np.memmap)
    assert vol.image.dtype == np.int16 and vol.mask.dtype == np.uint8
    np.testing.assert_array_equal(vol.image, image)
    np.testing.assert_array_equal(vol.mask, mask)
    assert vol.meta["shape"] == [6, 8, 10] and vol.meta["image_dtype"] == "int16" and vol.name == "valid_1_a_1"
    img_c, msk_c = vol.crop((1, 2, 3), (2, 3, 4))
    np.testing.assert_array_equal(img_c, image[1:3, 2:5, 3:7])
    np.testing.assert_array_equal(msk_c, mask[1:3, 2:5, 3:7])
    assert not isinstance(img_c, np.memmap)
    with pytest.raises(ValueError, match="outside"):
        vol.crop((5, 0, 0), (2, 3, 4))
    assert store.is_complete(tmp_path, "valid", "valid_1_a_1")
    assert store.list_volumes(tmp_path, "valid") == ["valid_1_a_1"]
    assert store.splits(tmp_path) == ["valid"]
    # no temporary directory is left behind
    assert [p.name for p in (tmp_path / "valid").iterdir()] == ["valid_1_a_1"]


def test_write_rejects_wrong_dtypes(tmp_path):
    image, mask = _arrays()
    with pytest.raises(TypeError, match="int16"):
        store.write_volume(tmp_path, "valid", "v", image.astype(np.float32), mask, _meta())
    with pytest.raises(ValueError, match="equal"):
        store.write_volume(tmp_path, "valid", "v", image, mask[:-1], _meta())
    assert store.list_volumes(tmp_path, "valid") == []
    assert not any(p.name.startswith(".tmp") for p in (tmp_path / "valid").glob("*"))


def test_window():
    hu = np.array([-2000, -1150, -400, 350, 1000], dtype=np.int16)
    w = store.window(hu, (-1150.0, 350.0))
    assert w.dtype == np.float32
    np.testing.assert_allclose(w, [0.0, 0.0, 0.5, 1.0, 1.0], atol=1e-6)


@pytest.mark.parametrize("damage", ["truncate_image", "bad_meta", "shape_mismatch", "missing_mask", "dtype"])
def test_is_complete_detects_damage(tmp_path, damage):
    image, mask = _arrays()
    d = store.write_volume(tmp_path, "valid", "valid_1_a_1", image, mask, _meta())
    if damage == "truncate_image":
        data = (d / "image.npy").read_bytes()
        (d / "image.npy").write_bytes(data[: len(data) - 10])
    elif damage == "bad_meta":
        (d / "meta.json").write_text("{not json")
    elif damage == "shape_mismatch":
        meta = json.loads((d / "meta.json").read_text())
        meta["shape"] = [6, 8, 11]
        (d / "meta.json").write_text(json.dumps(meta))
    elif damage == "missing_mask":
        (d / "mask.npy").unlink()
    elif damage == "dtype":
        np.save(d / "mask.npy", mask.astype(np.int16))
    assert store.check_volume_dir(d) is not None
    assert not store.is_complete(tmp_path, "valid", "valid_1_a_1")
    assert store.list_volumes(tmp_path, "valid", check=True) == []
    # a rewrite replaces the damaged directory
    store.write_volume(tmp_path, "valid", "valid_1_a_1", image, mask, _meta())
    assert store.is_complete(tmp_path, "valid", "valid_1_a_1")
    assert sorted(p.name for p in (tmp_path / "valid").iterdir()) == ["valid_1_a_1"]


def test_clean_temporaries_only_touches_given_volumes(tmp_path):
    split = tmp_path / "train"
    for name in (".tmp.train_1_a_1.ab12cd34", ".trash.train_1_a_1.00000000", ".tmp.train_2_a_1.ffffffff"):
        (split / name).mkdir(parents=True)
        (split / name / "image.npy").write_bytes(b"partial")
    assert store.clean_temporaries(tmp_path, "train", {"train_1_a_1"}) == 2
    assert sorted(p.name for p in split.iterdir()) == [".tmp.train_2_a_1.ffffffff"]
    assert store.clean_temporaries(tmp_path, "train") == 1
    assert list(split.iterdir()) == []


def test_manifest_and_failures(tmp_path):
    image, mask = _arrays()
    store.write_volume(tmp_path, "valid", "valid_1_a_1", image, mask, _meta())
    store.write_volume(tmp_path, "train", "train_3_b_2", image, mask, {**_meta("train_3_b_2", "train_3_b"),
                                                                        "split": "train"})
    store.write_failure(tmp_path, "valid", "valid_2_a_1", {"scan": "valid_2_a", "error": "NaN voxels", "seconds": 0.1})
    # a stale failure record of a volume that has since succeeded is not reported
    store.write_failure(tmp_path, "valid", "valid_1_a_1", {"scan": "valid_1_a", "error": "old", "seconds": 0.1})
    (tmp_path / "texts").mkdir()  # side directories are not splits
    ok, failed = store.rebuild_manifest(tmp_path, ["lung", "heart"])
    assert (ok, failed) == (2, 1)
    m = store.read_manifest(tmp_path)
    assert list(m["volume"]) == ["train_3_b_2", "valid_1_a_1", "valid_2_a_1"]
    assert list(m["status"]) == ["ok", "ok", "failed"]
    assert list(m["scan"]) == ["train_3_b", "valid_1_a", "valid_2_a"]
    assert m.loc[1, "shape"] == "6x8x10" and m.loc[1, "spacing"] == "1,1,3"
    assert int(m.loc[1, "voxels_lung"]) == 3 and int(m.loc[1, "voxels_heart"]) == 0
    assert m.loc[2, "error"] == "NaN voxels"
    lines = (tmp_path / "failures.csv").read_text().splitlines()
    assert lines == ["split,volume,error", "valid,valid_2_a_1,NaN voxels"]
    store.clear_failure(tmp_path, "valid", "valid_2_a_1")
    assert store.rebuild_manifest(tmp_path, ["lung", "heart"]) == (2, 0)
    with pytest.raises(FileNotFoundError, match="manifest.csv"):
        store.read_manifest(tmp_path / "nowhere")


def test_config_mismatch():
    stored = {"data": {"anatomy_table": "released", "spacing": [1.0, 1.0, 3.0], "hu_window": [-1150.0, 350.0],
                       "margin": [5, 20, 20], "crop_size": [112, 256, 352], "flip_prob": 0.2},
              "anatomy_table": {"anatomies": [{"name": "lung", "classes": ["lung_upper_lobe_left"]}]}}
    same = {**stored["data"], "flip_prob": 0.5, "spacing": (1, 1, 3)}
    assert store.config_mismatch(stored, same, stored["anatomy_table"]) == []
    other = {**stored["data"], "spacing": [1.5, 1.5, 3.0]}
    diffs = store.config_mismatch(stored, other, stored["anatomy_table"])
    assert len(diffs) == 1 and "data.spacing" in diffs[0]
    table2 = {"anatomies": [{"name": "lung", "classes": ["lung_lower_lobe_left"]}]}
    assert "different classes" in store.config_mismatch(stored, same, table2)[0]
