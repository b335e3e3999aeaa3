"""SupportSet: FIFO semantics, persistence, filled-rows-only lookups, self-exclusion, bf16 path."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from nnclr import runtime
from nnclr import support as support_module
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
    assert torch.equal(exact_sims, low_sims)  # re-scored by the fp32 scan's own matmul


def _near_duplicates(bases: int, copies: int, dim: int, seed: int) -> tuple[Tensor, Tensor]:
    """``copies`` copies of each of ``bases`` unit vectors, each moved by about 0.05, shuffled; and a
    query near each base. A query's scores against the copies of its base spread over about 6e-4:
    all of them within bf16 resolution (0.004) of the best, and mostly far apart in fp32 (1e-7)."""
    g = torch.Generator().manual_seed(seed)
    base = F.normalize(torch.randn(bases, dim, generator=g), dim=1)
    bank = base.repeat(copies, 1) + 0.05 * torch.randn(bases * copies, dim, generator=g) / dim**0.5
    queries = base + 0.05 * torch.randn(bases, dim, generator=g) / dim**0.5
    return bank[torch.randperm(bases * copies, generator=g)], queries


def _topk(support: SupportSet, queries: Tensor, k: int, **kwargs: object) -> tuple[Tensor, Tensor]:
    """(B, k) rows and similarities of the top-k in order, read through ``uniform`` (the i-th of k
    for u in [i/k, (i+1)/k))."""
    picks = [support.nearest(queries, k=k, uniform=torch.full((len(queries),), (i + 0.5) / k), **kwargs)
             for i in range(k)]
    return torch.stack([rows for rows, _ in picks], dim=1), torch.stack([sims for _, sims in picks], dim=1)


@pytest.mark.parametrize("copies", [16, 64, 400])  # 400: more than the candidate cap, the fp32 fallback
@pytest.mark.parametrize("k", [1, 3])
def test_low_precision_agrees_on_near_duplicates(copies: int, k: int) -> None:
    """More rows within bf16 resolution of the best than any fixed number of candidates (the old
    top-8 re-rank picked another row than fp32 for 49 of 256 queries with 16 copies, 33 of 64 with
    64): the fp32 path's rows.
    For k > 1 the same top-k scores in the same order (an exact fp32 tie may order two rows
    either way in torch.topk), and the same rows wherever a query's top-k scores are distinct."""
    bases = max(1, 4096 // copies)
    bank, queries = _near_duplicates(bases, copies, 32, seed=5)
    support = SupportSet(len(bank), 32)
    support.enqueue(bank, None, torch.arange(len(bank)) % 97, step=0)
    exclude = torch.arange(bases) % 97  # a few of each query's copies are its own stale copies
    exact_rows, exact_sims = _topk(support, queries, k, exclude_indices=exclude)
    low_rows, low_sims = _topk(support, queries, k, exclude_indices=exclude, low_precision=True)
    assert (exact_rows >= 0).all() and (support.indices[exact_rows] != exclude[:, None]).all()
    assert torch.equal(low_sims, exact_sims)
    distinct = (exact_sims[:, 1:] != exact_sims[:, :-1]).all(dim=1)  # (B,) no tie inside the top-k
    assert torch.equal(low_rows[distinct], exact_rows[distinct])
    assert distinct.float().mean() > 0.9


def test_low_precision_agrees_on_a_tightly_clustered_set() -> None:
    """65,536 x 256 rows in 64 tight clusters (pairwise cosine about 0.92 inside a cluster): the old
    top-8 re-rank picked another row than fp32 for 17 of 512 queries, the bounded candidates for none."""
    g = torch.Generator().manual_seed(7)
    centres = F.normalize(torch.randn(64, 256, generator=g), dim=1)
    bank = centres[torch.randint(0, 64, (65_536,), generator=g)] + 0.3 * torch.randn(65_536, 256, generator=g) / 16
    queries = centres[torch.randint(0, 64, (512,), generator=g)] + 0.3 * torch.randn(512, 256, generator=g) / 16
    support = SupportSet(65_536, 256)
    support.enqueue(bank, None, torch.arange(65_536) % 4096, step=0)
    exclude = torch.randint(0, 4096, (512,), generator=g)  # 16 rows each
    exact_rows, exact_sims = support.nearest(queries, exclude_indices=exclude)
    low_rows, low_sims = support.nearest(queries, exclude_indices=exclude, low_precision=True)
    assert torch.equal(low_rows, exact_rows)
    assert torch.equal(low_sims, exact_sims)


def test_low_precision_error_bound_holds_where_roundings_add_up() -> None:
    """Unit vectors whose elements all round down by almost 2^-8 (relative) in bf16: the bf16 score
    of a row with itself is off by about 0.0037. The bound covers it (and is within 2x of it)."""
    g = torch.Generator().manual_seed(8)
    d = 256
    low = (1 + 2.0**-8 * (1 - 2.0**-4)) * 2.0**-4  # just below the midpoint between 2^-4 and its bf16 successor
    rest = (2 / d - low**2) ** 0.5
    signs = torch.randint(0, 2, (300, d), generator=g) * 2.0 - 1
    vectors = signs * torch.cat([torch.full((d // 2,), low), torch.full((d // 2,), rest)])
    support = SupportSet(300, d)
    support.enqueue(vectors, None, None, step=0)
    z = F.normalize(vectors[:40], dim=1)
    bank_lp, norms = support.low_precision_bank()
    zq = support_module.shifted_queries(z, bank_lp.shape[1])
    scores, _ = support_module.scan_groups(zq, bank_lp, support.indices, None, 4096)
    shifted = scores.permute(1, 0, 2).reshape(40, -1)[:, :300].float()  # (40, 300) bf16 outputs
    error = support_module.error_bound(z, zq[:, :d], norms)[:, None]  # (40, 1)
    fp32 = z @ support.embeddings.T - 1
    u = 2.0**-8
    off = (shifted - fp32).abs() - u * shifted.abs() / (1 - u)  # what the bf16 output rounding leaves
    assert (off <= error).all()
    assert off.diagonal().min() > error.max() / 2  # the rows with themselves come close to the bound
    best = shifted.max(dim=1).values
    assert (shifted.diagonal() >= support_module.candidate_threshold(best, error[:, 0])).all()

def test_low_precision_threshold_admits_the_worst_case() -> None:
    """The fp32 best row at its worst: the bf16 best output x came from the lowest fp32 sum that rounds
    to x, the fp32 best ties with it and the scan's sum for it is 2 e lower; its rounded output must
    still reach the threshold. Also 10,000 random cases at every magnitude of the shifted score."""
    g = torch.Generator().manual_seed(9)
    best = (-1.6 * torch.rand(10_000, generator=g) + 0.01).bfloat16()  # shifted outputs: scores 1 + x
    error = 10 ** (-4 + 2 * torch.rand(10_000, generator=g))  # 1e-4 .. 1e-2
    below = torch.nextafter(best, torch.full_like(best, float("-inf"))).float()
    lowest = torch.nextafter((best.float() + below) / 2, best.float())  # the lowest fp32 that rounds to best
    assert torch.equal(lowest.bfloat16(), best)
    worst = (lowest.double() - 2 * error.double()).float().bfloat16().float()
    assert (worst >= support_module.candidate_threshold(best.float(), error)).all()


@pytest.mark.parametrize("b", [1, 2, 5, 20])
def test_low_precision_scores_are_the_fp32_scans_bitwise(b: int) -> None:
    """The candidates are re-scored by the fp32 scan's own matmul (at least 16 rows): the same numbers,
    so exact fp32 ties and 1-ulp differences order alike on both paths."""
    support = _filled(5000, 64, 5000, seed=10)
    queries = torch.randn(b, 64, generator=torch.Generator().manual_seed(11))
    exact_rows, exact_sims = support.nearest(queries)
    low_rows, low_sims = support.nearest(queries, low_precision=True)
    assert torch.equal(low_rows, exact_rows) and torch.equal(low_sims, exact_sims)


@pytest.mark.parametrize("size", [4096, 16384])
def test_low_precision_falls_back_to_fp32_for_dense_queries_only(size: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """One query sits in 600 near-duplicates: more candidates than the cap (4,096 rows), or its threshold
    reached in more than 3/4 of the 512-row groups (16,384 rows), so its candidates are not even
    read. It is scanned in fp32, in one scan with 15 other queries (a one-query scan sums in another
    order); the rest are re-scored."""
    scans, reads = [], []
    scan, candidates = support_module.scan_topk, support_module.candidates
    monkeypatch.setattr(support_module, "scan_topk", lambda z, *args: scans.append(len(z)) or scan(z, *args))
    monkeypatch.setattr(support_module, "candidates",
                        lambda s, flagged, t: reads.append(flagged.sum(dim=1)) or candidates(s, flagged, t))
    bank, near = _near_duplicates(1, 600, 64, seed=12)
    g = torch.Generator().manual_seed(13)
    rows = torch.cat([bank, torch.randn(size - 600, 64, generator=g)])
    order = torch.randperm(size, generator=g)
    support = SupportSet(size, 64)
    support.enqueue(rows[order], None, None, step=0)
    queries = torch.cat([torch.randn(30, 64, generator=g), near])
    exact_rows, exact_sims = support.nearest(queries)
    assert order[exact_rows[-1]] < 600 and scans == [31]
    low_rows, low_sims = support.nearest(queries, low_precision=True)
    assert torch.equal(low_rows, exact_rows) and torch.equal(low_sims, exact_sims)
    assert scans == [31, 16]
    assert (reads[0][-1] == 0) == (size == 16384) and (reads[0][:30] > 0).all()


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


@pytest.mark.parametrize("low", [False, True])
def test_topk_pick_is_the_uniforms_candidate_whatever_the_global_rng(low: bool) -> None:
    """The trainer's path: uniforms u (drawn for the global batch) pick candidate floor(u * k) of the top k;
    the global RNG plays no part (issue 20: it did, and a resumed run diverged)."""
    support = _filled(100, 8, 100)
    queries = torch.randn(20, 8)
    _, top = support.topk(queries, k=5)  # (20, 5) nearest first
    u = torch.rand(20, generator=torch.Generator().manual_seed(3))
    picks = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        picks.append(support.nearest(queries, k=5, uniform=u, low_precision=low)[0])
    assert torch.equal(picks[0], picks[1])
    assert torch.equal(picks[0], top.gather(1, (u * 5).long()[:, None])[:, 0])


def test_topk_with_fewer_filled_rows_than_k() -> None:
    support = _filled(10, 4, 2)
    rows, _ = support.nearest(torch.randn(50, 4), k=5, generator=torch.Generator().manual_seed(0))
    assert set(rows.tolist()) <= {0, 1}


@pytest.mark.parametrize("low", [False, True])
@pytest.mark.parametrize("k", [1, 3])
def test_nearest_has_no_grad(low: bool, k: int) -> None:
    """The neighbours are targets: nothing flows back into the queries (or the queue)."""
    support = _filled(10, 4, 10)
    z = torch.randn(3, 4, requires_grad=True)
    rows, sims = support.nearest(z * 2, k=k, low_precision=low, generator=torch.Generator().manual_seed(0))
    assert not sims.requires_grad and sims.grad_fn is None and rows.grad_fn is None
    assert not support.embeddings.requires_grad and torch.isfinite(sims).all()


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


def test_low_precision_is_fast_follows_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """CPU: what the /proc/cpuinfo probe says (AVX512-BF16 or AMX); CUDA: bf16 support; others: never."""
    monkeypatch.setattr("nnclr.support.cpu_has_fast_bf16", runtime.cpu_has_fast_bf16.__wrapped__)  # uncached
    for flags, fast in [("fpu avx2 avx512f avx512bw", False), ("fpu avx512f avx512_bf16", True),
                        ("fpu amx_bf16 amx_tile", True)]:
        monkeypatch.setattr("nnclr.runtime.open", lambda *_args, flags=flags, **_kw: io.StringIO(f"flags\t: {flags}\n"),
                            raising=False)
        assert low_precision_is_fast("cpu") is fast
        assert low_precision_is_fast(torch.device("cpu")) is fast
    monkeypatch.setattr("nnclr.runtime.open", lambda *_args, **_kw: (_ for _ in ()).throw(OSError("no /proc")),
                        raising=False)
    assert low_precision_is_fast("cpu") is False
    monkeypatch.setattr("nnclr.support.cpu_has_fast_bf16", lambda: True)
    assert low_precision_is_fast("meta") is False
    for available, bf16, fast in [(True, True, True), (True, False, False), (False, True, False)]:
        monkeypatch.setattr(torch.cuda, "is_available", lambda available=available: available)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda bf16=bf16: bf16)
        assert low_precision_is_fast("cuda") is fast
        assert low_precision_is_fast("cuda:1") is fast


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
