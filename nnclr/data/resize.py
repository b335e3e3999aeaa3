"""Resizing a whole image tensor to a square size.

Sources whose native size differs from the requested ``image_size`` are resized once, at load
time, so that every later step (augmentations, batching) sees one fixed size. The rule is the
same as for image folders: scale so the *shorter* side becomes ``size`` (antialiased bilinear)
and keep the centred ``size x size`` square. For square sources that is a plain resize.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_CHUNK = 512  # images per interpolation call: bounds the float32 working memory


def center_square(images: torch.Tensor) -> torch.Tensor:
    """Return the centred square crop (side = shorter side) of ``(N, C, H, W)`` images (a view)."""
    h, w = images.shape[-2:]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return images[..., top : top + side, left : left + side]


def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize ``uint8 (N, 3, H, W)`` images to ``(N, 3, size, size)``.

    The centred square is scaled with antialiased bilinear interpolation, rounded back to
    ``uint8``. Work is done in chunks so memory stays small for large data sets. Images that
    already have the requested size are returned unchanged (same tensor).

    Args:
        images: ``uint8`` tensor ``(N, 3, H, W)``.
        size: The output side length in pixels (> 0).

    Returns:
        A contiguous ``uint8`` tensor ``(N, 3, size, size)``.
    """
    if size <= 0:
        raise ValueError(f"size must be positive, got {size}")
    if tuple(images.shape[-2:]) == (size, size):
        return images
    square = center_square(images)
    out = torch.empty((images.shape[0], images.shape[1], size, size), dtype=torch.uint8)
    for start in range(0, images.shape[0], _CHUNK):
        chunk = square[start : start + _CHUNK].float()
        scaled = F.interpolate(
            chunk, size=(size, size), mode="bilinear", align_corners=False, antialias=True
        )
        out[start : start + _CHUNK] = scaled.round_().clamp_(0, 255).to(torch.uint8)
    return out
