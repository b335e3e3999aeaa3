"""Groups of near-duplicate images: connected components of the graph ``cos(x_i, x_j) >= threshold``.

Pairs are found with chunked inner products of the L2-normalised vectors (exact, no index), and
joined with a union-find. Groups are transitive: if A ~ B and B ~ C, A, B and C form one group
even when ``cos(A, C)`` is below the threshold; each group reports its smallest and largest
linked similarity.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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
def duplicate_groups(vectors: torch.Tensor, threshold: float, chunk: int = 1024) -> list[DuplicateGroup]:
    """Near-duplicate groups of ``vectors`` (N, F), L2-normalised, largest groups first.

    Args:
        vectors: float32 (N, F).
        threshold: cosine similarity at or above which two images are linked.
        chunk: rows per matrix product (bounds memory to chunk x N floats).

    Returns:
        The groups of at least two rows, by size (descending) then first row.
    """
    n = vectors.shape[0]
    parent = list(range(n))
    low: dict[int, float] = {}
    high: dict[int, float] = {}
    pairs: list[tuple[int, int, float]] = []
    for start in range(0, n, chunk):
        similarity = vectors[start : start + chunk] @ vectors.t()  # (chunk, N)
        rows = torch.arange(start, start + similarity.shape[0]).unsqueeze(1)
        linked = (similarity >= threshold) & (torch.arange(n).unsqueeze(0) > rows)  # upper triangle only
        i, j = linked.nonzero(as_tuple=True)
        values = similarity[i, j].tolist()
        for a, b, s in zip((i + start).tolist(), j.tolist(), values):
            pairs.append((a, b, s))
            ra, rb = _find(parent, a), _find(parent, b)
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)
    members: dict[int, list[int]] = {}
    for i in range(n):
        members.setdefault(_find(parent, i), []).append(i)
    for a, _, s in pairs:
        root = _find(parent, a)
        low[root] = min(low.get(root, s), s)
        high[root] = max(high.get(root, s), s)
    groups = [DuplicateGroup(rows, low[root], high[root]) for root, rows in members.items() if len(rows) > 1]
    return sorted(groups, key=lambda g: (-len(g.rows), g.rows[0]))
