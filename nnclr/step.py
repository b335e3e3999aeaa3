"""One contrastive step's loss: the one place where NNCLR, SimCLR and KMCLR are defined.

NNCLR (Dwibedi et al., ICCV 2021, Eq. 2, symmetrised as in Sec. 3.2)::

    L = 1/2 * [ nnclr_loss(NN(z1, Q), p2) + nnclr_loss(NN(z2, Q), p1) ]

with ``NN`` the selector's positive (the nearest support-set entry for NNCLR, the nearest k-means
prototype for KMCLR, the sample's own ``z`` during an instance warm-up). SimCLR (Chen et al.,
2020) uses NT-Xent on ``(z1, z2)`` with 2N-2 negatives and no predictor. DeepCluster (Caron et al.,
ECCV 2018) classifies both views into the samples' k-means pseudo-labels (``nnclr.deepcluster``).

Both views go through the network in one forward pass, so batch-norm sees both views as one
batch of 2B (as lightly's benchmarks and byol-pytorch do); this is the same for every method.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nnclr.deepcluster import pseudo_label_loss
from nnclr.losses import at_least_fp32, nnclr_loss, nt_xent
from nnclr.model import ContrastiveModel
from nnclr.selectors import InstanceSelector
from nnclr.support import SupportSet


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
    instance_positive: bool = False,
) -> StepOutput:
    """Forward both views (2B, 3, H, W) -> loss and diagnostics; no optimiser, no enqueue.

    Args:
        model: the :class:`ContrastiveModel`, or it wrapped in DistributedDataParallel; under
            torchrun B is this rank's share of the global batch and the losses gather the rest.
        views: view 1 then view 2 of the same B samples, concatenated on dim 0.
        method: ``nnclr`` | ``kmclr`` | ``simclr`` | ``deepcluster``.
        selector: picks positives from ``support`` (unused for SimCLR); for DeepCluster the
            :class:`~nnclr.deepcluster.PseudoLabels` of the epoch (and ``support`` is None).
        instance_positive: use the sample's own z as positive (NNCLR/KMCLR warm-up).
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
    choose = InstanceSelector() if instance_positive else selector
    s1 = choose(z1, support, indices=indices, step=step)
    s2 = choose(z2, support, indices=indices, step=step)
    loss = 0.5 * (
        nnclr_loss(s1.positives, p2, temperature=temperature)
        + nnclr_loss(s2.positives, p1, temperature=temperature)
    )
    diagnostics: dict[str, float] = {"positive_similarity": s1.similarity.float().mean().item()}
    if not instance_positive:  # the neighbour diagnostics, computed before this step's enqueue
        diagnostics |= support.diagnostics(s1.rows, s1.similarity, labels=labels, indices=indices, step=step)
    return StepOutput(loss, z1.detach(), diagnostics)
