"""SupportSet: FIFO semantics, persistence, filled-rows-only lookups, self-exclusion, bf16 path."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from nnclr.support import SupportSet, low_precision_is_fast


class _ListFIFO:
    """Reference: a ring of ``size`` slots written one row at a time."""

    def __init__(self, size: int) -> None:
        self.slots: list[int | None] = [None] * size
        self.ptr = 0

    def push(self, items: list[int]) -> None:
        for item in items:
            self.slots[self.ptr] = item
            self.ptr = (self.ptr + 1) % len(self.slots)


def _filled(size: int, dim: int, n: int, seed: int = 0) -> SupportSet:
    g = torch.Generator().manual_seed(seed)
    support = SupportSet(size, dim)
    support.enqueue(torch.randn(n, dim, generator=g), torch.arange(n) % 7, torch.arange(n), step=0)
    return support


@pytest.mark.parametrize("size, batches", [(10, [3, 4, 3, 4, 4, 3]), (10, [3, 25, 4]),
                                           (7, [7, 7, 1]), (5, [12]), (1, [2, 1])])
def test_enqueue_matches_list_fifo(size: int, batches: list[int]) -> None:
    support, ref = SupportSet(size, 4), _ListFIFO(size)
    counter = 0
    for step, b in enumerate(batches):
        ids = list(range(counter, counter + b))
        counter += b
        z = torch.randn(b, 4)
        support.enqueue(z, torch.tensor(ids) + 1000, torch.tensor(ids), step=step)
        ref.push(ids)
        expected = [-1 if s is None else s for s in ref.slots]
        assert support.indices.tolist() == expected
        assert support.labels.tolist() == [-1 if e < 0 else e + 1000 for e in expected]
        assert int(support.ptr) == ref.ptr
        assert int(support.num_filled) == min(size, counter)
    # the stored embeddings belong to the stored indices and are unit norm
    filled = support.indices >= 0
    assert torch.allclose(support.embeddings[filled].norm(dim=1), torch.ones(int(filled.sum())))


def test_enqueue_stores_normalised_detached_rows_and_steps() -> None:
    support = SupportSet(8, 3)
    z = torch.randn(3, 3, requires_grad=True) * 5
    support.enqueue(z, None, None, step=42)
    assert not support.embeddings.requires_grad
    assert torch.allclose(support.embeddings[:3], F.normalize(z.detach(), dim=1))
    assert support.steps.tolist() == [42] * 3 + [-1] * 5
    assert support.labels.tolist() == [-1] * 8
    assert support.fill_fraction == pytest.approx(3 / 8)


def test_state_dict_round_trip_keeps_everything() -> None:
    support = _filled(16, 8, 21)
    state = support.state_dict()
    assert set(state) == {"embeddings", "labels", "indices", "steps", "ptr", "num_filled"}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    fresh = SupportSet(16, 8)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    for name, value in support.state_dict().items():
        assert torch.equal(value, fresh.state_dict()[name]), name
    queries = torch.randn(9, 8)
    for low in (False, True):
        assert torch.equal(support.nearest(queries, low_precision=low)[0],
                           fresh.nearest(queries, low_precision=low)[0])


def test_loading_a_state_dict_refreshes_the_low_precision_cache() -> None:
    a, b = _filled(32, 8, 32, seed=1), _filled(32, 8, 32, seed=2)
    queries = torch.randn(5, 8)
    a.nearest(queries, low_precision=True)  # builds the bf16 cache of a's rows
    parent = torch.nn.ModuleDict({"support": a})
    parent.load_state_dict(torch.nn.ModuleDict({"support": b}).state_dict())
    assert torch.equal(a.nearest(queries, low_precision=True)[0], b.nearest(queries)[0])


def test_low_precision_cache_follows_enqueue() -> None:
    support = _filled(8, 4, 8)
    support.nearest(torch.randn(2, 4), low_precision=True)
    z = torch.randn(3, 4)
    support.enqueue(z, None, torch.tensor([100, 101, 102]), step=1)
    rows, sims = support.nearest(z, low_precision=True)
    assert rows.tolist() == [0, 1, 2]
    assert torch.allclose(sims, torch.ones(3))


@pytest.mark.parametrize("low", [False, True])
def test_empty_set_returns_no_neighbour(low: bool) -> None:
    rows, sims = SupportSet(10, 4).nearest(torch.randn(3, 4), low_precision=low)
    assert rows.tolist() == [-1, -1, -1]
    assert torch.isinf(sims).all() and (sims < 0).all()


@pytest.mark.parametrize("low", [False, True])
@pytest.mark.parametrize("k", [1, 2, 5])
def test_unfilled_rows_never_returned(low: bool, k: int) -> None:
    support = SupportSet(10, 4)
    stored = F.normalize(torch.tensor([[1.0, 1, 0, 0], [1, 0, 1, 0], [1, 0, 0, 1]]), dim=1)
    support.enqueue(stored, None, torch.arange(3), step=0)
    queries = -stored + 0.01 * torch.randn(3, 4)  # negative similarity to every filled row
    rows, sims = support.nearest(queries, low_precision=low, k=k,
                                 generator=torch.Generator().manual_seed(0))
    assert ((rows >= 0) & (rows < 3)).all()
    assert (sims < 0).all()  # an unfilled zero row would have scored 0


@pytest.mark.parametrize("low", [False, True])
def test_self_exclusion(low: bool) -> None:
    support = SupportSet(12, 8)
    z = torch.randn(4, 8)
    support.enqueue(z, None, torch.tensor([0, 1, 2, 3]), step=0)
    support.enqueue(z + 0.01, None, torch.tensor([0, 1, 2, 3]), step=1)  # stale copies
    support.enqueue(torch.randn(4, 8), None, torch.tensor([4, 5, 6, 7]), step=2)
    rows, _ = support.nearest(z, low_precision=low)
    assert (rows % 4 == torch.arange(4)).all() and (rows < 8).all()  # itself without exclusion
    rows, _ = support.nearest(z, exclude_indices=torch.tensor([0, 1, 2, 3]), low_precision=low)
    assert (support.indices[rows] != torch.arange(4)).all()
    assert (rows >= 0).all()


@pytest.mark.parametrize("low", [False, True])
def test_self_exclusion_of_every_row_gives_none(low: bool) -> None:
    support = SupportSet(6, 4)
    support.enqueue(torch.randn(3, 4), None, torch.tensor([5, 5, 5]), step=0)
    rows, sims = support.nearest(torch.randn(2, 4), exclude_indices=torch.tensor([5, -1]),
                                 low_precision=low)
    assert rows[0] == -1 and torch.isinf(sims[0])
    assert rows[1] >= 0  # index -1 (unknown) excludes nothing


@pytest.mark.parametrize("chunk", [1, 3, 4096])
def test_nearest_matches_dense_argmax(chunk: int) -> None:
    support = _filled(50, 6, 37)
    queries = torch.randn(11, 6)
    rows, sims = support.nearest(queries, chunk_size=chunk)
    dense = F.normalize(queries, dim=1) @ support.embeddings[:37].T
    assert torch.equal(rows, dense.argmax(dim=1))
    assert torch.allclose(sims, dense.max(dim=1).values, atol=1e-6)


def test_low_precision_agrees_with_fp32_argmax() -> None:
    support = _filled(10_000, 128, 10_000, seed=3)
    queries = torch.randn(512, 128, generator=torch.Generator().manual_seed(4))
    exact_rows, exact_sims = support.nearest(queries)
    low_rows, low_sims = support.nearest(queries, low_precision=True)
    assert torch.equal(exact_rows, low_rows)
    assert torch.allclose(exact_sims, low_sims, atol=1e-5)


def test_low_precision_agrees_on_near_duplicates() -> None:
    """Neighbours closer than bf16 resolution are still told apart by the fp32 re-rank."""
    g = torch.Generator().manual_seed(5)
    base = F.normalize(torch.randn(64, 32, generator=g), dim=1)
    bank = torch.cat([base + 1e-3 * torch.randn(64, 32, generator=g) for _ in range(4)])
    support = SupportSet(256, 32)
    support.enqueue(bank, None, None, step=0)
    queries = base + 1e-3 * torch.randn(64, 32, generator=g)
    assert torch.equal(support.nearest(queries)[0], support.nearest(queries, low_precision=True)[0])


@pytest.mark.parametrize("low", [False, True])
def test_topk_picks_only_among_topk(low: bool) -> None:
    support = _filled(200, 16, 200, seed=6)
    queries = torch.randn(40, 16)
    dense = F.normalize(queries, dim=1) @ support.embeddings.T
    top3 = dense.topk(3, dim=1).indices
    g = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(30):
        rows, sims = support.nearest(queries, k=3, generator=g, low_precision=low)
        assert (rows[:, None] == top3).any(dim=1).all()
        assert torch.allclose(sims, dense.gather(1, rows[:, None])[:, 0], atol=1e-5)
        seen.update((rows[:, None] == top3).float().argmax(dim=1).tolist())
    assert seen == {0, 1, 2}


def test_topk_is_reproducible_with_a_generator() -> None:
    support = _filled(100, 8, 100)
    queries = torch.randn(20, 8)
    a = support.nearest(queries, k=5, generator=torch.Generator().manual_seed(1))[0]
    b = support.nearest(queries, k=5, generator=torch.Generator().manual_seed(1))[0]
    assert torch.equal(a, b)


def test_topk_with_fewer_filled_rows_than_k() -> None:
    support = _filled(10, 4, 2)
    rows, _ = support.nearest(torch.randn(50, 4), k=5, generator=torch.Generator().manual_seed(0))
    assert set(rows.tolist()) <= {0, 1}


def test_nearest_has_no_grad() -> None:
    support = _filled(10, 4, 10)
    z = torch.randn(3, 4, requires_grad=True)
    _, sims = support.nearest(z)
    assert not sims.requires_grad


def test_rows_info_and_diagnostics() -> None:
    support = SupportSet(6, 2)
    stored = torch.tensor([[1.0, 0], [0, 1], [-1, 0]])
    support.enqueue(stored, torch.tensor([0, 1, 2]), torch.tensor([10, 11, 12]), step=3)
    queries = torch.tensor([[1.0, 0.1], [0.1, 1], [0, -1]])
    rows, sims = support.nearest(queries)
    assert rows.tolist()[:2] == [0, 1]
    info = support.rows_info(torch.tensor([1, -1]))
    assert info["labels"].tolist() == [1, -1] and info["steps"].tolist() == [3, -1]
    stats = support.diagnostics(rows, sims, labels=torch.tensor([0, 5, -1]),
                                indices=torch.tensor([10, 99, 98]), step=5)
    assert stats["nn_found"] == 1.0 and stats["nn_age"] == 2.0
    assert stats["nn_self_hit"] == pytest.approx(1 / 3)
    assert stats["nn_label_agreement"] == pytest.approx(1 / 2)
    assert stats["support_fill"] == 0.5
    empty = SupportSet(4, 2).diagnostics(torch.tensor([-1]), torch.tensor([float("-inf")]),
                                         labels=None, indices=None, step=0)
    assert empty["nn_found"] == 0.0


def test_low_precision_is_fast_returns_bool() -> None:
    assert isinstance(low_precision_is_fast("cpu"), bool)
    assert low_precision_is_fast("meta") is False


@settings(max_examples=60, deadline=None)
@given(size=st.integers(1, 12), batches=st.lists(st.integers(1, 30), min_size=1, max_size=6))
def test_enqueue_property_matches_list_fifo(size: int, batches: list[int]) -> None:
    support, ref = SupportSet(size, 2), _ListFIFO(size)
    counter = 0
    for step, b in enumerate(batches):
        ids = list(range(counter, counter + b))
        counter += b
        support.enqueue(torch.randn(b, 2), None, torch.tensor(ids), step=step)
        ref.push(ids)
    assert support.indices.tolist() == [-1 if s is None else s for s in ref.slots]
    assert int(support.ptr) == ref.ptr and int(support.num_filled) == min(size, counter)


def test_nearest_is_exact_under_autocast() -> None:
    support = _filled(2000, 64, 2000, seed=8)
    queries = torch.randn(128, 64)
    exact = support.nearest(queries)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        assert torch.equal(support.nearest(queries)[0], exact[0])
        assert torch.equal(support.nearest(queries, low_precision=True)[0], exact[0])
