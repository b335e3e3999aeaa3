"""Sprite sheets: many equally sized images tiled row-major into one big image.

The shipped demo data set is stored this way, as lossless WebP, which compresses CIFAR-sized
images far better than one file per image.
"""

from __future__ import annotations

import math

import numpy as np


def grid_shape(n: int, columns: int) -> tuple[int, int]:
    """Return ``(rows, columns)`` of a sheet holding ``n`` tiles, ``columns`` per row."""
    if n <= 0 or columns <= 0:
        raise ValueError(f"need n > 0 and columns > 0, got n={n}, columns={columns}")
    return math.ceil(n / columns), columns


def tile(images: np.ndarray, columns: int) -> np.ndarray:
    """Tile ``uint8 [N, H, W, C]`` images into ``[rows*H, columns*W, C]`` (row-major).

    Cells after the last image are filled with zeros.
    """
    n, h, w, c = images.shape
    rows, columns = grid_shape(n, columns)
    padded = np.zeros((rows * columns, h, w, c), dtype=images.dtype)
    padded[:n] = images
    grid = padded.reshape(rows, columns, h, w, c).transpose(0, 2, 1, 3, 4)
    return np.ascontiguousarray(grid.reshape(rows * h, columns * w, c))


def untile(sheet: np.ndarray, n: int, height: int, width: int) -> np.ndarray:
    """Invert :func:`tile`: cut ``sheet`` ``[rows*H, columns*W, C]`` into ``n`` images.

    Returns:
        ``[n, height, width, C]`` (a fresh contiguous array).

    Raises:
        ValueError: If the sheet size is not a whole number of tiles or holds fewer than ``n``.
    """
    total_h, total_w, c = sheet.shape
    if total_h % height or total_w % width:
        raise ValueError(f"sheet {total_w}x{total_h} is not a grid of {width}x{height} tiles")
    rows, columns = total_h // height, total_w // width
    if rows * columns < n:
        raise ValueError(f"sheet holds {rows * columns} tiles, fewer than {n}")
    grid = sheet.reshape(rows, height, columns, width, c).transpose(0, 2, 1, 3, 4)
    return np.ascontiguousarray(grid.reshape(rows * columns, height, width, c)[:n])
