"""Random resized crops of one image file, for loader workers that stream full-size images from disk.

A worker reads a file's bytes (:func:`read_image_bytes`), decodes the image once and cuts every
view's random resized crop from it (:func:`decode_views`); the rest of the augmentation happens
later on the device. :func:`decode_eval` is the evaluation transform (shorter side scaled, centred
square), :func:`nnclr.data.decode.try_load_square`'s rule.

How a view is cut. The crop box of view ``v`` is ``crop_boxes(u[v:v+1], H, W, scale, ratio)`` of the
full image (continuous, torchvision ``RandomResizedCrop``'s rule); it is rounded to whole pixels
(:func:`pixel_box`: ``round`` each of x0, y0, w, h, then clamped inside the image) and resized to
``size x size`` by ``torch.nn.functional.interpolate(..., "bilinear", antialias=True)`` on the
uint8 tensor: the same computation as ``torchvision.transforms.v2.functional.resized_crop`` of a
tensor at that box (so the views equal it exactly), and within 1 grey level of torchvision's
``RandomResizedCrop`` on a PIL image at that box (Pillow ``crop`` + ``resize(BILINEAR)``, whose filter
PyTorch's antialiased kernel reproduces). Cropping first means the filter does not read pixels
beyond the box (Pillow's ``resize(box=...)`` on the whole image would, a few levels at the border).

Colours are :func:`nnclr.data.decode.to_rgb`'s (grayscale, palette, 16-bit, alpha composited on
black, CMYK all become 8-bit RGB); the EXIF orientation is not applied (as ``decode.py``).

Which decoder and which resize: measured on AMD EPYC (``/proc/cpuinfo``), 1 torch thread, torch 2.14.1,
torchvision 0.29.1, Pillow 13.0.0 (libjpeg-turbo), medians of interleaved repeats over synthetic
photo-like JPEGs at quality 90 (upscaled CIFAR-10 + texture noise, as ``bench/loader.py`` makes them):

* JPEG whose every crop stays >= ``size`` pixels on each side after a reduction 2^k (k = 1..3):
  Pillow with ``draft()``, libjpeg's DCT-domain downscale, at the largest such 2^k. On 4000 x 3000
  photos (3.3 MiB): full decode 63 ms (torchvision) / 88 ms (Pillow); draft 1/2, 1/4, 1/8: 38, 37,
  34 ms, since the entropy decoding, which no reduction skips, dominates files this dense (smoother
  photos gain more). Whole call, two 224 views at scale 0.08..1 (reductions 4 or 8): 39 ms, against
  83 ms for torchvision's full decode + the same crops. Views from the reduced decode differ from the
  full decode's by a mean under 1 grey level (``tests/test_crops.py``).
* Other JPEG (RGB, grayscale and CMYK): ``torchvision.io.decode_jpeg(mode=RGB)``, 1.17 ms against
  Pillow's 1.27 ms (+ 0.16 ms to copy Pillow's image into a tensor) for a 500 x 375 photo (110 KiB);
  its pixels equal Pillow + ``to_rgb``'s exactly for RGB, grayscale and Adobe CMYK files (both are
  libjpeg-turbo; checked in the tests).
* Every other format: Pillow + ``to_rgb``, then one copy into a tensor.
* Crop + resize to 224 x 224, per view of a 500 x 375 image: ``interpolate`` on the uint8 tensor slice
  (channels-last storage, as ``decode_jpeg`` returns it) 0.21-0.30 ms, torchvision v2 ``resized_crop``
  0.23 ms (the same kernel), Pillow ``resize(box=...)`` 0.66 ms; of a 4000 x 3000 image 5 ms against
  Pillow's 21 ms.

TorchCodec (0.17), which torchvision 0.29 names as the successor of its deprecated image decoders:
its ``decode_jpeg`` gave the same pixels as torchvision's at the same speed (1.24 against 1.30 ms
median per 500 x 375 photo, 15 interleaved passes over 64 files, idle AMD EPYC), both being
libjpeg-turbo; so it is not a dependency yet. When torchvision drops its decoder, Pillow takes over
here (1.27 ms + 0.16 ms copy); TorchCodec would be the drop-in to restore the fast path.

Where a GPU decoder would go: nvJPEG (``torchvision.io.decode_jpeg(device="cuda")`` or TorchCodec's)
decodes whole batches on the device; it would replace the per-file decode of :func:`decode_views` by
a batch decode in the training process, with the same boxes (``crop_boxes`` of the header sizes,
:func:`probe_size`), leaving the workers to read bytes only. Not built: no GPU here to measure it.

Whole call on a 500 x 375 JPEG, two 224 views: 2.3 ms, against 4.1 ms for Pillow decode + Pillow
``resize(box=...)`` and 2.9 ms for Pillow decode + ``interpolate``.
"""

