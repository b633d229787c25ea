"""fvlm.retrieval: Recall@K and ranks on crafted embeddings, the same-scan rule, ties, the embed file."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import save_file

from fvlm.cli import main
from fvlm.retrieval import format_retrieval_table, retrieval_from_file, retrieval_metrics

# A Latin square: every row and column is a permutation of 1..6, so cosine similarities (image = row of W,
# text = unit vector) order each row and each column by W. Ranks of the diagonal = 7 - W[i, i]:
# [1, 2, 3, 1, 6, 4] in both directions.
LATIN = np.array([[6, 3, 5, 4, 2, 1],
                  [2, 5, 1, 3, 4, 6],
                  [5, 6, 4, 1, 3, 2],
                  [1, 2, 3, 6, 5, 4],
                  [3, 4, 6, 2, 1, 5],
                  [4, 1, 2, 5, 6, 3]], dtype=float)


def test_known_ranks_latin_square():
    r = retrieval_metrics(LATIN, np.eye(6), ks=(1, 2, 5, 10))
    for direction in ("image_to_text", "text_to_image"):
        d = r[direction]
        assert d["recall@1"] == pytest.approx(2 / 6)
        assert d["recall@2"] == pytest.approx(3 / 6)
        assert d["recall@5"] == pytest.approx(5 / 6)
        assert d["recall@10"] == 1.0
        assert d["median_rank"] == pytest.approx(2.5)  # ranks 1, 1, 2, 3, 4, 6
        assert d["mean_rank"] == pytest.approx(17 / 6)
    assert r["n"] == 6 and r["n_groups"] == 6 and r["ks_at_least_n"] == [10]


def test_directions_differ_and_ties_count_in_expectation():
    # image i = row of W (equal norms), text j = e_j: similarity(i, j) = W[i, j] / sqrt(14)
    w = np.array([[3, 2, 1], [3, 2, 1], [1, 3, 2]], dtype=float)
    r = retrieval_metrics(w, np.eye(3), ks=(1, 2))
    # volume -> report: rows rank their own column 1st, 2nd, 2nd
    assert r["image_to_text"] == pytest.approx({"recall@1": 1 / 3, "recall@2": 1.0, "median_rank": 2.0,
                                                "mean_rank": 5 / 3})
    # report -> volume: column 0 = [3, 3, 1]: image 0 tied with image 1 -> rank 1.5, recall@1 1/2;
    # column 1 = [2, 2, 3]: one strictly above, one tied -> rank 2.5, recall@2 1/2; column 2 = [1, 1, 2] -> 1
    assert r["text_to_image"] == pytest.approx({"recall@1": 0.5, "recall@2": 2.5 / 3, "median_rank": 1.5,
                                                "mean_rank": 5 / 3})
    # swapping the modalities swaps the directions
    s = retrieval_metrics(np.eye(3), w, ks=(1, 2))
    assert s["text_to_image"] == r["image_to_text"] and s["image_to_text"] == r["text_to_image"]


def test_collapsed_embeddings_score_chance():
    ones = np.ones((10, 4))
    r = retrieval_metrics(ones, ones, ks=(1, 5, 10))
    for d in (r["image_to_text"], r["text_to_image"]):
        # all ten candidates tie: P(hit within K) = K / 10, expected rank 5.5
        assert d["recall@1"] == pytest.approx(0.1)
        assert d["recall@5"] == pytest.approx(0.5)
        assert d["recall@10"] == pytest.approx(1.0)
        assert d["median_rank"] == pytest.approx(5.5)


VOLUMES = ["valid_1_a_1", "valid_1_a_2", "valid_2_a_1", "valid_3_a_1"]


def same_report_embeddings() -> tuple[np.ndarray, np.ndarray]:
    """Two reconstructions of scan valid_1_a share one report (identical text rows 0 and 1)."""
    e = np.eye(4)
    text = np.stack([e[0], e[0], e[1], e[2]])
    image = np.stack([e[0], 0.9 * e[0] + 0.1 * e[3], e[1], e[2]])
    return image, text


def test_same_scan_rule():
    image, text = same_report_embeddings()
    scans = ["valid_1_a", "valid_1_a", "valid_2_a", "valid_3_a"]
    by_scan = retrieval_metrics(image, text, ids=scans, ks=(1, 2))
    assert by_scan["n_groups"] == 3
    for d in (by_scan["image_to_text"], by_scan["text_to_image"]):
        assert d["recall@1"] == 1.0 and d["median_rank"] == 1.0
    exact = retrieval_metrics(image, text, ks=(1, 2))
    # exact-row rule: images 0 and 1 see their report tied with the twin report -> rank 1.5 each
    assert exact["image_to_text"]["recall@1"] == pytest.approx(0.75)
    assert exact["image_to_text"]["median_rank"] == pytest.approx(1.25)
    # report 1 (identical to report 0) ranks image 0 first, its own image second
    assert exact["text_to_image"]["recall@1"] == pytest.approx(0.75)
    assert exact["text_to_image"]["recall@2"] == 1.0


def test_input_errors():
    with pytest.raises(ValueError, match="differ in shape"):
        retrieval_metrics(np.ones((3, 4)), np.ones((2, 4)))
    with pytest.raises(ValueError, match="zero vector"):
        retrieval_metrics(np.zeros((2, 4)), np.ones((2, 4)))
    with pytest.raises(ValueError, match="3 ids for 2"):
        retrieval_metrics(np.ones((2, 4)), np.ones((2, 4)), ids=["a", "b", "c"])


def write_embeddings(path, image_lung, text_lung, valid_lung, image_heart, text_heart):
    n = len(VOLUMES)
    tensors = {
        "image/lung": image_lung.astype(np.float32), "text/lung": text_lung.astype(np.float32),
        "valid/lung": valid_lung,
        "image/heart": image_heart.astype(np.float32), "text/heart": text_heart.astype(np.float32),
        "valid/heart": np.ones(n, dtype=bool),
    }
    save_file(tensors, str(path), metadata={"volumes": json.dumps(VOLUMES), "anatomies": json.dumps(["lung", "heart"])})


def test_from_file_per_anatomy_and_mean(tmp_path):
    image, text = same_report_embeddings()
    rng = np.random.default_rng(0)
    heart_img, heart_txt = rng.normal(size=(4, 4)), rng.normal(size=(4, 4))
    valid = np.array([True, True, False, True])
    path = tmp_path / "emb.safetensors"
    write_embeddings(path, image, text, valid, heart_img, heart_txt)
    r = retrieval_from_file(path, ks=(1, 2))
    assert r["grouping"] == "scan" and r["n_volumes"] == 4 and set(r["anatomies"]) == {"lung", "heart"}
    lung = r["anatomies"]["lung"]
    assert lung["n"] == 3 and lung["n_groups"] == 2
    assert lung["image_to_text"]["recall@1"] == 1.0
    assert r["anatomies"]["heart"] == retrieval_metrics(heart_img, heart_txt, ids=[v[:-2] for v in VOLUMES],
                                                        ks=(1, 2))

    def unit(x):
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    # the volume embedding: mean of the normalised valid anatomy embeddings (volume 2 has only its heart)
    v = valid[:, None].astype(float)
    mean_img = (unit(image) * v + unit(heart_img)) / (1 + v)
    mean_txt = (unit(text) * v + unit(heart_txt)) / (1 + v)
    assert r["mean"] == retrieval_metrics(mean_img, mean_txt, ids=[v[:-2] for v in VOLUMES], ks=(1, 2))
    table = format_retrieval_table(r)
    assert "lung" in table and "mean" in table and "R@1" in table


def test_cli_retrieval_only(tmp_path):
    image, text = same_report_embeddings()
    path = tmp_path / "emb.safetensors"
    write_embeddings(path, image, text, np.ones(4, dtype=bool), image, text)
    out = tmp_path / "r.json"
    assert main(["metrics", "--retrieval", str(path), "--json", str(out)]) == 0
    r = json.loads(out.read_text())["retrieval"]
    assert r["mean"]["ks"] == [5, 10, 50, 100] and r["mean"]["ks_at_least_n"] == [5, 10, 50, 100]
    assert r["mean"]["image_to_text"]["recall@5"] == 1.0
    # a file without the metadata: one clear error
    save_file({"image/lung": np.ones((2, 2), dtype=np.float32)}, str(tmp_path / "bad.safetensors"))
    assert main(["metrics", "--retrieval", str(tmp_path / "bad.safetensors")]) == 2
    assert main(["metrics"]) == 2  # neither scores nor --retrieval
