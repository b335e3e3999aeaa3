"""One contrastive step's loss: the one place where NNCLR, SimCLR and KMCLR are defined.

NNCLR (Dwibedi et al., ICCV 2021, Eq. 2, symmetrised as in Sec. 3.2)::

    L = 1/2 * [ nnclr_loss(NN(z1, Q), p2) + nnclr_loss(NN(z2, Q), p1) ]

with ``NN`` the selector's positive (the nearest support-set entry for NNCLR, the nearest k-means
prototype for KMCLR). SimCLR (Chen et al., 2020) uses NT-Xent on ``(z1, z2)`` with 2N-2 negatives
and no predictor. For short runs NNCLR and KMCLR can mix in SimCLR's loss, whose positive is good
from the first step while the support set's neighbours are still near-random::

    L_w = w * NT-Xent(z1, z2) + (1 - w) * L,   w = instance_weight(config.method, step, schedule_steps)
 DeepCluster (Caron et al.,
ECCV 2018) classifies both views into the samples' k-means pseudo-labels (``nnclr.deepcluster``).

Both views go through the network in one forward pass, so batch-norm sees both views as one
batch of 2B (as lightly's benchmarks and byol-pytorch do); this is the same for every method.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nnclr.config import MethodConfig
from nnclr.deepcluster import pseudo_label_loss
from nnclr.losses import at_least_fp32, nnclr_loss, nt_xent
from nnclr.model import ContrastiveModel
from nnclr.support import SupportSet


def instance_weight(method: MethodConfig, step: int, schedule_steps: int) -> float:
    """w at 0-based ``step``: ``method.instance_weight`` falling linearly to 0 at step
    ``method.instance_decay * schedule_steps``; always 0 for SimCLR and DeepCluster.

    >>> instance_weight(MethodConfig(instance_weight=1.0, instance_decay=0.5), 25, 100)
    0.5
    """
    if method.name not in ("nnclr", "kmclr") or method.instance_weight == 0 or method.instance_decay == 0:
        return 0.0
    return method.instance_weight * max(0.0, 1.0 - step / (method.instance_decay * schedule_steps))


@dataclass
class StepOutput:
    """The loss (fp32 scalar with graph), z1 to enqueue (B, D), and the NN diagnostics.

    ``diagnostics`` (see ``SupportSet.diagnostics``): ``positive_similarity`` (mean cosine between
    z and its positive), ``nn_label_agreement`` (share of neighbours with the query's label,
    solo-learn's ``nn_acc``), ``nn_age`` (steps since the neighbour was written), ``nn_self_hit``
    (share of neighbours that are a stale copy of the query), ``nn_found``, ``support_fill``.
    """

    loss: torch.Tensor
    z1: torch.Tensor
    diagnostics: dict[str, float]


def contrastive_step(
    model: ContrastiveModel | torch.nn.Module,
    views: torch.Tensor,
    *,
    method: str,
    temperature: float,
    support: SupportSet | None,
    selector: object | None,
    labels: torch.Tensor,
    indices: torch.Tensor,
    step: int,
    instance_weight: float = 0.0,
) -> StepOutput:
    """Forward both views (2B, 3, H, W) -> loss and diagnostics; no optimiser, no enqueue.

    Args:
        model: the :class:`ContrastiveModel`, or it wrapped in DistributedDataParallel; under
            torchrun B is this rank's share of the global batch and the losses gather the rest.
        views: view 1 then view 2 of the same B samples, concatenated on dim 0.
        method: ``nnclr`` | ``kmclr`` | ``simclr`` | ``deepcluster``.
        selector: picks positives from ``support`` (unused for SimCLR); for DeepCluster the
            :class:`~nnclr.deepcluster.PseudoLabels` of the epoch (and ``support`` is None).
        instance_weight: w in [0, 1], the share of SimCLR's NT-Xent on (z1, z2) in an NNCLR/KMCLR
            loss (0 = the paper's loss alone; the neighbour diagnostics are computed either way).
    """
    _, z, p = model(views)
    z = F.normalize(at_least_fp32(z), dim=1)  # (2B, D)
    z1, z2 = z.chunk(2)
    if method == "simclr":
        return StepOutput(nt_xent(z1, z2, temperature=temperature), z1.detach(), {})
    if method == "deepcluster":  # p: the classifier's logits (2B, K); both views share a pseudo-label
        targets = selector(indices)  # type: ignore[operator]
        loss, diagnostics = pseudo_label_loss(p, torch.cat([targets, targets]))
        return StepOutput(loss, z1.detach(), diagnostics)
    p1, p2 = at_least_fp32(p).chunk(2)  # (B, D) each
    assert support is not None and selector is not None
    s1 = selector(z1, support, indices=indices, step=step)  # type: ignore[operator]
    s2 = selector(z2, support, indices=indices, step=step)  # type: ignore[operator]
    loss = 0.5 * (
        nnclr_loss(s1.positives, p2, temperature=temperature)
        + nnclr_loss(s2.positives, p1, temperature=temperature)
    )
    if instance_weight > 0:
        loss = instance_weight * nt_xent(z1, z2, temperature=temperature) + (1 - instance_weight) * loss
    diagnostics: dict[str, float] = {
        "positive_similarity": s1.similarity.float().mean().item(), "instance_weight": instance_weight,
    }
    # the neighbour diagnostics, computed before this step's enqueue
    diagnostics |= support.diagnostics(s1.rows, s1.similarity, labels=labels, indices=indices, step=step)
    return StepOutput(loss, z1.detach(), diagnostics)
