"""Batched view augmentation on the training device.

A whole batch of uint8 images ``(B, 3, H, W)`` becomes two float32 views ``(B, 3, S, S)``
with tensor ops only: no Python loop over samples, no host round trip, no ``.cuda()`` (every
tensor is made on the images' device). Each view is made in two steps:

1. :func:`sample_view_params` draws every random number for the batch from one explicit
   ``torch.Generator`` in a single ``torch.rand`` call, so a run that seeds (or saves and
   restores) the generator replays exactly the same views;
2. :func:`apply_view` applies those parameters: random resized crop and horizontal flip as one
   bilinear ``grid_sample`` warp, then colour jitter, grayscale, Gaussian blur, solarize and the
   per-channel normalisation, all with per-sample factors shaped ``(B, 1, 1, 1)``.

The recipes follow the papers:

* ``byol``: the augmentations of BYOL (Grill et al. 2020, arXiv 2006.07733, Appendix B,
  Table 6), which NNCLR uses unchanged (Dwibedi et al. ICCV 2021, arXiv 2104.14548, implementation
  details):
  random resized crop (scale 0.08-1, ratio 3/4-4/3), flip p=0.5, colour jitter p=0.8
  (brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1) in a random order, grayscale p=0.2,
  Gaussian blur p=1.0 / 0.1 (views 1 / 2, sigma in [0.1, 2]), solarize p=0.0 / 0.2.
* ``simclr``: SimCLR (Chen et al. 2020, arXiv 2002.05709, Appendix A): crop and flip as
  above, colour distortion of strength s=1 (jitter 0.8s/0.8s/0.8s/0.2s with p=0.8, grayscale
  p=0.2), Gaussian blur p=0.5; both views alike.
* ``crops``: random resized crop and flip only (the crops-only ablation of the NNCLR paper).

Differences from torchvision's per-image transforms, all deliberate:

* Crops are continuous boxes (no rounding of the crop width and height to whole pixels) and are
  resampled bilinearly without antialiasing. When ``S >= H, W`` (the usual case: 32 -> 32,
  96 -> 96) a crop is never shrunk, so there is nothing to alias; when the input is larger than
  the output, small-scale aliasing is possible (like kornia's and ``grid_sample`` based
  pipelines).
* Everything is computed in float32 on [0, 1] images, without re-quantising to uint8 between
  operations.
* The colour-jitter order is a random permutation **per sample** (like torchvision's
  ``ColorJitter`` applied image by image), with torchvision's clamping to [0, 1] after each
  operation kept, so each operation matches ``torchvision.transforms.v2.functional`` to float
  rounding (tests check this).
"""

from __future__ import annotations

# Re-exports: the public API (the operations the tests check against torchvision are in nnclr.augment.ops).
from nnclr.augment.batch import BatchAugment, eval_transform
from nnclr.augment.ops import apply_view
from nnclr.augment.params import BRIGHTNESS as BRIGHTNESS
from nnclr.augment.params import CONTRAST as CONTRAST
from nnclr.augment.params import HUE as HUE
from nnclr.augment.params import SATURATION as SATURATION
from nnclr.augment.params import sample_view_params
from nnclr.augment.recipes import (
    CIFAR_MEAN,
    CIFAR_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    RECIPES,
    ViewRecipe,
    blur_kernel_size,
    normalization_for,
)

__all__ = [
    "CIFAR_MEAN",
    "CIFAR_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "RECIPES",
    "BatchAugment",
    "ViewRecipe",
    "apply_view",
    "blur_kernel_size",
    "eval_transform",
    "normalization_for",
    "sample_view_params",
]
