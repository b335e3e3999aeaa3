"""Which loader a run uses: the in-memory set, or batches streamed from disk.

``data.loader=auto`` holds a ``folder:`` source in memory when its decoded images fit a budget,
counting every training process on the machine (each holds its own copy), and streams it
otherwise; the other sources (demo, CIFAR, STL-10, ``npz:``) are arrays and always in memory.
The budget is ``data.memory_gb``, or half of the machine's memory. It depends on the machine's
total memory, not on what happens to be free, so that a resumed run makes the same choice.
"""

from __future__ import annotations

from dataclasses import dataclass

from nnclr.config import DataConfig
from nnclr.data.dataset import ImageDataset
from nnclr.data.pairs import align_labels, check_distinct
from nnclr.data.registry import load_dataset
from nnclr.errors import UserError
from nnclr.machine import local_processes, total_memory

GIB = 2**30


@dataclass(frozen=True)
class LoaderChoice:
    """``loader`` is ``"memory"`` or ``"stream"``; ``reason`` one line for the user ("" when there is no choice)."""

    loader: str
    reason: str


def _size(nbytes: float) -> str:
    return f"{nbytes / GIB:.1f} GiB" if nbytes >= GIB else f"{nbytes / 2**20:.0f} MiB"


def choose_loader(requested: str, data_name: str, n: int, size: int, memory_gb: float = 0.0) -> LoaderChoice:
    """Decide between ``memory`` and ``stream`` (see the module docstring).

    Args:
        requested: ``data.loader``: ``auto``, ``memory`` or ``stream``.
        data_name: ``data.name``.
        n: Files in the training split.
        size: ``data.image_size`` S.
        memory_gb: ``data.memory_gb`` (0 = half the machine's memory).

    Raises:
        UserError: ``stream`` asked for a source that is not a folder.
    """
    if not data_name.strip().lower().startswith("folder:"):
        if requested == "stream":
            raise UserError(
                f"data.loader=stream: only folder: sources stream from disk; {data_name} is an array held in "
                "memory (use data.loader=auto or memory)"
            )
        return LoaderChoice("memory", "")
    processes = local_processes()
    need = n * 3 * size * size * processes
    budget = memory_gb * GIB if memory_gb else total_memory() / 2
    where = "data.memory_gb" if memory_gb else "half of this machine's memory"
    sizes = (f"{n:,} images x 3x{size}x{size} bytes x {processes} process{'es' if processes > 1 else ''} = "
             f"{_size(need)} decoded")
    if requested == "memory" or (requested == "auto" and need <= budget):
        why = "data.loader=memory" if requested == "memory" else f"{sizes} <= {_size(budget)}, {where}"
        return LoaderChoice("memory", f"data: decoding {data_name} into memory ({why}); centred squares, "
                                      "crops of the square")
    why = "data.loader=stream" if requested == "stream" else f"{sizes} > {_size(budget)}, {where}"
    return LoaderChoice("stream", f"data: streaming {data_name} from disk ({why}); crops of the full images")


@dataclass
class TrainingData:
    """A run's data: the training split, the kNN monitor's test split, and the loader chosen."""

    train_set: ImageDataset
    test_set: ImageDataset | None
    choice: LoaderChoice


def load_training_data(data: DataConfig, loader: str | None = None) -> TrainingData:
    """Load (or, to stream, index) the training and test splits of ``data``.

    Args:
        data: The run's ``data`` section.
        loader: ``"memory"`` or ``"stream"`` to override ``data.loader`` (a resumed run keeps the
            loader it started with).
    """
    lazy = load_dataset(data.name, data.train_split, root=data.root, image_size=data.image_size,
                        download=data.download, lazy=True)
    choice = choose_loader(loader or data.loader, data.name, len(lazy), data.image_size, data.memory_gb)
    stream = choice.loader == "stream"
    train_set = lazy if stream or lazy.index is None else load_dataset(
        data.name, data.train_split, root=data.root, image_size=data.image_size, download=data.download)
    train_set.index = lazy.index
    test_set = None
    if data.test_split and train_set.has_labels:
        check_distinct(data.name, data.train_split, data.test_split)
        test_set = load_dataset(data.name, data.test_split, root=data.root, image_size=data.image_size,
                                download=data.download, lazy=stream)
        align_labels(train_set, test_set, test_split=data.test_split)
    return TrainingData(train_set, test_set, choice)
