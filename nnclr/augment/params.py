"""Per-sample parameter sampling: every random number of a view from one ``torch.rand`` draw."""

from __future__ import annotations

import math

import torch

from nnclr.augment.recipes import ViewRecipe

# Colour-jitter operation ids, as used in the "order" parameter.
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3

_CROP_ATTEMPTS = 10  # as torchvision's RandomResizedCrop


# Column layout of the single (B, _NUM_DRAWS) uniform draw of sample_view_params.
_C_SCALE = slice(0, _CROP_ATTEMPTS)
_C_RATIO = slice(_CROP_ATTEMPTS, 2 * _CROP_ATTEMPTS)
_C_POS_X = 2 * _CROP_ATTEMPTS
_C_POS_Y = _C_POS_X + 1
_C_FLIP = _C_POS_Y + 1
_C_JITTER = _C_FLIP + 1
_C_FACTORS = slice(_C_JITTER + 1, _C_JITTER + 5)  # brightness, contrast, saturation, hue
_C_ORDER = slice(_C_JITTER + 5, _C_JITTER + 9)  # sort keys of the jitter permutation
_C_GRAY = _C_JITTER + 9
_C_BLUR = _C_GRAY + 1
_C_SIGMA = _C_BLUR + 1
_C_SOLARIZE = _C_SIGMA + 1
_NUM_DRAWS = _C_SOLARIZE + 1


def sample_view_params(
    recipe: ViewRecipe,
    batch: int,
    height: int,
    width: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> dict[str, torch.Tensor]:
    """Draw the random parameters of one view for a batch, all from ``generator``.

    The crop follows torchvision's ``RandomResizedCrop.get_params``: up to 10 attempts of
    (area fraction ~ U(scale), log aspect ratio ~ U(log ratio)); the first attempt that fits
    in the image is used, otherwise a central crop of the clamped aspect ratio. Sizes and
    positions are continuous (no rounding to whole pixels).

    Args:
        recipe: The view's recipe.
        batch: Number of samples B.
        height: Input image height H in pixels.
        width: Input image width W in pixels.
        generator: Source of randomness (on ``device``); None uses torch's default generator.
        device: Device of the returned tensors; defaults to the generator's device.

    Returns:
        A dict of per-sample tensors (all of length B on ``device``):
        ``box`` (B, 4) crop ``(x0, y0, w, h)`` in input pixels (edges: pixel k spans [k, k+1]);
        ``flip`` (B,) bool; ``jitter`` (B,) bool, whether colour jitter applies;
        ``brightness``, ``contrast``, ``saturation`` (B,) factors, ``hue`` (B,) shift (drawn
        for every sample; ignored where ``jitter`` is False); ``order`` (B, 4) long, the
        per-sample permutation of (BRIGHTNESS, CONTRAST, SATURATION, HUE);
        ``gray``, ``blur``, ``solarize`` (B,) bool; ``sigma`` (B,) blur standard deviation.
    """
    if device is None:
        device = generator.device if generator is not None else torch.device("cpu")
    u = torch.rand(batch, _NUM_DRAWS, generator=generator, device=device)  # (B, D) in [0, 1)

    # Random resized crop: candidate (area, ratio) pairs, first one that fits wins.
    lo, hi = recipe.crop_scale
    area = (height * width) * (lo + (hi - lo) * u[:, _C_SCALE])  # (B, 10)
    log_lo, log_hi = math.log(recipe.crop_ratio[0]), math.log(recipe.crop_ratio[1])
    ratio = torch.exp(log_lo + (log_hi - log_lo) * u[:, _C_RATIO])  # (B, 10)
    w_all = torch.sqrt(area * ratio)
    h_all = torch.sqrt(area / ratio)
    fits = (w_all <= width) & (h_all <= height)  # (B, 10)
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)  # (B, 1): first True (0 if none)
    any_fit = fits.any(dim=1)  # (B,)
    in_ratio = width / height  # fallback: central crop, torchvision's rule
    if in_ratio < recipe.crop_ratio[0]:
        fw, fh = float(width), width / recipe.crop_ratio[0]
    elif in_ratio > recipe.crop_ratio[1]:
        fw, fh = height * recipe.crop_ratio[1], float(height)
    else:
        fw, fh = float(width), float(height)
    w = torch.where(any_fit, w_all.gather(1, first).squeeze(1), fw)  # (B,)
    h = torch.where(any_fit, h_all.gather(1, first).squeeze(1), fh)
    free_x, free_y = width - w, height - h  # >= 0
    x0 = torch.where(any_fit, u[:, _C_POS_X] * free_x, free_x / 2)
    y0 = torch.where(any_fit, u[:, _C_POS_Y] * free_y, free_y / 2)

    def factor(col: torch.Tensor, strength: float) -> torch.Tensor:
        low = max(0.0, 1.0 - strength)
        return low + (1.0 + strength - low) * col

    factors = u[:, _C_FACTORS]
    s_lo, s_hi = recipe.blur_sigma
    return {
        "box": torch.stack([x0, y0, w, h], dim=1),  # (B, 4)
        "flip": u[:, _C_FLIP] < recipe.flip_p,
        "jitter": u[:, _C_JITTER] < recipe.jitter_p,
        "brightness": factor(factors[:, 0], recipe.brightness),
        "contrast": factor(factors[:, 1], recipe.contrast),
        "saturation": factor(factors[:, 2], recipe.saturation),
        "hue": recipe.hue * (2 * factors[:, 3] - 1),
        "order": u[:, _C_ORDER].argsort(dim=1),  # (B, 4): a uniform random permutation
        "gray": u[:, _C_GRAY] < recipe.gray_p,
        "blur": u[:, _C_BLUR] < recipe.blur_p,
        "sigma": s_lo + (s_hi - s_lo) * u[:, _C_SIGMA],
        "solarize": u[:, _C_SOLARIZE] < recipe.solarize_p,
    }
