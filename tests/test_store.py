"""The processed store: atomic volume directories, compressed chunked arrays (format 2) and format-1 .npy stores,
validation, lazy crops, reads in forked DataLoader workers, manifest and failures."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch

from fvlm.data import b2nd, store


def _arrays(shape=(6, 8, 10), seed=0):
    rng = np.random.default_rng(seed)
    image = rng.integers(-1150, 351, size=shape).astype(np.int16)
    mask = rng.integers(0, 5, size=shape).astype(np.uint8)
    return image, mask


def _meta(volume="valid_1_a_1", scan="valid_1_a"):
    return {"format": 1, "split": "valid", "volume": volume, "scan": scan, "spacing": [1.0, 1.0, 3.0],
            "anatomies": {"lung": {"voxels": 3, "bbox": [0, 1, 0, 1, 0, 3]}}, "source": {"version": "v1"},
            "seconds": 0.5}


def test_write_open_roundtrip_compressed(tmp_path):
    image, mask = _arrays()
    d = store.write_volume(tmp_path, "valid", "valid_1_a_1", image, mask, _meta())
    assert d == tmp_path / "valid" / "valid_1_a_1"
    assert sorted(p.name for p in d.iterdir()) == ["image.b2nd", "mask.b2nd", "meta.json"]
    vol = store.open_volume(tmp_path, "valid", "valid_1_a_1")
    assert isinstance(vol.image, store.CompressedArray) and isinstance(vol.mask, store.CompressedArray)
    assert vol.image.dtype == np.int16 and vol.mask.dtype == np.uint8
    assert vol.image.shape == (6, 8, 10) and vol.image.ndim == 3 and len(vol.mask) == 6
    np.testing.assert_array_equal(np.asarray(vol.image), image)
    np.testing.assert_array_equal(np.asarray(vol.mask), mask)
    # numpy-style indexing returns numpy arrays equal to the same indexing of the original
    for key in [(slice(1, 5), slice(2, 7), slice(0, 9)), (slice(None, None, -1), slice(1, 8, 3)), (2, ..., 4),
                (slice(4, 100),), (slice(3, 3),), ([0, 5],), (image > 0,)]:
        got = vol.image[key]
        assert isinstance(got, np.ndarray) and got.dtype == np.int16
        np.testing.assert_array_equal(got, image[key])
    with pytest.raises(IndexError):
        vol.image[6]
    again = pickle.loads(pickle.dumps(vol.image))  # spawn-started workers receive arrays by path
    assert again.shape == vol.image.shape
    np.testing.assert_array_equal(again[2:4], image[2:4])
    meta = vol.meta
    assert meta["format"] == store.FORMAT_VERSION == 2  # the writer sets the format, whatever meta said
    assert meta["shape"] == [6, 8, 10] and meta["image_dtype"] == "int16" and vol.name == "valid_1_a_1"
    assert meta["storage"]["image"]["codec"] == "lz4" and meta["storage"]["mask"]["chunks"] == [6, 8, 10]
    img_c, msk_c = vol.crop((1, 2, 3), (2, 3, 4))
    np.testing.assert_array_equal(img_c, image[1:3, 2:5, 3:7])
    np.testing.assert_array_equal(msk_c, mask[1:3, 2:5, 3:7])
    assert img_c.flags.owndata and img_c.flags.writeable
    with pytest.raises(ValueError, match="outside"):
        vol.crop((5, 0, 0), (2, 3, 4))
    loaded = store.open_volume(tmp_path, "valid", "valid_1_a_1", mmap=False)
    assert type(loaded.image) is np.ndarray and type(loaded.mask) is np.ndarray
    np.testing.assert_array_equal(loaded.image, image)
    assert store.is_complete(tmp_path, "valid", "valid_1_a_1")
    assert store.list_volumes(tmp_path, "valid") == ["valid_1_a_1"]
    assert store.splits(tmp_path) == ["valid"]
    # no temporary directory is left behind
    assert [p.name for p in (tmp_path / "valid").iterdir()] == ["valid_1_a_1"]


def test_chunked_and_compressed(tmp_path):
    """A CT-like volume (padding + smooth body) is stored in z slabs of CHUNK_SLICES slices, well compressed."""
    d_, h, w = 40, 48, 64
    z, y, x = np.mgrid[:d_, :h, :w]
    image = np.full((d_, h, w), -1150, dtype=np.int16)
    body = ((y - h / 2) / 20) ** 2 + ((x - w / 2) / 28) ** 2 < 1
    image[body] = (40 + 30 * np.sin(z / 5.0) + 20 * np.cos(x / 7.0))[body].astype(np.int16)
    mask = (body & (z > 5)).astype(np.uint8) * 3
    d = store.write_volume(tmp_path, "train", "t", image, mask, _meta("t", "t"))
    vol = store.open_volume(tmp_path, "train", "t")
    assert vol.image.chunks == (b2nd.CHUNK_SLICES, h, w) == (16, 48, 64)
    np.testing.assert_array_equal(vol.image[17:39, 5:40, 3:60], image[17:39, 5:40, 3:60])
    raw = image.nbytes + mask.nbytes
    stored = (d / "image.b2nd").stat().st_size + (d / "mask.b2nd").stat().st_size
    assert stored < raw / 4, (stored, raw)
    # other codecs / chunk shapes change only the compression: readers see the same arrays
    zstd = {"codec": "zstd", "clevel": 1, "filters": ["shuffle", "bytedelta"]}
    store.write_volume(tmp_path, "train", "z", image, mask, _meta("z", "t"), codecs={"image": zstd}, chunks=(8, 16, 16))
    vz = store.open_volume(tmp_path, "train", "z")
    assert vz.image.chunks == (8, 16, 16) and vz.meta["storage"]["image"]["codec"] == "zstd"
    assert vz.meta["storage"]["mask"]["codec"] == "lz4"
    np.testing.assert_array_equal(vz.image[17:39, 5:40, 3:60], image[17:39, 5:40, 3:60])
    np.testing.assert_array_equal(np.asarray(vz.mask), mask)


def _write_v1(root, split, volume, image, mask):
    """A format-1 volume directory as fvlm wrote it before format 2 (plain .npy arrays)."""
    d = root / split / volume
    d.mkdir(parents=True)
    np.save(d / "image.npy", image)
    np.save(d / "mask.npy", mask)
    meta = {**_meta(volume), "format": 1, "shape": list(image.shape), "image_dtype": "int16", "mask_dtype": "uint8"}
    (d / "meta.json").write_text(json.dumps(meta))
    return d


def test_format_1_store_still_reads(tmp_path):
    image, mask = _arrays()
    d = _write_v1(tmp_path, "valid", "valid_1_a_1", image, mask)
    assert store.check_volume_dir(d) is None and store.is_complete(tmp_path, "valid", "valid_1_a_1")
    vol = store.open_volume(tmp_path, "valid", "valid_1_a_1")
    assert isinstance(vol.image, np.memmap) and isinstance(vol.mask, np.memmap)
    img_c, msk_c = vol.crop((1, 2, 3), (2, 3, 4))
    np.testing.assert_array_equal(img_c, image[1:3, 2:5, 3:7])
    assert not isinstance(img_c, np.memmap) and not isinstance(msk_c, np.memmap)
    assert type(store.open_volume(tmp_path, "valid", "valid_1_a_1", mmap=False).mask) is np.ndarray
    # a truncated .npy is still detected
    data = (d / "image.npy").read_bytes()
    (d / "image.npy").write_bytes(data[:-10])
    assert "bytes" in store.check_volume_dir(d)
    # a rewrite replaces the format-1 directory by a format-2 one
    store.write_volume(tmp_path, "valid", "valid_1_a_1", image, mask, _meta())
    assert sorted(p.name for p in d.iterdir()) == ["image.b2nd", "mask.b2nd", "meta.json"]
    assert store.is_complete(tmp_path, "valid", "valid_1_a_1")
    # a format this version does not know is refused with a clear message
    meta = json.loads((d / "meta.json").read_text())
    (d / "meta.json").write_text(json.dumps({**meta, "format": 3}))
    assert "format 3" in store.check_volume_dir(d)
    with pytest.raises(ValueError, match="format 3"):
        store.open_volume(tmp_path, "valid", "valid_1_a_1")


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


@pytest.mark.parametrize("damage", ["truncate_image", "truncate_mask_1_byte", "garbage_image", "bad_meta",
                                    "shape_mismatch", "missing_mask", "dtype"])
def test_is_complete_detects_damage(tmp_path, damage):
    image, mask = _arrays()
    d = store.write_volume(tmp_path, "valid", "valid_1_a_1", image, mask, _meta())
    if damage == "truncate_image":
        data = (d / "image.b2nd").read_bytes()
        (d / "image.b2nd").write_bytes(data[: len(data) // 2])
    elif damage == "truncate_mask_1_byte":
        data = (d / "mask.b2nd").read_bytes()
        (d / "mask.b2nd").write_bytes(data[:-1])
    elif damage == "garbage_image":
        (d / "image.b2nd").write_bytes(b"\0" * 4096)
    elif damage == "bad_meta":
        (d / "meta.json").write_text("{not json")
    elif damage == "shape_mismatch":
        meta = json.loads((d / "meta.json").read_text())
        meta["shape"] = [6, 8, 11]
        (d / "meta.json").write_text(json.dumps(meta))
    elif damage == "missing_mask":
        (d / "mask.b2nd").unlink()
    elif damage == "dtype":
        b2nd.write_b2nd(d / "mask.b2nd", mask.astype(np.int16), b2nd.CODECS["mask"])
    why = store.check_volume_dir(d)
    assert why is not None
    if damage == "dtype":
        assert "dtype int16" in why
    if damage.startswith(("truncate", "garbage")):
        assert ".b2nd" in why
    assert not store.is_complete(tmp_path, "valid", "valid_1_a_1")
    assert store.list_volumes(tmp_path, "valid", check=True) == []
    # a rewrite replaces the damaged directory
    store.write_volume(tmp_path, "valid", "valid_1_a_1", image, mask, _meta())
    assert store.is_complete(tmp_path, "valid", "valid_1_a_1")
    assert sorted(p.name for p in (tmp_path / "valid").iterdir()) == ["valid_1_a_1"]


class _Crops(torch.utils.data.Dataset):
    """Random-access crops the way the training dataset reads them: open per item, slice, np.asarray."""

    def __init__(self, root, parent_volume):
        self.root, self.parent_volume = root, parent_volume

    def __len__(self):
        return 8

    def __getitem__(self, i):
        vol = self.parent_volume if i % 2 else store.open_volume(self.root, "train", f"t{i % 3}")
        z = i % 3
        return np.asarray(vol.image[z:z + 20, 1:30, 2:40]), np.asarray(vol.mask[z:z + 20, 1:30, 2:40]), i % 3


def test_forked_dataloader_workers_read(tmp_path):
    """Two fork-started DataLoader workers read compressed volumes (opened in the worker or inherited from the
    parent) after the parent used blosc2's thread pool; a deadlock would hit the loader timeout."""
    import blosc2

    arrays = [_arrays((24, 32, 40), seed=k) for k in range(3)]
    for k, (image, mask) in enumerate(arrays):
        store.write_volume(tmp_path, "train", f"t{k}", image, mask, _meta(f"t{k}", "t"))
    blosc2.compress2(np.arange(1 << 20, dtype=np.int32), cparams=blosc2.CParams(nthreads=2))  # start the pool
    parent = store.open_volume(tmp_path, "train", "t1")
    np.asarray(parent.image[:4])
    loader = torch.utils.data.DataLoader(_Crops(tmp_path, parent), batch_size=2, num_workers=2,
                                         multiprocessing_context="fork", timeout=60)
    seen = 0
    for images, masks, which in loader:
        for img, msk, k in zip(images.numpy(), masks.numpy(), which.tolist(), strict=True):
            k = 1 if seen % 2 else k  # odd items read the parent's (t1) handle
            z = seen % 3
            np.testing.assert_array_equal(img, arrays[k][0][z:z + 20, 1:30, 2:40])
            np.testing.assert_array_equal(msk, arrays[k][1][z:z + 20, 1:30, 2:40])
            seen += 1
    assert seen == 8


