"""``duplicate_groups`` against a slow reference: every pair compared, groups by breadth-first search."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nnclr.use import duplicates
from nnclr.use.duplicates import duplicate_groups


def _reference(vectors: torch.Tensor, threshold: float) -> list[tuple[list[int], float, float]]:
    """Connected components of the graph ``cos(x_i, x_j) >= threshold``, one pair at a time."""
    n = vectors.shape[0]
    similarity = vectors @ vectors.t()
    neighbours = [[j for j in range(n) if j != i and similarity[i, j] >= threshold] for i in range(n)]
    seen, groups = set(), []
    for first in range(n):
        if first in seen or not neighbours[first]:
            continue
        component, frontier = {first}, [first]
        while frontier:
            i = frontier.pop()
            for j in neighbours[i]:
                if j not in component:
                    component.add(j)
                    frontier.append(j)
        seen |= component
        rows = sorted(component)
        linked = [float(similarity[i, j]) for i in rows for j in neighbours[i] if j > i]
        groups.append((rows, min(linked), max(linked)))
    return sorted(groups, key=lambda g: (-len(g[0]), g[0][0]))


@pytest.mark.parametrize("max_pairs", [1, 50, duplicates.MAX_PAIRS])
@pytest.mark.parametrize("chunk", [1, 7, 64, None])
@pytest.mark.parametrize("threshold", [0.5, 0.9, 0.99])
def test_groups_equal_the_pairwise_reference(chunk: int | None, threshold: float, max_pairs: int,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Also when the linked pairs of a block are joined a few at a time (``MAX_PAIRS``: bounded memory)."""
    monkeypatch.setattr(duplicates, "MAX_PAIRS", max_pairs)
    generator = torch.Generator().manual_seed(3)
    centres = F.normalize(torch.randn(12, 16, generator=generator), dim=1)
    members = centres.repeat_interleave(10, dim=0) + 0.15 * torch.randn(120, 16, generator=generator)
    vectors = F.normalize(members[torch.randperm(120, generator=generator)], dim=1)
    got = [(g.rows, g.min_similarity, g.max_similarity) for g in duplicate_groups(vectors, threshold, chunk=chunk)]
    expected = _reference(vectors, threshold)
    assert [rows for rows, _, _ in got] == [rows for rows, _, _ in expected]
    for (_, low, high), (_, low_ref, high_ref) in zip(got, expected):
        assert low == pytest.approx(low_ref, abs=1e-6) and high == pytest.approx(high_ref, abs=1e-6)


def test_every_row_linked_is_one_group_spanning_all_blocks() -> None:
    vectors = F.normalize(torch.ones(50, 4) + 1e-3 * torch.randn(50, 4), dim=1)
    groups = duplicate_groups(vectors, threshold=0.0, chunk=3)
    assert [g.rows for g in groups] == [list(range(50))]