from __future__ import annotations

import errno
import functools
import io
import os
import re
import stat
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from nnclr.augment.params import CROP_DRAWS, crop_boxes
from nnclr.data.decode import to_rgb, try_load_square


@functools.cache
def _jpeg_decoder() -> Callable[[torch.Tensor], torch.Tensor] | None:
    """torchvision's ``decode_jpeg`` to RGB, or None where it is gone (then Pillow decodes every JPEG).

    Imported on the first JPEG, not with this module: ``import torchvision`` takes 1-2 s (it imports its models
    and ``torch._dynamo``), which every ``nnclr`` command would pay for data that holds no JPEG.
    torchvision 0.29 deprecates its image decoders in favour of TorchCodec (not a dependency).
    """
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except ImportError:  # pragma: no cover - older/newer torchvision without image ops
        return None
    return functools.partial(decode_jpeg, mode=ImageReadMode.RGB)

_DRAFT_SCALES = (8, 4, 2)  # what libjpeg's DCT scaling offers (Pillow's draft), largest first
_TORCHVISION_JPEG_MODES = frozenset({"RGB", "L", "CMYK"})  # decode_jpeg(mode=RGB) == Pillow + to_rgb (tests)
# What Pillow and torchvision raise on unreadable data (decode.try_load_square's list, plus
# torchvision's RuntimeError and a few Pillow raises from malformed headers).
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, RuntimeError, IndexError, Image.DecompressionBombError)


class DecodeError(ValueError):
    """The bytes are not a readable image (truncated, corrupt, not an image, a decompression bomb).

    ``reason`` is one line of text, for callers that skip such files and report them.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


_BUFFER_NAME = re.compile(r"\s*<_io\.BytesIO object at 0x[0-9a-fA-F]+>")  # Pillow names the file object


def _clean(text: str) -> str:
    return _BUFFER_NAME.sub("", text)


def _reason(exc: BaseException) -> str:
    text = _clean(" ".join(str(exc).split())) or type(exc).__name__
    if isinstance(exc, RuntimeError) and text.startswith("decode_jpeg, "):
        # torchvision: "decode_jpeg, /path/to/decode_jpeg.cpp:171, Image is incomplete or truncated"
        text = "JPEG: " + text.split(", ", 2)[-1]
    return text


def unreadable_reason(error: OSError | DecodeError) -> str:
    """One line saying why a file could not be used: the OS's ``strerror``, or the decoder's reason."""
    text = getattr(error, "strerror", None) or str(error) or type(error).__name__
    return " ".join(text.split())


def read_image_bytes(path: str | os.PathLike[str]) -> bytes:
    """The whole content of the regular file ``path``.

    The file is opened non-blocking and checked with ``fstat`` before anything is read, so a FIFO,
    a device or a socket named like an image never blocks the reader.

    Raises:
        OSError: If ``path`` cannot be opened or read, or is not a regular file (``strerror`` says
            which kind of file it is).
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    fd = os.open(path, flags)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            if stat.S_ISDIR(mode):
                raise OSError(errno.EISDIR, os.strerror(errno.EISDIR), os.fspath(path))
            kinds = {stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
                     stat.S_IFSOCK: "a socket"}
            kind = kinds.get(stat.S_IFMT(mode), "of an unknown kind")
            raise OSError(errno.EINVAL, f"not a regular file ({kind})", os.fspath(path))
        file = open(fd, "rb", buffering=0, closefd=True)  # noqa: SIM115 - closed below
    except BaseException:
        os.close(fd)
        raise
    with file:
        return file.readall()


