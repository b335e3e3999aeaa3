"""Positive selectors: the one pluggable piece that turns the shared machinery into a method.

SimCLR, NNCLR and KMCLR share backbone, projector, predictor, support set and loss; they differ
only in which vector is the positive for a projection z (DESIGN.md section 3):

- ``instance`` (SimCLR): z itself, gradient flowing through it.
- ``nn`` (NNCLR, Dwibedi et al., ICCV 2021, arXiv 2104.14548): NN(z, Q), the support-set entry
  of highest cosine similarity, detached; top-1 (the paper's ablation found sampling one of the
  top-k worse).
- ``kmeans`` (KMCLR): the nearest of K online spherical k-means prototypes of the support set,
  detached (K = 400 matched NNCLR on CIFAR-100 while storing 0.4% of the vectors).

All selectors are ``torch.nn.Module`` so that a model can hold any of them as a submodule; only
the k-means one has state (persistent buffers), the others have an empty ``state_dict``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from nnclr import distributed
from nnclr.errors import UserError
from nnclr.kmeans import kmeans_plus_plus, spherical_kmeans
from nnclr.support import SupportSet


class Selection(NamedTuple):
    """What a selector returns for a batch of B projections."""

    positives: Tensor  # (B, D) L2-normalised
    rows: Tensor  # (B,) support rows used (-1 = none / not from the support set)
    similarity: Tensor  # (B,) cosine similarity between z and its positive (detached)


def _self_positive(z: Tensor, detach: bool) -> Selection:
    """Fallback/instance selection: the positive is z itself (similarity 1)."""
    positives = F.normalize(z.detach() if detach else z, dim=1)  # (B, D)
    rows = torch.full((z.shape[0],), -1, dtype=torch.long, device=z.device)
    return Selection(positives, rows, torch.ones(z.shape[0], device=z.device))


class InstanceSelector(torch.nn.Module):
    """SimCLR: the positive is the view's own projection z; gradients flow through it."""

    def forward(self, z: Tensor, support: SupportSet, *, indices: Tensor, step: int) -> Selection:
        """Return z (normalised) as its own positive; ``support``/``indices``/``step`` unused."""
        return _self_positive(z, detach=False)


class NearestNeighbourSelector(torch.nn.Module):
    """NNCLR: the positive is the nearest support-set entry NN(z, Q), detached.

    Args:
        topk: 1 = the nearest entry (the paper's default and best); k > 1 = one of the k nearest
            uniformly at random (the paper's ablation; uses the global torch RNG).
        exclude_self: never pick an entry holding a copy of the query's own sample (a stale
            embedding of the same image from an earlier epoch).
        low_precision: bf16 scan + fp32 re-rank in :meth:`SupportSet.nearest` (same rows, ~2-3x
            faster on CPUs with AVX512-BF16 and on GPUs).

    Rows without a neighbour (empty support set, or every filled row excluded) fall back to
    ``z.detach()`` with ``rows = -1``.
    """

    def __init__(self, *, topk: int = 1, exclude_self: bool = True,
                 low_precision: bool = False) -> None:
        super().__init__()
        if topk < 1:
            raise UserError(f"selector topk must be >= 1, got {topk}")
        self.topk, self.exclude_self, self.low_precision = topk, exclude_self, low_precision

    def extra_repr(self) -> str:
        return (f"topk={self.topk}, exclude_self={self.exclude_self}, "
                f"low_precision={self.low_precision}")

    def forward(self, z: Tensor, support: SupportSet, *, indices: Tensor, step: int) -> Selection:
        """Look up NN(z, Q) for each row of z (B, D); ``step`` unused."""
        exclude = indices if self.exclude_self else None
        rows, sims = support.nearest(z, exclude_indices=exclude, k=self.topk,
                                     low_precision=self.low_precision)
        rows, sims = rows.to(z.device), sims.to(z.device)
        fallback = _self_positive(z, detach=True)
        found = rows >= 0  # (B,)
        neighbours = support.embeddings[rows.clamp_min(0).to(support.embeddings.device)]
        positives = torch.where(found[:, None], neighbours.to(z.device, z.dtype),
                                fallback.positives)  # (B, D)
        return Selection(positives, rows, torch.where(found, sims, fallback.similarity))


