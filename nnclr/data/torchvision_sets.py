"""CIFAR-10, CIFAR-100 and STL-10 through torchvision, with an offline ``.npz`` fallback.

For each of these sources the folder ``root`` is searched in this order:

1. ``root/{split}.npz`` in the format of :mod:`nnclr.data.arrays` (e.g. the shared, offline
   copy of CIFAR-10) - no network, no checksum;
2. torchvision's own files (``cifar-10-batches-py``, ``cifar-100-python``,
   ``stl10_binary``), downloaded first when ``download=True`` and they are missing;
   torchvision verifies their md5 checksums.

When neither works a :class:`~nnclr.errors.UserError` says where it looked and how to provide
a local copy.
"""

from __future__ import annotations

import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import torch

from nnclr.data.arrays import hwc_to_tensor, read_npz
from nnclr.data.dataset import ImageDataset
from nnclr.errors import UserError

SPLITS: dict[str, tuple[str, ...]] = {
    "cifar10": ("train", "test"),
    "cifar100": ("train", "test"),
    "stl10": ("train", "test", "unlabeled", "train+unlabeled"),
}
_TORCHVISION_FOLDER = {
    "cifar10": "cifar-10-batches-py",
    "cifar100": "cifar-100-python",
    "stl10": "stl10_binary",
}
_LOAD_ERRORS = (OSError, RuntimeError, ValueError, EOFError, tarfile.TarError, pickle.PickleError)


def default_root(name: str) -> Path:
    """Return the folder used when no ``root`` is given.

    That is ``$NNCLR_DATA_DIR/<name>`` when the variable is set, else
    ``~/.cache/nnclr/data/<name>``.
    """
    parent = os.environ.get("NNCLR_DATA_DIR")
    base = Path(parent).expanduser() if parent else Path.home() / ".cache" / "nnclr" / "data"
    return base / name


def _from_torchvision(name: str, root: Path, split: str, download: bool) -> ImageDataset:
    """Build the data set with torchvision (may download); its exceptions pass through."""
    from torchvision import datasets  # imported here: it takes seconds and most runs never need it

    if name == "stl10":
        stl = datasets.STL10(str(root), split=split, download=download)
        labels = torch.from_numpy(np.asarray(stl.labels, dtype=np.int64))
        classes = [] if split == "unlabeled" else list(stl.classes)
        images = torch.from_numpy(np.ascontiguousarray(stl.data))  # already (N, 3, 96, 96)
        return ImageDataset(images, labels, classes, name)
    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    data = cls(str(root), train=split == "train", download=download)
    labels = torch.tensor(data.targets, dtype=torch.int64)
    return ImageDataset(hwc_to_tensor(data.data), labels, list(data.classes), name)


def _not_found(name: str, root: Path, split: str, download: bool, exc: Exception) -> UserError:
    reason = " ".join(f"{type(exc).__name__}: {exc}".split())
    tried = "download failed" if download else "download=False"
    retry = "retry when online" if download else "allow the download (download=True) when online"
    return UserError(
        f"data.name='{name}': no usable copy in {root} (looked for {split}.npz and torchvision's "
        f"{_TORCHVISION_FOLDER[name]}/; {tried}: {reason}); put torchvision's files or "
        f"{split}.npz (images uint8 [N,H,W,3], labels) in that folder, pass root=<folder with "
        f"them>, or {retry}"
    )


def load_torchvision(name: str, split: str, root: Path | None, download: bool) -> ImageDataset:
    """Load ``cifar10``, ``cifar100`` or ``stl10`` at native size (32 or 96 pixels).

    Args:
        name: One of :data:`SPLITS`.
        split: A split valid for ``name`` (checked by the caller).
        root: The folder to search; ``None`` means :func:`default_root`.
        download: Whether torchvision may download missing files.

    Raises:
        UserError: If there is no local copy and the download is off or fails.
    """
    folder = default_root(name) if root is None else Path(root).expanduser()
    npz = folder / f"{split}.npz"
    if npz.is_file():
        return read_npz(npz, name)
    try:
        return _from_torchvision(name, folder, split, download)
    except _LOAD_ERRORS as exc:
        raise _not_found(name, folder, split, download, exc) from exc
