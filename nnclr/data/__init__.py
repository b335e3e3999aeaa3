"""Data sets held in memory as ``uint8`` image tensors.

Public API:

* :class:`ImageDataset`: items are ``(image, label, index)``.
* :func:`load_dataset`: ``demo``, ``cifar10``, ``cifar100``, ``stl10``, ``npz:PATH`` and
  ``folder:PATH`` sources.
"""

from nnclr.data.dataset import ImageDataset
from nnclr.data.registry import VALID_SOURCES, load_dataset

__all__ = ["VALID_SOURCES", "ImageDataset", "load_dataset"]
