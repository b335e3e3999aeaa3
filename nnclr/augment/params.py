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
CROP_DRAWS = _C_POS_Y + 1  # the leading columns that decide the crop box (attempts' scale, ratio; x, y)


def crop_boxes(
    u: torch.Tensor,
    height: int | float | torch.Tensor,
    width: int | float | torch.Tensor,
    scale: tuple[float, float],
    ratio: tuple[float, float],
) -> torch.Tensor:
    """Random resized crop boxes from uniforms, torchvision's ``RandomResizedCrop.get_params`` rule.

    Up to 10 attempts of (area fraction ~ U(scale), log aspect ratio ~ U(log ratio)); the first
    attempt that fits in the image is used, otherwise a central crop of the clamped aspect ratio.
    Sizes and positions are continuous (no rounding to whole pixels).

    Args:
        u: (B, CROP_DRAWS) uniforms in [0, 1): 10 scale draws, 10 ratio draws, x and y position.
        height: Image height H: a number, or a (B,) tensor when the images differ in size (the
            streaming loader crops each full-size image in its worker).
        width: Image width W, likewise.
        scale: Range of the crop area as a fraction of the image area.
        ratio: Range of the crop aspect ratio (width / height).

    Returns:
        (B, 4) float32 boxes ``(x0, y0, w, h)`` in input pixels (pixel k spans [k, k + 1]).
    """
    height = torch.as_tensor(height, dtype=torch.float32, device=u.device)
    width = torch.as_tensor(width, dtype=torch.float32, device=u.device)
    if height.dim() == 1:
        height, width = height[:, None], width[:, None]  # (B, 1): broadcast over the attempts
    lo, hi = scale
    area = (height * width) * (lo + (hi - lo) * u[:, _C_SCALE])  # (B, 10)
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u[:, _C_RATIO])  # (B, 10)
    w_all = torch.sqrt(area * aspect)
    h_all = torch.sqrt(area / aspect)
    fits = (w_all <= width) & (h_all <= height)  # (B, 10)
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)  # (B, 1): first True (0 if none)
    any_fit = fits.any(dim=1)  # (B,)
    height, width = height.reshape(-1), width.reshape(-1)  # (B,) or (1,)
    in_ratio = width / height  # fallback: central crop, torchvision's rule
    fw = torch.where(in_ratio < ratio[0], width, torch.where(in_ratio > ratio[1], height * ratio[1], width))
    fh = torch.where(in_ratio < ratio[0], width / ratio[0], height)
    w = torch.where(any_fit, w_all.gather(1, first).squeeze(1), fw)  # (B,)
    h = torch.where(any_fit, h_all.gather(1, first).squeeze(1), fh)
    free_x, free_y = width - w, height - h  # >= 0
    x0 = torch.where(any_fit, u[:, _C_POS_X] * free_x, free_x / 2)
    y0 = torch.where(any_fit, u[:, _C_POS_Y] * free_y, free_y / 2)
    return torch.stack([x0, y0, w, h], dim=1)


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

    x0, y0, w, h = crop_boxes(u[:, :CROP_DRAWS], height, width, recipe.crop_scale, recipe.crop_ratio).unbind(1)

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
