"""``load_dataset``: one entry point that maps a source name to its loader."""

from __future__ import annotations

import numbers
import os
from pathlib import Path

import torch

from nnclr.data import demo_set, torchvision_sets
from nnclr.data.arrays import load_npz
from nnclr.data.dataset import ImageDataset
from nnclr.data.folder import DEFAULT_IMAGE_SIZE, load_folder, split_folder
from nnclr.data.lazy import FolderImages
from nnclr.data.resize import resize_images
from nnclr.data.scan import load_index
from nnclr.errors import UserError

NAMED_SOURCES = ("demo", "cifar10", "cifar100", "stl10")
PATH_SOURCES = ("npz", "folder")
VALID_SOURCES = "demo, cifar10, cifar100, stl10, npz:PATH, folder:PATH"


def _unknown_source(name: str) -> UserError:
    hint = ""
    if os.path.exists(name):
        kind = "npz" if name.endswith(".npz") else "folder"
        hint = f" (it is a path: did you mean '{kind}:{name}'?)"
    return UserError(f"data.name={name!r}: unknown data set{hint}; valid: {VALID_SOURCES}")


def parse_name(name: str) -> tuple[str, str | None]:
    """Split ``name`` into ``(source, path)``; ``path`` is ``None`` for the named sources.

    Raises:
        UserError: If the source is unknown or a path source has an empty path.
    """
    source, sep, path = name.strip().partition(":")
    source = source.strip().lower()
    if not sep and source in NAMED_SOURCES:
        return source, None
    if sep and source in PATH_SOURCES:
        if not path.strip():
            raise UserError(f"data.name={name!r}: empty path; write {source}:PATH")
        return source, path.strip()
    raise _unknown_source(name)


def _check_split(name: str, split: str, valid: tuple[str, ...]) -> None:
    if split not in valid:
        choices = ", ".join(valid)
        raise UserError(f"data.name={name!r}: unknown split {split!r}; valid splits: {choices}")


def _check_size(image_size: int | None) -> None:
    if image_size is None:
        return
    if (
        isinstance(image_size, bool)
        or not isinstance(image_size, numbers.Integral)
        or image_size < 1
    ):
        raise UserError(f"image_size={image_size!r}: must be a positive whole number of pixels")


def lazy_folder(root: Path, split: str, image_size: int | None, name: str) -> ImageDataset:
    """The ``folder:`` source indexed (cached, :func:`nnclr.data.scan.load_index`), decoded on demand."""
    index, _ = load_index(split_folder(root, split))
    size = DEFAULT_IMAGE_SIZE if image_size is None else int(image_size)
    dataset = ImageDataset(FolderImages(index, size), torch.as_tensor(index.labels), index.classes, name)
    dataset.index = index
    return dataset


def load_dataset(
    name: str,
    split: str = "train",
    *,
    root: str | None = None,
    image_size: int | None = None,
    download: bool = True,
    lazy: bool = False,
) -> ImageDataset:
    """Load a data set into memory as ``uint8 (N, 3, S, S)`` images with labels.

    With ``lazy=True`` a ``folder:`` source is only indexed, not decoded: its ``images`` are a
    :class:`~nnclr.data.lazy.FolderImages` that decodes the slices asked for (bounded memory for
    folders of any size). The other sources are arrays and load as usual.

    Sources:

    * ``demo``: a class-balanced CIFAR-10 subset shipped with the package (train/test).
    * ``cifar10``, ``cifar100`` (train/test), ``stl10`` (train/test/unlabeled/
      train+unlabeled): ``root/{split}.npz`` if present, else torchvision's files in ``root``
      (downloaded when ``download=True``). ``root`` defaults to
      ``$NNCLR_DATA_DIR/<name>`` or ``~/.cache/nnclr/data/<name>``.
    * ``npz:PATH``: a folder with ``{split}.npz`` or a single ``.npz`` (any split).
    * ``folder:PATH``: a folder of images, one subfolder per class or unlabelled
      (see :mod:`nnclr.data.folder`); decoded at ``image_size`` (default 64).

    When ``image_size`` is given and differs from the native size of an array source (demo,
    CIFAR, STL-10, npz), the whole tensor is resized once at load time: centred square crop
    (a no-op for square images), then antialiased bilinear interpolation.

    Args:
        name: The source, e.g. ``"demo"`` or ``"folder:/data/pets"``.
        split: The split to load.
        root: Folder for ``cifar10``/``cifar100``/``stl10`` (ignored by the other sources).
        image_size: Output side length in pixels; ``None`` keeps the native size (64 for
            folders).
        download: Whether torchvision may download missing CIFAR/STL-10 files.
        lazy: Index a ``folder:`` source instead of decoding it.

    Returns:
        The :class:`ImageDataset`, ``name`` set to the source name as given.

    Raises:
        UserError: For an unknown source or split, a missing or invalid path or file, an
            unreadable image, or a data set that is not available offline.
    """
    source, path = parse_name(name)
    _check_size(image_size)
    label = f"{source}:{path}" if path is not None else source
    if source == "folder" and lazy:
        return lazy_folder(Path(path).expanduser(), split, image_size, label)
    if source == "folder":
        dataset = load_folder(Path(path).expanduser(), split, image_size, label)
    elif source == "npz":
        dataset = load_npz(Path(path).expanduser(), split, label)
    elif source == "demo":
        _check_split(name, split, demo_set.SPLITS)
        dataset = demo_set.load_demo(split)
    else:
        _check_split(name, split, torchvision_sets.SPLITS[source])
        folder = Path(root) if root is not None else None
        dataset = torchvision_sets.load_torchvision(source, split, folder, download)
    if image_size is not None:
        dataset.images = resize_images(dataset.images, int(image_size))
    return dataset
