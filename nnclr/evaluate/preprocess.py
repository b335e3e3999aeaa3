"""How the evaluation protocols turn uint8 images into the encoder's input: size, mean, std, device, dtype in one value.

Two ways, as in the evaluation recipes of SimCLR (Chen et al. 2020, Appendix B.5-B.6) and NNCLR (Dwibedi et
al. 2021, Sec. 4.2):

* :meth:`Preprocess.centre`: the whole image scaled to ``size`` x ``size``, no augmentation
  (:func:`nnclr.augment.eval_transform`): test images, and the labelled images of precise batch norm;
* :meth:`Preprocess.augmented`: one random resized crop (scale 0.08-1) + horizontal flip per image (the
  ``crops`` recipe of :mod:`nnclr.augment`): the training images of SGD.

Both scale by 1/255 and normalise with the per-channel ``mean`` and ``std`` of the pretraining data.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from nnclr import runtime
from nnclr.augment import RECIPES, apply_view, eval_transform, sample_view_params

if TYPE_CHECKING:
    from nnclr.pretrained import Pretrained


@dataclass(frozen=True)
class Preprocess:
    """The encoder's input: images of side ``size``, normalised with ``mean``/``std``, on ``device``.

    Attributes:
        size: S, the side of the square images the encoder sees.
        mean, std: per-channel (3,) statistics the inputs are normalised with.
        device: where the images go and the encoder runs.
        dtype: the autocast precision of the encoder (float32: no autocast).
    """

    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    device: torch.device
    dtype: torch.dtype = torch.float32

    @classmethod
    def of(cls, pretrained: Pretrained) -> Preprocess:
        """The preprocessing of a loaded encoder (:func:`nnclr.load`)."""
        return cls(pretrained.image_size, pretrained.mean, pretrained.std, pretrained.device, pretrained.dtype)

    def centre(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) -> float32 (B, 3, S, S) on ``device``: scaled to S x S, normalised."""
        return eval_transform(images.to(self.device), self.size, mean=self.mean, std=self.std)

    def augmented(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """uint8 (B, 3, H, W) -> one random-resized-crop + flip view, float32 (B, 3, S, S) on ``device``, normalised.

        The crop boxes and flips are drawn from ``generator`` (on ``device``).
        """
        images = images.to(self.device)
        recipe = RECIPES["crops"][0]
        params = sample_view_params(recipe, images.shape[0], images.shape[2], images.shape[3], generator, images.device)
        mean = torch.tensor(self.mean, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=self.device).view(1, 3, 1, 1)
        return apply_view(images.float().mul_(1.0 / 255), params, recipe, self.size, mean, std)

    def autocast(self) -> contextlib.AbstractContextManager:
        """Autocast to ``dtype`` on ``device`` (nothing for float32), for the encoder's forward passes."""
        return runtime.autocast(self.device, self.dtype)
