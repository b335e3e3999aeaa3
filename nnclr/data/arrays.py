"""Images stored as numpy arrays in ``.npz`` files (the ``npz:PATH`` source).

Format (the one of ``shared/data/cifar10``): key ``images`` ``uint8 [N, H, W, 3]`` (HWC, RGB),
optional ``labels`` integer ``[N]`` (missing means all ``-1``), optional ``classes`` string
``[C]``. Files are read with ``allow_pickle=False``.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch

from nnclr.data.dataset import ImageDataset
from nnclr.errors import UserError

FORMAT = (
    "expected an .npz with 'images' uint8 [N,H,W,3] (HWC RGB), optional 'labels' int [N] "
    "and optional 'classes' str [C]"
)


def hwc_to_tensor(images: np.ndarray) -> torch.Tensor:
    """Convert ``uint8 [N, H, W, 3]`` numpy images to a contiguous ``uint8 (N, 3, H, W)`` tensor."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous()


def _bad(path: Path, what: str) -> UserError:
    return UserError(f"{path}: {what}; {FORMAT}")


def _read_images(data: np.lib.npyio.NpzFile, path: Path) -> np.ndarray:
    if "images" not in data.files:
        raise _bad(path, f"no 'images' array (keys: {', '.join(data.files) or 'none'})")
    images = data["images"]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise _bad(path, f"'images' is {images.dtype} {list(images.shape)}")
    if images.shape[0] == 0:
        raise _bad(path, "'images' holds no images")
    return images


def _read_labels(data: np.lib.npyio.NpzFile, path: Path, n: int) -> np.ndarray:
    if "labels" not in data.files:
        return np.full(n, -1, dtype=np.int64)
    labels = data["labels"]
    if not np.issubdtype(labels.dtype, np.integer) or labels.shape != (n,):
        raise _bad(path, f"'labels' is {labels.dtype} {list(labels.shape)}, want int [{n}]")
    labels = labels.astype(np.int64)
    if (labels < -1).any():
        raise _bad(path, f"'labels' has values below -1 (min {labels.min()})")
    return labels


def _read_classes(data: np.lib.npyio.NpzFile, path: Path, labels: np.ndarray) -> list[str]:
    if "classes" not in data.files:
        top = int(labels.max()) if labels.size else -1
        return [str(c) for c in range(top + 1)]
    classes = data["classes"]
    if classes.dtype.kind not in "US" or classes.ndim != 1:
        raise _bad(path, f"'classes' is {classes.dtype} {list(classes.shape)}, want str [C]")
    names = [c.decode() if isinstance(c, bytes) else str(c) for c in classes.tolist()]
    if labels.size and int(labels.max()) >= len(names):
        raise _bad(path, f"'labels' go up to {labels.max()} but there are {len(names)} classes")
    return names


def read_npz(path: Path, name: str) -> ImageDataset:
    """Load one ``.npz`` file in the format above.

    Args:
        path: The ``.npz`` file.
        name: The data set name to record.

    Returns:
        The images as an :class:`ImageDataset` (native size). Without a ``classes`` array the
        class names are ``"0".."C-1"`` (C = max label + 1), or ``[]`` when nothing is labelled.

    Raises:
        UserError: If the file is missing, unreadable or not in the expected format.
    """
    if not path.is_file():
        raise UserError(f"{path}: no such file; pass an existing .npz file or a folder holding one")
    try:
        with np.load(path, allow_pickle=False) as data:
            images = _read_images(data, path)
            labels = _read_labels(data, path, images.shape[0])
            classes = _read_classes(data, path, labels)
    except UserError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise _bad(path, f"cannot read it ({reason})") from exc
    return ImageDataset(hwc_to_tensor(images), torch.from_numpy(labels), classes, name)


def npz_file_for(path: Path, split: str) -> Path:
    """Pick the file for ``split``: ``path`` itself if it is a file, else ``path/{split}.npz``.

    Raises:
        UserError: If the path does not exist or the folder has no ``{split}.npz``.
    """
    if path.is_file():
        return path
    where = f"data.name='npz:{path}'"
    if not path.exists():
        raise UserError(
            f"{where}: no such file or folder; pass a .npz file or a folder with {split}.npz"
        )
    candidate = path / f"{split}.npz"
    if candidate.is_file():
        return candidate
    found = sorted(p.stem for p in path.glob("*.npz"))
    have = f"splits found: {', '.join(found)}" if found else "it holds no .npz files"
    raise UserError(
        f"{where}: no {split}.npz in this folder ({have}); add {split}.npz or pick another split"
    )


def load_npz(path: Path, split: str, name: str) -> ImageDataset:
    """Load ``npz:PATH``: one ``.npz`` file (any split; :mod:`nnclr.data.pairs` refuses it as both splits of a pair)
    or a folder holding ``{split}.npz``."""
    return read_npz(npz_file_for(path, split), name)
