"""Online mini-batch k-means over a stream of embeddings: KMCLR's prototypes.

KMCLR (M. Rossini, "Beyond Single Instance Positives For Contrastive Visual Representation
Learning", 2023; github.com/mwritescode/nnclr-cifar100, ``src/models/kmclr.py``) replaces NNCLR's
support set by K prototypes that scikit-learn's ``MiniBatchKMeans.partial_fit`` learns from every
training step's view-1 projections; the positive of a projection z is its nearest prototype. What
the original does, with file and line citations, and every way this module differs from it, are
in ``docs/kmclr.md``.

The algorithm is mini-batch k-means (Sculley, "Web-scale k-means clustering", WWW 2010, Alg. 1)
as scikit-learn implements it (``sklearn.cluster._kmeans._mini_batch_step``). For a batch
x (N, D), every row is assigned to its nearest centre (all assignments made before any centre
moves); then each centre j given m_j > 0 rows becomes the running mean of every row it was ever
given::

    c_j <- (n_j * c_j + sum_{i: a(i) = j} x_i) / (n_j + m_j),    n_j <- n_j + m_j

which is Sculley's per-point step c <- (1 - 1/n) c + x/n with per-centre counts n. Each time
10 * K rows have been seen, and whenever a centre's count is 0, centres whose count is below
``reassignment_ratio`` times the largest count are moved onto uniformly drawn rows of the batch
(at most N/2 of them, the lowest counts first) and given the smallest count among the others
(scikit-learn's reassignment of low-count centres, default ratio 0.01).

Geometry: ``spherical=True`` (the default) normalises the rows, assigns each to the prototype of
highest cosine similarity and keeps the prototypes at unit length: the direction of the running
mean, i.e. the normalised sum of every row the prototype was given (the mean update of spherical
k-means, Dhillon & Modha 2001, as :func:`nnclr.kmeans.spherical_kmeans`). The running mean itself
is kept as that direction times its length (``lengths``), so the update above is exact. The
original instead ran Euclidean k-means on the raw (batch-normalised, never L2-normalised)
projections, although its loss L2-normalises the positive (``src/utils/training/loss.py`` l.15)
and its own NNCLR baseline finds neighbours by cosine (``src/utils/support_set.py`` l.26-29). Here
the projections reach the selector L2-normalised and the loss only sees the positive's direction,
so the prototype whose direction is closest is the consistent choice: Euclidean assignment of a
unit z to a short mean (a diffuse cluster) and a long one (a tight cluster) can prefer the long
one although the short one's direction is closer. ``spherical=False`` is scikit-learn's algorithm
unchanged on z as given (no normalisation); ``tests/test_online_kmeans.py`` checks it against
``MiniBatchKMeans.partial_fit``.

Initialisation: the first K rows of the stream become the prototypes (count 1 each), in order, as
the original's periodic re-initialisation does with its last K projections; a batch with more rows
than still needed gives its seeds by greedy k-means++ (Arthur & Vassilvitskii 2007, with
scikit-learn's 2 + ln K candidate draws) given the prototypes already filled, and its remaining
rows go through a normal update, so every row is counted once. Until K rows have been seen
:attr:`OnlineKMeans.is_initialised` is False and :meth:`OnlineKMeans.nearest` refuses (the
selector falls back to z itself); nothing but the prototype rows is buffered.

Distributed: :meth:`OnlineKMeans.update` gathers the batch from every rank in rank order
(:func:`nnclr.distributed.gather_no_grad`) and every rank runs the same computation on it, and the
random row choices are broadcast from rank 0, so all ranks hold identical prototypes and W
processes compute exactly what one process computes on the global batch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from nnclr import distributed
from nnclr.kmeans import assign


class OnlineKMeans(torch.nn.Module):
    """Mini-batch k-means fitted online on a stream of (B, D) batches; all state in persistent buffers.

    Buffers: ``prototypes`` float32 (K, D) (unit rows when spherical, else the running means);
    ``counts`` int64 (K,) rows each prototype was given; ``lengths`` float32 (K,) the running
    means' lengths (spherical only); int64 scalars ``filled`` (prototype rows seeded so far, K once
    initialised), ``updates`` (calls of :meth:`update`) and ``seen_since_reassign`` (rows since the
    last reassignment check).

    Args:
        num_prototypes: K (400 in the original for CIFAR-100).
        dim: D, the embedding dimension.
        spherical: cosine geometry on L2-normalised rows (True) or scikit-learn's Euclidean k-means
            on the rows as given (False); see the module docstring.
        reassignment_ratio: scikit-learn's ``reassignment_ratio``; 0 never moves a prototype.
        reset_every: forget everything and re-seed from the stream at every ``reset_every``-th
            call of :meth:`update` (the original re-initialises every 3 epochs: pass
            ``3 * steps_per_epoch``); 0 never resets.
    """

    def __init__(
        self,
        num_prototypes: int,
        dim: int,
        *,
        spherical: bool = True,
        reassignment_ratio: float = 0.01,
        reset_every: int = 0,
    ) -> None:
        super().__init__()
        if num_prototypes < 1 or dim < 1:
            raise ValueError(f"num_prototypes and dim must be >= 1, got {num_prototypes} and {dim}")
        if reassignment_ratio < 0 or reset_every < 0:
            raise ValueError(f"reassignment_ratio and reset_every must be >= 0, got {reassignment_ratio} and "
                             f"{reset_every}")
        self.num_prototypes, self.dim, self.spherical = num_prototypes, dim, spherical
        self.reassignment_ratio, self.reset_every = reassignment_ratio, reset_every
        self.register_buffer("prototypes", torch.zeros(num_prototypes, dim))
        self.register_buffer("counts", torch.zeros(num_prototypes, dtype=torch.long))
        if spherical:
            self.register_buffer("lengths", torch.ones(num_prototypes))
        for name in ("filled", "updates", "seen_since_reassign"):
            self.register_buffer(name, torch.zeros((), dtype=torch.long))

    def extra_repr(self) -> str:
        return (f"num_prototypes={self.num_prototypes}, dim={self.dim}, spherical={self.spherical}, "
                f"reassignment_ratio={self.reassignment_ratio}, reset_every={self.reset_every}")

    @property
    def is_initialised(self) -> bool:
        """True once K rows have been seen since the start (or the last reset)."""
        return int(self.filled) == self.num_prototypes

    def storage_bytes(self) -> int:
        """Bytes of the state kept between steps: every buffer (all are saved in the state_dict)."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    @torch.no_grad()
    def update(self, z: Tensor, generator: torch.Generator) -> dict[str, float]:
        """One mini-batch k-means step on this step's batch (collective under torch.distributed).

        Args:
            z: (B, D) this process's rows (detached and cast to float32 here); every rank passes the same B.
            generator: CPU generator for the k-means++ draws and the reassignments (rank 0's draws are used).

        Returns:
            ``kmeans_inertia`` the mean squared distance of the batch's rows to their prototype before the
            update (2 - 2 cos when spherical; NaN when no row was assigned, i.e. while seeding),
            ``kmeans_empty`` the share of prototypes given no row of this batch (NaN likewise),
            ``kmeans_reassigned`` prototypes moved onto rows, ``kmeans_filled`` the share of prototypes seeded.
        """
        if z.dim() != 2 or z.shape[1] != self.dim:
            raise ValueError(f"expected z of shape (B, {self.dim}), got {tuple(z.shape)}")
        with torch.autocast(z.device.type, enabled=False):
            x = distributed.gather_no_grad(self._rows(z)).to(self.prototypes.device)  # (N, D), rank-major
            self.updates += 1
            if self.reset_every and int(self.updates) % self.reset_every == 0:
                self.filled.zero_()
                self.counts.zero_()
            if not self.is_initialised:
                x = self._seed(x, generator)
            stats = {"kmeans_inertia": math.nan, "kmeans_empty": math.nan, "kmeans_reassigned": 0.0}
            if x.shape[0] > 0 and self.is_initialised:
                stats = self._step(x, generator)
        return stats | {"kmeans_filled": int(self.filled) / self.num_prototypes}

    @torch.no_grad()
    def nearest(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """The nearest prototype of each row of z (B, D): (B,) float32 cosine similarity and (B,) int64 index.

        Nearest by cosine when spherical, by Euclidean distance otherwise (the similarity is still the
        cosine between z and that prototype). Float32 even under autocast; on z's device.
        """
        if not self.is_initialised:
            raise RuntimeError(f"the k-means has seen {int(self.filled)} of the {self.num_prototypes} rows it "
                               "needs to start: call update() until is_initialised")
        with torch.autocast(z.device.type, enabled=False):
            x = self._rows(z).to(self.prototypes.device)  # (B, D)
            if self.spherical:
                best, sims = assign(x, self.prototypes)
            else:
                best = self._assign(x)[0]
                sims = F.cosine_similarity(x, self.prototypes[best], dim=1)
        return sims.to(z.device), best.to(z.device)

    # --- internals ------------------------------------------------------------------------------

    def _rows(self, z: Tensor) -> Tensor:
        """z detached in float32, L2-normalised when spherical."""
        x = z.detach().float()
        return F.normalize(x, dim=1) if self.spherical else x

    def _assign(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(N,) index of each row's nearest prototype and (N,) its squared distance (2 - 2 cos if spherical)."""
        if self.spherical:
            best, sims = assign(x, self.prototypes)
            return best, (2.0 - 2.0 * sims).clamp_min(0.0)
        d2 = _squared_distances(x, self.prototypes)  # (N, K)
        dist, best = d2.min(dim=1)
        return best, dist

    def _seed(self, x: Tensor, generator: torch.Generator) -> Tensor:
        """Fill the next prototype rows from x (N, D); returns the rows not used as seeds."""
        start, need = int(self.filled), self.num_prototypes - int(self.filled)
        if x.shape[0] <= need:
            take = torch.arange(x.shape[0], device=x.device)
        else:
            take = _rank0(_kmeans_plus_plus(x, self.prototypes[:start], need, generator), x.device)
        rows = slice(start, start + take.numel())
        self.prototypes[rows] = x[take]
        self.counts[rows] = 1
        if self.spherical:
            self.lengths[rows] = x[take].norm(dim=1)
        self.filled += take.numel()
        if self.is_initialised:
            self.seen_since_reassign.zero_()
        rest = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        rest[take] = False
        return x[rest]

    def _step(self, x: Tensor, generator: torch.Generator) -> dict[str, float]:
        """scikit-learn's ``_mini_batch_step`` on x (N, D): assign, running-mean update, reassignment."""
        k = self.num_prototypes
        self.seen_since_reassign += x.shape[0]
        reassign = bool((self.counts == 0).any()) or int(self.seen_since_reassign) >= 10 * k
        if reassign:
            self.seen_since_reassign.zero_()
        best, dist = self._assign(x)  # (N,), (N,)
        given = torch.bincount(best, minlength=k)  # (K,) m_j
        sums = torch.zeros(k, self.dim, dtype=torch.float64, device=x.device).index_add_(0, best, x.double())
        old = self.prototypes.double() * (self.lengths.double()[:, None] if self.spherical else 1.0)  # (K, D)
        total = self.counts + given  # (K,) n_j + m_j
        means = torch.where((given > 0)[:, None], (old * self.counts[:, None] + sums) / total.clamp_min(1)[:, None],
                            old)  # (K, D) the running means
        self.counts.copy_(total)
        moved = self._reassign(x, means, generator) if reassign and self.reassignment_ratio > 0 else 0
        if self.spherical:
            lengths = means.norm(dim=1)  # (K,)
            keep = lengths > 0  # a mean of opposite rows has no direction: keep the old one
            self.prototypes.copy_(torch.where(keep[:, None], means / lengths.clamp_min(1e-300)[:, None],
                                              self.prototypes.double()))
            self.lengths.copy_(lengths)
        else:
            self.prototypes.copy_(means)
        return {"kmeans_inertia": float(dist.mean()), "kmeans_empty": float((given == 0).double().mean()),
                "kmeans_reassigned": float(moved)}

    def _reassign(self, x: Tensor, means: Tensor, generator: torch.Generator) -> int:
        """Move low-count prototypes onto random rows of x, in place on ``means`` and ``counts``."""
        counts = self.counts
        low = counts.double() < self.reassignment_ratio * float(counts.max())  # (K,)
        limit = int(0.5 * x.shape[0])  # at most half the batch, the lowest counts first
        if int(low.sum()) > 0.5 * x.shape[0]:
            low[torch.argsort(counts, stable=True)[limit:]] = False
        n = int(low.sum())
        if n == 0:
            return 0
        rows = _rank0(torch.randperm(x.shape[0], generator=generator)[:n], x.device)
        means[low] = x[rows].double()
        counts[low] = counts[~low].min()  # scikit-learn: not too small, or they would be moved again at once
        return n


def _squared_distances(x: Tensor, centres: Tensor) -> Tensor:
    """(N, C) squared Euclidean distances between the rows of x (N, D) and centres (C, D), >= 0."""
    d2 = (x * x).sum(1, keepdim=True) - 2.0 * x @ centres.T + (centres * centres).sum(1)
    return d2.clamp_min(0.0)


def _kmeans_plus_plus(x: Tensor, chosen: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """(k,) indices of distinct rows of x (N, D), N > k, by greedy k-means++ after the centres ``chosen`` (C, D).

    The first centre (when C = 0) is uniform; each next one is the best, by the resulting total squared
    distance, of 2 + ln(C + k) candidates drawn with probability proportional to the squared distance to
    the nearest centre so far (scikit-learn's ``_kmeans_plusplus``).
    """
    n = x.shape[0]
    trials = 2 + int(math.log(chosen.shape[0] + k))
    picked: list[int] = []
    if chosen.shape[0]:
        closest = _squared_distances(x, chosen).min(dim=1).values  # (N,)
    else:
        picked.append(int(torch.randint(n, (1,), generator=generator)))
        closest = _squared_distances(x, x[picked]).squeeze(1)
    while len(picked) < k:
        weights = closest.double().cpu()
        weights[picked] = 0.0  # also when rounding left a picked row a tiny distance to itself
        if float(weights.sum()) <= 0.0:  # every row sits on a centre: any row not yet picked
            weights = torch.ones(n, dtype=torch.float64)
            weights[picked] = 0.0
        candidates = torch.multinomial(weights, trials, replacement=True, generator=generator)  # (T,)
        after = torch.minimum(closest[:, None], _squared_distances(x, x[candidates.to(x.device)]))  # (N, T)
        best = int(after.sum(dim=0).argmin())
        picked.append(int(candidates[best]))
        closest = after[:, best]
    return torch.tensor(picked)


def _rank0(indices: Tensor, device: torch.device) -> Tensor:
    """Rank 0's copy of ``indices`` (the same shape on every rank), on ``device`` (NCCL broadcasts CUDA tensors)."""
    return distributed.broadcast(indices.to(device).contiguous(), src=0)
