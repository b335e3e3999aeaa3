"""Decoding one image file into a square RGB ``uint8`` array.

Every file becomes RGB: grayscale and palette images are expanded, 16-bit and 32-bit integer
images are scaled down to 8 bits, and images with transparency are composited onto black (so
what hides under fully transparent pixels never leaks in). The image is then scaled so its
shorter side is ``size`` (antialiased bilinear, Pillow's ``resize``) and the centred
``size x size`` square is kept; both steps are done in one ``resize`` call with a crop box.
Multi-frame files (GIF, TIFF) use their first frame.

libtiff, which Pillow decodes compressed TIFFs with, prints its own warnings and errors on stderr
(fd 2, from C: "ZIPDecode: Decoding error at scanline 0", "TIFFFetchNormalTag: Incorrect count ...")
besides the reason Pillow raises; :func:`nnclr.libtiff.quiet_libtiff` turns that off for the ``nnclr`` command.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from nnclr.errors import UserError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})


def is_image_file(path: Path) -> bool:
    """Whether ``path`` has an image extension (case-insensitive) and is not a hidden file."""
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _high_bit_depth_to_l(image: Image.Image) -> Image.Image:
    """Map a 16/32-bit integer or float grayscale image to 8-bit ``L``.

    ``I;16*`` images are 16-bit (``0..65535``). 32-bit ``I`` images whose values stay within
    ``0..255`` are kept as they are, others are taken as 16-bit; ``F`` (float) images are taken
    as ``0..1`` when their maximum is at most 1, else as ``0..255``.
    """
    values = np.asarray(image).astype(np.float64)
    peak = float(values.max()) if values.size else 0.0
    if image.mode == "F":
        top = 1.0 if peak <= 1.0 else 255.0
    elif image.mode == "I" and peak <= 255:
        top = 255.0
    else:
        top = 65535.0
    scaled = np.clip(np.rint(values * (255.0 / top)), 0, 255).astype(np.uint8)
    return Image.fromarray(scaled)  # 2-D uint8 -> mode "L"


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow image to 8-bit RGB (alpha composited onto black)."""
    if image.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N", "F"):
        image = _high_bit_depth_to_l(image)
    if image.mode in ("P", "L", "RGB") and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, image)
    return image.convert("RGB") if image.mode != "RGB" else image


def square_box(width: int, height: int) -> tuple[float, float, float, float]:
    """The centred square of a ``width`` x ``height`` image, as PIL's box (left, top, right, bottom)."""
    side = min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    return (left, top, left + side, top + side)


def try_load_square(path: Path, size: int) -> np.ndarray | str:
    """Decode ``path`` to a ``uint8 [3, size, size]`` RGB array (shorter side scaled, centre crop).

    Args:
        path: An image file.
        size: The output side length in pixels.

    Returns:
        A ``uint8`` array in CHW layout, or, if Pillow cannot open or decode the file (truncated,
        corrupt, not an image, a decompression bomb, no permission, a symlink loop), the reason
        as one line of text: for callers that skip such files and report them.
    """
    try:
        with Image.open(path) as image:
            image.draft("RGB", (size, size))  # JPEG: decode at a reduced scale >= size
            rgb = to_rgb(image)
            square = rgb.resize((size, size), Image.Resampling.BILINEAR, box=square_box(*rgb.size))
            array = np.asarray(square, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        return " ".join(str(exc).split()) or type(exc).__name__
    return array.transpose(2, 0, 1)


def load_square(path: Path, size: int) -> np.ndarray:
    """:func:`try_load_square` for one file that must be readable.

    Raises:
        UserError: If Pillow cannot open or decode the file (the message names it and the reason).
    """
    array = try_load_square(path, size)
    if isinstance(array, str):
        raise UserError(
            f"{path}: cannot read this image ({array}); remove the file or replace it with a valid image"
        )
    return array
