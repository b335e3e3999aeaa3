"""Groups of near-duplicate images: connected components of the graph ``cos(x_i, x_j) >= threshold``.

Pairs are found with chunked inner products of the L2-normalised vectors (exact, no index), and
joined with a union-find. Groups are transitive: if A ~ B and B ~ C, A, B and C form one group
even when ``cos(A, C)`` is below the threshold; each group reports its smallest and largest
linked similarity.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from nnclr.use.search import rows_per_chunk


@dataclass
class DuplicateGroup:
    """Rows of one group (sorted), and the smallest / largest similarity among its linked pairs."""

    rows: list[int]
    min_similarity: float
    max_similarity: float


def _find(parent: list[int], i: int) -> int:
    while parent[i] != i:
        parent[i] = parent[parent[i]]  # path halving
        i = parent[i]
    return i


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
    parent = list(range(n))
    firsts: list[np.ndarray] = []  # the first row of every linked pair
    similarities: list[np.ndarray] = []  # and its similarity
    starts = range(0, n, chunk)
    for start in tqdm(starts, desc="comparing", unit="block", file=sys.stderr, disable=not progress or len(starts) < 8):
        similarity = vectors[start : start + chunk] @ vectors.t()  # (chunk, N)
        rows = torch.arange(start, start + similarity.shape[0]).unsqueeze(1)
        linked = (similarity >= threshold) & (torch.arange(n).unsqueeze(0) > rows)  # upper triangle only
        i, j = linked.nonzero(as_tuple=True)
        firsts.append((i + start).numpy())
        similarities.append(similarity[i, j].float().numpy())
        for a, b in zip((i + start).tolist(), j.tolist()):
            ra, rb = _find(parent, a), _find(parent, b)
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)
    roots = np.array([_find(parent, i) for i in range(n)], dtype=np.int64)
    low, high = np.full(n, np.inf), np.full(n, -np.inf)  # per root: smallest / largest linked similarity
    if firsts:
        pair_roots, values = roots[np.concatenate(firsts)], np.concatenate(similarities)
        np.minimum.at(low, pair_roots, values)
        np.maximum.at(high, pair_roots, values)
    members: dict[int, list[int]] = {}
    for i, root in enumerate(roots.tolist()):
        members.setdefault(root, []).append(i)
    groups = [
        DuplicateGroup(rows, float(low[root]), float(high[root])) for root, rows in members.items() if len(rows) > 1
    ]
    return sorted(groups, key=lambda g: (-len(g.rows), g.rows[0]))
