"""A folder's images decoded on demand: the ``images`` of an :class:`ImageDataset` that is not held in memory.

Evaluation, the kNN monitor, DeepCluster's clustering and the report read a data set in slices
(``images[start:start + 512]``) or by index (``images[indices]``). :class:`FolderImages` answers
those reads by decoding just the files asked for, with the evaluation preprocessing of the
in-memory path (shorter side scaled to S, centred S x S square: :func:`nnclr.data.crops.decode_eval`),
on a few threads (Pillow releases the GIL while decoding). Memory is what one slice needs,
whatever the number of files.

:meth:`FolderImages.select` takes a subset (a boolean mask or indices) without decoding it, and
:func:`select` does the same for an in-memory tensor or a :class:`FolderImages`.
:func:`prefetched` yields ``images[key]`` for a sequence of keys, decoding the next batch on a
background thread while the caller computes on the current one (for a tensor: plain indexing).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from nnclr.data.crops import DecodeError, decode_eval, read_image_bytes, unreadable_reason
from nnclr.data.index import FileIndex

_THREADS = 2


class FolderImages:
    """uint8 ``(N, 3, S, S)`` images of a file index, decoded when sliced.

    Supports ``len``, ``.shape``, ``.dtype``, ``.ndim`` and indexing by an int, a slice, or an
    integer/boolean tensor or array (returning a decoded ``uint8`` tensor). An unreadable file
    decodes to a black image and is counted in ``unreadable`` (warned once per file).

    Args:
        index: The files.
        size: Output side S.
    """

    dtype = torch.uint8
    ndim = 4

    def __init__(self, index: FileIndex, size: int, positions: np.ndarray | None = None) -> None:
        self.index, self.size = index, int(size)
        # the index entries these images are, in order: all of them, or a subset (a shard, a selection)
        self.positions = np.arange(len(index), dtype=np.int64) if positions is None else \
            np.ascontiguousarray(positions, dtype=np.int64)
        self.unreadable: dict[str, str] = {}

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self), 3, self.size, self.size))

    def __len__(self) -> int:
        return len(self.positions)

    def rows(self, start: int, stop: int) -> FolderImages:
        """The images ``[start, stop)`` of these, still decoded on demand (a shard for one process)."""
        return self._view(self.positions[start:stop])

    def select(self, key: torch.Tensor | np.ndarray | Sequence[int]) -> FolderImages:
        """The images ``self[key]`` (a boolean mask or integer indices), not decoded: a subset view."""
        return self._view(self._index_positions(self._key_positions(key)))

    def _view(self, positions: np.ndarray) -> FolderImages:
        view = FolderImages(self.index, self.size, positions)
        view.unreadable = self.unreadable  # one warning per file, whichever view decodes it
        return view

    def contiguous(self) -> FolderImages:
        return self

    def __getitem__(self, key: int | slice | torch.Tensor | np.ndarray | Sequence[int]) -> torch.Tensor:
        n = len(self)
        if isinstance(key, (int, np.integer)) or (isinstance(key, torch.Tensor) and key.ndim == 0
                                                  and not key.dtype.is_floating_point and key.dtype != torch.bool):
            i = int(key)
            if not -n <= i < n:
                raise IndexError(f"index {i} out of range for {n} images")
            return self._decode(self._index_positions(np.array([i % n])).tolist())[0]
        return self._decode(self._index_positions(self._key_positions(key)).tolist())

    def _key_positions(self, key: slice | torch.Tensor | np.ndarray | Sequence[int]) -> np.ndarray:
        """Positions (among these images) of a slice, a boolean mask or integer indices."""
        n = len(self)
        if isinstance(key, slice):
            return np.arange(*key.indices(n), dtype=np.int64)
        array = key.cpu().numpy() if isinstance(key, torch.Tensor) else np.asarray(key)
        if array.dtype == bool:
            if array.shape != (n,):
                raise IndexError(f"boolean mask of shape {array.shape} for {n} images")
            return np.flatnonzero(array)
        array = array.reshape(-1).astype(np.int64)
        if array.size and (array.min() < -n or array.max() >= n):
            raise IndexError(f"index out of range for {n} images")
        return array % n if n else array

    def _index_positions(self, positions: np.ndarray) -> np.ndarray:
        """Entries of the file index of positions among these images."""
        return self.positions[positions]

    def _decode(self, positions: list[int]) -> torch.Tensor:
        """The images at ``positions``, decoded. Every decode goes through here: the tests patch it to count the
        images decoded (a seam)."""
        out = torch.zeros((len(positions), 3, self.size, self.size), dtype=torch.uint8)
        paths = [self.index.path(i) for i in positions]
        with ThreadPoolExecutor(max_workers=_THREADS) as pool:
            for row, (path, array) in enumerate(zip(paths, pool.map(self._load, paths))):
                if isinstance(array, str):
                    self._warn(path, array)
                else:
                    out[row] = array
        return out

    def _load(self, path: str) -> torch.Tensor | str:
        """The decoded image, or why it cannot be read (only regular files are opened: no FIFO blocks)."""
        try:
            return decode_eval(read_image_bytes(path), self.size)
        except (OSError, DecodeError) as error:
            return unreadable_reason(error)

    def _warn(self, path: str, reason: str) -> None:
        if path not in self.unreadable:
            self.unreadable[path] = reason
            print(f"nnclr: warning: {path}: cannot read this image ({reason}); used a black image",
                  file=sys.stderr)

    def __repr__(self) -> str:
        return f"FolderImages({self.index.root}, n={len(self)}, size={self.size})"


def select(images: torch.Tensor | FolderImages, key: torch.Tensor) -> torch.Tensor | FolderImages:
    """``images[key]`` for a tensor; for :class:`FolderImages` the same subset as a view, not decoded."""
    if isinstance(images, FolderImages):
        return images.select(key)
    return images[key]


def prefetched(images: torch.Tensor | FolderImages, keys: Iterable[slice | torch.Tensor]) -> Iterator[torch.Tensor]:
    """``images[key]`` for each key in turn.

    For :class:`FolderImages` the next key is decoded on a background thread while the caller
    works on the current batch (at most two batches decoded at a time); a tensor is just indexed.
    """
    if not isinstance(images, FolderImages):
        for key in keys:
            yield images[key]
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="nnclr-prefetch") as pool:
        pending = None
        for key in keys:
            future = pool.submit(images.__getitem__, key)
            if pending is not None:
                yield pending.result()
            pending = future
        if pending is not None:
            yield pending.result()


def batch_slices(n: int, batch_size: int) -> list[slice]:
    """``[slice(0, b), slice(b, 2b), ...]`` covering ``range(n)``."""
    return [slice(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]
