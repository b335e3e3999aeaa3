"""Groups of near-duplicate images: connected components of the graph ``cos(x_i, x_j) >= threshold``.

Pairs are found with chunked inner products of the L2-normalised vectors (exact, no index) and joined
block by block (connected components of at most :data:`MAX_PAIRS` pairs at a time over the components found
so far), so memory does not grow with the number of linked pairs (issue 23: keeping every pair took 2.3 GB for
10,000 images at a low threshold). Groups are transitive: if A ~ B and B ~ C, A, B and C form one group
even when ``cos(A, C)`` is below the threshold; each group reports its smallest and largest
linked similarity.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np
import torch
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from tqdm import tqdm

from nnclr.use.search import rows_per_chunk

MAX_PAIRS = 1 << 20  # linked pairs joined at once (about 60 bytes each while they are joined)


@dataclass
class DuplicateGroup:
    """Rows of one group (sorted), and the smallest / largest similarity among its linked pairs."""

    rows: list[int]
    min_similarity: float
    max_similarity: float


def _row_slices(counts: torch.Tensor, limit: int) -> list[slice]:
    """Consecutive row ranges whose ``counts`` (linked pairs per row) sum to at most ``limit`` (a row over the
    limit alone is one range)."""
    slices, start, total = [], 0, 0
    for row, count in enumerate(counts.tolist()):
        if total + count > limit and row > start:
            slices.append(slice(start, row))
            start, total = row, 0
        total += count
    return [*slices, slice(start, len(counts))]


def _merge(label: np.ndarray, low: np.ndarray, high: np.ndarray, a: np.ndarray, b: np.ndarray,
           similarity: np.ndarray) -> None:
    """Join the components of the linked rows ``a[k] ~ b[k]`` (their similarity ``similarity[k]``), in place.

    ``label`` (N,) names every row's component by its smallest row; ``low``/``high`` (N,) hold, at a
    component's name, the smallest / largest similarity of its linked pairs. The components touched by this
    block's pairs are joined with :func:`scipy.sparse.csgraph.connected_components` on the graph of their
    names, so memory is that of one block of pairs whatever the number of pairs in total.
    """
    a, b = label[a], label[b]
    names = np.unique(np.concatenate([a, b]))  # the components this block touches
    m = len(names)
    ia, ib = np.searchsorted(names, a), np.searchsorted(names, b)
    graph = coo_matrix((np.ones(len(ia), dtype=np.int8), (ia, ib)), shape=(m, m))
    count, component = connected_components(graph, directed=False)
    joined = np.full(count, label.shape[0], dtype=np.int64)
    np.minimum.at(joined, component, names)  # a joined component is named by its smallest row
    new_name = joined[component]  # (m,): each touched component's new name
    np.minimum.at(low, new_name, low[names])
    np.maximum.at(high, new_name, high[names])
    np.minimum.at(low, new_name[ia], similarity)
    np.maximum.at(high, new_name[ia], similarity)
    where = np.searchsorted(names, label).clip(max=m - 1)
    touched = names[where] == label
    label[touched] = new_name[where[touched]]


@torch.no_grad()
def duplicate_groups(
    vectors: torch.Tensor, threshold: float, chunk: int | None = None, progress: bool = False
) -> list[DuplicateGroup]:
    """Near-duplicate groups of ``vectors`` (N, F), L2-normalised, largest groups first.

    Args:
        vectors: float32 (N, F).
        threshold: cosine similarity at or above which two images are linked.
        chunk: rows per matrix product (default: memory bounded, see :func:`nnclr.use.search.rows_per_chunk`).
        progress: show a progress bar (on large sets).

    Returns:
        The groups of at least two rows, by size (descending) then first row.
    """
    n = vectors.shape[0]
    chunk = chunk or rows_per_chunk(n)
    label = np.arange(n, dtype=np.int64)  # every row's component, named by its smallest row
    low, high = np.full(n, np.inf), np.full(n, -np.inf)  # per component: smallest / largest linked similarity
    starts = range(0, n, chunk)
    for start in tqdm(starts, desc="comparing", unit="block", file=sys.stderr, disable=not progress or len(starts) < 8):
        similarity = vectors[start : start + chunk] @ vectors.t()  # (chunk, N)
        rows = torch.arange(start, start + similarity.shape[0]).unsqueeze(1)
        linked = (similarity >= threshold) & (torch.arange(n).unsqueeze(0) > rows)  # upper triangle only
        for part in _row_slices(linked.sum(dim=1), MAX_PAIRS):  # at most MAX_PAIRS pairs held at once
            i, j = linked[part].nonzero(as_tuple=True)
            if len(i):
                i += part.start
                _merge(label, low, high, (i + start).numpy(), j.numpy(), similarity[i, j].double().numpy())
    roots = label
    members: dict[int, list[int]] = {}
    for i, root in enumerate(roots.tolist()):
        members.setdefault(root, []).append(i)
    groups = [
        DuplicateGroup(rows, float(low[root]), float(high[root])) for root, rows in members.items() if len(rows) > 1
    ]
    return sorted(groups, key=lambda g: (-len(g.rows), g.rows[0]))
