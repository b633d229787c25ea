"""Report-to-volume and volume-to-report retrieval from embeddings: Recall@K and median rank.

Given image embeddings (N, E) and text embeddings (N, E), row i of both belonging to volume i, each query is
ranked against all N candidates of the other modality by cosine similarity. CT-CLIP publishes Recall@K for
K in (5, 10, 50, 100) this way.

Choices (each one changes the numbers, so they are written down):

- **Hit = same scan.** The reconstructions of one CT-RATE scan (``valid_1_a_1``, ``valid_1_a_2``, ...) share
  one report, so their text embeddings are identical. Counting only the exact row as a hit would make a
  reconstruction-level benchmark depend on which of several identical reports happens to sort first. A
  retrieved item is therefore a hit when it belongs to the query's scan (``ids`` = scan ids; ``ids=None``
  gives the exact-row rule, i.e. every row its own group). The rank of a query is the position of the first
  hit.
- **Ties are broken at random, in expectation.** Identical texts of *different* scans (per-anatomy texts
  such as "lung shows no significant abnormalities.") give equal similarities. With ``g`` non-hits strictly
  above the best hit, ``w`` non-hits tied with it and ``c`` hits tied with it, the expected rank is
  ``1 + g + w / (c + 1)`` and Recall@K is the exact probability that a uniformly random order of the tied
  items puts a hit within the first K. A collapsed model (all embeddings equal) thus scores chance
  (Recall@K = K/N), never a perfect score. Similarities within ``tie_tol`` count as equal.
- **K >= N**: every query trivially succeeds (Recall@K = 1); such K are listed under ``ks_at_least_n``.

``retrieval_from_file`` reads the output of ``fvlm embed``: a safetensors file with tensors
``image/{anatomy}`` (N, E), ``text/{anatomy}`` (N, E), ``valid/{anatomy}`` (N,) bool and metadata ``volumes``
and ``anatomies`` (JSON lists). It reports each anatomy (over its valid volumes) and ``mean``: the volume
embedding = mean of the L2-normalised embeddings of the volume's valid anatomies (both modalities alike).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open
from scipy.special import gammaln

from fvlm.text import scan_id

log = logging.getLogger(__name__)

DEFAULT_KS: tuple[int, ...] = (5, 10, 50, 100)
_CHUNK_ELEMENTS = 1 << 24  # similarity block size (float64): 128 MiB whatever N is


def _normalise(x: np.ndarray, what: str) -> np.ndarray:
    """Rows L2-normalised in float64; loud on non-finite values or zero rows."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"{what}: expected (N, E) embeddings, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{what}: embeddings contain NaN or inf (row {int(np.argwhere(~np.isfinite(x))[0, 0])})")
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    if (norm == 0).any():
        raise ValueError(f"{what}: row {int(np.flatnonzero(norm[:, 0] == 0)[0])} is a zero vector")
    return x / norm


def _recall_at(k: int, g: np.ndarray, w: np.ndarray, c: np.ndarray) -> np.ndarray:
    """P(rank <= k) per query when the ``c + w`` tied items are ordered uniformly at random.

    The first hit lies within the top k unless the ``m = k - g`` first tied slots are all non-hits, which has
    probability C(w, m) / C(c + w, m) (0 when m > w).
    """
    m = k - g
    p = np.zeros(len(g))
    sure = m > w
    p[sure] = 1.0
    part = (m > 0) & ~sure
    if part.any():
        mm, ww, cc = m[part], w[part], c[part]
        log_all_miss = gammaln(ww + 1) - gammaln(ww - mm + 1) - gammaln(cc + ww + 1) + gammaln(cc + ww - mm + 1)
        p[part] = 1.0 - np.exp(log_all_miss)
    return p


