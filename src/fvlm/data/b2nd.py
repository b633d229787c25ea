"""The array container of the processed store: blosc2 NDArray files (``.b2nd``), read lazily and written with the
store's chunk layout and codecs (see :mod:`fvlm.data.store` for the layout around them).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

#: z depth of a stored chunk (each chunk spans the full y/x extent): a crop decompresses every chunk its z range
#: touches; 16 slices keep the waste at the crop's z ends small (112-slice paper crop) and chunks about 1-4 MB
CHUNK_SLICES = 16
#: blosc2 compression of the stored arrays. LZ4 + byte shuffle decodes a 112 x 256 x 352 int16 crop in about
#: 10-15 ms on one core; zstd (+ bytedelta) saves 15-35 % of the bytes at about twice the decode time. The mask
#: (mostly long runs of equal bytes) compresses to about 0.02 bytes per voxel without a filter; a filter only costs
#: time.
CODECS: dict[str, dict[str, Any]] = {
    "image": {"codec": "lz4", "clevel": 5, "filters": ["shuffle"]},
    "mask": {"codec": "lz4", "clevel": 5, "filters": []},
}


def _blosc2():
    """The blosc2 module, imported on first use (its import costs about 0.5 s, not needed for format-1 stores)."""
    import blosc2

    return blosc2


class CompressedArray:
    """A read-only (D, H, W) array in a ``.b2nd`` file (blosc2 NDArray), decompressed on indexing.

    Supports ``shape``, ``dtype``, ``ndim``, ``len()``, ``np.asarray(arr)`` (decompresses everything) and
    numpy-style basic indexing (ints, slices with any step, ``...``), which decompresses only the chunks the
    selection touches and returns a new ``np.ndarray``; other keys (integer or boolean arrays) decompress
    the whole array first. The file is memory-mapped; decompression runs in the calling thread (no blosc2
    thread pool, so it is safe in forked DataLoader workers; parallelism comes from the workers).
    """

    def __init__(self, path: str | Path):
        blosc2 = _blosc2()
        self.path = Path(path)
        try:
            self._array = blosc2.open(str(self.path), mode="r", mmap_mode="r", dparams=blosc2.DParams(nthreads=1))
        except RuntimeError as e:  # blosc2 reports a missing trailer (truncated file) or a bad header this way
            raise ValueError(f"{self.path}: not a readable blosc2 .b2nd array ({e})") from e
        if not hasattr(self._array, "chunks") or len(self._array.shape) != 3:
            raise ValueError(f"{self.path}: expected a 3-D blosc2 NDArray, got {type(self._array).__name__}")
        self.shape: tuple[int, ...] = tuple(int(n) for n in self._array.shape)
        self.dtype = np.dtype(self._array.dtype)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    @property
    def chunks(self) -> tuple[int, ...]:
        return tuple(int(c) for c in self._array.chunks)

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"CompressedArray({str(self.path)!r}, shape={self.shape}, dtype={self.dtype})"

    def __getitem__(self, key: Any) -> np.ndarray:
        keys = key if isinstance(key, tuple) else (key,)
        if all(k is Ellipsis or isinstance(k, (slice, int, np.integer)) for k in keys):
            out = self._array[key]
        else:  # advanced indexing: decompress once, let numpy index
            out = self._array[...][key]
        return np.asarray(out)

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        out = self[...]
        return out if dtype is None else out.astype(dtype, copy=False)

    def __reduce__(self):
        # pickled by path (spawn / forkserver DataLoader workers): the receiving process opens the file itself
        return (CompressedArray, (self.path,))


def write_b2nd(path: Path, array: np.ndarray, codec: dict[str, Any],
                chunks: tuple[int, int, int] | None = None) -> dict[str, Any]:
    """Write a (D, H, W) array as a .b2nd file; returns its storage record for meta.json.

    ``chunks=None``: chunks of :data:`CHUNK_SLICES` full slices split into one-slice blocks (the store's
    layout); otherwise the given chunk shape with blocks chosen by blosc2. Compression runs in the calling
    thread (preprocessing is parallel over processes).
    """
    blosc2 = _blosc2()
    d, h, w = array.shape
    if chunks is None:
        chunks, blocks = (min(d, CHUNK_SLICES), h, w), (1, h, w)
    else:
        chunks, blocks = tuple(min(int(c), n) for c, n in zip(chunks, array.shape, strict=True)), None
    filters = [blosc2.Filter[f.upper()] for f in codec["filters"]] or [blosc2.Filter.NOFILTER]
    cparams = blosc2.CParams(codec=blosc2.Codec[codec["codec"].upper()], clevel=int(codec["clevel"]),
                             filters=filters, typesize=array.dtype.itemsize, nthreads=1)
    arr = blosc2.asarray(np.ascontiguousarray(array), urlpath=str(path), mode="w", chunks=chunks, blocks=blocks,
                         cparams=cparams)
    record = {"file": path.name, **codec, "chunks": [int(c) for c in arr.chunks],
              "blocks": [int(b) for b in arr.blocks]}
    del arr  # closes the frame before the directory is renamed
    return record
