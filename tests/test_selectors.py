"""Selectors: where gradients flow, exact rows, top-k choices, k-means prototypes, fallbacks, state, hooks."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F

from nnclr.errors import UserError
from nnclr.selectors import (
    NearestNeighbourSelector,
    NeighboursSelector,
    PrototypeSelector,
    Selection,
    Selector,
    self_positive,
)
from nnclr.support import SupportSet


def _support_with(rows: torch.Tensor, size: int | None = None) -> SupportSet:
    support = SupportSet(size or rows.shape[0], rows.shape[1])
    support.enqueue(rows, None, torch.arange(rows.shape[0]) + 1000, step=0)
    return support


def _u(b: int, value: float = 0.0) -> torch.Tensor:
    return torch.full((b,), value)


def test_self_positive_is_detached_z() -> None:
    z = torch.randn(5, 8, requires_grad=True)
    sel = self_positive(z)
    assert isinstance(sel, Selection)
    assert torch.allclose(sel.positives, F.normalize(z.detach(), dim=1)) and not sel.positives.requires_grad
    assert (sel.rows == -1).all() and torch.allclose(sel.similarity, torch.ones(5))


def test_nn_returns_exact_stored_row_without_gradient() -> None:
    stored = torch.randn(20, 8)
    support = _support_with(stored)
    z = (stored[[3, 7, 11]] + 0.01 * torch.randn(3, 8)).requires_grad_()
    sel = NearestNeighbourSelector()(z, support, indices=torch.tensor([0, 1, 2]), uniform=_u(3))
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
    sel = selector(stored[:4], support, indices=torch.arange(1000, 1004), uniform=_u(4))
    assert (sel.rows >= 0).all() and (sel.rows != torch.arange(4)).all()
    sel = NearestNeighbourSelector(exclude_self=False, low_precision=low)(
        stored[:4], support, indices=torch.arange(1000, 1004), uniform=_u(4))
    assert sel.rows.tolist() == [0, 1, 2, 3]


def test_nn_falls_back_to_detached_z_on_empty_support() -> None:
    z = torch.randn(3, 4, requires_grad=True)
    sel = NearestNeighbourSelector()(z, SupportSet(8, 4), indices=torch.arange(3), uniform=_u(3))
    assert (sel.rows == -1).all()
    assert torch.allclose(sel.positives, F.normalize(z.detach(), dim=1))
    assert not sel.positives.requires_grad
    assert torch.allclose(sel.similarity, torch.ones(3))


def test_nn_mixed_fallback_when_only_self_is_stored() -> None:
    support = _support_with(torch.randn(1, 4), size=5)  # one row, sample index 1000
    z = torch.randn(2, 4)
    sel = NearestNeighbourSelector()(z, support, indices=torch.tensor([1000, 7]), uniform=_u(2))
    assert sel.rows.tolist() == [-1, 0]
    assert torch.allclose(sel.positives[0], F.normalize(z[0], dim=0))
    assert torch.equal(sel.positives[1], support.embeddings[0])


def test_topk_choice_follows_the_uniforms() -> None:
    """topk > 1: the uniform u picks candidate floor(u * k) of the k nearest, in order of similarity."""
    stored = F.normalize(torch.randn(50, 8), dim=1)
    support = _support_with(stored)
    z = torch.randn(6, 8)
    order = (F.normalize(z, dim=1) @ stored.T).argsort(dim=1, descending=True)  # (6, 50)
    selector = NearestNeighbourSelector(topk=3, exclude_self=False)
    for value, rank in ((0.0, 0), (0.34, 1), (0.99, 2)):
        sel = selector(z, support, indices=torch.arange(6), uniform=_u(6, value))
        assert sel.rows.tolist() == order[:, rank].tolist()
    mixed = selector(z, support, indices=torch.arange(6), uniform=torch.tensor([0.0, 0.5, 0.9, 0.0, 0.5, 0.9]))
    assert mixed.rows.tolist() == [order[i, r].item() for i, r in enumerate([0, 1, 2, 0, 1, 2])]


def _clusters(k: int = 4, per: int = 64, dim: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(k, dim, generator=g), dim=1)
    rows = centres.repeat_interleave(per, dim=0) + 0.02 * torch.randn(k * per, dim, generator=g)
    return rows[torch.randperm(k * per, generator=g)], centres


def test_prototypes_fall_back_to_detached_z_until_initialised() -> None:
    selector = PrototypeSelector(num_prototypes=4, dim=8)
    z = torch.randn(2, 8, requires_grad=True)
    sel = selector(z, None, indices=torch.arange(2), uniform=_u(2))
    assert not selector.kmeans.is_initialised and (sel.rows == -1).all()
    assert torch.allclose(sel.positives, F.normalize(z.detach(), dim=1)) and not sel.positives.requires_grad


def test_prototype_positive_is_the_nearest_prototype_near_the_cluster_centre() -> None:
    rows, centres = _clusters()
    selector = PrototypeSelector(num_prototypes=4, dim=8)
    generator = torch.Generator().manual_seed(0)
    for batch in rows.split(64):
        selector.after_step(batch, generator)
    assert selector.kmeans.is_initialised
    z = (centres + 0.05 * torch.randn(4, 8)).requires_grad_()
    sel = selector(z, None, indices=torch.arange(4), uniform=_u(4))
    nearest = (F.normalize(z.detach(), dim=1) @ F.normalize(selector.prototypes, dim=1).T).argmax(dim=1)
    assert torch.equal(sel.positives, selector.prototypes[nearest])
    assert nearest.unique().numel() == 4  # each cluster has its own prototype
    assert torch.allclose(F.normalize(sel.positives, dim=1), centres, atol=0.05)
    assert not sel.positives.requires_grad and (sel.rows == -1).all()
    assert torch.allclose(sel.similarity, (F.normalize(z.detach(), dim=1) * sel.positives).sum(1), atol=1e-5)


def test_prototype_state_round_trip_continues_identically() -> None:
    rows, _ = _clusters()
    a = PrototypeSelector(num_prototypes=4, dim=8)
    a.after_step(rows[:64], torch.Generator().manual_seed(0))
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    buffer.seek(0)
    b = PrototypeSelector(num_prototypes=4, dim=8)
    b.load_state_dict(torch.load(buffer, weights_only=True))
    for selector in (a, b):
        selector.after_step(rows[64:128], torch.Generator().manual_seed(1))
    assert torch.equal(a.prototypes, b.prototypes)


def test_the_base_selector_is_simclrs_stateless_one() -> None:
    selector = Selector()
    assert selector.state_dict() == {} and NearestNeighbourSelector().state_dict() == {}
    assert selector.after_step(torch.randn(3, 4), torch.Generator()) == {}
    order = selector.epoch_order(10, torch.Generator().manual_seed(0))
    assert sorted(order.tolist()) == list(range(10))


def test_topk_below_one_is_a_user_error() -> None:
    with pytest.raises(UserError, match="method.topk"):
        NearestNeighbourSelector(topk=0)
    with pytest.raises(UserError, match="method.num_prototypes"):
        PrototypeSelector(num_prototypes=0, dim=4)


@pytest.mark.parametrize("weighting", ["uniform", "soft"])
def test_neighbours_are_the_k_nearest_rows_with_their_weights(weighting: str) -> None:
    stored = F.normalize(torch.randn(40, 8), dim=1)
    support = _support_with(stored)
    z = torch.randn(5, 8)
    sims = F.normalize(z, dim=1) @ stored.T  # (5, 40) brute force
    top = sims.topk(4, dim=1)
    selector = NeighboursSelector(k=4, weighting=weighting, soft_temperature=0.2, exclude_self=False)
    n = selector.neighbours(z, support, indices=torch.arange(5))
    assert torch.equal(n.rows, top.indices)
    assert torch.equal(n.positives, support.embeddings[top.indices]) and not n.positives.requires_grad
    expected = (top.values / 0.2).softmax(dim=1) if weighting == "soft" else torch.full((5, 4), 0.25)
    assert torch.allclose(n.weights, expected, atol=1e-6)
    mean = F.normalize((expected[..., None] * support.embeddings[top.indices]).sum(dim=1), dim=1)
    assert torch.allclose(selector(z, support, indices=torch.arange(5), uniform=_u(5)).positives, mean, atol=1e-6)


def test_neighbours_weigh_only_the_rows_there_are_and_fall_back_to_z() -> None:
    support = _support_with(torch.randn(2, 8), size=10)  # 2 filled rows, k = 4
    selector = NeighboursSelector(k=4, exclude_self=False)
    z = torch.randn(3, 8)
    n = selector.neighbours(z, support, indices=torch.arange(3))
    assert (n.rows[:, 2:] == -1).all() and torch.allclose(n.weights, torch.tensor([[0.5, 0.5, 0.0, 0.0]] * 3))
    empty = selector.neighbours(z, SupportSet(10, 8), indices=torch.arange(3))
    assert torch.allclose(empty.weights, torch.tensor([[1.0, 0.0, 0.0, 0.0]] * 3))
    assert torch.allclose(empty.positives[:, 0], F.normalize(z, dim=1))
