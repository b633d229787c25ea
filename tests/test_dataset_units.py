"""Unit tests of the sampling pieces of fvlm.data.dataset that need no processed store."""

import numpy as np
import pytest
import torch

from fvlm.data.dataset import Collate, EpochSampler, Sample, random_crop_flip


def test_random_crop_reads_window_and_pads():
    image = np.arange(4 * 6 * 8, dtype=np.int16).reshape(4, 6, 8)
    mask = (image % 3).astype(np.uint8)
    rng = np.random.default_rng(0)
    img, msk = random_crop_flip(image, mask, (2, 6, 10), flip_prob=0.0, rng=rng, pad_value=-1000)
    assert img.shape == msk.shape == (2, 6, 10)
    # x was padded by 2 in total, z and y are a window of the source
    inside = img[img != -1000].reshape(2, 6, 8)
    z0 = int(inside[0, 0, 0]) // 48
    np.testing.assert_array_equal(inside, image[z0 : z0 + 2])
    assert (msk[img == -1000] == 0).all()


def test_random_crop_flips_image_and_mask_together():
    image = np.arange(3 * 4 * 5, dtype=np.int16).reshape(3, 4, 5)
    mask = (np.arange(3 * 4 * 5) % 7).reshape(3, 4, 5).astype(np.uint8)
    img, msk = random_crop_flip(image, mask, (3, 4, 5), flip_prob=1.0, rng=np.random.default_rng(1), pad_value=0)
    np.testing.assert_array_equal(img, image[::-1, ::-1, ::-1])
    np.testing.assert_array_equal(msk, mask[::-1, ::-1, ::-1])
    assert img.flags["C_CONTIGUOUS"]


def test_epoch_sampler_partitions_ranks_and_resumes():
    n, b = 23, 3
    s0, s1 = EpochSampler(n, b, seed=5, rank=0, world_size=2), EpochSampler(n, b, seed=5, rank=1, world_size=2)
    assert s0.batches_per_epoch == 3  # 23 // 6
    a, c = list(s0), list(s1)
    assert len(a) == len(c) == 9 and not set(a) & set(c)
    assert all(e == 0 for _, e in a)
    s0.set_epoch(1)
    assert [i for i, _ in s0] != [i for i, _ in a]  # a new permutation per epoch
    s0.set_epoch(1, start_batch=2)
    full = EpochSampler(n, b, seed=5, rank=0, world_size=2)
    full.set_epoch(1)
    assert list(s0) == list(full)[2 * b :]
    with pytest.raises(ValueError, match="fewer than one global batch"):
        EpochSampler(5, 3, seed=0, world_size=2)


class _Tok:
    """A whitespace tokenizer with the transformers call signature (enough for the collate contract)."""

    def __call__(self, texts, padding, truncation, max_length, return_tensors):
        ids = [[len(w) + 1 for w in t.split()][:max_length] for t in texts]
        longest = max(len(i) for i in ids)
        return {"input_ids": torch.tensor([i + [0] * (longest - len(i)) for i in ids]),
                "attention_mask": torch.tensor([[1] * len(i) + [0] * (longest - len(i)) for i in ids])}


def test_collate_tokenises_each_distinct_text_once():
    def sample(texts, normal):
        return Sample(np.zeros((1, 2, 2, 2), np.float32), np.zeros((2, 2, 2), np.uint8), np.ones(2, bool),
                      np.array(normal), texts, "v")

    samples = [sample(["a b", "c"], [False, True]), sample(["a b", "d e f"], [False, False])]
    batch = Collate(_Tok(), max_length=8)(samples)
    assert batch["text_input_ids"].shape == (3, 3)  # 3 distinct texts, padded to the longest (3 words)
    assert batch["text_index"].tolist() == [[0, 1], [0, 2]]
    assert batch["text_id"][0, 0] == batch["text_id"][1, 0] and batch["text_id"][0, 1] != batch["text_id"][1, 1]
    assert batch["is_normal"].tolist() == [[False, True], [False, False]]
    assert batch["image"].shape == (2, 1, 2, 2, 2) and batch["mask"].dtype == torch.uint8
