"""Folders of image files (the ``folder:PATH`` source).

Layout rules:

* ``PATH/train`` plus ``PATH/test`` (or ``PATH/val``) folders: each split is loaded from its own
  folder (``val`` answers ``split="test"`` when there is no ``test``). Otherwise the whole
  folder is the ``train`` split and there is no ``test`` split.
* Inside the chosen folder, every subfolder that holds images (at any depth below it) is a
  class: sorted names give labels ``0..C-1``, as in torchvision's ``ImageFolder``. Images lying
  directly in the folder next to class subfolders are ignored, with a warning.
* With no class subfolders, the images directly in the folder are loaded unlabelled
  (labels ``-1``, ``classes == []``).
* Hidden files and folders (name starting with ``.``) are skipped. Order is deterministic:
  by class, then sorted relative paths.

The files are listed by :func:`nnclr.data.scan.load_index` (in parallel, cached on disk), so this
in-memory loader and the streaming one see the same files in the same order; only regular files
are listed (a FIFO, a socket, a dangling symlink is reported as unreadable, never opened).
Every file is decoded as described in :mod:`nnclr.data.decode` and kept in memory as
``uint8 (N, 3, S, S)``. A file that cannot be read (truncated, corrupt, not an image, no
permission, a symlink loop) and a folder that cannot be listed are skipped, counted and the first
few named in one warning line on stderr; a folder in which no image can be read is an error.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from nnclr.data.dataset import ImageDataset
from nnclr.data.decode import is_image_file, try_load_square
from nnclr.data.scan import PROGRESS_MIN_FILES, load_index
from nnclr.errors import UserError
from nnclr.machine import usable_cpus

DEFAULT_IMAGE_SIZE = 64


# Pillow releases the GIL while decoding JPEG and resizing: 2 threads decoded 240 640x480 JPEGs
# 1.7x faster than 1 on 2 cores (PNG: no gain, no loss).
_THREADS = min(4, len(usable_cpus()))
_TEST_NAMES = ("test", "val")


def images_below(path: Path, unreadable: list[tuple[Path, str]] | None = None) -> list[Path]:
    """All image files at any depth below ``path``, sorted; symlinked folders followed once.

    For :mod:`nnclr.use.embed` (any depth, no classes); the ``folder:`` source uses
    :func:`nnclr.data.scan.load_index`. Folders that cannot be listed are added to ``unreadable`` with the reason.
    """
    seen: set[str] = set()
    found: list[Path] = []

    def onerror(error: OSError) -> None:
        if unreadable is not None:
            unreadable.append((Path(error.filename), error.strerror or type(error).__name__))

    for top, dirs, files in os.walk(path, followlinks=True, onerror=onerror):
        real = os.path.realpath(top)
        if real in seen:  # a symlink loop or a folder reached twice
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found.extend(Path(top) / f for f in files if is_image_file(Path(f)))
    return sorted(found, key=lambda p: p.relative_to(path).as_posix())


def _is_dir(entry: os.DirEntry) -> bool:
    """Whether ``entry`` is a folder or a link to one; False for a link that loops or leads nowhere."""
    try:
        return entry.is_dir()
    except OSError:
        return False


def split_folder(root: Path, split: str) -> Path:
    """Return the folder that holds ``split`` (see the module docstring for the rules).

    Raises:
        UserError: If ``root`` is missing or a file, or the split is not available there.
    """
    where = f"data.name='folder:{root}'"
    if not root.exists():
        raise UserError(f"{where}: no such directory; pass an existing folder of images")
    if not root.is_dir():
        raise UserError(
            f"{where}: is a file, not a directory; pass the folder that holds the images "
            "(or use npz:PATH for an .npz file)"
        )
    try:  # listing it and looking into it (r and x): what finding the splits and the images needs
        os.stat(os.path.join(root, "."))  # needs x: the names alone (r) cannot be opened
        with os.scandir(root) as entries:
            names = {entry.name for entry in entries if _is_dir(entry)}
    except OSError as error:
        raise UserError(
            f"{where}: the folder cannot be read ({error.strerror or type(error).__name__}); make it readable "
            f"(e.g. chmod u+rx {root}) or pass another folder"
        ) from None
    test = next((root / t for t in _TEST_NAMES if t in names), None)
    if "train" in names and test is not None:
        splits = {"train": root / "train", "test": test}
        if "val" in names:
            splits["val"] = root / "val"
        if split not in splits:
            raise UserError(f"{where}: unknown split {split!r}; valid splits: {', '.join(splits)}")
        return splits[split]
    if split == "train":
        return root
    raise UserError(
        f"{where}: there is no {split!r} split in this folder (it has no train/ and test/ "
        "subfolders); use split 'train', or put the images in train/ and test/ subfolders"
    )


def scan_folder(
    path: Path, unreadable: list[tuple[Path, str]] | None = None
) -> tuple[list[Path], list[int], list[str]]:
    """List the images under ``path`` with their labels and the class names (:func:`load_index`).

    Returns:
        ``(files, labels, classes)``; labels are ``-1`` and classes ``[]`` when unlabelled.
        Subfolders that cannot be listed and entries that are not regular files are added to
        ``unreadable``.

    Raises:
        UserError: If there are no images, or ``path`` itself cannot be listed.
    """
    index, bad = load_index(path)
    if unreadable is not None:
        unreadable.extend(bad)
    return index.paths(), index.labels.tolist(), index.classes


def _decode_all(
    files: list[Path], size: int, load: Callable[[Path, int], np.ndarray | str]
) -> Iterator[np.ndarray | str]:
    """Yield the decoded files in order, two at a time on a small thread pool."""
    if len(files) < 8:
        yield from (load(f, size) for f in files)
        return
    pool = ThreadPoolExecutor(max_workers=_THREADS)
    try:
        yield from pool.map(load, files, [size] * len(files))
    finally:  # on an error, drop the queued files instead of decoding them all first
        pool.shutdown(wait=True, cancel_futures=True)


def decode_files(
    files: list[Path], size: int, desc: str = "decoding images"
) -> tuple[torch.Tensor, list[int], list[tuple[Path, str]]]:
    """Decode ``files`` into one ``uint8 (M, 3, size, size)`` tensor (progress bar if many).

    Returns:
        The images of the M files that could be read, their positions in ``files``, and the
        files that could not be read with the reason.
    """
    out = torch.empty((len(files), 3, size, size), dtype=torch.uint8)
    view = out.numpy()
    kept: list[int] = []
    skipped: list[tuple[Path, str]] = []
    quiet = len(files) <= PROGRESS_MIN_FILES
    disable = True if quiet else None  # None: tqdm shows the bar only on a terminal
    with tqdm(total=len(files), desc=desc, unit="img", file=sys.stderr, disable=disable) as bar:
        for i, array in enumerate(_decode_all(files, size, try_load_square)):
            if isinstance(array, str):
                skipped.append((files[i], array))
            else:
                view[len(kept)] = array
                kept.append(i)
            bar.update(1)
    return out[: len(kept)], kept, skipped


def _report_skipped(folder: Path, total: int, skipped: list[tuple[Path, str]], shown: int = 3) -> None:
    """One warning line: how many files or folders were skipped, and the first few with the reason."""
    first = "; ".join(f"{path}: {reason}" for path, reason in skipped[:shown])
    more = f"; and {len(skipped) - shown} more" if len(skipped) > shown else ""
    print(f"nnclr: warning: {folder}: skipped {len(skipped)} unreadable file(s) or folder(s) "
          f"({total} image files found): {first}{more}", file=sys.stderr)


def load_folder(root: Path, split: str, image_size: int | None, name: str) -> ImageDataset:
    """Load the ``folder:PATH`` source.

    Args:
        root: The folder given by the user.
        split: ``"train"``, ``"test"`` (or ``"val"`` when the folder has both).
        image_size: Output side length; ``None`` means 64.
        name: The data set name to record.

    Returns:
        The decoded images (``uint8 (N, 3, S, S)``) with labels and class names.

    Raises:
        UserError: For a missing path, a file instead of a folder, no images, an unknown split
            or no readable image.
    """
    size = DEFAULT_IMAGE_SIZE if image_size is None else image_size
    folder = split_folder(root, split)
    unreadable: list[tuple[Path, str]] = []
    files, labels, classes = scan_folder(folder, unreadable)
    images, kept, skipped = decode_files(files, size, desc=f"decoding {folder}")
    if not kept:
        path, reason = skipped[0]
        raise UserError(
            f"none of the {len(files)} image files in {folder} could be read (first: {path}: {reason}); "
            "check that they are images and readable"
        )
    if unreadable or skipped:  # image names the index could not stat (links to nowhere, loops) count as found
        found = len(files) + sum(is_image_file(Path(path)) for path, _ in unreadable)
        _report_skipped(folder, found, unreadable + skipped)
    return ImageDataset(images, torch.tensor([labels[i] for i in kept], dtype=torch.int64), classes, name)
