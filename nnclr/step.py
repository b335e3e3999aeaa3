"""One step's loss: the forward pass every method shares and the losses the methods are made of.

NNCLR (Dwibedi et al., ICCV 2021, Eq. 2, symmetrised as in Sec. 3.2)::

    L = 1/2 * [ nnclr_loss(NN(z1), p2) + nnclr_loss(NN(z2), p1) ]

with ``NN`` the selector's positive (the nearest support-set entry for NNCLR, the nearest k-means
prototype for KMCLR): :func:`positive_loss`. SimCLR (Chen et al., 2020) uses NT-Xent on ``(z1, z2)``
with 2N-2 negatives and no predictor: :func:`instance_loss`. DeepCluster (Caron et al., ECCV 2018)
classifies both views into the samples' k-means pseudo-labels: :func:`pseudo_label_loss`. All4One
adds a centroid and a feature contrast to NNCLR's loss, with modules of its own (``StepInputs.extras``):
:func:`all4one_loss`. Which method uses which loss is written in its record (:mod:`nnclr.methods`).

For short runs a method whose record says ``short_run`` mixes in SimCLR's loss, whose positive is
good from the first step while the support set's neighbours are still near-random::

    L_w = w * NT-Xent(z1, z2) + (1 - w) * L,   w = instance_weight(config.method, step, schedule_steps)

Both views go through the network in one forward pass, so batch-norm sees both views as one
batch of 2B (as lightly's benchmarks and byol-pytorch do); this is the same for every method.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nnclr import all4one, deepcluster
from nnclr.config import MethodConfig
from nnclr.losses import at_least_fp32, multi_positive_loss, nnclr_loss, nt_xent, positiveness, soft_neighbours_loss
from nnclr.selectors import Neighbours, NeighboursSelector, PositiveSelector, Selector
from nnclr.support import SupportSet


def instance_weight(method: MethodConfig, step: int, schedule_steps: int) -> float:
    """w at 0-based ``step``: ``method.instance_weight`` falling linearly to 0 at step
    ``method.instance_decay * schedule_steps`` (for the methods whose record has ``short_run``).

    >>> instance_weight(MethodConfig(instance_weight=1.0, instance_decay=0.5), 25, 100)
    0.5
    """
    if method.instance_weight == 0 or method.instance_decay == 0:
        return 0.0
    return method.instance_weight * max(0.0, 1.0 - step / (method.instance_decay * schedule_steps))


@dataclass
class StepInputs:
    """What a method's loss is computed from.

    ``z1``/``z2`` (b, D) are the L2-normalised fp32 projections of the two views, ``p1``/``p2`` the
    prediction head's outputs (b, D), z itself without a predictor, or a classifier's logits (b, K).
    ``uniforms`` (2, b) are this rank's rows of uniforms drawn for the global batch, one row per view.
    ``t1``/``t2`` (b, D) are the target network's L2-normalised fp32 projections of the views (no gradient), for
    the methods with one (BYOL's), else None. ``extras`` are the method's own trainable modules (its record's
    ``extras``, held by the model as ``model.extras``), for the methods with some, else None.
    """

    z1: torch.Tensor
    z2: torch.Tensor
    p1: torch.Tensor
    p2: torch.Tensor
    support: SupportSet | None
    selector: Selector
    labels: torch.Tensor  # (b,) -1 = unknown
    indices: torch.Tensor  # (b,) sample indices in the data set
    step: int
    uniforms: torch.Tensor
    temperature: float
    instance_weight: float
    t1: torch.Tensor | None = None
    t2: torch.Tensor | None = None
    extras: nn.Module | None = None


@dataclass
class StepOutput:
    """The loss (fp32 scalar with graph), what to enqueue into the support set (b, D): view 1's z, or its target
    projection t1 for the methods with a target network, and the diagnostics.

    ``diagnostics`` (see ``SupportSet.diagnostics``): ``positive_similarity`` (mean cosine between
    z and its positive), ``nn_label_agreement`` (share of neighbours with the query's label,
    solo-learn's ``nn_acc``), ``nn_age`` (steps since the neighbour was written), ``nn_self_hit``
    (share of neighbours that are a stale copy of the query), ``nn_found``, ``support_fill``.
    """

    loss: torch.Tensor
    z1: torch.Tensor
    diagnostics: dict[str, float]


Loss = Callable[[StepInputs], StepOutput]


def instance_loss(x: StepInputs) -> StepOutput:
    """SimCLR: NT-Xent of (z1, z2), each view the other's positive (Chen et al., 2020, Eq. 1)."""
    return StepOutput(nt_xent(x.z1, x.z2, temperature=x.temperature), x.z1.detach(), {})


def positive_loss(x: StepInputs) -> StepOutput:
    """NNCLR's symmetrised loss with the selector's positives, mixed with NT-Xent by ``x.instance_weight``."""
    selector = x.selector
    assert isinstance(selector, PositiveSelector)
    s1 = selector(x.z1, x.support, indices=x.indices, uniform=x.uniforms[0], step=x.step)
    s2 = selector(x.z2, x.support, indices=x.indices, uniform=x.uniforms[1], step=x.step)
    loss = 0.5 * (
        nnclr_loss(s1.positives, x.p2, temperature=x.temperature)
        + nnclr_loss(s2.positives, x.p1, temperature=x.temperature)
    )
    w = x.instance_weight
    if w > 0:
        loss = w * nt_xent(x.z1, x.z2, temperature=x.temperature) + (1 - w) * loss
    diagnostics: dict[str, float] = {"positive_similarity": s1.similarity.float().mean().item(), "instance_weight": w}
    if x.support is not None:  # the neighbour diagnostics, computed before this step's enqueue, over every row used
        rows = s1.rows.reshape(len(x.z1), -1)  # (b, k): k = 1 for NNCLR, the neighbours averaged for nnclr_mean
        k = rows.shape[1]
        diagnostics |= x.support.diagnostics(
            rows.flatten(), s1.similarity.repeat_interleave(k), step=x.step,
            labels=x.labels.repeat_interleave(k), indices=x.indices.repeat_interleave(k))
    return StepOutput(loss, x.z1.detach(), diagnostics)


def neighbours_loss(x: StepInputs) -> StepOutput:
    """NNCLR's loss with the k nearest neighbours of each z as weighted positives
    (:func:`~nnclr.losses.multi_positive_loss`), symmetrised over the views and mixed with NT-Xent by
    ``x.instance_weight`` as :func:`positive_loss` is; the diagnostics are over all k neighbours."""
    selector = x.selector
    assert isinstance(selector, NeighboursSelector) and x.support is not None
    n1 = selector.neighbours(x.z1, x.support, indices=x.indices, step=x.step)
    n2 = selector.neighbours(x.z2, x.support, indices=x.indices, step=x.step)
    loss = 0.5 * (
        multi_positive_loss(n1.positives, n1.weights, x.p2, temperature=x.temperature)
        + multi_positive_loss(n2.positives, n2.weights, x.p1, temperature=x.temperature)
    )
    w = x.instance_weight
    if w > 0:
        loss = w * nt_xent(x.z1, x.z2, temperature=x.temperature) + (1 - w) * loss
    similarity = (n1.weights * n1.similarity).sum(dim=1)  # (b,) weighted cosine of z with its positives
    diagnostics: dict[str, float] = {"positive_similarity": similarity.float().mean().item(), "instance_weight": w}
    k = n1.rows.shape[1]  # label agreement, age and self-hits over every neighbour used
    diagnostics |= x.support.diagnostics(n1.rows.flatten(), n1.similarity.flatten(), step=x.step,
                                         labels=x.labels.repeat_interleave(k), indices=x.indices.repeat_interleave(k))
    return StepOutput(loss, x.z1.detach(), diagnostics)


def snclr_loss(x: StepInputs) -> StepOutput:
    """SNCLR (Ge et al., ICLR 2023): the other view's z stays the positive and the k nearest support-set
    neighbours of that z join it as soft positives, weighted by their positiveness to this view's z
    (:func:`~nnclr.losses.positiveness`, τ_a = ``method.attention_temperature``); symmetrised over the views
    (:func:`~nnclr.losses.soft_neighbours_loss`) and mixed with NT-Xent by ``x.instance_weight`` as
    :func:`positive_loss` is. The reference code's targets come from a momentum encoder; here they are the online
    network's z, as NNCLR's and SimCLR's are. The diagnostics are over all k."""
    selector = x.selector
    assert isinstance(selector, NeighboursSelector) and x.support is not None
    n1 = selector.neighbours(x.z1.detach(), x.support, indices=x.indices, step=x.step)  # neighbours of view 1's z
    n2 = selector.neighbours(x.z2.detach(), x.support, indices=x.indices, step=x.step)
    found1, found2 = n1.rows >= 0, n2.rows >= 0
    w1 = positiveness(x.z1, n2.positives, found2, temperature=selector.soft_temperature)  # view 1 scores k2's
    w2 = positiveness(x.z2, n1.positives, found1, temperature=selector.soft_temperature)
    loss = 0.5 * (
        soft_neighbours_loss(x.p1, x.z2, n2.positives, w1, found2, temperature=x.temperature)
        + soft_neighbours_loss(x.p2, x.z1, n1.positives, w2, found1, temperature=x.temperature)
    )
    w = x.instance_weight
    if w > 0:
        loss = w * nt_xent(x.z1, x.z2, temperature=x.temperature) + (1 - w) * loss
    similarity = (w2.detach() * n1.similarity).sum(dim=1)  # (b,) score-weighted cosine of z1 with its neighbours
    diagnostics: dict[str, float] = {"positive_similarity": similarity.float().mean().item(), "instance_weight": w}
    k = n1.rows.shape[1]
    diagnostics |= x.support.diagnostics(n1.rows.flatten(), n1.similarity.flatten(), step=x.step,
                                         labels=x.labels.repeat_interleave(k), indices=x.indices.repeat_interleave(k))
    return StepOutput(loss, x.z1.detach(), diagnostics)


def byol_loss(p: torch.Tensor, targets: torch.Tensor, found: torch.Tensor | None = None) -> torch.Tensor:
    """BYOL's loss (Grill et al., NeurIPS 2020, Eq. 2) averaged over each sample's targets:
    mean_j ||p̂ - t̂_j||² = 2 - 2 mean_j cos(p, t_j), p (b, D), targets (b, k, D) detached, ``found`` (b, k) the
    targets that exist (all when None); mean over the batch."""
    p = F.normalize(at_least_fp32(p), dim=1)
    distance = 2 - 2 * torch.einsum("bd,bkd->bk", p, F.normalize(targets, dim=-1))  # (b, k)
    if found is None:
        return distance.mean()
    return (distance * found).sum(dim=1).div(found.sum(dim=1)).mean()


def _nearest_target_loss(x: StepInputs, t1: torch.Tensor, t2: torch.Tensor) -> StepOutput:
    """BYOL's loss between p of one view and the nearest support-set neighbour of the other view's target ``t``,
    symmetrised; what the support set stores is t1."""
    selector = x.selector
    assert isinstance(selector, PositiveSelector)
    s1 = selector(t1, x.support, indices=x.indices, uniform=x.uniforms[0], step=x.step)
    s2 = selector(t2, x.support, indices=x.indices, uniform=x.uniforms[1], step=x.step)
    loss = 0.5 * (byol_loss(x.p1, s2.positives[:, None]) + byol_loss(x.p2, s1.positives[:, None]))
    diagnostics: dict[str, float] = {"positive_similarity": s1.similarity.float().mean().item()}
    if x.support is not None:
        diagnostics |= x.support.diagnostics(s1.rows, s1.similarity, step=x.step, labels=x.labels, indices=x.indices)
    return StepOutput(loss, t1, diagnostics)


def nn_byol_loss(x: StepInputs) -> StepOutput:
    """NNBYOL (Dwibedi et al., ICCV 2021, Sec. 4.4; solo-learn's ``nnbyol``): BYOL's loss between p of one view
    and the nearest support-set neighbour of the other view's target-network projection, symmetrised; the
    support set holds the target projections t1."""
    assert x.t1 is not None and x.t2 is not None
    return _nearest_target_loss(x, x.t1, x.t2)


def nn_siam_loss(x: StepInputs) -> StepOutput:
    """NNSiam (Dwibedi et al., ICCV 2021, Sec. 4.4; solo-learn's ``nnsiam``): SimSiam's loss -cos(p, NN(z))
    (Chen and He, CVPR 2021, Eq. 1-2) to the nearest support-set neighbour of the other view's z (stop-gradient),
    symmetrised; no target network, the support set holds z1 as NNCLR's. SimSiam's -cos is BYOL's 2 - 2 cos
    halved, minus 1: the same minimiser, the gradients SimSiam's scale."""
    out = _nearest_target_loss(x, x.z1.detach(), x.z2.detach())
    return StepOutput(out.loss / 2 - 1, out.z1, out.diagnostics)


def mean_shift_loss(x: StepInputs) -> StepOutput:
    """MSF (Koohpayegani et al., ICCV 2021, Sec. 3): BYOL's loss between p of one view and each of the other
    view's target projection t and t's k nearest support-set neighbours, averaged (t itself is one of its own
    k + 1 nearest: MSF's k = ``method.neighbours`` + 1); symmetrised, the support set holds target projections.
    A query whose neighbours are not there yet (a support set still filling) has t alone, as BYOL."""
    selector = x.selector
    assert isinstance(selector, NeighboursSelector) and x.t1 is not None and x.t2 is not None
    n1 = selector.neighbours(x.t1, x.support, indices=x.indices, step=x.step)
    n2 = selector.neighbours(x.t2, x.support, indices=x.indices, step=x.step)

    def shifted(t: torch.Tensor, n: Neighbours, p: torch.Tensor) -> torch.Tensor:
        targets = torch.cat([t[:, None], n.positives], dim=1)  # (b, 1 + k, D): t and its neighbours
        return byol_loss(p, targets, torch.cat([torch.ones_like(n.rows[:, :1], dtype=torch.bool), n.rows >= 0], 1))

    loss = 0.5 * (shifted(x.t2, n2, x.p1) + shifted(x.t1, n1, x.p2))
    diagnostics: dict[str, float] = {"positive_similarity": n1.similarity.float().mean().item()}
    k = n1.rows.shape[1]
    diagnostics |= x.support.diagnostics(n1.rows.flatten(), n1.similarity.flatten(), step=x.step,
                                         labels=x.labels.repeat_interleave(k), indices=x.indices.repeat_interleave(k))
    return StepOutput(loss, x.t1, diagnostics)


def all4one_loss(x: StepInputs) -> StepOutput:
    """All4One (Estepa et al., ICCV 2023; solo-learn's ``all4one``), three objectives weighted 1/2 each::

        L = 1/2 L_centroid + 1/2 L_neighbour + 1/2 L_feature

    With n_j(t) the j-th nearest support-set neighbour of a target projection t (k = ``method.neighbours``, nearest
    first; the query's own t where the support set has fewer than k rows):

    - ``L_neighbour`` = 1/2 [nnclr(n_1(t1), p2) + nnclr(n_1(t2), p1)], NNCLR's loss at τ = ``method.temperature``
      with the nearest neighbour of the other view's target projection as the positive;
    - ``L_centroid`` (:func:`nnclr.all4one.centroid_loss`): InfoNCE at τ = 0.1 between the transformer centroid of
      one view's sequence (n_1(t) ... n_k(t)) and that of the other view's sequence with q'(z) in front
      (q'(z), n_1(t) ... n_{k-1}(t)), symmetrised;
    - ``L_feature`` (:func:`nnclr.all4one.feature_contrast`): 10 x the redundancy reduction of the feature-wise
      cross-correlations C(t1, z2) and C(t2, z1) over the global batch.

    The support set holds t1, as NNBYOL's; the diagnostics are those of the nearest neighbour (solo-learn's
    ``nn_acc``), and each objective's value is logged (``neighbour_loss``, ``centroid_loss``, ``feature_loss``).
    """
    selector = x.selector
    assert isinstance(selector, NeighboursSelector) and x.support is not None
    assert x.t1 is not None and x.t2 is not None and x.extras is not None
    n1 = selector.neighbours(x.t1, x.support, indices=x.indices, step=x.step)  # (b, k, D) nearest first
    n2 = selector.neighbours(x.t2, x.support, indices=x.indices, step=x.step)
    neighbour = 0.5 * (nnclr_loss(n1.positives[:, 0], x.p2, temperature=x.temperature)
                       + nnclr_loss(n2.positives[:, 0], x.p1, temperature=x.temperature))
    centroid = all4one.centroid_loss(x.extras, n1.positives, n2.positives, x.z1, x.z2)
    feature = all4one.feature_contrast(x.t1, x.t2, x.z1, x.z2)
    w = all4one.WEIGHT
    loss = w * centroid + w * neighbour + w * feature
    diagnostics: dict[str, float] = {
        "positive_similarity": n1.similarity[:, 0].float().mean().item(), "neighbour_loss": neighbour.item(),
        "centroid_loss": centroid.item(), "feature_loss": feature.item()}
    diagnostics |= x.support.diagnostics(n1.rows[:, 0], n1.similarity[:, 0], step=x.step, labels=x.labels,
                                         indices=x.indices)
    return StepOutput(loss, x.t1, diagnostics)


def pseudo_label_loss(x: StepInputs) -> StepOutput:
    """DeepCluster: cross-entropy of both views' logits ``p`` (b, K) with the samples' pseudo-labels."""
    targets = x.selector(x.indices)  # (b,)
    loss, diagnostics = deepcluster.pseudo_label_loss(torch.cat([x.p1, x.p2]), torch.cat([targets, targets]))
    return StepOutput(loss, x.z1.detach(), diagnostics)


def contrastive_step(
    model: torch.nn.Module,
    views: torch.Tensor,
    *,
    loss: Loss,
    temperature: float,
    support: SupportSet | None,
    selector: Selector,
    labels: torch.Tensor,
    indices: torch.Tensor,
    step: int,
    uniforms: torch.Tensor | None = None,
    instance_weight: float = 0.0,
    target: torch.nn.Module | None = None,
    extras: torch.nn.Module | None = None,
) -> StepOutput:
    """Forward both views (2b, 3, H, W), then the method's ``loss``; no optimiser, no enqueue.

    Args:
        model: the :class:`~nnclr.model.ContrastiveModel`, or it wrapped in DistributedDataParallel; under
            torchrun b is this rank's share of the global batch and the losses gather the rest.
        views: view 1 then view 2 of the same b samples, concatenated on dim 0.
        loss: the method's loss (``Method.loss`` of :mod:`nnclr.methods`).
        uniforms: (2, b) uniforms for the selector's random choices (None: zeros, i.e. no randomness needed).
        instance_weight: w in [0, 1], the share of SimCLR's NT-Xent in a positive-selector loss.
        target: the model's target network (images -> z), for the methods with one; it sees the same views.
        extras: the model's ``extras`` (the method's own trainable modules), for the methods with some.
    """
    _, z, p = model(views)
    z = F.normalize(at_least_fp32(z), dim=1)  # (2b, D)
    z1, z2 = z.chunk(2)
    p1, p2 = at_least_fp32(p).chunk(2)
    t1 = t2 = None
    if target is not None:
        with torch.no_grad():
            t1, t2 = F.normalize(at_least_fp32(target(views)), dim=1).chunk(2)  # (b, D) each
    if uniforms is None:
        uniforms = torch.zeros(2, z1.shape[0])
    return loss(StepInputs(
        z1=z1, z2=z2, p1=p1, p2=p2, support=support, selector=selector, labels=labels, indices=indices,
        step=step, uniforms=uniforms.to(z.device), temperature=temperature, instance_weight=instance_weight,
        t1=t1, t2=t2, extras=extras,
    ))
