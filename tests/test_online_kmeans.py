"""OnlineKMeans (KMCLR's prototypes): the update against a slow reference written from the equations and against
scikit-learn's MiniBatchKMeans, convergence, seeding, resume, determinism, autocast, storage, two processes."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from nnclr.online_kmeans import OnlineKMeans


class Reference:
    """Mini-batch k-means from the equations, one point and one centre at a time, in float64.

    Seeding: the first K rows of the stream, count 1 each. Step (Sculley 2010, Alg. 1): assign every row of the batch
    to its nearest centre first, then for each row v[c] += 1, c <- (1 - 1/v[c]) c + x / v[c] (c the running mean;
    spherical: rows normalised, nearest by cosine to the mean's direction). Every 10 K rows, or when a count is 0:
    centres with count < ratio * max count (at most half the batch, lowest counts first) jump to rows drawn with
    randperm, and take the smallest count of the others.
    """

    def __init__(self, k: int, spherical: bool, ratio: float, generator: torch.Generator) -> None:
        self.k, self.spherical, self.ratio, self.generator = k, spherical, ratio, generator
        self.means: list[torch.Tensor] = []
        self.counts: list[int] = []
        self.seen = 0
        self.reassigned = 0

    def row(self, x: torch.Tensor) -> torch.Tensor:
        x = x.double()
        return x / x.norm() if self.spherical else x

    def score(self, x: torch.Tensor, j: int) -> float:
        """Higher is nearer: cosine to the direction of mean j, or minus the squared distance."""
        c = self.means[j]
        return float(x @ c / c.norm()) if self.spherical else -float(((x - c) ** 2).sum())

    def nearest(self, x: torch.Tensor) -> int:
        best = 0
        for j in range(1, self.k):
            if self.score(x, j) > self.score(x, best):
                best = j
        return best

    def update(self, batch: torch.Tensor) -> None:
        rows = [self.row(r) for r in batch]
        while len(self.means) < self.k and rows:
            self.means.append(rows.pop(0))
            self.counts.append(1)
        if len(self.means) < self.k or not rows:
            return
        self.seen += len(rows)
        due = 0 in self.counts or self.seen >= 10 * self.k
        if due:
            self.seen = 0
        labels = [self.nearest(r) for r in rows]
        for r, j in zip(rows, labels):
            self.counts[j] += 1
            eta = 1.0 / self.counts[j]
            self.means[j] = (1 - eta) * self.means[j] + eta * r
        if not (due and self.ratio > 0):
            return
        top = max(self.counts)
        low = [j for j in range(self.k) if self.counts[j] < self.ratio * top]
        if len(low) > 0.5 * len(rows):
            low = sorted(low, key=lambda j: (self.counts[j], j))[: int(0.5 * len(rows))]
        if not low:
            return
        picks = torch.randperm(len(rows), generator=self.generator)[: len(low)].tolist()
        floor = min(self.counts[j] for j in range(self.k) if j not in low)
        for j, i in zip(sorted(low), picks):
            self.means[j] = rows[i].clone()
            self.counts[j] = floor
        self.reassigned += len(low)

    def prototypes(self) -> torch.Tensor:
        means = torch.stack(self.means)
        return F.normalize(means, dim=1) if self.spherical else means


def blob_stream(steps: int, batch: int, dim: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Rows around +e1 (a few clumps), so that a seed at -e1 is never anyone's nearest centre."""
    clumps = torch.randn(4, dim, generator=generator)
    clumps[:, 0] = 4.0
    out = []
    for _ in range(steps):
        which = torch.randint(4, (batch,), generator=generator)
        out.append(clumps[which] + 0.7 * torch.randn(batch, dim, generator=generator))
    return out


@pytest.mark.parametrize("spherical", [True, False])
def test_update_equals_the_reference_loop(spherical: bool) -> None:
    k, dim = 6, 5
    data = torch.Generator().manual_seed(1)
    stream = blob_stream(32, 7, dim, data)
    stream[0], stream[1] = stream[0][:3], stream[1][:3]  # the first 6 rows are the seeds (two calls of 3)
    stream[1][2] = -10.0 * F.one_hot(torch.tensor(0), dim).float()  # an outlier seed: no row ever goes to it
    km = OnlineKMeans(k, dim, spherical=spherical, reassignment_ratio=0.3)
    ref = Reference(k, spherical, 0.3, torch.Generator().manual_seed(5))
    gen = torch.Generator().manual_seed(5)
    moved = 0.0
    for batch in stream:
        moved += km.update(batch, gen)["kmeans_reassigned"]
        ref.update(batch)
    assert ref.reassigned > 0 and moved == ref.reassigned  # the reassignment was exercised, identically
    assert km.counts.tolist() == ref.counts
    torch.testing.assert_close(km.prototypes, ref.prototypes().float(), rtol=0, atol=2e-6)
    queries = torch.randn(20, dim, generator=data) + 4.0 * F.one_hot(torch.tensor(0), dim)
    sims, best = km.nearest(queries)
    assert best.tolist() == [ref.nearest(ref.row(q)) for q in queries]
    expected = F.cosine_similarity(queries.double(), ref.prototypes()[best], dim=1)
    torch.testing.assert_close(sims, expected.float(), rtol=0, atol=1e-6)


def test_euclidean_mode_is_sklearn_minibatch_kmeans_partial_fit() -> None:
    sklearn_cluster = pytest.importorskip("sklearn.cluster")
    k, dim = 5, 3
    data = torch.Generator().manual_seed(2)
    seeds = 3.0 * torch.randn(k, dim, generator=data)
    stream = [seeds] + [seeds[torch.randint(k, (16,), generator=data)] + torch.randn(16, dim, generator=data)
                        for _ in range(20)]
    km = OnlineKMeans(k, dim, spherical=False, reassignment_ratio=0.0)
    # the original's (re-)initialisation: partial_fit on K rows, which k-means++ picks all of (here: init=those rows)
    sk = sklearn_cluster.MiniBatchKMeans(n_clusters=k, init=seeds.double().numpy(), n_init=1, reassignment_ratio=0.0)
    gen = torch.Generator().manual_seed(0)
    for batch in stream:
        km.update(batch, gen)
        sk.partial_fit(batch.double().numpy())
    torch.testing.assert_close(km.prototypes, torch.from_numpy(sk.cluster_centers_).float(), rtol=0, atol=1e-5)
    assert km.counts.tolist() == [int(c) for c in sk._counts]
    assert km.nearest(stream[-1])[1].tolist() == sk.predict(stream[-1].double().numpy()).tolist()


def mixture(
    centres: torch.Tensor, n: int, noise: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    which = torch.randint(centres.shape[0], (n,), generator=generator)
    return centres[which] + noise * torch.randn(n, centres.shape[1], generator=generator), which


@pytest.mark.parametrize("spherical", [True, False])
def test_converges_to_the_centres_of_a_separated_mixture(spherical: bool) -> None:
    dim = 8
    centres = 5.0 * torch.eye(dim)[:4]  # (4, D)
    data, gen = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    km = OnlineKMeans(4, dim, spherical=spherical)
    for _ in range(60):
        km.update(mixture(centres, 32, 0.5, data)[0], gen)
    target = F.normalize(centres, dim=1) if spherical else centres
    error = torch.cdist(target, km.prototypes)  # (4, 4)
    assert sorted(error.argmin(dim=1).tolist()) == [0, 1, 2, 3]  # one prototype per component
    assert float(error.min(dim=1).values.max()) < (0.02 if spherical else 0.15)


def test_a_batch_larger_than_k_seeds_one_prototype_per_cluster() -> None:
    centres = 5.0 * torch.eye(6)[:4]
    for seed in range(5):  # a uniform choice of 4 of the 64 rows covers all 4 clusters only 10% of the time
        rows, which = mixture(centres, 64, 0.01, torch.Generator().manual_seed(seed))
        km = OnlineKMeans(4, 6, spherical=False, reassignment_ratio=0.0)
        km.update(rows, torch.Generator().manual_seed(seed))
        assert sorted(torch.cdist(km.prototypes, centres).argmin(dim=1).tolist()) == [0, 1, 2, 3], seed
        assert int(km.counts.sum()) == 64  # 4 seeds + 60 rows of the update: every row counted once


def test_batches_smaller_than_k_fill_the_prototypes_before_it_starts() -> None:
    k, dim = 10, 4
    a, b = F.normalize(torch.randn(2, dim), dim=1)
    batches = [torch.randn(4, dim), torch.randn(4, dim), torch.stack([a, b, a, b])]
    km = OnlineKMeans(k, dim)
    gen = torch.Generator().manual_seed(0)
    stats = km.update(batches[0], gen)
    assert not km.is_initialised and math.isnan(stats["kmeans_inertia"]) and stats["kmeans_filled"] == 0.4
    torch.testing.assert_close(km.prototypes[:4], F.normalize(batches[0], dim=1))
    with pytest.raises(RuntimeError, match="4 of the 10"):
        km.nearest(batches[0])
    km.update(batches[1], gen)
    assert int(km.filled) == 8 and not km.is_initialised
    stats = km.update(batches[2], gen)  # k-means++ takes a and b as seeds, the copies go through an update
    assert km.is_initialised and stats["kmeans_filled"] == 1.0 and math.isfinite(stats["kmeans_inertia"])
    assert km.counts.tolist() == [1] * 8 + [2, 2]  # every row counted once
    assert {tuple(p) for p in km.prototypes[8:].tolist()} == {tuple(a.tolist()), tuple(b.tolist())}
    assert km.nearest(batches[2])[0].shape == (4,)


def test_reset_every_forgets_the_old_stream() -> None:
    dim = 6
    old, new = 5.0 * torch.eye(dim)[:3], 5.0 * torch.eye(dim)[3:]
    data = torch.Generator().manual_seed(4)
    stream = [mixture(old, 16, 0.3, data)[0] for _ in range(5)] + [mixture(new, 16, 0.3, data)[0] for _ in range(3)]
    resetting = OnlineKMeans(3, dim, reset_every=6)
    keeping = OnlineKMeans(3, dim)
    for batch in stream:
        resetting.update(batch, torch.Generator().manual_seed(0))
        keeping.update(batch, torch.Generator().manual_seed(0))
    assert int(resetting.counts.sum()) == 3 * 16  # only the 3 batches since the reset at the 6th update
    near_new = resetting.prototypes @ F.normalize(new, dim=1).T  # (3, 3) cosines
    assert float(near_new.max(dim=1).values.min()) > 0.95
    assert float((keeping.prototypes @ F.normalize(new, dim=1).T).max(dim=1).values.min()) < 0.5


def run(km: OnlineKMeans, batches: list[torch.Tensor], gen: torch.Generator) -> float:
    return sum(km.update(b, gen)["kmeans_reassigned"] for b in batches)


def test_state_dict_round_trip_resumes_exactly() -> None:
    k, dim = 3, 4
    batches = blob_stream(12, 6, dim, torch.Generator().manual_seed(6))
    batches[0][0] = -10.0 * F.one_hot(torch.tensor(0), dim)  # k-means++ seeds it; no row goes to it
    kwargs = dict(reassignment_ratio=0.3, reset_every=8)
    whole, gen = OnlineKMeans(k, dim, **kwargs), torch.Generator().manual_seed(9)
    run(whole, batches[:4], gen)
    moved_after = run(whole, batches[4:], gen)
    # after the split: the reassignment check at 10 K = 30 rows (update 6) and the reset (update 8)
    assert moved_after > 0 and int(whole.counts.sum()) == 5 * 6
    first, gen = OnlineKMeans(k, dim, **kwargs), torch.Generator().manual_seed(9)
    run(first, batches[:4], gen)
    state, gen_state = {key: v.clone() for key, v in first.state_dict().items()}, gen.get_state()
    resumed = OnlineKMeans(k, dim, **kwargs)
    resumed.load_state_dict(state)
    run(resumed, batches[4:], torch.Generator().set_state(gen_state))
    for key, value in whole.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key


def test_deterministic_given_the_generator_whatever_the_global_seed() -> None:
    batches = [torch.randn(32, 8, generator=torch.Generator().manual_seed(i)) for i in range(6)]
    results = []
    for global_seed, seed in ((0, 1), (123, 1), (0, 2)):
        torch.manual_seed(global_seed)
        km = OnlineKMeans(4, 8, reassignment_ratio=0.5)
        run(km, batches, torch.Generator().manual_seed(seed))
        results.append(km.state_dict())
    assert all(torch.equal(results[0][key], results[1][key]) for key in results[0])
    assert not torch.equal(results[0]["prototypes"], results[2]["prototypes"])  # the generator chose the seeds


def test_float32_under_bf16_autocast() -> None:
    batches = [torch.randn(16, 32) for _ in range(4)]
    plain, mixed = OnlineKMeans(8, 32), OnlineKMeans(8, 32)
    run(plain, batches, torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        run(mixed, [b.bfloat16() for b in batches], torch.Generator().manual_seed(0))
        sims, best = mixed.nearest(batches[0])
    assert sims.dtype == torch.float32 and mixed.prototypes.dtype == torch.float32
    plain_sims, plain_best = plain.nearest(batches[0])
    assert torch.equal(best, plain_best)
    torch.testing.assert_close(sims, plain_sims, rtol=0, atol=2e-2)  # bf16 inputs, fp32 arithmetic
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sims_fp32_input = plain.nearest(batches[0])[0]
    assert torch.equal(sims_fp32_input, plain_sims)  # not one bf16 rounding in the lookup


def test_storage_bytes_counts_every_saved_byte() -> None:
    spherical, euclidean = OnlineKMeans(400, 256), OnlineKMeans(400, 256, spherical=False)
    assert spherical.storage_bytes() == 400 * 256 * 4 + 400 * 8 + 400 * 4 + 3 * 8 == 414_424
    assert euclidean.storage_bytes() == 400 * 256 * 4 + 400 * 8 + 3 * 8 == 412_824
    for km in (spherical, euclidean):
        assert km.storage_bytes() == sum(t.numel() * t.element_size() for t in km.state_dict().values())


# --- two gloo processes on halves of every batch = one process on the whole batch ---------------------------------

K, DIM, STEPS, GLOBAL = 6, 5, 12, 8


def global_batches() -> list[torch.Tensor]:
    return blob_stream(STEPS, GLOBAL, DIM, torch.Generator().manual_seed(7))


def worker(rank: int, world: int, port: int, out: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    km = OnlineKMeans(K, DIM, reassignment_ratio=0.3)
    half = GLOBAL // world
    gen = torch.Generator().manual_seed(11 + rank)  # rank 1's generator differs: rank 0's draws must be used
    moved = run(km, [b[rank * half : (rank + 1) * half] for b in global_batches()], gen)
    torch.save({"state": km.state_dict(), "moved": moved}, out / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_on_halves_equal_one_process_on_the_whole_batch(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(2, port, tmp_path), nprocs=2, join=True)
    one = OnlineKMeans(K, DIM, reassignment_ratio=0.3)
    moved = run(one, global_batches(), torch.Generator().manual_seed(11))
    assert moved > 0  # seeding by k-means++ (first batch 8 > K) and reassignments both drew random numbers
    for rank in range(2):
        saved = torch.load(tmp_path / f"rank{rank}.pt")
        assert saved["moved"] == moved
        for key, value in one.state_dict().items():
            assert torch.equal(saved["state"][key], value), f"rank {rank} {key}"
