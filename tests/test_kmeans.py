"""Spherical k-means: recovery of separated clusters, empty-cluster reseeding, determinism."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nnclr.kmeans import assign, spherical_kmeans


def _blobs(k: int, per: int, dim: int, noise: float, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(k, dim, generator=g), dim=1)
    labels = torch.arange(k).repeat_interleave(per)
    x = centres[labels] + noise * torch.randn(k * per, dim, generator=g)
    perm = torch.randperm(k * per, generator=g)
    return x[perm], labels[perm]


def _same_partition(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when a and b are the same partition up to a relabelling (a bijection)."""
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


@pytest.mark.parametrize("k, dim, seed", [(2, 8, 0), (5, 16, 1), (12, 32, 2)])
def test_separated_clusters_recovered_exactly(k: int, dim: int, seed: int) -> None:
    x, labels = _blobs(k, per=30, dim=dim, noise=0.02, seed=seed)
    centroids, assignments = spherical_kmeans(x, k, generator=torch.Generator().manual_seed(seed))
    assert centroids.shape == (k, dim)
    assert torch.allclose(centroids.norm(dim=1), torch.ones(k), atol=1e-5)
    assert _same_partition(assignments, labels)
    assert torch.equal(assign(F.normalize(x, dim=1), centroids)[0], assignments)


def test_more_clusters_than_distinct_points_leaves_none_empty() -> None:
    x = torch.randn(3, 8).repeat(4, 1)  # 12 rows, 3 distinct
    _, assignments = spherical_kmeans(x, 7, iters=5)
    assert torch.bincount(assignments, minlength=7).min() >= 1


def test_pathological_init_is_reseeded() -> None:
    x, _ = _blobs(4, per=10, dim=8, noise=0.05, seed=3)
    init = F.normalize(torch.ones(4, 8), dim=1)  # four identical centroids
    centroids, assignments = spherical_kmeans(x, 4, init=init, iters=10)
    assert torch.bincount(assignments, minlength=4).min() >= 1
    assert torch.unique(centroids, dim=0).shape[0] == 4


def test_every_point_its_own_cluster_when_n_equals_k() -> None:
    x = torch.randn(9, 4)
    _, assignments = spherical_kmeans(x, 9, init=F.normalize(x[:1].repeat(9, 1), dim=1), iters=2)
    assert sorted(assignments.tolist()) == list(range(9))


def test_fewer_points_than_clusters_does_not_crash() -> None:
    centroids, assignments = spherical_kmeans(torch.randn(3, 4), 5, iters=3)
    assert centroids.shape == (5, 4) and assignments.shape == (3,)


def test_deterministic_given_generator() -> None:
    x = torch.randn(500, 16)
    a = spherical_kmeans(x, 10, generator=torch.Generator().manual_seed(7))
    b = spherical_kmeans(x, 10, generator=torch.Generator().manual_seed(7))
    c = spherical_kmeans(x, 10)
    d = spherical_kmeans(x, 10)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert torch.equal(c[0], d[0]) and torch.equal(c[1], d[1])


def test_does_not_touch_global_rng() -> None:
    x = torch.randn(50, 4)
    state = torch.get_rng_state()
    spherical_kmeans(x, 5)
    assert torch.equal(state, torch.get_rng_state())


def test_chunked_assignment_matches_unchunked() -> None:
    x = F.normalize(torch.randn(1000, 8), dim=1)
    c = F.normalize(torch.randn(17, 8), dim=1)
    full = assign(x, c, chunk_size=10_000)
    small = assign(x, c, chunk_size=7)
    assert torch.equal(full[0], small[0]) and torch.allclose(full[1], small[1])


def test_warm_start_at_the_solution_stays_put() -> None:
    x, _ = _blobs(3, per=20, dim=8, noise=0.02, seed=4)
    centroids, assignments = spherical_kmeans(x, 3)
    again, assignments2 = spherical_kmeans(x, 3, init=centroids, iters=3)
    assert torch.allclose(again, centroids, atol=1e-6) and torch.equal(assignments, assignments2)


def test_bad_init_shape_rejected() -> None:
    with pytest.raises(ValueError):
        spherical_kmeans(torch.randn(10, 4), 3, init=torch.randn(2, 4))


def test_autocast_does_not_change_the_result() -> None:
    x = torch.randn(300, 16)
    plain = spherical_kmeans(x, 6)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        under = spherical_kmeans(x, 6)
    assert torch.equal(plain[0], under[0]) and torch.equal(plain[1], under[1])
