"""Spherical (cosine) k-means, chunked and distributed-ready.

Used by DeepCluster's pseudo-labels (:mod:`nnclr.deepcluster`), which cluster the whole training set
every epoch. KMCLR's prototypes learn online instead (:mod:`nnclr.online_kmeans`).

Distributed pattern (as solo-learn's ``kmeans.py``): every rank holds its own rows; per-cluster
sums and counts are summed over ranks with :func:`nnclr.distributed.all_reduce_sum`, the initial
centroids are drawn on rank 0 and broadcast, and empty-cluster reseeding gathers candidates from
all ranks, so every rank ends with the same centroids. In a single process all of this is a no-op.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from nnclr import distributed

_INIT_POOL = 16_384  # k-means++ draws from at most this many random rows (cost ~ K x pool x D)


def spherical_kmeans(
    x: Tensor,
    num_clusters: int,
    *,
    iters: int = 10,
    init: Tensor | None = None,
    generator: torch.Generator | None = None,
    chunk_size: int = 8192,
) -> tuple[Tensor, Tensor]:
    """Cluster rows of ``x`` by cosine similarity (Lloyd iterations on the unit sphere).

    Each iteration assigns every row to the centroid of highest cosine similarity (in chunks of
    ``chunk_size`` rows, so N = 100k, K = 1000 needs ~32 MB of logits at a time), then sets each
    centroid to the L2-normalised sum of its rows.

    Empty clusters are reseeded after every assignment: the rows farthest from their own centroid
    (lowest cosine similarity), taken only from clusters holding more than one row, are moved into
    the empty clusters, which then become those rows. Whenever the (global) number of rows is at
    least K, no cluster is empty, even with duplicate rows or a pathological ``init``.

    Args:
        x: (N, D) rows (this rank's share when distributed); normalised inside, computed in fp32.
        num_clusters: K.
        iters: number of assignment + update rounds.
        init: optional (K, D) starting centroids (e.g. the previous prototypes, a warm start);
            rank 0's copy is used.
        generator: CPU generator for the k-means++ initialisation when ``init`` is None; None
            means a generator seeded with 0, so the result is always reproducible.
        chunk_size: rows per block in the assignment step.

    Returns:
        centroids: (K, D) unit-norm float32.
        assignments: (N,) int64 cluster of each row, the assignment the returned centroids were
            computed from (after reseeding); equal to the argmax assignment at convergence.
    """
    if num_clusters < 1:
        raise ValueError(f"num_clusters must be >= 1, got {num_clusters}")
    with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
        return _spherical_kmeans(x, num_clusters, iters, init, generator, chunk_size)


def _spherical_kmeans(
    x: Tensor,
    num_clusters: int,
    iters: int,
    init: Tensor | None,
    generator: torch.Generator | None,
    chunk_size: int,
) -> tuple[Tensor, Tensor]:
    """The body of :func:`spherical_kmeans`, run without grad and autocast."""
    x = F.normalize(x.detach().float(), dim=1)  # (N, D)
    centroids = _initial_centroids(x, num_clusters, init, generator)  # (K, D)
    assignments = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    for _ in range(iters):
        assignments, sims = assign(x, centroids, chunk_size=chunk_size)
        assignments = _reseed_empty(assignments, sims, num_clusters)
        centroids = _update(x, assignments, centroids)
    return centroids, assignments


def _initial_centroids(
    x: Tensor, k: int, init: Tensor | None, generator: torch.Generator | None
) -> Tensor:
    """(K, D) unit starting centroids: ``init`` or k-means++ on rank 0, broadcast to all ranks."""
    if init is not None:
        if init.shape != (k, x.shape[1]):
            expected = (k, x.shape[1])
            raise ValueError(f"init must have shape {expected}, got {tuple(init.shape)}")
        centroids = F.normalize(init.detach().float().to(x.device), dim=1).clone()
    elif distributed.is_main():
        gen = generator if generator is not None else torch.Generator().manual_seed(0)
        centroids = _kmeans_pp(x, k, gen)
    else:
        centroids = x.new_zeros(k, x.shape[1])
    return distributed.broadcast(centroids.contiguous(), src=0)


@torch.no_grad()
def assign(x: Tensor, centroids: Tensor, *, chunk_size: int = 8192) -> tuple[Tensor, Tensor]:
    """Nearest centroid of each row by dot product, in blocks of ``chunk_size`` rows.

    Args:
        x: (N, D) unit rows.
        centroids: (K, D) unit rows.

    Returns:
        (N,) int64 index of the best centroid (lowest index on ties), (N,) its similarity.
    """
    best = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    sims = torch.empty(x.shape[0], dtype=x.dtype, device=x.device)
    for start in range(0, x.shape[0], chunk_size):
        block = x[start : start + chunk_size] @ centroids.T  # (chunk, K)
        sims[start : start + chunk_size], best[start : start + chunk_size] = block.max(dim=1)
    return best, sims


@torch.no_grad()
def kmeans_plus_plus(x: Tensor, num_clusters: int, generator: torch.Generator | None = None) -> Tensor:
    """(K, D) unit starting centroids for :func:`spherical_kmeans` from the rows of ``x`` (N, D).

    Greedy k-means++ (see ``_kmeans_pp``) on the normalised rows, local to this process: use it
    as ``init`` when every rank holds the same rows (e.g. the gathered support set), so that the
    seeding does not depend on how the rows are split over ranks.
    """
    with torch.autocast(x.device.type, enabled=False):
        gen = generator if generator is not None else torch.Generator().manual_seed(0)
        return _kmeans_pp(F.normalize(x.detach().float(), dim=1), num_clusters, gen)


def _kmeans_pp(x: Tensor, k: int, gen: torch.Generator) -> Tensor:
    """Greedy k-means++ seeding (Arthur & Vassilvitskii 2007; sklearn's variant) on a sample.

    Works on at most ``_INIT_POOL`` random rows. The first centre is uniform; for each next one,
    ``2 + log(k)`` candidates are drawn with probability proportional to the squared chord
    distance 2 - 2cos to the nearest chosen centre (uniform if all are zero), and the candidate
    that most lowers the total squared distance is kept. The greedy trials make two seeds in one
    well-separated cluster (which Lloyd iterations cannot undo) much rarer than plain k-means++.
    """
    perm = torch.randperm(x.shape[0], generator=gen)[:_INIT_POOL]
    pool = x.cpu()[perm]  # (P, D)
    trials = 2 + int(math.log(k))
    first = int(torch.randint(pool.shape[0], (1,), generator=gen))
    chosen = [first]
    nearest = pool @ pool[first]  # (P,) similarity to the nearest chosen centre
    for _ in range(1, k):
        weights = (2.0 - 2.0 * nearest).clamp_min(0.0)
        if float(weights.sum()) <= 0.0:
            weights = torch.ones_like(weights)
        cands = torch.multinomial(weights, trials, replacement=True, generator=gen)  # (T,)
        best = torch.maximum(nearest[:, None], pool @ pool[cands].T)  # (P, T)
        pick = int((2.0 - 2.0 * best).clamp_min(0.0).sum(dim=0).argmin())
        chosen.append(int(cands[pick]))
        nearest = best[:, pick].contiguous()
    return pool[torch.tensor(chosen)].to(x.device)  # (K, D)


def _update(x: Tensor, assignments: Tensor, previous: Tensor) -> Tensor:
    """New centroids: normalised per-cluster sums over all ranks; empty ones keep ``previous``."""
    k = previous.shape[0]
    sums = torch.zeros_like(previous).index_add_(0, assignments, x)  # (K, D)
    counts = torch.bincount(assignments, minlength=k).to(x.dtype)  # (K,)
    distributed.all_reduce_sum(sums)
    distributed.all_reduce_sum(counts)
    return torch.where((counts > 0)[:, None], F.normalize(sums, dim=1), previous)


def _global_counts(assignments: Tensor, k: int) -> Tensor:
    counts = torch.bincount(assignments, minlength=k)
    return distributed.all_reduce_sum(counts)


def _reseed_empty(assignments: Tensor, sims: Tensor, k: int) -> Tensor:
    """Move the rows farthest from their centroid into empty clusters (see spherical_kmeans).

    Each round, every rank proposes its E farthest rows among clusters of count > 1 (E = number
    of empty clusters); all ranks see the same gathered proposals and make the same greedy
    choice, skipping a proposal that would empty its cluster. Repeats while progress is made.
    """
    assignments = assignments.clone()
    counts = _global_counts(assignments, k)  # (K,)
    while True:
        empty = torch.nonzero(counts == 0).flatten()  # (E,)
        if empty.numel() == 0:
            return assignments
        proposals = _propose(assignments, sims, counts, empty.numel())  # (W*E, 3)
        moved = _steal(proposals, empty, counts, assignments)
        if moved == 0:  # fewer rows than clusters: nothing left to take
            return assignments


def _propose(assignments: Tensor, sims: Tensor, counts: Tensor, e: int) -> Tensor:
    """(W*E, 3) float64 rows (similarity, local row, cluster), rank-major; +inf pads."""
    movable = counts[assignments] > 1  # (N,)
    keyed = torch.where(movable, sims, torch.full_like(sims, float("inf")))
    order = torch.sort(keyed, stable=True).indices[:e]
    out = torch.full((e, 3), float("inf"), dtype=torch.float64, device=sims.device)
    out[: order.numel(), 0] = keyed[order].double()
    out[: order.numel(), 1] = order.double()
    out[: order.numel(), 2] = assignments[order].double()
    return distributed.gather_no_grad(out)


def _steal(proposals: Tensor, empty: Tensor, counts: Tensor, assignments: Tensor) -> int:
    """Greedily give each empty cluster one proposed row; updates counts/assignments in place."""
    e = empty.numel()
    order = torch.sort(proposals[:, 0], stable=True).indices.tolist()  # farthest first
    moved = 0
    for p in order:
        sim, row, cluster = proposals[p].tolist()
        if moved == e or sim == float("inf"):
            break
        if counts[int(cluster)] <= 1:
            continue
        target = int(empty[moved])
        counts[int(cluster)] -= 1
        counts[target] += 1
        if p // e == distributed.rank():
            assignments[int(row)] = target
        moved += 1
    return moved
