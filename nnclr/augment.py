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

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from nnclr.errors import UserError

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

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalization_for(data_name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel (mean, std): CIFAR-10's for the CIFAR family and the demo, ImageNet's otherwise."""
    if data_name in ("demo", "cifar10", "cifar100"):
        return CIFAR_MEAN, CIFAR_STD
    return IMAGENET_MEAN, IMAGENET_STD

# ITU-R 601-2 luma, the weights of torchvision's rgb_to_grayscale.
_GRAY_WEIGHTS = (0.2989, 0.587, 0.114)

# Colour-jitter operation ids, as used in the "order" parameter.
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3

_CROP_ATTEMPTS = 10  # as torchvision's RandomResizedCrop


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


def _crop_flip(
    images: torch.Tensor, box: torch.Tensor, flip: torch.Tensor, size: int
) -> torch.Tensor:
    """Random resized crop + horizontal flip as one bilinear warp.

    The sampling grid is separable (no rotation), so it is built from two (B, S) coordinate
    vectors instead of ``affine_grid`` (whose batched matmul costs more than the warp itself
    on CPU). Output pixel centre ``u + 0.5`` maps to input ``x0 + (u + 0.5) * w / S``.

    Args:
        images: (B, 3, H, W) float.
        box: (B, 4) crop ``(x0, y0, w, h)`` in input pixels.
        flip: (B,) bool.
        size: Output side S.

    Returns:
        (B, 3, S, S) float.
    """
    _, _, height, width = images.shape
    base = (torch.arange(size, device=images.device, dtype=torch.float32) + 0.5) / size  # (S,)
    x0, y0, w, h = box.unbind(1)  # (B,) each
    frac_x = torch.where(flip[:, None], 1.0 - base, base)  # (B, S): flip reverses the columns
    gx = (x0[:, None] + w[:, None] * frac_x) * (2.0 / width) - 1.0  # (B, S), normalised
    gy = (y0[:, None] + h[:, None] * base) * (2.0 / height) - 1.0  # (B, S)
    grid = torch.stack(
        torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), dim=-1
    )  # (B, S, S, 2)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _gray(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, S, S) -> (B, 1, S, S) luma with torchvision's weights."""
    r, g, b = x.unbind(1)  # (B, S, S) each
    return (
        (r * _GRAY_WEIGHTS[0])
        .add_(g, alpha=_GRAY_WEIGHTS[1])
        .add_(b, alpha=_GRAY_WEIGHTS[2])
        .unsqueeze(1)
    )


def _linear_step(
    x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor
) -> torch.Tensor:
    """``clamp(a * x + b * gray(x) + c * mean(gray(x)), 0, 1)``, per-sample (B, 1, 1, 1) a, b, c.

    Brightness f is (f, 0, 0), contrast f is (f, 0, 1 - f), saturation f is (f, 1 - f, 0) and
    the identity is (1, 0, 0): exactly torchvision's ``_blend`` (which clamps to [0, 1]) with
    the black image, the mean gray level and the grayscale image.
    """
    gray = _gray(x)  # (B, 1, S, S)
    mean = gray.mean(dim=(2, 3), keepdim=True)  # (B, 1, 1, 1)
    offset = gray.mul_(b).add_(mean * c)  # (B, 1, S, S); in place: faster than a broadcast addcmul
    return torch.addcmul(offset, x, a).clamp_(0.0, 1.0)  # (B, 3, S, S)


def _adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the HSV hue of [0, 1] RGB images by per-sample ``shift`` (fraction of a turn).

    Exact HSV (as torchvision's ``adjust_hue``), vectorised. A hue rotation keeps each
    pixel's max and min (V and S unchanged), so only the hue in sextants ``h6`` in [0, 6) is
    computed, shifted, wrapped with ``floor`` (``torch.remainder`` is ~15x slower on CPU) and
    turned back into RGB with the closed form ``c = min + chroma * w_c(h6)``, where
    ``w_R = clamp(|h6 - 3| - 1, 0, 1)``, ``w_G = clamp(2 - |h6 - 2|, 0, 1)`` and
    ``w_B = clamp(2 - |h6 - 4|, 0, 1)`` (the piecewise-linear HSV hue ramps). A YIQ rotation
    (one 3x3 matrix per sample) would be cheaper but is not a close approximation: on uniform
    random colours with shifts in [-0.1, 0.1] it differs from the HSV shift by 0.05 per channel
    on average and by up to 0.45 (measured), so it is not used. Tests compare this function
    with torchvision's to 1e-5.

    Args:
        x: (B, 3, S, S) in [0, 1].
        shift: (B,) hue shift in [-0.5, 0.5].

    Returns:
        (B, 3, S, S) in [0, 1].
    """
    r, g, b = x.unbind(1)  # (B, S, S)
    maxc = torch.maximum(torch.maximum(r, g), b)
    minc = torch.minimum(torch.minimum(r, g), b)
    chroma = maxc - minc
    # Hue numerator in units of chroma, torchvision's cases: R max -> (g - b); else G max ->
    # (b - r) + 2c; else (B max) -> (r - g) + 4c. Selected arithmetically with 0/1 masks
    # (sign(max - c) is 0 exactly where channel c is the max): torch.where is slow on CPU.
    not_r = torch.sign(maxc - r)  # (B, S, S) in {0, 1}
    not_g = torch.sign(maxc - g)
    num_gb = torch.lerp((b - r).add_(chroma, alpha=2.0), (r - g).add_(chroma, alpha=4.0), not_g)
    num = torch.lerp(g - b, num_gb, not_r)
    h6 = num.div_(chroma.clamp(min=1e-12))  # (B, S, S) in [-1, 5]; 0 where chroma == 0 (grays)
    h6.add_(6.0 * shift.view(-1, 1, 1))  # in [-4, 8]
    h6.sub_(torch.floor(h6 * (1.0 / 6.0)).mul_(6.0))  # wrapped to [0, 6)
    centre, slope, offset = _HUE_RAMPS.to(x.device).unbind(0)  # (1, 3, 1, 1) each
    ramp = (
        (h6.unsqueeze(1) - centre).abs_().mul_(slope).add_(offset).clamp_(0.0, 1.0)
    )  # (B, 3, S, S)
    return ramp.mul_(chroma.unsqueeze(1)).add_(minc.unsqueeze(1))


# Per channel (R, G, B): w_c(h6) = clamp(slope * |h6 - centre| + offset, 0, 1).
_HUE_RAMPS = torch.tensor([[3.0, 2.0, 4.0], [1.0, -1.0, -1.0], [-1.0, 2.0, 2.0]]).view(
    3, 1, 3, 1, 1
)


def _color_jitter(
    x: torch.Tensor, params: dict[str, torch.Tensor], recipe: ViewRecipe
) -> torch.Tensor:
    """Brightness, contrast, saturation and hue in a random order per sample.

    A sample's permutation is "some linear operations, hue, the other linear operations".
    Batched, this is 3 slots before the hue step and 3 after: in slot j a sample applies its
    j-th linear operation if that belongs on this side of its hue, else the identity. Every
    operation except hue is one fused :func:`_linear_step`, so the cost is 6 cheap steps and
    one hue rotation, whatever the permutations. Samples without jitter get identities.

    Args:
        x: (B, 3, S, S) in [0, 1].
        params: From :func:`sample_view_params`.
        recipe: The view's recipe (operations with strength 0 are skipped).

    Returns:
        (B, 3, S, S) in [0, 1].
    """
    on = params["jitter"]  # (B,)
    order = params["order"]  # (B, 4)
    batch = order.shape[0]
    is_hue = order == HUE
    hue_pos = is_hue.to(torch.uint8).argmax(dim=1)  # (B,) number of linear ops before hue
    # The three linear operations in each sample's order (a stable sort moves HUE last).
    ranks = is_hue.to(torch.int64) * 4 + torch.arange(4, device=x.device)
    linear = order.gather(1, ranks.argsort(dim=1)[:, :3])  # (B, 3)

    ones = torch.ones_like(params["brightness"])
    zeros = torch.zeros_like(ones)
    fb, fc, fs = params["brightness"], params["contrast"], params["saturation"]
    # Coefficients (a, b, c) of each linear operation: (B, 3 ops, 3 coefs).
    table = torch.stack(
        [
            torch.stack([fb, zeros, zeros], 1),
            torch.stack([fc, zeros, 1 - fc], 1),
            torch.stack([fs, 1 - fs, zeros], 1),
        ],
        dim=1,
    )
    identity = torch.tensor((1.0, 0.0, 0.0), device=x.device)
    slot_coefs = table.gather(1, linear[:, :, None].expand(batch, 3, 3))  # (B, 3 slots, 3 coefs)
    slot = torch.arange(3, device=x.device)
    before = (slot[None, :] < hue_pos[:, None]) & on[:, None]  # (B, 3)
    after = (slot[None, :] >= hue_pos[:, None]) & on[:, None]
    needs_linear = recipe.brightness > 0 or recipe.contrast > 0 or recipe.saturation > 0

    def linear_steps(mask: torch.Tensor) -> torch.Tensor:
        coefs = torch.where(mask[:, :, None], slot_coefs, identity)  # (B, 3, 3)
        out = x
        for j in range(3):
            a, b, c = (coefs[:, j, i].view(batch, 1, 1, 1) for i in range(3))
            out = _linear_step(out, a, b, c)
        return out

    if needs_linear:
        x = linear_steps(before)
    if recipe.hue > 0:
        x = _adjust_hue(x, torch.where(on, params["hue"], 0.0))
    if needs_linear:
        x = linear_steps(after)
    return x


def _gaussian_kernels(sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """(B,) sigmas -> (B, K) normalised 1-D Gaussian kernels (torchvision's formula)."""
    half = kernel_size // 2
    taps = torch.arange(-half, half + 1, device=sigma.device, dtype=torch.float32)  # (K,)
    kernel = torch.exp(-0.5 * (taps[None, :] / sigma[:, None]) ** 2)  # (B, K)
    return kernel / kernel.sum(dim=1, keepdim=True)


def _blur_all(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Separable blur of every sample of x (B, 3, H, W) with its own (B, K) kernel, reflect padding.

    K = 3: sums of shifted slices weighted by (B, 1, 1, 1) taps (fastest for small kernels);
    larger K: depthwise ``conv2d`` over the B * 3 planes (cache-blocked, ~2x faster at 96x96).
    """
    batch, channels, height, width = x.shape
    size = kernel.shape[1]
    half = size // 2
    if size <= 3:
        weights = kernel.view(batch, size, 1, 1, 1).unbind(1)  # K x (B, 1, 1, 1)
        padded = F.pad(x, (half, half, 0, 0), mode="reflect")  # (B, 3, H, W + K - 1)
        out = padded[..., 0:width] * weights[0]
        for i in range(1, size):
            out.addcmul_(padded[..., i : i + width], weights[i])
        padded = F.pad(out, (0, 0, half, half), mode="reflect")  # (B, 3, H + K - 1, W)
        out = padded[:, :, 0:height] * weights[0]
        for i in range(1, size):
            out.addcmul_(padded[:, :, i : i + height], weights[i])
        return out
    planes = batch * channels
    weight = kernel.repeat_interleave(channels, dim=0)  # (B * 3, K)
    padded = F.pad(x, (half, half, 0, 0), mode="reflect").view(1, planes, height, width + 2 * half)
    out = F.conv2d(padded, weight.view(planes, 1, 1, size), groups=planes).view(
        batch, channels, height, width
    )
    padded = F.pad(out, (0, 0, half, half), mode="reflect").view(
        1, planes, height + 2 * half, width
    )
    out = F.conv2d(padded, weight.view(planes, 1, size, 1), groups=planes)
    return out.view(batch, channels, height, width)


def _gaussian_blur(
    x: torch.Tensor,
    sigma: torch.Tensor,
    apply: torch.Tensor,
    kernel_size: int,
    select: bool | None = None,
) -> torch.Tensor:
    """Gaussian blur with a per-sample sigma, reflect padding (as torchvision's ``gaussian_blur``).

    On CPU only the samples with ``apply`` are blurred (picked with ``nonzero``, free there:
    BYOL's view 2 blurs 10% of them). On other devices, where ``nonzero`` would synchronise
    with the host, every sample is convolved and the others get a delta kernel, which is an
    exact identity, so both paths give the same values.

    Args:
        x: (B, 3, S, S); may be modified in place.
        sigma: (B,) standard deviations in pixels.
        apply: (B,) bool.
        kernel_size: Odd kernel size K.
        select: Blur only the selected samples; None means "on CPU".

    Returns:
        (B, 3, S, S).
    """
    if select is None:
        select = x.device.type == "cpu"
    if select:
        index = apply.nonzero().squeeze(1)  # (n,)
        if index.numel() == 0:
            return x
        if index.numel() < x.shape[0]:
            kernel = _gaussian_kernels(sigma.index_select(0, index), kernel_size)
            return x.index_copy_(0, index, _blur_all(x.index_select(0, index), kernel))
        return _blur_all(x, _gaussian_kernels(sigma, kernel_size))
    half = kernel_size // 2
    delta = torch.zeros(kernel_size, device=x.device)
    delta[half] = 1.0
    kernel = torch.where(apply[:, None], _gaussian_kernels(sigma, kernel_size), delta)  # (B, K)
    return _blur_all(x, kernel)


def _solarize(x: torch.Tensor, apply: torch.Tensor, threshold: float) -> torch.Tensor:
    """``x -> 1 - x`` where ``x >= threshold``, for the samples with ``apply`` (B,) True.

    At threshold 0.5 this is ``min(x, 1 - x)``, which avoids full-size boolean tensors (slow
    on CPU). Returns (B, 3, S, S).
    """
    if threshold == 0.5:
        solarized = torch.minimum(x, 1.0 - x)
    else:
        solarized = torch.where(x >= threshold, 1.0 - x, x)
    return torch.lerp(x, solarized, apply.to(x.dtype).view(-1, 1, 1, 1))


def apply_view(
    images: torch.Tensor,
    params: dict[str, torch.Tensor],
    recipe: ViewRecipe,
    size: int,
    mean: torch.Tensor,
    std: torch.Tensor,
) -> torch.Tensor:
    """Apply one view's sampled parameters (BYOL order: crop, flip, jitter, gray, blur, solarize).

    Args:
        images: (B, 3, H, W) float32 in [0, 1].
        params: From :func:`sample_view_params` with the same recipe.
        recipe: The view's recipe; operations with probability 0 are skipped entirely.
        size: Output side S.
        mean: (1, 3, 1, 1) per-channel mean.
        std: (1, 3, 1, 1) per-channel standard deviation.

    Returns:
        (B, 3, S, S) float32, normalised.
    """
    x = _crop_flip(images, params["box"], params["flip"], size)  # (B, 3, S, S)
    if recipe.jitter_p > 0:
        x = _color_jitter(x, params, recipe)
    if recipe.gray_p > 0:
        to_gray = params["gray"].to(x.dtype).view(-1, 1, 1, 1)  # (B, 1, 1, 1) in {0, 1}
        x = torch.lerp(x, _gray(x), to_gray)
    if recipe.blur_p > 0:
        x = _gaussian_blur(x, params["sigma"], params["blur"], blur_kernel_size(size))
    if recipe.solarize_p > 0:
        x = _solarize(x, params["solarize"], recipe.solarize_threshold)
    return x.sub_(mean).div_(std)


def _check_images(images: torch.Tensor) -> None:
    if (
        not isinstance(images, torch.Tensor)
        or images.dim() != 4
        or images.shape[1] != 3
        or images.dtype != torch.uint8
    ):
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        dtype = images.dtype if isinstance(images, torch.Tensor) else None
        raise ValueError(
            f"expected uint8 images of shape (B, 3, H, W), got shape {shape} and dtype {dtype}"
        )


def _stats(values: tuple[float, float, float], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device).view(1, 3, 1, 1)


class BatchAugment(torch.nn.Module):
    """Two augmented views of a uint8 batch, made on the batch's device.

    Example:
        >>> augment = BatchAugment("byol", 32)
        >>> g = torch.Generator().manual_seed(0)
        >>> v1, v2 = augment(torch.zeros(8, 3, 32, 32, dtype=torch.uint8), g)
        >>> v1.shape
        torch.Size([8, 3, 32, 32])

    Args:
        recipe: ``"byol"`` (NNCLR's, from BYOL Table 6), ``"simclr"`` (SimCLR Appendix A),
            ``"crops"`` (crop + flip only), or a pair of :class:`ViewRecipe`.
        size: Output side S.
        mean: Per-channel mean used for normalisation.
        std: Per-channel standard deviation used for normalisation.
        crop_scale: Overrides the recipes' random-resized-crop area range (both views).
        blur: False turns the Gaussian blur off (both views), as in CIFAR recipes.

    Raises:
        UserError: Unknown recipe name or invalid crop scale.
    """

    def __init__(
        self,
        recipe: str | tuple[ViewRecipe, ViewRecipe] = "byol",
        size: int = 32,
        *,
        mean: tuple[float, float, float] = CIFAR_MEAN,
        std: tuple[float, float, float] = CIFAR_STD,
        crop_scale: tuple[float, float] | None = None,
        blur: bool = True,
    ) -> None:
        super().__init__()
        if isinstance(recipe, str):
            if recipe not in RECIPES:
                raise UserError(
                    f"unknown augmentation recipe {recipe!r}; valid: {', '.join(sorted(RECIPES))}"
                )
            views = RECIPES[recipe]
        else:
            views = tuple(recipe)
        if len(views) != 2 or not all(isinstance(v, ViewRecipe) for v in views):
            raise ValueError("recipe must be a name or a pair of ViewRecipe")
        if crop_scale is not None:
            views = tuple(replace(v, crop_scale=tuple(float(s) for s in crop_scale)) for v in views)
        if not blur:
            views = tuple(replace(v, blur_p=0.0) for v in views)
        if size < 1:
            raise UserError(f"augmentation output size must be >= 1, got {size}")
        self.name = recipe if isinstance(recipe, str) else "custom"
        self.views: tuple[ViewRecipe, ViewRecipe] = views  # type: ignore[assignment]
        self.size = int(size)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)

    def extra_repr(self) -> str:
        return f"recipe={self.name!r}, size={self.size}"

    def sample_params(
        self,
        batch: int,
        height: int,
        width: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> list[dict[str, torch.Tensor]]:
        """The parameters of both views (view 1 drawn first), see :func:`sample_view_params`."""
        return [sample_view_params(v, batch, height, width, generator, device) for v in self.views]

    def apply_params(
        self, images: torch.Tensor, params: list[dict[str, torch.Tensor]]
    ) -> list[torch.Tensor]:
        """Apply both views' parameters to a uint8 (B, 3, H, W) batch; returns 2 x (B, 3, S, S).

        (Not named ``apply``: that is ``nn.Module.apply(fn)``, which parents call recursively.)
        """
        _check_images(images)
        mean, std = _stats(self.mean, images.device), _stats(self.std, images.device)
        batch = images.shape[0]
        chunk = self.chunk_size(images) if images.device.type == "cpu" else batch
        if chunk >= batch:
            x = images.to(torch.float32).mul_(1.0 / 255)  # (B, 3, H, W) in [0, 1]
            return [apply_view(x, p, v, self.size, mean, std) for p, v in zip(params, self.views)]
        views = [
            images.new_empty((batch, 3, self.size, self.size), dtype=torch.float32)
            for _ in self.views
        ]
        for start in range(0, batch, chunk):
            part = slice(start, start + chunk)
            x = images[part].to(torch.float32).mul_(1.0 / 255)  # (b, 3, H, W)
            for out, p, v in zip(views, params, self.views):
                out[part] = apply_view(
                    x, {k: t[part] for k, t in p.items()}, v, self.size, mean, std
                )
        return views

    # On CPU, batches whose (B, 3, S, S) float tensors exceed this many elements are processed
    # in slices of the batch (same values: parameters are drawn for the whole batch first), to
    # keep the temporaries in cache: 1.3-1.8x faster at B=256, 96x96; no slicing at 32x32.
    chunk_elements = 1 << 20

    def chunk_size(self, images: torch.Tensor) -> int:
        """Samples per slice on CPU: about ``chunk_elements`` floats per (b, 3, S, S) tensor."""
        per_sample = 3 * max(self.size * self.size, images.shape[2] * images.shape[3])
        return max(1, self.chunk_elements // per_sample)

    def forward(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> list[torch.Tensor]:
        """Two views of ``images``.

        Args:
            images: (B, 3, H, W) uint8 on the training device.
            generator: On the images' device; None uses torch's default generator there.

        Returns:
            [view1, view2], each (B, 3, S, S) float32 normalised with ``mean``/``std``.

        Raises:
            ValueError: Not a uint8 (B, 3, H, W) tensor, or the generator is on another device.
        """
        _check_images(images)
        if generator is not None and generator.device.type != images.device.type:
            raise ValueError(
                f"generator is on {generator.device} but the images are on {images.device}"
            )
        batch, _, height, width = images.shape
        params = self.sample_params(batch, height, width, generator, images.device)
        return self.apply_params(images, params)


def eval_transform(
    images: torch.Tensor,
    size: int,
    mean: tuple[float, float, float] = CIFAR_MEAN,
    std: tuple[float, float, float] = CIFAR_STD,
) -> torch.Tensor:
    """Deterministic evaluation transform: scale to [0, 1], resize if needed, normalise.

    Args:
        images: (B, 3, H, W) uint8.
        size: Output side S. Images are resized (bilinear, antialiased) to (S, S) only when
            (H, W) != (S, S); non-square inputs are stretched, not cropped.
        mean: Per-channel mean.
        std: Per-channel standard deviation.

    Returns:
        (B, 3, S, S) float32.

    Raises:
        ValueError: Not a uint8 (B, 3, H, W) tensor.
    """
    _check_images(images)
    x = images.to(torch.float32).mul_(1.0 / 255)  # (B, 3, H, W)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(
            x, size=(size, size), mode="bilinear", antialias=True, align_corners=False
        )
    return x.sub_(_stats(mean, x.device)).div_(_stats(std, x.device))
