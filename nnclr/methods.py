"""The methods: one record each, the only place that says what a method is made of.

A method is a selector (which positive or target each sample gets, :mod:`nnclr.selectors`), a loss
(:mod:`nnclr.step`), the heads on the encoder, whether it keeps a support set, whether the short-run
schedule mixes SimCLR's loss in, the ``method.*`` config keys it reads, what the report shows and
the trainable modules of its own that its loss uses besides the heads (``extras``, All4One's).
The model, the training loop, the step and the report ask the record; nothing else tests a
method's name. Adding a method (docs/methods.md, "Adding a method"): a selector class or a loss, a
record below, its name in ``nnclr.config.METHODS`` and a recipe in ``configs/``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from nnclr import all4one
from nnclr.config import Config
from nnclr.deepcluster import PseudoLabels
from nnclr.errors import UserError
from nnclr.prior import PIXELS_DIM, PriorSpace, prior_steps
from nnclr.selectors import NearestNeighbourSelector, NeighboursSelector, PrototypeSelector, Selector
from nnclr.step import (
    Loss,
    all4one_loss,
    instance_loss,
    mean_shift_loss,
    neighbours_loss,
    nn_byol_loss,
    nn_siam_loss,
    positive_loss,
    pseudo_label_loss,
    snclr_loss,
)

HEADS = ("predictor", "none", "classifier")
DIAGNOSTICS = ("neighbours", "clustering", "none")


@dataclass(frozen=True)
class BuildContext:
    """What a selector may be built from besides the config."""

    num_samples: int  # N, the training set's size
    steps_per_epoch: int
    dtype: torch.dtype  # the run's compute dtype (bf16 runs look neighbours up in bf16, then exactly)


@dataclass(frozen=True)
class Method:
    """One method.

    Attributes:
        name: the ``method.name`` that selects it.
        paper: where it comes from.
        summary: one line for the docs and the report.
        selector: builds the method's :class:`~nnclr.selectors.Selector` from the config.
        loss: the step's loss from both views' z and p (:mod:`nnclr.step`).
        head: what sits on z: ``predictor`` (p = q(z), dropped when ``model.pred_hidden_dim`` is 0), ``none``
            (p = z) or ``classifier`` (p = logits of a linear layer over ``method.num_clusters`` classes).
        support: keeps a FIFO support set of past z (``method.support_size`` rows), enqueued after every step.
        short_run: the loss is mixed with SimCLR's by ``method.instance_weight``/``instance_decay``.
        keys: the ``method.*`` keys it reads (the report shows these; ``method.name`` is implied).
        diagnostics: the report's training diagnostics: ``neighbours`` (support-set neighbours), ``clustering``
            (per-epoch clustering records) or ``none``.
        prototypes: the report shows the selector's prototypes.
        target: keeps BYOL's target network (an exponential moving average of backbone and projector,
            ``method.target_momentum``); the loss gets its projections of both views and the support set stores
            them.
        extras: builds the trainable modules the method's loss uses besides the heads (an ``nn.ModuleDict``) from
            the config, or None (every method but All4One). The model holds them as ``model.extras``, so the
            optimiser, DistributedDataParallel (``model.sync_bn=heads`` converts their batch-norm as the heads'),
            checkpoints, resume, ``train.precision`` and the non-finite checks treat them as the heads; the loss gets
            them as ``StepInputs.extras``. None adds nothing to the model (its checkpoints are unchanged).
    """

    name: str
    paper: str
    summary: str
    selector: Callable[[Config, BuildContext], Selector]
    loss: Loss
    head: str
    support: bool
    short_run: bool
    keys: tuple[str, ...]
    diagnostics: str
    prototypes: bool = False
    target: bool = False
    extras: Callable[[Config], nn.Module] | None = None

    def __post_init__(self) -> None:
        assert self.head in HEADS and self.diagnostics in DIAGNOSTICS, self
        assert all(key.startswith("method.") for key in self.keys), self.keys
        assert self.support == ("method.support_size" in self.keys), "a support set is sized by method.support_size"
        assert self.short_run == ("method.instance_weight" in self.keys), "the short-run schedule reads its keys"
        assert self.target == ("method.target_momentum" in self.keys), "a target network moves by target_momentum"


SHORT_RUN_KEYS = ("method.instance_weight", "method.instance_decay")
PRIOR_KEYS = ("method.prior", "method.prior_epochs")  # the support-set selectors' prior space (nnclr.prior)
NEIGHBOURS_KEYS = ("method.temperature", "method.support_size", "method.neighbours", "method.exclude_self",
                   *SHORT_RUN_KEYS, *PRIOR_KEYS)


def _prior(config: Config, context: BuildContext) -> PriorSpace | None:
    """The prior space of ``method.prior`` (None for ``none``: the selector's state is today's)."""
    m = config.method
    if m.prior == "none":
        return None
    dim = PIXELS_DIM if m.prior == "pixels" else config.model.proj_dim
    return PriorSpace(m.prior, num_samples=context.num_samples, dim=dim,
                      until_step=prior_steps(m.prior_epochs, context.steps_per_epoch))


def _nearest_neighbour(config: Config, context: BuildContext) -> Selector:
    m = config.method
    return NearestNeighbourSelector(topk=m.topk, exclude_self=m.exclude_self,
                                    low_precision=context.dtype == torch.bfloat16, prior=_prior(config, context))


def _neighbours(weighting: str) -> Callable[[Config, BuildContext], Selector]:
    def build(config: Config, context: BuildContext) -> Selector:
        m = config.method
        return NeighboursSelector(k=m.neighbours, weighting=weighting, soft_temperature=m.soft_temperature,
                                  exclude_self=m.exclude_self, low_precision=context.dtype == torch.bfloat16,
                                  prior=_prior(config, context))
    return build


def _attention_candidates(config: Config, context: BuildContext) -> Selector:
    """SNCLR's candidates: the k nearest support-set rows, scored by the loss (``method.attention_temperature``)."""
    m = config.method
    return NeighboursSelector(k=m.neighbours, weighting="uniform", soft_temperature=m.attention_temperature,
                              exclude_self=m.exclude_self, low_precision=context.dtype == torch.bfloat16,
                              prior=_prior(config, context))


def _prototypes(config: Config, context: BuildContext) -> Selector:
    m = config.method
    return PrototypeSelector(num_prototypes=m.num_prototypes, dim=config.model.proj_dim,
                             reset_every=round(m.kmeans_reset_epochs * context.steps_per_epoch))


def _pseudo_labels(config: Config, context: BuildContext) -> Selector:
    m = config.method
    return PseudoLabels(num_samples=context.num_samples, num_clusters=m.num_clusters, iters=m.kmeans_iters)


METHODS: dict[str, Method] = {m.name: m for m in (
    Method(
        name="nnclr",
        paper="Dwibedi et al., With a Little Help from My Friends: Nearest-Neighbor Contrastive Learning of "
              "Visual Representations, ICCV 2021 (arXiv 2104.14548)",
        summary="the positive is the nearest neighbour of z in a support set of past projections",
        selector=_nearest_neighbour, loss=positive_loss, head="predictor", support=True, short_run=True,
        keys=("method.temperature", "method.support_size", "method.topk", "method.exclude_self", *SHORT_RUN_KEYS,
              *PRIOR_KEYS),
        diagnostics="neighbours",
    ),
    Method(
        name="simclr",
        paper="Chen et al., A Simple Framework for Contrastive Learning of Visual Representations, ICML 2020 "
              "(arXiv 2002.05709)",
        summary="the positive is the other view's projection (NT-Xent); no predictor, no support set",
        selector=lambda config, context: Selector(), loss=instance_loss, head="none", support=False,
        short_run=False, keys=("method.temperature",), diagnostics="none",
    ),
    Method(
        name="kmclr",
        paper="KMCLR (mwritescode/nnclr-cifar100): NNCLR with the nearest of K online mini-batch k-means "
              "prototypes of the projections as the positive",
        summary="the positive is the nearest of K prototypes of online k-means on the projections; no support set",
        selector=_prototypes, loss=positive_loss, head="predictor", support=False, short_run=True,
        keys=("method.temperature", "method.num_prototypes", "method.kmeans_reset_epochs", *SHORT_RUN_KEYS),
        diagnostics="none", prototypes=True,
    ),
    Method(
        name="deepcluster",
        paper="Caron et al., Deep Clustering for Unsupervised Learning of Visual Features, ECCV 2018 "
              "(arXiv 1807.05520)",
        summary="classify both views into k-means pseudo-labels of the training set, re-clustered every epoch",
        selector=_pseudo_labels, loss=pseudo_label_loss, head="classifier", support=False, short_run=False,
        keys=("method.num_clusters", "method.kmeans_iters"), diagnostics="clustering",
    ),
    Method(
        name="nnclr_multi",
        paper="NNCLR with its k nearest neighbours all as positives (the 'NNCLR top-5' of "
              "pc-cp/Benchmark-Methods-For-MNN; Long et al., Pattern Recognition 2025)",
        summary="each of the k nearest support-set neighbours of z is a positive, with weight 1/k",
        selector=_neighbours("uniform"), loss=neighbours_loss, head="predictor", support=True, short_run=True,
        keys=NEIGHBOURS_KEYS, diagnostics="neighbours",
    ),
    Method(
        name="nnclr_soft",
        paper="NNCLR with soft neighbours: the k nearest weighted by similarity (after SNCLR's soft neighbours, "
              "Ge et al., ICLR 2023, with cosine-softmax weights instead of its attention module)",
        summary="the k nearest support-set neighbours of z are positives weighted by softmax(cosine / T)",
        selector=_neighbours("soft"), loss=neighbours_loss, head="predictor", support=True, short_run=True,
        keys=(*NEIGHBOURS_KEYS, "method.soft_temperature"), diagnostics="neighbours",
    ),
    Method(
        name="nnclr_mean",
        paper="NNCLR with a mean-shift positive: the mean of the k nearest neighbours (MSF, Koohpayegani et al., "
              "ICCV 2021; CMSF, Navaneet et al., ECCV 2022; here without their momentum target)",
        summary="the positive is the normalised mean of the k nearest support-set neighbours of z",
        selector=_neighbours("uniform"), loss=positive_loss, head="predictor", support=True, short_run=True,
        keys=NEIGHBOURS_KEYS, diagnostics="neighbours",
    ),
    Method(
        name="snclr",
        paper="Ge et al., Soft Neighbors are Positive Supporters in Contrastive Visual Representation Learning, "
              "ICLR 2023 (arXiv 2303.17142); here without its momentum encoder",
        summary="the other view's z stays the positive; its k nearest support-set neighbours join it as soft "
                "positives weighted by attention (positiveness) scores",
        selector=_attention_candidates, loss=snclr_loss, head="predictor", support=True, short_run=True,
        keys=("method.temperature", "method.support_size", "method.neighbours", "method.exclude_self",
              "method.attention_temperature", *SHORT_RUN_KEYS, *PRIOR_KEYS),
        diagnostics="neighbours",
    ),
    Method(
        name="nnbyol",
        paper="NNBYOL: BYOL (Grill et al., NeurIPS 2020, arXiv 2006.07733) with NNCLR's nearest neighbour as the "
              "target (Dwibedi et al., ICCV 2021, Sec. 4.4; solo-learn's nnbyol)",
        summary="BYOL's loss between the prediction p and the nearest support-set neighbour of the other view's "
                "target-network projection; the support set holds target projections",
        selector=_nearest_neighbour, loss=nn_byol_loss, head="predictor", support=True, short_run=False,
        keys=("method.support_size", "method.topk", "method.exclude_self", "method.target_momentum", *PRIOR_KEYS),
        diagnostics="neighbours", target=True,
    ),
    Method(
        name="nnsiam",
        paper="NNSiam: SimSiam (Chen and He, CVPR 2021, arXiv 2011.10566) with NNCLR's nearest neighbour as the "
              "target (Dwibedi et al., ICCV 2021, Sec. 4.4; solo-learn's nnsiam)",
        summary="SimSiam's loss -cos(p, NN(z)) to the nearest support-set neighbour of the other view's z; "
                "no negatives, no target network",
        selector=_nearest_neighbour, loss=nn_siam_loss, head="predictor", support=True, short_run=False,
        keys=("method.support_size", "method.topk", "method.exclude_self", *PRIOR_KEYS), diagnostics="neighbours",
    ),
    Method(
        name="msf",
        paper="MSF, Koohpayegani, Tejankar, Pirsiavash, Mean Shift for Self-Supervised Learning, ICCV 2021 "
              "(arXiv 2105.07269)",
        summary="BYOL's loss averaged over the other view's target-network projection and its k nearest "
                "support-set neighbours (the mean shift of the target)",
        selector=_neighbours("uniform"), loss=mean_shift_loss, head="predictor", support=True, short_run=False,
        keys=("method.support_size", "method.neighbours", "method.exclude_self", "method.target_momentum",
              *PRIOR_KEYS),
        diagnostics="neighbours", target=True,
    ),
    Method(
        name="all4one",
        paper="Estepa, Sarasúa, Nagarajan, Radeva, All4One: Symbiotic Neighbour Contrastive Learning via "
              "Self-Attention and Redundancy Reduction, ICCV 2023 (arXiv 2303.09417; solo-learn's all4one)",
        summary="NNCLR's loss to the nearest neighbour of the other view's target projection, plus an InfoNCE between "
                "transformer centroids of the views' k nearest neighbours and a feature-wise redundancy reduction; "
                "the support set holds target projections",
        selector=_neighbours("uniform"), loss=all4one_loss, head="predictor", support=True, short_run=False,
        keys=("method.temperature", "method.support_size", "method.neighbours", "method.exclude_self",
              "method.target_momentum", *PRIOR_KEYS),
        diagnostics="neighbours", target=True, extras=all4one.build_modules,
    ),
)}


def method_of(config: Config) -> Method:
    """The record of ``config.method.name``."""
    try:
        return METHODS[config.method.name]
    except KeyError:
        raise UserError(f"unknown method {config.method.name!r}; choose one of: {', '.join(METHODS)}") from None
