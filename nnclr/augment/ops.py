"""Batched tensor operations of a view: crop and flip, colour jitter, grayscale, blur, solarize."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nnclr.augment.params import HUE
from nnclr.augment.recipes import ViewRecipe, blur_kernel_size

# ITU-R 601-2 luma, the weights of torchvision's rgb_to_grayscale.
_GRAY_WEIGHTS = (0.2989, 0.587, 0.114)


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


def grayscale(x: torch.Tensor) -> torch.Tensor:
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
    gray = grayscale(x)  # (B, 1, S, S)
    mean = gray.mean(dim=(2, 3), keepdim=True)  # (B, 1, 1, 1)
    offset = gray.mul_(b).add_(mean * c)  # (B, 1, S, S); in place: faster than a broadcast addcmul
    return torch.addcmul(offset, x, a).clamp_(0.0, 1.0)  # (B, 3, S, S)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
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


def color_jitter(
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
        x = adjust_hue(x, torch.where(on, params["hue"], 0.0))
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


def gaussian_blur(
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


def solarize(x: torch.Tensor, apply: torch.Tensor, threshold: float) -> torch.Tensor:
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
        params: From :func:`sample_view_params` with the same recipe; ``box=None`` when the images
            are already the view's crops at S x S (then only the flip applies of the warp).
        recipe: The view's recipe; operations with probability 0 are skipped entirely.
        size: Output side S.
        mean: (1, 3, 1, 1) per-channel mean.
        std: (1, 3, 1, 1) per-channel standard deviation.

    Returns:
        (B, 3, S, S) float32, normalised.
    """
    if params.get("box") is None:  # already cropped to S x S (the streaming loader's workers): flip only
        x = torch.where(params["flip"].view(-1, 1, 1, 1), images.flip(-1), images)
    else:
        x = _crop_flip(images, params["box"], params["flip"], size)  # (B, 3, S, S)
    if recipe.jitter_p > 0:
        x = color_jitter(x, params, recipe)
    if recipe.gray_p > 0:
        to_gray = params["gray"].to(x.dtype).view(-1, 1, 1, 1)  # (B, 1, 1, 1) in {0, 1}
        x = torch.lerp(x, grayscale(x), to_gray)
    if recipe.blur_p > 0:
        x = gaussian_blur(x, params["sigma"], params["blur"], blur_kernel_size(size))
    if recipe.solarize_p > 0:
        x = solarize(x, params["solarize"], recipe.solarize_threshold)
    return x.sub_(mean).div_(std)
