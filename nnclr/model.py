"""The network: encoder f, projection MLP g and (optional) prediction MLP q.

NNCLR (Dwibedi et al., ICCV 2021, Sec. 3.2 and Fig. 2): ``h = f(x)``, ``z = g(h)``, ``p = q(z)``;
the support set stores ``z`` and the loss compares neighbours of ``z`` with ``p`` of the other
view. SimCLR has no predictor: ``p = z``. DeepCluster (Caron et al., ECCV 2018) has a linear
classifier on ``z`` in the predictor's place: ``p`` = its logits over the K pseudo-classes. The methods
built on BYOL (Grill et al., NeurIPS 2020, Sec. 3.1) add a target network: a copy of f and g whose
weights are an exponential moving average of the online ones, ``ξ ← τ ξ + (1 - τ) θ`` after every step.
A method may own trainable modules besides the heads (its record's ``extras``: All4One's second predictor and
transformer); the model holds them, so that they are optimised, checkpointed and distributed with it, and the
loss calls them. No loss and no support set live here.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from nnclr.backbones import build_backbone
from nnclr.config import Config
from nnclr.heads import prediction_head, projection_head
from nnclr.methods import method_of


class ContrastiveModel(nn.Module):
    """Backbone + projector + predictor, composed (no inheritance between methods).

    Args:
        backbone: maps images (B, 3, H, W) to pooled features h (B, F).
        projector: maps h (B, F) to z (B, D).
        predictor: maps z (B, D) to p (B, D), or None (then p = z).
        classifier: DeepCluster's classifier, z (B, D) -> logits (B, K), or None; when given it
            takes the predictor's place: p = its logits.
        target: keep a target network (BYOL's momentum encoder): backbone and projector copied, without
            gradients, moved towards the online ones by :meth:`update_target`.
        extras: the method's own trainable modules (``Method.extras``), or None; not part of :meth:`forward`:
            the loss calls them (``StepInputs.extras``).
    """

    def __init__(
        self, backbone: nn.Module, projector: nn.Module, predictor: nn.Module | None,
        classifier: nn.Module | None = None, target: bool = False, extras: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.projector = projector
        self.predictor = predictor
        self.classifier = classifier
        self.target: nn.Module | None = None
        if target:
            self.target = copy.deepcopy(nn.Sequential(backbone, projector)).requires_grad_(False)
        self.extras = extras  # None registers nothing: the state dict of a method without extras is unchanged

    @torch.no_grad()
    def copy_to_target(self) -> None:
        """Set the target network's weights and buffers to the online ones (after loading encoder weights)."""
        assert self.target is not None
        self.target.load_state_dict(nn.Sequential(self.backbone, self.projector).state_dict())

    @torch.no_grad()
    def update_target(self, tau: float) -> None:
        """BYOL's update of the target weights ξ ← τ ξ + (1 - τ) θ (Grill et al., 2020, Eq. 1); buffers
        (batch-norm statistics) are the target's own, from its own forward passes."""
        assert self.target is not None
        online = [p.detach() for p in nn.Sequential(self.backbone, self.projector).parameters()]
        torch._foreach_lerp_(list(self.target.parameters()), online, 1.0 - tau)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Images (B, 3, H, W) -> (h (B, F), z (B, D), p (B, D), or logits (B, K) with a classifier)."""
        h = self.backbone(x)
        z = self.projector(h)
        head = self.classifier if self.classifier is not None else self.predictor
        p = head(z) if head is not None else z
        return h, z, p

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone features h (B, F): what evaluation and retrieval use."""
        return self.backbone(x)


def build_model(config: Config, backbone: nn.Module | None = None) -> ContrastiveModel:
    """Build the model a config describes, with the heads its method's record names (:mod:`nnclr.methods`):
    SimCLR gets no predictor, as in its paper; DeepCluster a classifier ``Linear(d, K)`` on z instead,
    K = ``method.num_clusters``; a method with ``extras`` gets its own modules, built last (the other parts draw
    the same initial weights as without them).

    Args:
        config: The run's config; ``model.backbone`` names the encoder (:func:`nnclr.backbones.build_backbone`).
        backbone: An encoder built in Python, used as it is (not copied: training changes its weights) in place
            of building ``model.backbone``. ``model.backbone`` is set to the spec that rebuilds it, so that the
            saved run can be loaded (:func:`nnclr.custom_backbone.adopt`; a UserError when none does).
    """
    m, method = config.model, method_of(config)
    head = method.head
    size = config.data.image_size
    if backbone is None:
        backbone, feature_dim = build_backbone(m.backbone, cifar_stem=m.cifar_stem, image_size=size)
    else:
        from nnclr.custom_backbone import adopt

        m.backbone, feature_dim = adopt(backbone, m.backbone, cifar_stem=m.cifar_stem, image_size=size)
    projector = projection_head(
        feature_dim, hidden_dim=m.proj_hidden_dim, out_dim=m.proj_dim, num_layers=m.proj_layers
    )
    if head == "classifier":
        classifier = nn.Linear(m.proj_dim, config.method.num_clusters)
        predictor = None
    else:
        classifier = None
        use_predictor = head == "predictor" and m.pred_hidden_dim > 0
        predictor = prediction_head(m.proj_dim, hidden_dim=m.pred_hidden_dim) if use_predictor else None
    extras = method.extras(config) if method.extras is not None else None
    return ContrastiveModel(backbone, projector, predictor, classifier=classifier, target=method.target,
                            extras=extras)


def target_momentum(base: float, step: int, schedule_steps: int) -> float:
    """BYOL's τ at 0-based ``step``: from ``base`` up to 1 along a cosine over the schedule (Grill et al., 2020,
    Sec. 3.2: τ = 1 - (1 - τ_base)(cos(πk/K) + 1)/2).

    >>> target_momentum(0.99, 0, 100), target_momentum(0.99, 100, 100)
    (0.99, 1.0)
    """
    return 1.0 - (1.0 - base) * (math.cos(math.pi * min(step, schedule_steps) / schedule_steps) + 1.0) / 2.0