def test_clean_temporaries_only_touches_given_volumes(tmp_path):
    split = tmp_path / "train"
    for name in (".tmp.train_1_a_1.ab12cd34", ".trash.train_1_a_1.00000000", ".tmp.train_2_a_1.ffffffff"):
        (split / name).mkdir(parents=True)
        (split / name / "image.b2nd").write_bytes(b"partial")
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
    # the released after-margins (4/19/19) shape the arrays too; an empty margin_after means data.margin
    released = {**stored["data"], "margin_after": [4, 19, 19]}
    diffs = store.config_mismatch(stored, released, stored["anatomy_table"])
    assert len(diffs) == 1 and "data.margin_after" in diffs[0]
    assert store.config_mismatch(stored, {**stored["data"], "margin_after": [5, 20, 20]}, stored["anatomy_table"]) == []
    assert store.config_mismatch({**stored, "data": released}, released, stored["anatomy_table"]) == []


def test_consumers_read_both_formats_alike(tmp_path):
    """The dataset's random crop and zero-shot's padded anatomy crop index the arrays numpy-style: a format-2
    volume gives exactly what the same volume stored as format 1 gives."""
    from fvlm.data.dataset import random_crop_flip
    from fvlm.zeroshot import CropSpec, read_crop

    image, mask = _arrays((20, 24, 28), seed=3)
    store.write_volume(tmp_path, "valid", "new", image, mask, _meta("new"))
    _write_v1(tmp_path, "valid", "old", image, mask)
    new, old = (store.open_volume(tmp_path, "valid", v) for v in ("new", "old"))
    assert isinstance(new.image, store.CompressedArray) and isinstance(old.image, np.memmap)
    for seed in range(3):  # crops inside, padded (larger than the volume in y) and flipped
        a = random_crop_flip(new.image, new.mask, (16, 30, 20), 0.5, np.random.default_rng(seed), -1150)
        b = random_crop_flip(old.image, old.mask, (16, 30, 20), 0.5, np.random.default_rng(seed), -1150)
        for x, y in zip(a, b, strict=True):
            assert type(x) is np.ndarray and x.dtype == y.dtype
            np.testing.assert_array_equal(x, y)
    spec = CropSpec("new", 2, (-3, 4, 10), (16, 16, 24))  # partly outside: padded
    a, b = read_crop(new, spec, (-1150.0, 350.0)), read_crop(old, spec, (-1150.0, 350.0))
    assert a[0].shape == (1, 16, 16, 24) and a[0].dtype == np.float32
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
