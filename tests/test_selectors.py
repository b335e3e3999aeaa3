"""Positive selectors: where gradients flow, exact rows, k-means prototypes, fallbacks, state."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F

from nnclr.errors import UserError
from nnclr.selectors import (
    SELECTORS,
    InstanceSelector,
    KMeansSelector,
    NearestNeighbourSelector,
    Selection,
    build_selector,
)
from nnclr.support import SupportSet


def _support_with(rows: torch.Tensor, size: int | None = None) -> SupportSet:
    support = SupportSet(size or rows.shape[0], rows.shape[1])
    support.enqueue(rows, None, torch.arange(rows.shape[0]) + 1000, step=0)
    return support


def _clustered_support(k: int = 4, per: int = 25, dim: int = 8) -> tuple[SupportSet, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(k, dim, generator=g), dim=1)
    rows = centres.repeat_interleave(per, dim=0) + 0.01 * torch.randn(k * per, dim, generator=g)
    return _support_with(rows), centres


def test_instance_gradient_flows_into_z() -> None:
    z = torch.randn(5, 8, requires_grad=True)
    sel = InstanceSelector()(z, SupportSet(4, 8), indices=torch.arange(5), step=0)
    assert isinstance(sel, Selection)
    assert torch.allclose(sel.positives, F.normalize(z, dim=1))
    assert (sel.rows == -1).all() and torch.allclose(sel.similarity, torch.ones(5))
    sel.positives.sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0


def test_nn_returns_exact_stored_row_without_gradient() -> None:
    stored = torch.randn(20, 8)
    support = _support_with(stored)
    z = (stored[[3, 7, 11]] + 0.01 * torch.randn(3, 8)).requires_grad_()
    sel = NearestNeighbourSelector()(z, support, indices=torch.tensor([0, 1, 2]), step=1)
    assert sel.rows.tolist() == [3, 7, 11]
    assert torch.equal(sel.positives, support.embeddings[[3, 7, 11]])
    assert not sel.positives.requires_grad and not sel.similarity.requires_grad
    expected = (F.normalize(z.detach(), dim=1) * support.embeddings[[3, 7, 11]]).sum(dim=1)
    assert torch.allclose(sel.similarity, expected, atol=1e-6)


@pytest.mark.parametrize("low", [False, True])
def test_nn_excludes_self_copies(low: bool) -> None:
    stored = torch.randn(10, 8)
    support = _support_with(stored)  # indices 1000..1009
    selector = NearestNeighbourSelector(low_precision=low)
    sel = selector(stored[:4], support, indices=torch.arange(1000, 1004), step=1)
    assert (sel.rows >= 0).all() and (sel.rows != torch.arange(4)).all()
    sel = NearestNeighbourSelector(exclude_self=False, low_precision=low)(
        stored[:4], support, indices=torch.arange(1000, 1004), step=1)
    assert sel.rows.tolist() == [0, 1, 2, 3]


def test_nn_falls_back_to_detached_z_on_empty_support() -> None:
    z = torch.randn(3, 4, requires_grad=True)
    sel = NearestNeighbourSelector()(z, SupportSet(8, 4), indices=torch.arange(3), step=0)
    assert (sel.rows == -1).all()
    assert torch.allclose(sel.positives, F.normalize(z.detach(), dim=1))
    assert not sel.positives.requires_grad
    assert torch.allclose(sel.similarity, torch.ones(3))


def test_nn_mixed_fallback_when_only_self_is_stored() -> None:
    support = _support_with(torch.randn(1, 4), size=5)  # one row, sample index 1000
    z = torch.randn(2, 4)
    sel = NearestNeighbourSelector()(z, support, indices=torch.tensor([1000, 7]), step=1)
    assert sel.rows.tolist() == [-1, 0]
    assert torch.allclose(sel.positives[0], F.normalize(z[0], dim=0))
    assert torch.equal(sel.positives[1], support.embeddings[0])


def test_kmeans_falls_back_until_enough_rows() -> None:
    selector = KMeansSelector(num_prototypes=4, recluster_every=10, dim=8)
    support = _support_with(torch.randn(3, 8), size=10)  # 3 < K filled rows
    z = torch.randn(2, 8, requires_grad=True)
    sel = selector(z, support, indices=torch.arange(2), step=0)
    assert not selector.is_clustered and (sel.rows == -1).all()
    assert torch.allclose(sel.positives, F.normalize(z.detach(), dim=1))
    assert not sel.positives.requires_grad


def test_kmeans_positive_is_the_cluster_centre() -> None:
    support, centres = _clustered_support()
    selector = KMeansSelector(num_prototypes=4, recluster_every=10, dim=8)
    z = (centres + 0.05 * torch.randn(4, 8)).requires_grad_()
    sel = selector(z, support, indices=torch.arange(4), step=5)
    assert selector.is_clustered and int(selector.last_recluster) == 5
    means = F.normalize(support.embeddings.view(4, 25, 8).mean(dim=1), dim=1)  # stored clusters
    assert torch.allclose(sel.positives, means, atol=1e-5)
    assert torch.allclose(sel.positives, centres, atol=1e-2)
    assert not sel.positives.requires_grad and (sel.rows == -1).all()
    assert torch.allclose(sel.similarity, (F.normalize(z.detach(), dim=1) * sel.positives).sum(1),
                          atol=1e-6)
    assert selector.assign(z).unique().numel() == 4


def test_kmeans_reclusters_on_schedule() -> None:
    support, _ = _clustered_support()
    selector = KMeansSelector(num_prototypes=4, recluster_every=10, iters=2, dim=8)
    z = torch.randn(2, 8)
    for step, expected in [(0, 0), (5, 0), (9, 0), (10, 10), (19, 10), (25, 25)]:
        selector(z, support, indices=torch.arange(2), step=step)
        assert int(selector.last_recluster) == expected


def test_kmeans_state_dict_round_trip() -> None:
    support, centres = _clustered_support()
    selector = KMeansSelector(num_prototypes=4, recluster_every=10, dim=8)
    selector(torch.randn(2, 8), support, indices=torch.arange(2), step=3)
    state = selector.state_dict()
    assert set(state) == {"prototypes", "last_recluster"}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    fresh = KMeansSelector(num_prototypes=4, recluster_every=10, dim=8)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(fresh.prototypes, selector.prototypes)
    assert int(fresh.last_recluster) == 3
    z = centres + 0.05 * torch.randn(4, 8)
    a = selector(z, support, indices=torch.arange(4), step=7)
    b = fresh(z, support, indices=torch.arange(4), step=7)
    assert torch.equal(a.positives, b.positives) and int(fresh.last_recluster) == 3


def test_kmeans_is_deterministic() -> None:
    support, _ = _clustered_support()
    a = KMeansSelector(num_prototypes=4, dim=8)
    b = KMeansSelector(num_prototypes=4, dim=8)
    a.recluster(support, step=0)
    b.recluster(support, step=0)
    assert torch.equal(a.prototypes, b.prototypes)


def test_stateless_selectors_have_empty_state() -> None:
    assert InstanceSelector().state_dict() == {}
    assert NearestNeighbourSelector().state_dict() == {}


def test_build_selector() -> None:
    assert set(SELECTORS) == {"instance", "nn", "kmeans"}
    assert isinstance(build_selector("instance"), InstanceSelector)
    nn = build_selector("nn", topk=2, exclude_self=False)
    assert isinstance(nn, NearestNeighbourSelector) and nn.topk == 2 and not nn.exclude_self
    km = build_selector("kmeans", num_prototypes=3, dim=5)
    assert isinstance(km, KMeansSelector) and km.prototypes.shape == (3, 5)


def test_build_selector_errors_are_user_errors() -> None:
    with pytest.raises(UserError, match="instance, kmeans, nn"):
        build_selector("knn")
    with pytest.raises(UserError, match="nn"):
        build_selector("nn", bogus=1)
    with pytest.raises(UserError):
        build_selector("nn", topk=0)
