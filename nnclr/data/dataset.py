"""The in-memory image data set every source is loaded into."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch.utils.data import Dataset

if TYPE_CHECKING:
    from nnclr.data.index import FileIndex


class ImageDataset(Dataset):
    """In-memory images. Every item is ``(image, label, index)``.

    Attributes:
        images: ``uint8`` tensor ``(N, 3, H, W)``, contiguous, RGB; or, for a folder that is not held
            in memory, a :class:`nnclr.data.lazy.FolderImages` that decodes the slices asked for.
        labels: ``int64`` tensor ``(N,)``; ``-1`` where the label is unknown.
        classes: Class names (``classes[label]``); ``[]`` when unlabelled.
        name: Where the images came from, e.g. ``"demo"``, ``"cifar10"``, ``"folder:/path"``.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor | None = None,
        classes: list[str] | None = None,
        name: str = "",
    ) -> None:
        """Wrap already decoded images.

        Args:
            images: ``uint8`` ``(N, 3, H, W)`` RGB; made contiguous if it is not.
            labels: Integer ``(N,)``; ``None`` means all unknown (``-1``).
            classes: Class names; ``None`` means ``[]``.
            name: A short description of the source.

        Raises:
            ValueError: If the shapes or dtypes are wrong (a programming error, not a user one).
        """
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(
                f"images must be uint8 (N, 3, H, W), got {images.dtype} {tuple(images.shape)}"
            )
        n = images.shape[0]
        self.in_memory = isinstance(images, torch.Tensor)
        if labels is None:
            labels = torch.full((n,), -1, dtype=torch.int64)
        labels = torch.as_tensor(labels).to(torch.int64)
        if labels.shape != (n,):
            raise ValueError(f"labels must have shape ({n},), got {tuple(labels.shape)}")
        self.images = images.contiguous() if self.in_memory else images
        self.labels = labels.contiguous()
        self.classes = list(classes) if classes is not None else []
        self.name = name
        self.index: FileIndex | None = None  # the files of a folder: source (set by its loader)

    def __len__(self) -> int:
        """Return the number of images."""
        return self.images.shape[0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        """Return ``(images[i], int(labels[i]), i)``; ``i`` may be negative."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} images")
        i = int(i) % n
        return self.images[i], int(self.labels[i]), i

    @property
    def has_labels(self) -> bool:
        """Whether any image has a known label (``>= 0``)."""
        return bool((self.labels >= 0).any())

    def __repr__(self) -> str:
        """Summarise the size, image shape and classes."""
        shape = "x".join(str(s) for s in self.images.shape[1:])
        return (
            f"ImageDataset(name={self.name!r}, n={len(self)}, image={shape}, "
            f"classes={len(self.classes)}, labelled={self.has_labels})"
        )