def pixel_box(x0: float, y0: float, w: float, h: float, width: int, height: int) -> tuple[int, int, int, int]:
    """A continuous box ``(x0, y0, w, h)`` rounded to whole pixels inside a ``width x height`` image.

    Each of the four values is rounded (half to even, Python's ``round``), the size is kept within
    ``1..width`` (``1..height``) and the corner moved so the box stays inside the image.
    """
    wr = min(max(1, round(w)), width)
    hr = min(max(1, round(h)), height)
    xr = min(max(0, round(x0)), width - wr)
    yr = min(max(0, round(y0)), height - hr)
    return xr, yr, wr, hr


def _open(data: bytes | bytearray | memoryview) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))  # reads the header only
    except _DECODE_ERRORS as exc:
        raise DecodeError(_reason(exc)) from None
    if image.width < 1 or image.height < 1:
        raise DecodeError(f"empty image ({image.width} x {image.height})")
    return image


def probe_size(data: bytes | bytearray | memoryview) -> tuple[int, int]:
    """``(width, height)`` of an encoded image from its header (nothing is decoded).

    Raises:
        DecodeError: If the header is not a readable image's.
    """
    return _open(data).size


def _pillow_tensor(image: Image.Image) -> torch.Tensor:
    """Decode ``image`` (Pillow), to RGB; a (3, H, W) uint8 tensor in channels-last storage."""
    try:
        image.load()
        rgb = to_rgb(image)
        array = np.array(rgb, dtype=np.uint8)  # writable (H, W, 3) copy
    except _DECODE_ERRORS as exc:
        raise DecodeError(_reason(exc)) from None
    if array.ndim != 3 or array.shape[2] != 3:  # to_rgb always gives RGB; guard against odd plugins
        raise DecodeError(f"unexpected decoded shape {array.shape}")
    return torch.from_numpy(array).permute(2, 0, 1)


def _torchvision_jpeg(data: bytes | bytearray | memoryview) -> torch.Tensor:
    encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)  # a writable copy: no warning, ~10 us
    try:
        return _jpeg_decoder()(encoded)  # (3, H, W), channels-last storage
    except _DECODE_ERRORS as exc:
        raise DecodeError(_reason(exc)) from None


def _boxes(u: torch.Tensor, height: int, width: int, crops: Sequence) -> list[list[float]]:
    """Every view's continuous box ``[x0, y0, w, h]``, one ``crop_boxes`` call per distinct (scale, ratio)."""
    views = u.shape[0]
    boxes: list[list[float]] = [[]] * views
    groups: dict[tuple, list[int]] = {}
    for v in range(views):
        scale, ratio = crops[v]
        groups.setdefault((tuple(scale), tuple(ratio)), []).append(v)
    with torch.inference_mode():  # ~100 us instead of ~170 us per call; only Python floats leave
        for (scale, ratio), rows in groups.items():
            found = crop_boxes(u[rows] if len(rows) < views else u, height, width, scale, ratio).tolist()
            for v, box in zip(rows, found):
                boxes[v] = box
    return boxes


def draft_scale(boxes: Sequence[Sequence[float]], size: int) -> int:
    """The largest JPEG reduction 2^k (1, 2, 4 or 8) after which every box is still >= ``size`` on each side.

    1 when any box is already smaller than ``size`` on a side (no reduction for it).
    """
    shortest = min(min(box[2], box[3]) for box in boxes)
    for scale in _DRAFT_SCALES:
        if shortest / scale >= size:
            return scale
    return 1


