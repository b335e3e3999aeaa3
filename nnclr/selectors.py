"""Selectors: each method's state between steps and the hooks the training loop calls on it.

SimCLR, NNCLR and KMCLR share backbone, projector, predictor and loss; they differ only in which
vector is the positive for a projection z (DESIGN.md section 3):

- :class:`Selector` itself (SimCLR): the positive is the other view's z; no state.
- :class:`NearestNeighbourSelector` (NNCLR, Dwibedi et al., ICCV 2021, arXiv 2104.14548): NN(z, Q),
  the support-set entry of highest cosine similarity, detached; top-1 (the paper's ablation found
  sampling one of the top-k worse). With ``method.prior`` the support-set selectors choose their rows in a
  prior space for the first epochs (:class:`SupportSelector`, :mod:`nnclr.prior`; after GPS-SSL).
- :class:`PrototypeSelector` (KMCLR, mwritescode/nnclr-cifar100): the nearest of K prototypes of
  mini-batch k-means fitted online on the stream of projections, detached; no support set.

DeepCluster's :class:`~nnclr.deepcluster.PseudoLabels` is a selector too: its targets are the
samples' k-means pseudo-labels. Every selector is a ``torch.nn.Module`` whose persistent buffers
are its state (saved in the checkpoint as ``selector``), and the loop calls the same three hooks on
every method's selector, so it never asks which method it trains:

- :meth:`Selector.start_epoch` before an epoch's first step (DeepCluster re-clusters the training set);
- :meth:`Selector.epoch_order` for the epoch's sample order (DeepCluster: uniform over pseudo-labels);
- :meth:`Selector.after_step` after the optimiser step, with the batch's z (KMCLR's online k-means).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from nnclr.errors import UserError
from nnclr.online_kmeans import OnlineKMeans
from nnclr.prior import PriorSpace
from nnclr.support import SupportSet


class Selection(NamedTuple):
    """What a positive selector returns for a batch of B projections."""

    positives: Tensor  # (B, D) L2-normalised
    rows: Tensor  # (B,) or (B, k) support rows the positive was made of (-1 = none / not from the support set)
    similarity: Tensor  # (B,) cosine similarity between z and its positive (detached)


@dataclass
class EpochContext:
    """What :meth:`Selector.start_epoch` may use.

    ``features()`` computes the L2-normalised projections z (N, D) of every training image (model in
    eval mode, no augmentation, identical on every rank); it is costly and only called on demand.
    ``extract(module)`` gives any module's L2-normalised outputs (N, F) for every training image, prepared
    as for ``features()`` (the pixel prior's thumbnails, :class:`~nnclr.prior.Thumbnails`).
    """

    epoch: int
    first_step: int  # the epoch's first step: epoch * steps per epoch (a resumed run may start later)
    features: Callable[[], Tensor]
    extract: Callable[[torch.nn.Module], Tensor]
    generator: torch.Generator  # seeded by (train.seed, CLUSTER, epoch)
    true_labels: Tensor | None  # (N,) -1 where unknown; for diagnostics only
    classifier: torch.nn.Module | None  # the model's classifier head, if it has one
    optimizer: torch.optim.Optimizer


class Selector(torch.nn.Module):
    """The base of every method's state; alone it is SimCLR's (no state, every hook a no-op)."""

    def start_epoch(self, context: EpochContext) -> dict[str, Any] | None:
        """Before the first step of ``context.epoch``; returns a ``clustering`` record to log, or None."""
        return None

    def epoch_order(self, num_samples: int, generator: torch.Generator) -> Tensor:
        """(num_samples,) the epoch's sample order: a uniform permutation."""
        return torch.randperm(num_samples, generator=generator)

    def after_step(self, z: Tensor, generator: torch.Generator) -> dict[str, float]:
        """After the optimiser step, with this rank's view-1 projections z (b, D), detached; returns diagnostics.

        Called on every rank (it may be collective); ``generator`` is the step's CPU generator (the same on every
        rank). The support set is enqueued by the loop, not here.
        """
        return {}


class PositiveSelector(Selector):
    """A selector that gives each projection z a positive vector (NNCLR, KMCLR and their relatives)."""

    def forward(self, z: Tensor, support: SupportSet | None, *, indices: Tensor, uniform: Tensor,
                step: int | None = None) -> Selection:
        """Positives for z (b, D).

        Args:
            z: this rank's L2-normalised projections of one view.
            support: the support set (None for methods that keep none).
            indices: (b,) the samples' indices in the data set.
            uniform: (b,) uniforms in [0, 1) for random choices, drawn for the global batch from the step's
                generator and sliced by rank, so that a resumed run and W processes choose alike.
            step: the training step (0-based); a selector with a prior space needs it.
        """
        raise NotImplementedError


def self_positive(z: Tensor) -> Selection:
    """The fallback positive: z itself, detached (similarity 1, no row)."""
    positives = F.normalize(z.detach(), dim=1)  # (B, D)
    rows = torch.full((z.shape[0],), -1, dtype=torch.long, device=z.device)
    return Selection(positives, rows, torch.ones(z.shape[0], device=z.device))


class SupportSelector(PositiveSelector):
    """What the support-set selectors share: self-exclusion, the bf16 lookup and an optional prior space.

    With a prior (``method.prior``, :class:`~nnclr.prior.PriorSpace`), the steps of its phase choose the support
    rows by the similarity of the samples' prior vectors (:meth:`SupportSet.topk_by_sample`) instead of z's; the
    positives are still the chosen rows' stored z, and the similarities returned are z's cosines with them, so
    the loss and the neighbour diagnostics see the positives actually used.
    """

    def __init__(self, *, exclude_self: bool, low_precision: bool, prior: PriorSpace | None) -> None:
        super().__init__()
        self.exclude_self, self.low_precision = exclude_self, low_precision
        self.prior = prior  # a submodule (its vectors are in the state) or None (no state: today's)

    def start_epoch(self, context: EpochContext) -> dict[str, Any] | None:
        """Before the run's first step, the prior's vectors (one pass over the training set); else nothing."""
        if self.prior is not None:
            self.prior.start_epoch(context)
        return None

    def uses_prior(self, step: int | None) -> bool:
        """Whether ``step`` chooses its neighbours in the prior space."""
        return self.prior is not None and self.prior.active(step)

    def prior_topk(self, z: Tensor, support: SupportSet, *, indices: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """The k rows nearest each query's sample in the prior space: z's cosines (b, k) with their stored z
        (-inf where there is no row), rows (b, k) (-1 where there is none), on z's device."""
        assert self.prior is not None
        exclude = indices if self.exclude_self else None
        _, rows = support.topk_by_sample(self.prior.vectors, indices, k=k, exclude_indices=exclude)
        return _cosines(z, support, rows.to(z.device)), rows.to(z.device)


def _cosines(z: Tensor, support: SupportSet, rows: Tensor) -> Tensor:
    """Cosines of each query z (b, D) with the stored rows (b,) or (b, k); -inf where a row is -1."""
    stored = support.embeddings[rows.clamp_min(0).to(support.embeddings.device)].to(z.device)  # (b, [k,] D)
    query = F.normalize(z.detach().float(), dim=1)
    sims = (query[:, None] * stored.reshape(len(z), -1, stored.shape[-1])).sum(dim=-1).reshape(rows.shape)
    return torch.where(rows >= 0, sims, float("-inf"))


class NearestNeighbourSelector(SupportSelector):
    """NNCLR: the positive is the nearest support-set entry NN(z, Q), detached.

    Args:
        topk: 1 = the nearest entry (the paper's default and best); k > 1 = one of the k nearest,
            chosen by ``uniform`` (the paper's ablation).
        exclude_self: never pick an entry holding a copy of the query's own sample (a stale
            embedding of the same image from an earlier epoch).
        low_precision: bf16 scan + exact fp32 re-scoring in :meth:`SupportSet.nearest` (same rows,
            faster on CPUs with AVX512-BF16/AMX and on GPUs).
        prior: choose the entry in this prior space for the steps of its phase (``method.prior``, see
            :class:`SupportSelector`); None = always in z space.

    Rows without a neighbour (empty support set, or every filled row excluded) fall back to
    ``z.detach()`` with ``rows = -1``.
    """

    def __init__(self, *, topk: int = 1, exclude_self: bool = True, low_precision: bool = False,
                 prior: PriorSpace | None = None) -> None:
        super().__init__(exclude_self=exclude_self, low_precision=low_precision, prior=prior)
        if topk < 1:
            raise UserError(f"method.topk must be >= 1, got {topk}")
        self.topk = topk

    def extra_repr(self) -> str:
        return f"topk={self.topk}, exclude_self={self.exclude_self}, low_precision={self.low_precision}"

    def forward(self, z: Tensor, support: SupportSet | None, *, indices: Tensor, uniform: Tensor,
                step: int | None = None) -> Selection:
        """Look up NN(z, Q) for each row of z (b, D) (in the prior space while ``step`` is in its phase)."""
        assert support is not None, "NNCLR needs a support set"
        exclude = indices if self.exclude_self else None
        if self.uses_prior(step):
            assert self.prior is not None
            rows, _ = support.nearest_by_sample(self.prior.vectors, indices, exclude_indices=exclude, k=self.topk,
                                                uniform=uniform)
            rows = rows.to(z.device)
            sims = _cosines(z, support, rows)
        else:
            rows, sims = support.nearest(z, exclude_indices=exclude, k=self.topk, uniform=uniform,
                                         low_precision=self.low_precision)
            rows, sims = rows.to(z.device), sims.to(z.device)
        fallback = self_positive(z)
        found = rows >= 0  # (b,)
        neighbours = support.embeddings[rows.clamp_min(0).to(support.embeddings.device)]
        positives = torch.where(found[:, None], neighbours.to(z.device, z.dtype), fallback.positives)  # (b, D)
        return Selection(positives, rows, torch.where(found, sims, fallback.similarity))


class NeighboursSelector(SupportSelector):
    """The k nearest support-set entries of z, detached: the positives of the several-neighbour methods.

    Later work found that NNCLR's single nearest neighbour is a noisy positive and that softening or
    aggregating several neighbours helps (issue 21; pc-cp/Benchmark-Methods-For-MNN's README: "NNCLR top-5"
    88.83 vs NNCLR 87.72 kNN on CIFAR-10). :meth:`neighbours` gives the k nearest rows and their weights, for
    a loss with k positives (:func:`nnclr.step.neighbours_loss`); calling the selector gives one positive, the
    normalised weighted mean of the k neighbours (mean shift: MSF, Koohpayegani et al., ICCV 2021, pulls a
    target towards the mean of its k nearest neighbours; CMSF, Navaneet et al., ECCV 2022).

    Args:
        k: neighbours per query (``method.neighbours``).
        weighting: ``uniform`` (1/k each) or ``soft`` (softmax of the cosine similarities / ``soft_temperature``,
            so that closer neighbours count more).
        soft_temperature: the softmax temperature of ``soft`` weighting.
        exclude_self, low_precision, prior: as :class:`NearestNeighbourSelector`. In the prior phase the k rows
            are the k nearest in the prior space (nearest first) and ``soft`` weighs them by z's cosines.

    A query with fewer than k neighbours (a support set still filling) weighs only those it has; one with none
    falls back to ``z.detach()``.
    """

    def __init__(self, *, k: int = 5, weighting: str = "uniform", soft_temperature: float = 0.1,
                 exclude_self: bool = True, low_precision: bool = False, prior: PriorSpace | None = None) -> None:
        super().__init__(exclude_self=exclude_self, low_precision=low_precision, prior=prior)
        if k < 1:
            raise UserError(f"method.neighbours must be >= 1, got {k}")
        if weighting not in ("uniform", "soft"):
            raise ValueError(f"weighting must be uniform or soft, got {weighting!r}")
        self.k, self.weighting, self.soft_temperature = k, weighting, soft_temperature

    def extra_repr(self) -> str:
        return (f"k={self.k}, weighting={self.weighting}, soft_temperature={self.soft_temperature}, "
                f"exclude_self={self.exclude_self}, low_precision={self.low_precision}")

    def neighbours(self, z: Tensor, support: SupportSet | None, *, indices: Tensor,
                   step: int | None = None) -> Neighbours:
        """The k nearest rows of each query (b, D) and their weights (in the prior space while ``step`` is in
        its phase)."""
        assert support is not None, "the neighbour methods need a support set"
        if self.uses_prior(step):
            sims, rows = self.prior_topk(z, support, indices=indices, k=self.k)
        else:
            exclude = indices if self.exclude_self else None
            sims, rows = support.topk(z, k=self.k, exclude_indices=exclude, low_precision=self.low_precision)
            rows, sims = rows.to(z.device), sims.to(z.device)  # (b, k), -1 / -inf where there is no row
        found = rows >= 0
        stored = support.embeddings[rows.clamp_min(0).to(support.embeddings.device)].to(z.device, z.dtype)
        positives = torch.where(found[..., None], stored, F.normalize(z.detach(), dim=1)[:, None])  # (b, k, D)
        if self.weighting == "soft":
            logits = torch.where(found, sims / self.soft_temperature, float("-inf"))
        else:
            logits = torch.where(found, 0.0, float("-inf"))
        none = ~found.any(dim=1, keepdim=True)  # (b, 1): the fallback z counts once
        logits = torch.where(none, torch.where(torch.arange(self.k, device=z.device) == 0, 0.0, float("-inf")),
                             logits)
        return Neighbours(positives, logits.softmax(dim=1), rows, torch.where(found, sims, 1.0))

    def forward(self, z: Tensor, support: SupportSet | None, *, indices: Tensor, uniform: Tensor,
                step: int | None = None) -> Selection:
        """One positive per query: the normalised weighted mean of its k neighbours (b, D)."""
        n = self.neighbours(z, support, indices=indices, step=step)
        positives = F.normalize((n.weights[..., None] * n.positives).sum(dim=1), dim=1)  # (b, D)
        similarity = (F.normalize(z.detach(), dim=1) * positives).sum(dim=1)
        return Selection(positives, n.rows, similarity)


class Neighbours(NamedTuple):
    """What :meth:`NeighboursSelector.neighbours` returns for b queries."""

    positives: Tensor  # (b, k, D) L2-normalised neighbours (z.detach() where a query has none)
    weights: Tensor  # (b, k) each row sums to 1; 0 for missing neighbours
    rows: Tensor  # (b, k) support rows, -1 where missing, nearest first
    similarity: Tensor  # (b, k) cosine of z with each positive


class PrototypeSelector(PositiveSelector):
    """KMCLR: the positive is the nearest of K prototypes of online mini-batch k-means, detached.

    The prototypes (:class:`~nnclr.online_kmeans.OnlineKMeans`) learn from every step's view-1
    projections in :meth:`after_step`, after the loss, as the support set is enqueued after it; no
    support set is kept. Until the k-means is initialised the positive falls back to ``z.detach()``.

    Args:
        num_prototypes: K (400 matched NNCLR on CIFAR-100 in the original).
        dim: embedding dimension D.
        reset_every: steps between two re-initialisations of the k-means from the stream (the original
            re-initialises every 3 epochs, which its report found better than every 10); 0 = never.
    """

    def __init__(self, *, num_prototypes: int = 400, dim: int, reset_every: int = 0) -> None:
        super().__init__()
        if num_prototypes < 1:
            raise UserError(f"method.num_prototypes must be >= 1, got {num_prototypes}")
        self.kmeans = OnlineKMeans(num_prototypes, dim, reset_every=reset_every)

    def forward(self, z: Tensor, support: SupportSet | None, *, indices: Tensor, uniform: Tensor,
                step: int | None = None) -> Selection:
        """Each row's nearest prototype (b, D); ``support``, ``indices``, ``uniform`` and ``step`` unused."""
        if not self.kmeans.is_initialised:
            return self_positive(z)
        sims, best = self.kmeans.nearest(z)  # (b,), (b,)
        rows = torch.full_like(best, -1)
        return Selection(self.kmeans.prototypes[best].to(z.device, z.dtype), rows, sims.to(z.device))

    def after_step(self, z: Tensor, generator: torch.Generator) -> dict[str, float]:
        """One mini-batch k-means step on this step's projections (collective under torchrun)."""
        return self.kmeans.update(z, generator)

    @property
    def prototypes(self) -> Tensor:
        """(K, D) the current prototypes."""
        return self.kmeans.prototypes