class KMeansSelector(torch.nn.Module):
    """KMCLR: the positive is the nearest of K online spherical k-means prototypes, detached.

    The prototypes are re-clustered from the filled support-set rows every ``recluster_every``
    steps (warm-started from the previous prototypes; the first clustering is seeded by greedy
    k-means++ from a generator seeded with the step, so it is reproducible), as soon as at least
    K rows are filled. Until then the positive falls back to ``z.detach()``. Under DDP every rank
    clusters its share of the (identical, gathered) support set and the statistics are reduced,
    so all ranks hold the same prototypes; the call is then collective.

    Buffers (persistent, so a resumed run continues exactly): ``prototypes`` (K, D) float32,
    ``last_recluster`` int64 scalar (-1 = never clustered).

    Args:
        num_prototypes: K (400 matched NNCLR on CIFAR-100).
        recluster_every: steps between re-clusterings.
        iters: Lloyd iterations per re-clustering.
        dim: embedding dimension.
    """

    def __init__(self, *, num_prototypes: int = 400, recluster_every: int = 100, iters: int = 10,
                 dim: int) -> None:
        super().__init__()
        if num_prototypes < 1 or recluster_every < 1 or iters < 1:
            raise UserError("kmeans selector needs num_prototypes, recluster_every and iters >= 1")
        self.num_prototypes = num_prototypes
        self.recluster_every, self.iters = recluster_every, iters
        self.register_buffer("prototypes", torch.zeros(num_prototypes, dim))
        self.register_buffer("last_recluster", torch.tensor(-1, dtype=torch.long))

    def extra_repr(self) -> str:
        return (f"num_prototypes={self.num_prototypes}, recluster_every={self.recluster_every}, "
                f"iters={self.iters}")

    @property
    def is_clustered(self) -> bool:
        """True once the prototypes have been computed at least once."""
        return int(self.last_recluster) >= 0

    def due(self, support: SupportSet, step: int) -> bool:
        """Whether :meth:`forward` at ``step`` re-clusters (enough rows and the interval passed)."""
        if int(support.num_filled) < self.num_prototypes:
            return False
        return not self.is_clustered or step - int(self.last_recluster) >= self.recluster_every

    @torch.no_grad()
    def recluster(self, support: SupportSet, step: int) -> None:
        """Run spherical k-means on the filled support rows and store the prototypes.

        The support set is identical on every rank, so the first k-means++ seeding is drawn from
        all n rows (the same on every rank and in one process); the Lloyd iterations then run on
        this rank's 1/W of the rows with the per-cluster sums all-reduced.
        """
        n = int(support.num_filled)
        share = torch.tensor_split(torch.arange(n), distributed.world_size())[distributed.rank()]
        rows = support.embeddings[share.to(support.embeddings.device)]  # (n / W, D)
        if self.is_clustered:
            init = self.prototypes
        else:
            generator = torch.Generator().manual_seed(int(step))
            init = kmeans_plus_plus(support.embeddings[:n], self.num_prototypes, generator)  # (K, D)
        centroids, _ = spherical_kmeans(rows, self.num_prototypes, iters=self.iters, init=init)
        self.prototypes.copy_(centroids)
        self.last_recluster.fill_(int(step))

    def forward(self, z: Tensor, support: SupportSet, *, indices: Tensor, step: int) -> Selection:
        """Re-cluster if due, then pick each row's nearest prototype; ``indices`` unused."""
        if self.due(support, step):
            self.recluster(support, step)
        if not self.is_clustered:
            return _self_positive(z, detach=True)
        sims, best = self._nearest_prototype(z)  # (B,), (B,)
        rows = torch.full_like(best, -1)
        return Selection(self.prototypes[best].to(z.dtype), rows, sims)

    def assign(self, z: Tensor) -> Tensor:
        """(B,) index of the nearest prototype of each row of z (for diagnostics)."""
        return self._nearest_prototype(z)[1]

    @torch.no_grad()
    def _nearest_prototype(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """(B,) fp32 cosine to the nearest prototype and (B,) its index."""
        with torch.autocast(z.device.type, enabled=False):
            return (F.normalize(z.detach().float(), dim=1) @ self.prototypes.T).max(dim=1)


SELECTORS: dict[str, type[torch.nn.Module]] = {
    "instance": InstanceSelector,
    "nn": NearestNeighbourSelector,
    "kmeans": KMeansSelector,
}


def build_selector(kind: str, **kwargs: object) -> torch.nn.Module:
    """Construct the selector registered as ``kind`` with keyword arguments ``kwargs``.

    Raises:
        UserError: unknown ``kind`` (the message lists the valid ones) or arguments it does
            not take.
    """
    if kind not in SELECTORS:
        raise UserError(f"unknown selector {kind!r}; valid kinds: {', '.join(sorted(SELECTORS))}")
    try:
        return SELECTORS[kind](**kwargs)
    except TypeError as err:
        raise UserError(f"bad arguments for selector {kind!r}: {err}") from None
