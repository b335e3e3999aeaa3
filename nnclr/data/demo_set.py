"""The ``demo`` source: a small, class-balanced subset of CIFAR-10 shipped inside the package.

Files in ``nnclr/data/demo/`` (built by ``scripts/build_demo.py``; see the README there):

* ``train.webp`` / ``test.webp``: lossless WebP sprite sheets of the 32x32 images, row-major in
  order of the original CIFAR-10 index;
* ``labels.npz``: per split ``{split}_labels`` and ``{split}_indices`` (index into the official
  CIFAR-10 split), ``{split}_sha256`` of the pixels (``uint8 [N, 32, 32, 3]`` bytes), and
  ``classes``.

Decoding takes well under half a second; the pixels are checked against the stored hash.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from nnclr.data.arrays import hwc_to_tensor
from nnclr.data.dataset import ImageDataset
from nnclr.data.sprites import untile
from nnclr.errors import UserError

DEMO_DIR = Path(__file__).resolve().parent / "demo"
SPLITS = ("train", "test")
TILE = 32
META_FILE = "labels.npz"


def sprite_path(split: str, folder: Path = DEMO_DIR) -> Path:
    """Return the sprite sheet file of ``split``."""
    return folder / f"{split}.webp"


def pixel_sha256(images: np.ndarray) -> str:
    """Return the hex sha256 of ``uint8 [N, H, W, 3]`` images' bytes (C order)."""
    return hashlib.sha256(np.ascontiguousarray(images, dtype=np.uint8).tobytes()).hexdigest()


def _broken(folder: Path, what: str) -> UserError:
    return UserError(
        f"demo data in {folder} {what}; reinstall nnclr or rebuild it with scripts/build_demo.py"
    )


def read_meta(split: str, folder: Path = DEMO_DIR) -> dict[str, np.ndarray]:
    """Read ``labels``, ``indices``, ``sha256`` of ``split`` and ``classes`` from the meta file."""
    try:
        with np.load(folder / META_FILE, allow_pickle=False) as meta:
            return {
                "labels": meta[f"{split}_labels"].astype(np.int64),
                "indices": meta[f"{split}_indices"].astype(np.int64),
                "sha256": meta[f"{split}_sha256"],
                "classes": meta["classes"],
            }
    except (OSError, KeyError, ValueError) as exc:
        raise _broken(folder, f"is missing or unreadable ({exc})") from exc


def demo_source_indices(split: str = "train") -> np.ndarray:
    """Return the indices into the official CIFAR-10 ``split`` of the demo images, in demo order."""
    return read_meta(split)["indices"]


def decode_sprites(split: str, n: int, folder: Path = DEMO_DIR) -> np.ndarray:
    """Decode the sprite sheet of ``split`` to ``uint8 [n, 32, 32, 3]``."""
    try:
        with Image.open(sprite_path(split, folder)) as image:
            sheet = np.asarray(image.convert("RGB"))
    except OSError as exc:
        raise _broken(folder, f"cannot be decoded ({exc})") from exc
    return untile(sheet, n, TILE, TILE)


def load_demo(split: str, folder: Path = DEMO_DIR) -> ImageDataset:
    """Load the shipped demo subset of CIFAR-10 at its native 32x32 size.

    Args:
        split: ``"train"`` or ``"test"`` (checked by the caller).
        folder: Where the demo files are (the package's own copy by default).

    Raises:
        UserError: If the files are missing or do not decode to the recorded pixels.
    """
    meta = read_meta(split, folder)
    images = decode_sprites(split, len(meta["labels"]), folder)
    if pixel_sha256(images) != str(meta["sha256"]):
        raise _broken(folder, f"decodes to different pixels than recorded ({split})")
    classes = [str(c) for c in meta["classes"].tolist()]
    return ImageDataset(hwc_to_tensor(images), torch.from_numpy(meta["labels"]), classes, "demo")