def _direction(query: np.ndarray, cand: np.ndarray, group: np.ndarray, ks: Sequence[int],
               tie_tol: float) -> dict[str, float]:
    """Recall@K, median and mean rank of ``query`` rows (N, E) against ``cand`` rows (N, E), both normalised."""
    n = len(query)
    g = np.empty(n, dtype=np.int64)
    w = np.empty(n, dtype=np.int64)
    c = np.empty(n, dtype=np.int64)
    rows = max(1, _CHUNK_ELEMENTS // n)
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        sim = query[start:stop] @ cand.T  # (rows, N) cosine similarities
        hit = group[start:stop, None] == group[None, :]
        best = np.where(hit, sim, -np.inf).max(axis=1, keepdims=True)
        tied = np.abs(sim - best) <= tie_tol
        g[start:stop] = np.sum((sim > best + tie_tol) & ~hit, axis=1)
        w[start:stop] = np.sum(tied & ~hit, axis=1)
        c[start:stop] = np.sum(tied & hit, axis=1)
    rank = 1.0 + g + w / (c + 1.0)
    out = {f"recall@{k}": float(_recall_at(k, g, w, c).mean()) for k in ks}
    out["median_rank"] = float(np.median(rank))
    out["mean_rank"] = float(rank.mean())
    return out


def retrieval_metrics(image: Any, text: Any, ids: Sequence[Any] | None = None, ks: Sequence[int] = DEFAULT_KS,
                      *, tie_tol: float = 1e-6) -> dict[str, Any]:
    """Volume-to-report (``image_to_text``) and report-to-volume (``text_to_image``) retrieval.

    Args:
        image: (N, E) image embeddings (numpy or torch), row i = volume i; L2-normalised here.
        text: (N, E) text embeddings, row i = the report of volume i.
        ids: (N,) group of each row (scan ids: a retrieved item is a hit when its group equals the query's);
            None = each row its own group (exact-row rule).
        ks: the K of Recall@K.
        tie_tol: cosine similarities closer than this are ties (see the module docstring).

    Returns:
        ``{"n", "n_groups", "ks", "ks_at_least_n", "image_to_text": {"recall@K"..., "median_rank", "mean_rank"},
        "text_to_image": {...}}``; ranks are 1-based (expected ranks under random tie-breaking).
    """
    img = _normalise(_to_numpy(image), "image")
    txt = _normalise(_to_numpy(text), "text")
    if img.shape != txt.shape:
        raise ValueError(f"image {img.shape} and text {txt.shape} embeddings differ in shape")
    n = len(img)
    if n == 0:
        raise ValueError("no embeddings to retrieve from")
    if ids is None:
        group = np.arange(n)
    else:
        if len(ids) != n:
            raise ValueError(f"{len(ids)} ids for {n} embeddings")
        group = np.unique(np.asarray([str(i) for i in ids]), return_inverse=True)[1]
    ks = [int(k) for k in ks]
    if any(k < 1 for k in ks):
        raise ValueError(f"K must be >= 1, got {ks}")
    at_least_n = [k for k in ks if k >= n]
    if at_least_n:
        log.info("Recall@K with K >= N = %d is 1 by construction: K = %s", n, at_least_n)
    return {
        "n": n,
        "n_groups": int(group.max()) + 1,
        "ks": ks,
        "ks_at_least_n": at_least_n,
        "image_to_text": _direction(img, txt, group, ks, tie_tol),
        "text_to_image": _direction(txt, img, group, ks, tie_tol),
    }


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor (bf16 has no numpy dtype)
        return x.detach().float().cpu().numpy()
    return np.asarray(x)


def _group_ids(volumes: Sequence[str], same_scan: bool) -> list[str]:
    """Scan id of each volume; a name that is not CT-RATE style is its own group."""
    if not same_scan:
        return list(volumes)
    out, odd = [], 0
    for v in volumes:
        try:
            out.append(scan_id(v))
        except ValueError:
            out.append(v)
            odd += 1
    if odd:
        log.info("%d volume name(s) are not CT-RATE style (split_patient_scan_reconstruction): "
                 "each is its own scan for retrieval", odd)
    return out


def read_embeddings(path: str | Path) -> tuple[list[str], list[str], dict[str, np.ndarray]]:
    """Read an ``fvlm embed`` file -> (volumes, anatomies, tensors as numpy), checking the layout."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"embeddings file not found: {path}")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {key: _to_numpy(f.get_tensor(key)) for key in f.keys()}
    try:
        volumes = json.loads(meta["volumes"])
        anatomies = json.loads(meta["anatomies"])
    except KeyError as e:
        raise ValueError(f"{path}: metadata entry {e} missing (expected JSON lists 'volumes' and 'anatomies')") from e
    n = len(volumes)
    for a in anatomies:
        for kind, ndim in (("image", 2), ("text", 2), ("valid", 1)):
            key = f"{kind}/{a}"
            if key not in tensors:
                raise ValueError(f"{path}: tensor {key!r} missing (has {sorted(tensors)[:8]})")
            if tensors[key].ndim != ndim or tensors[key].shape[0] != n:
                raise ValueError(f"{path}: tensor {key!r} has shape {tensors[key].shape}, expected {ndim}-d "
                                 f"with {n} rows (one per volume)")
        tensors[f"valid/{a}"] = tensors[f"valid/{a}"].astype(bool)
    return list(volumes), list(anatomies), tensors


def retrieval_from_file(path: str | Path, *, ks: Sequence[int] = DEFAULT_KS, same_scan: bool = True,
                        tie_tol: float = 1e-6) -> dict[str, Any]:
    """Retrieval per anatomy and for the anatomy-mean volume embedding of an ``fvlm embed`` file.

    Returns ``{"file", "n_volumes", "grouping", "ties", "anatomies": {anatomy: retrieval_metrics(...)},
    "mean": retrieval_metrics(...)}``; an anatomy is evaluated over the volumes where it is valid.
    """
    volumes, anatomies, tensors = read_embeddings(path)
    groups = np.asarray(_group_ids(volumes, same_scan), dtype=object)
    per: dict[str, Any] = {}
    img_sum = txt_sum = None
    count = np.zeros(len(volumes))
    for a in anatomies:
        valid = tensors[f"valid/{a}"]
        img, txt = tensors[f"image/{a}"], tensors[f"text/{a}"]
        if valid.sum() == 0:
            log.warning("%s: anatomy %s is valid in no volume; skipped", path, a)
            continue
        per[a] = retrieval_metrics(img[valid], txt[valid], ids=list(groups[valid]), ks=ks, tie_tol=tie_tol)
        img_n = np.where(valid[:, None], _normalise(np.where(valid[:, None], img, 1.0), f"{path} image/{a}"), 0.0)
        txt_n = np.where(valid[:, None], _normalise(np.where(valid[:, None], txt, 1.0), f"{path} text/{a}"), 0.0)
        img_sum = img_n if img_sum is None else img_sum + img_n
        txt_sum = txt_n if txt_sum is None else txt_sum + txt_n
        count += valid
    if img_sum is None:
        raise ValueError(f"{path}: no anatomy is valid in any volume")
    keep = count > 0
    if (~keep).any():
        log.warning("%s: %d volume(s) have no valid anatomy and are left out of the mean retrieval",
                    path, int((~keep).sum()))
    mean = retrieval_metrics(img_sum[keep] / count[keep, None], txt_sum[keep] / count[keep, None],
                             ids=list(groups[keep]), ks=ks, tie_tol=tie_tol)
    return {
        "file": str(path),
        "n_volumes": len(volumes),
        "grouping": "scan" if same_scan else "volume",
        "ties": "expected under random tie-breaking",
        "anatomies": per,
        "mean": mean,
    }


def format_retrieval_table(result: dict[str, Any]) -> str:
    """Text table: one row per anatomy and ``mean``, both directions, Recall@K in % and median rank."""
    rows = {**result["anatomies"], "mean": result["mean"]}
    ks = result["mean"]["ks"]
    width = max(len(name) for name in rows) + 2
    head = f"{'embedding':<{width}} {'dir':<4} {'n':>6} " + " ".join(f"{'R@' + str(k):>7}" for k in ks)
    head += f" {'med.rank':>9}"
    lines = [head, "-" * len(head)]
    for name, r in rows.items():
        for short, key in (("v2r", "image_to_text"), ("r2v", "text_to_image")):
            vals = " ".join(f"{100 * r[key][f'recall@{k}']:>6.1f}{'*' if k in r['ks_at_least_n'] else ' '}"
                            for k in ks)
            lines.append(f"{name:<{width}} {short:<4} {r['n']:>6} {vals} {r[key]['median_rank']:>9.1f}")
    lines.append(f"v2r = volume-to-report, r2v = report-to-volume; hit = same {result['grouping']}; "
                 "ties broken at random (expected); * K >= N (trivially 100 %)")
    return "\n".join(lines)


__all__ = ["DEFAULT_KS", "format_retrieval_table", "read_embeddings", "retrieval_from_file", "retrieval_metrics"]