def decode_views(
    data: bytes | bytearray | memoryview,
    u: torch.Tensor,
    crops: Sequence[tuple[tuple[float, float], tuple[float, float]]],
    size: int,
    boxes: Sequence[Sequence[float]] | None = None,
) -> torch.Tensor:
    """Decode an image once and cut its random resized crops.

    Args:
        data: The encoded file (any format Pillow reads; JPEG takes the fast paths).
        u: (V, CROP_DRAWS) float32 uniforms in [0, 1), one row per view.
        crops: ``crops[v] = (scale, ratio)`` of view ``v`` (area fraction range, aspect range).
        size: Output side S.
        boxes: The views' boxes ``crop_boxes(u, H, W, ...)`` when the caller computed them already
            (a loader worker does so for a whole batch in one call: ~0.2 ms of small tensor operations
            per call, 7% of a 500 x 375 photo's cost when made image by image).

    Returns:
        uint8 (V, 3, S, S): view ``v`` is the box ``crop_boxes(u[v:v+1], H, W, *crops[v])`` of the full
        decoded RGB image, rounded to pixels (:func:`pixel_box`), resized with antialiased bilinear.

    Raises:
        DecodeError: If the bytes are not a readable image.
    """
    if u.dim() != 2 or u.shape[1] != CROP_DRAWS or len(crops) != u.shape[0]:
        raise ValueError(f"u must be (V, {CROP_DRAWS}) with one (scale, ratio) per row; got {tuple(u.shape)}, "
                         f"{len(crops)} crops")
    image = _open(data)
    width, height = image.size
    if boxes is None:
        boxes = _boxes(u, height, width, crops)
    scale = 1
    if image.format == "JPEG":
        scale = draft_scale(boxes, size)
    if scale > 1:
        try:
            drafted = image.draft(image.mode, (width // scale, height // scale))
        except _DECODE_ERRORS as exc:
            raise DecodeError(_reason(exc)) from None
        if drafted is not None:  # (mode, (0, 0, W / s, H / s)) in the decoded image's pixels
            scale = width / drafted[1][2]
        else:
            scale = 1
        pixels = _pillow_tensor(image)
    elif image.format == "JPEG" and image.mode in _TORCHVISION_JPEG_MODES and _jpeg_decoder() is not None:
        pixels = _torchvision_jpeg(data)
    else:
        pixels = _pillow_tensor(image)
    _, rows, cols = pixels.shape
    out = torch.empty(len(boxes), 3, size, size, dtype=torch.uint8)
    for v, (x0, y0, w, h) in enumerate(boxes):
        if scale != 1:
            x0, y0, w, h = x0 / scale, y0 / scale, w / scale, h / scale
        x, y, bw, bh = pixel_box(x0, y0, w, h, cols, rows)
        crop = pixels[None, :, y : y + bh, x : x + bw]
        out[v] = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
    return out


def decode_eval(data: bytes | bytearray | memoryview, size: int) -> torch.Tensor:
    """uint8 (3, S, S): the shorter side scaled to ``size``, the centred square; exactly
    :func:`nnclr.data.decode.try_load_square` (which the in-memory path uses) on these bytes.

    Raises:
        DecodeError: If the bytes are not a readable image.
    """
    array = try_load_square(io.BytesIO(data), size)  # type: ignore[arg-type] - Image.open takes file objects
    if isinstance(array, str):
        raise DecodeError(_clean(array) or "unreadable image")
    return torch.from_numpy(np.ascontiguousarray(array))


__all__ = ["DecodeError", "decode_eval", "decode_views", "draft_scale", "pixel_box", "probe_size", "read_image_bytes",
           "unreadable_reason"]
