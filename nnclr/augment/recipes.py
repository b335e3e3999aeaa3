"""Augmentation recipes: per-dataset normalisation statistics and the per-view parameters of each recipe."""

from __future__ import annotations

from dataclasses import dataclass, replace

from nnclr.errors import UserError

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalization_for(data_name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel (mean, std): CIFAR-10's for the CIFAR family and the demo, ImageNet's otherwise."""
    if data_name in ("demo", "cifar10", "cifar100"):
        return CIFAR_MEAN, CIFAR_STD
    return IMAGENET_MEAN, IMAGENET_STD


@dataclass(frozen=True)
class ViewRecipe:
    """The augmentation parameters of one view.

    Attributes:
        crop_scale: Range of the crop area as a fraction of the image area.
        crop_ratio: Range of the crop aspect ratio (width / height), sampled log-uniformly.
        flip_p: Probability of a horizontal flip.
        jitter_p: Probability of applying colour jitter (all four operations, random order).
        brightness: Brightness factor drawn from ``[max(0, 1 - b), 1 + b]``.
        contrast: Contrast factor drawn from ``[max(0, 1 - c), 1 + c]``.
        saturation: Saturation factor drawn from ``[max(0, 1 - s), 1 + s]``.
        hue: Hue shift drawn from ``[-hue, hue]`` (fraction of the hue circle, at most 0.5).
        gray_p: Probability of converting to grayscale (3 equal channels).
        blur_p: Probability of a Gaussian blur.
        blur_sigma: Range of the blur's standard deviation, in output pixels.
        solarize_p: Probability of solarizing (``x -> 1 - x`` where ``x >= threshold``).
        solarize_threshold: Solarize threshold on [0, 1] images.
    """

    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter_p: float = 0.0
    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0
    gray_p: float = 0.0
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0
    solarize_threshold: float = 0.5

    def __post_init__(self) -> None:
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise UserError(f"crop scale {self.crop_scale} must satisfy 0 < min <= max <= 1")
        lo, hi = self.crop_ratio
        if not 0 < lo <= hi:
            raise UserError(f"crop ratio {self.crop_ratio} must satisfy 0 < min <= max")
        for name in ("flip_p", "jitter_p", "gray_p", "blur_p", "solarize_p"):
            if not 0 <= getattr(self, name) <= 1:
                raise UserError(f"{name}={getattr(self, name)} must be a probability in [0, 1]")
        for name in ("brightness", "contrast", "saturation"):
            if getattr(self, name) < 0:
                raise UserError(f"{name}={getattr(self, name)} must be >= 0")
        if not 0 <= self.hue <= 0.5:
            raise UserError(f"hue={self.hue} must be in [0, 0.5]")
        lo, hi = self.blur_sigma
        if not 0 < lo <= hi:
            raise UserError(f"blur sigma {self.blur_sigma} must satisfy 0 < min <= max")


_CROP_FLIP = ViewRecipe()
_BYOL_1 = ViewRecipe(
    jitter_p=0.8, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1, gray_p=0.2, blur_p=1.0
)
_SIMCLR = replace(_BYOL_1, brightness=0.8, contrast=0.8, saturation=0.8, hue=0.2, blur_p=0.5)

RECIPES: dict[str, tuple[ViewRecipe, ViewRecipe]] = {
    # BYOL Table 6 (used by NNCLR): asymmetric blur and solarize.
    "byol": (_BYOL_1, replace(_BYOL_1, blur_p=0.1, solarize_p=0.2)),
    # SimCLR Appendix A, colour strength s=1: both views alike.
    "simclr": (_SIMCLR, _SIMCLR),
    # NNCLR crops-only ablation.
    "crops": (_CROP_FLIP, _CROP_FLIP),
}


def blur_kernel_size(size: int) -> int:
    """Odd Gaussian kernel size of about 10% of the output side (BYOL: 23 for 224).

    Args:
        size: Output side in pixels.

    Returns:
        ``int(0.1 * size)`` rounded up to odd, at least 3 (32 -> 3, 96 -> 9, 224 -> 23).
    """
    return max(3, int(0.1 * size) | 1)
