"""A prior space for choosing neighbours while the network's own embeddings are still near-random.

NNCLR's positive is the nearest neighbour of z in the support set (Dwibedi et al., ICCV 2021). At the start of
a run z is nearly random, so the neighbours seldom share the query's class (20-22% after one epoch of CIFAR-10,
``nn_label_agreement``). GPS-SSL (Feizi, Balestriero, Romero-Soriano, Rabbany, "GPS-SSL: Guided Positive
Sampling to Inject Prior Into Self-Supervised Learning", arXiv 2401.01990, 2024) chooses positives by nearest
neighbours in a fixed *prior* embedding space instead. Here that is an option of the support-set methods
(``method.prior``): for the first ``method.prior_epochs`` epochs the support row is chosen by the similarity of
the samples' prior vectors (:meth:`nnclr.support.SupportSet.topk_by_sample`), and the positive is still that
row's stored z; afterwards the lookup is NNCLR's, in z space.

The priors (``method.prior``):

- ``initial``: the initial encoder's L2-normalised projections z of every training image, without augmentation,
  computed once before the first step (``EpochContext.features``: one pass over the training set);
- ``current``: the same extraction, repeated before the first step of every epoch of the phase with the encoder of
  that moment: the neighbour is chosen among un-augmented views of the support set's samples by the current
  network (a clean lookup), while the positive stays the row's stored z of an augmented view. Measured on
  CIFAR-10 after 10 minutes (``experiments/neighbour_agreement.py``, RESULTS.md): the nearest row of an
  augmented view's z shares its label 31% of the time, the nearest by un-augmented views 39% (a 1,024-row bank).
  It costs a forward pass over the training set per epoch; ``method.prior_epochs`` at or above the run's epochs
  keeps it for the whole run (with the default 1 it is ``initial``);
- ``pixels``: every training image (normalised as for feature extraction) area-downscaled to 8x8, flattened to
  3 x 64 values, centred on its own mean and L2-normalised: a cosine of two such vectors is the correlation of
  the two thumbnails (a "tiny images" prior, after Torralba, Fergus, Freeman, TPAMI 2008).

The vectors are a persistent buffer of the selector, so they are in every checkpoint of the phase and a resumed
run looks up the same neighbours; under torchrun every process extracts its share and holds the whole (identical)
set. The first step after the phase releases them (N x Dp floats: 1.3 GB for ImageNet's 1.28 M images at 256
dimensions), so later checkpoints hold none.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nnclr.config import CHOICES

if TYPE_CHECKING:
    from nnclr.selectors import EpochContext

PRIORS = CHOICES["method.prior"]  # none, initial, current, pixels
THUMBNAIL = 8  # side of the pixel prior's thumbnails
PIXELS_DIM = 3 * THUMBNAIL * THUMBNAIL


class Thumbnails(nn.Module):
    """Images (B, 3, H, W) -> (B, 3 * 8 * 8): area-downscaled to 8x8, flattened, each row centred on its own mean.

    The extraction (:func:`nnclr.evaluate.features.extract_features`) L2-normalises the rows.
    """

    def forward(self, x: Tensor) -> Tensor:
        t = F.adaptive_avg_pool2d(x.float(), THUMBNAIL).flatten(1)  # (B, 192)
        return t - t.mean(dim=1, keepdim=True)


def prior_steps(prior_epochs: float, steps_per_epoch: int) -> int:
    """The steps in the prior phase: step s uses the prior while s / steps_per_epoch < ``prior_epochs``.

    >>> prior_steps(0.1, 390), prior_steps(1.0, 390), prior_steps(0.0, 390)
    (39, 390, 0)
    """
    return math.ceil(round(prior_epochs * steps_per_epoch, 6))


class PriorSpace(nn.Module):
    """One prior vector per training sample, and the steps that choose neighbours with it.

    Buffers (persistent): ``vectors`` float32 (N, Dp) L2-normalised rows (zeros until computed; (0, Dp) once
    released after the phase); ``ready`` bool scalar, whether they have been computed (a resumed run does not
    compute them again: for ``initial`` the weights have moved on); for ``current`` only, ``epoch`` int64 scalar,
    the epoch they were computed for (-1 before), so that a run resumed within an epoch keeps that epoch's vectors.

    Args:
        kind: ``initial``, ``current`` or ``pixels`` (see the module docstring).
        num_samples: N, the training set's size.
        dim: Dp, the prior's width (``model.proj_dim`` for ``initial`` and ``current``, :data:`PIXELS_DIM` for
            ``pixels``).
        until_step: steps [0, until_step) choose neighbours in the prior space (:func:`prior_steps`); an epoch
            whose first step is past them computes nothing.
    """

    def __init__(self, kind: str, *, num_samples: int, dim: int, until_step: int) -> None:
        super().__init__()
        if kind not in PRIORS[1:]:
            raise ValueError(f"kind must be one of {PRIORS[1:]}, got {kind!r}")
        self.kind, self.until_step = kind, until_step
        self.register_buffer("vectors", torch.zeros(num_samples, dim))
        self.register_buffer("ready", torch.tensor(False))
        if kind == "current":  # only here, so that the other priors' states are what they were
            self.register_buffer("epoch", torch.tensor(-1, dtype=torch.long))

    def extra_repr(self) -> str:
        return f"kind={self.kind}, num_samples={self.vectors.shape[0]}, dim={self.vectors.shape[1]}, " \
               f"until_step={self.until_step}"

    @torch.no_grad()
    def start_epoch(self, context: EpochContext) -> None:
        """Compute the vectors before the run's first step (``current``: before every epoch's first step in the
        phase); nothing once computed for this epoch, nor when no step of the epoch uses them."""
        if context.first_step >= self.until_step:
            return
        if bool(self.ready) and (self.kind != "current" or int(self.epoch) == context.epoch):
            return
        vectors = context.extract(Thumbnails()) if self.kind == "pixels" else context.features()
        if tuple(vectors.shape) != tuple(self.vectors.shape):
            raise RuntimeError(f"the {self.kind} prior is {tuple(vectors.shape)}, expected {tuple(self.vectors.shape)}")
        self.vectors.copy_(F.normalize(vectors.float(), dim=1))
        self.ready.fill_(True)
        if self.kind == "current":
            self.epoch.fill_(context.epoch)

    def active(self, step: int | None) -> bool:
        """Whether ``step`` chooses its neighbours in the prior space; the first step after the phase releases the
        vectors (every process of a torchrun at the same step)."""
        if step is None:
            raise ValueError("a selector with a prior space needs the training step")
        if step >= self.until_step:
            self._release()
            return False
        if not bool(self.ready):
            raise RuntimeError("the prior space is used before it was computed (PriorSpace.start_epoch)")
        if not len(self.vectors):
            raise RuntimeError(f"the prior space was released after its phase, and step {step} is in a phase of "
                               f"{self.until_step} steps")
        return True

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: object, **kwargs: object) -> None:
        """A state written after the phase holds no vectors: take that shape instead of N rows."""
        vectors = state_dict.get(prefix + "vectors")
        if vectors is not None and len(vectors) == 0:
            self._release()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _release(self) -> None:
        """Drop the vectors: a (0, Dp) buffer, so that memory and later checkpoints hold none."""
        if len(self.vectors):
            self.vectors = self.vectors.new_zeros(0, self.vectors.shape[1])
