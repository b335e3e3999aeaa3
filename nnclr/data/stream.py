"""Training batches streamed from a folder of any size, decoded in ``DataLoader`` workers.

The NNCLR paper (Dwibedi et al., ICCV 2021, Sec. 4.1) takes BYOL's augmentations (Grill et al.
2020, Appendix B): each view starts with a random resized crop of the *full* image. Here each
sample of a step is read from disk once, decoded once, and both views' crops (scale
``augment.crop_min_scale``..1, aspect 3/4..4/3) are cut from it and resized to S x S in a worker
(:mod:`nnclr.data.crops`); the rest of the augmentation (flip, colour, grayscale, blur, solarize)
stays batched on the training device (:class:`nnclr.augment.BatchAugment`).

Exact resume: what a step sees is a function of (seed, epoch, step, sample) only.

* The sampler (main process) yields ``(step, indices, first_row)``: the step's slice of the epoch's
  permutation (``nnclr.train``'s order, so DeepCluster's pseudo-label order works too), this
  rank's part of it, and where that part starts in the global batch.
* The worker draws the crop uniforms of the *global* batch from a CPU generator seeded with
  ``(seed, CROPS, step)`` and keeps its rows, so one process and W processes cut the same crops,
  whichever worker decodes the batch and however many workers there are.
* A file that cannot be read (deleted, truncated, corrupt since it was indexed) is replaced by
  the next readable file of the index (i + 1, i + 2, ...), cropped with the same uniforms; the
  other samples of the batch are untouched. The batch reports the files it skipped.
"""

from __future__ import annotations

import math
import signal
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from nnclr import distributed
from nnclr.augment.params import CROP_DRAWS, crop_boxes
from nnclr.data.crops import DecodeError, decode_views, probe_size, read_image_bytes, unreadable_reason
from nnclr.data.index import FileIndex
from nnclr.errors import UserError
from nnclr.machine import local_processes, usable_cpus
from nnclr.seeding import CROPS, derive_seed

SHOWN_UNREADABLE = 10  # replaced files named on stderr; the rest are only in metrics.jsonl
MAX_SUBSTITUTES = 64  # files tried after an unreadable one before the batch is given up

Crop = tuple[tuple[float, float], tuple[float, float]]  # (scale range, aspect-ratio range) of one view


@dataclass
class StreamBatch:
    """One step's data for this process, as a worker returns it.

    Attributes:
        step: The training step.
        views: uint8 (2, b, 3, S, S): both views' random resized crops of each sample.
        labels: int64 (b,), -1 where unknown.
        indices: int64 (b,) positions in the file index of the samples used.
        skipped: ``(relative path, reason)`` of files that could not be read and were replaced.
    """

    step: int
    views: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def pin_memory(self) -> StreamBatch:
        """Called by the DataLoader's pinning thread on CUDA (``pin_memory=True``)."""
        self.views, self.labels, self.indices = (t.pin_memory() for t in (self.views, self.labels, self.indices))
        return self


class StepSampler(Sampler):
    """Yields ``(step, indices, first_row)`` for the steps ``[first, end)`` of one epoch.

    ``set_epoch`` replaces the order and the range before each ``iter(loader)``, which keeps
    persistent workers alive across epochs.
    """

    def __init__(self, batch_size: int, steps_per_epoch: int, rows: slice) -> None:
        self.batch_size, self.steps_per_epoch, self.rows = batch_size, steps_per_epoch, rows
        self.order = torch.empty(0, dtype=torch.int64)
        self.first = self.end = 0

    def set_epoch(self, order: torch.Tensor, first: int, end: int) -> None:
        """Use the permutation ``order`` (N,) for the steps ``[first, end)`` (all in one epoch)."""
        self.order, self.first, self.end = order, first, end

    def __len__(self) -> int:
        return self.end - self.first

    def __iter__(self) -> Iterator[tuple[int, torch.Tensor, int]]:
        b = self.batch_size
        for step in range(self.first, self.end):
            position = step % self.steps_per_epoch
            batch = self.order[position * b : (position + 1) * b]
            yield step, batch[self.rows].clone(), self.rows.start


class CropBatches(Dataset):
    """Item ``(step, indices, first_row)`` -> :class:`StreamBatch` (decoded in a worker).

    Args:
        index: The training split's files and labels.
        size: Output side S.
        crops: Each view's (scale range, aspect-ratio range).
        seed: ``train.seed``.
        batch_size: The global batch B (the crop uniforms are drawn for all of it).
    """

    def __init__(self, index: FileIndex, size: int, crops: tuple[Crop, Crop], seed: int, batch_size: int) -> None:
        self.index, self.size, self.crops, self.seed, self.batch_size = index, size, crops, seed, batch_size
        self.labels = torch.as_tensor(index.labels, dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.index)

    def uniforms(self, step: int) -> torch.Tensor:
        """(B, 2, CROP_DRAWS) crop uniforms of the global batch of ``step`` (CPU, float32)."""
        generator = torch.Generator().manual_seed(derive_seed(self.seed, CROPS, step))
        return torch.rand(self.batch_size, len(self.crops), CROP_DRAWS, generator=generator)

    def __getitem__(self, item: tuple[int, torch.Tensor, int]) -> StreamBatch:
        step, indices, first_row = item
        u = self.uniforms(step)[first_row : first_row + len(indices)]  # (b, 2, CROP_DRAWS)
        skipped: list[tuple[str, str]] = []
        files = [self._read(i, skipped) for i in indices.tolist()]  # (index, bytes, (width, height))
        boxes = self._boxes(u, [size for _, _, size in files])  # (b, 2, 4), one crop_boxes call per view
        views = _batch_tensor((len(self.crops), len(indices), 3, self.size, self.size))
        used = torch.empty(len(indices), dtype=torch.int64)
        for row, (j, data, _) in enumerate(files):
            try:
                views[:, row] = decode_views(data, u[row], self.crops, self.size, boxes=boxes[row].tolist())
            except DecodeError as error:  # a readable header, unreadable data (truncated, corrupt)
                skipped.append((self.index.relpath(j), unreadable_reason(error)))
                j, views[:, row] = self._decode(*self._read(j + 1, skipped)[:2], u[row], skipped)
            used[row] = j
        return StreamBatch(step, views, self.labels[used], used, skipped)

    def _boxes(self, u: torch.Tensor, sizes: list[tuple[int, int]]) -> torch.Tensor:
        """(b, V, 4) crop boxes of every sample's full image (:func:`nnclr.augment.params.crop_boxes`)."""
        width, height = torch.tensor(sizes, dtype=torch.float32).unbind(1)  # (b,) each
        with torch.inference_mode():
            return torch.stack([crop_boxes(u[:, v], height, width, *crop) for v, crop in enumerate(self.crops)], 1)

    def _read(self, i: int, skipped: list[tuple[str, str]]) -> tuple[int, bytes, tuple[int, int]]:
        """Bytes and size of file ``i``, or of the next readable one (skipped files are recorded)."""
        n = len(self.index)
        for attempt in range(min(MAX_SUBSTITUTES, n)):
            j = (i + attempt) % n
            try:
                data = read_image_bytes(self.index.path(j))
                return j, data, probe_size(data)
            except (OSError, DecodeError) as error:
                skipped.append((self.index.relpath(j), unreadable_reason(error)))
        raise UserError(
            f"{self.index.root}: {min(MAX_SUBSTITUTES, n)} files in a row could not be read, the last "
            f"{skipped[-1][0]} ({skipped[-1][1]}); check that the folder is still there and readable"
        )

    def _decode(self, j: int, data: bytes, u: torch.Tensor, skipped: list[tuple[str, str]]
                ) -> tuple[int, torch.Tensor]:
        """``(j, decode_views of file j)``, moving on to the next file while the data cannot be decoded."""
        for _ in range(MAX_SUBSTITUTES):
            try:
                return j, decode_views(data, u, self.crops, self.size)
            except DecodeError as error:
                skipped.append((self.index.relpath(j), unreadable_reason(error)))
                j, data, _ = self._read(j + 1, skipped)
        raise UserError(f"{self.index.root}: {MAX_SUBSTITUTES} files in a row could not be decoded; "
                        "check that the folder holds images")


def _batch_tensor(shape: tuple[int, ...]) -> torch.Tensor:
    """An uninitialised uint8 tensor; in a loader worker, in shared memory (as ``default_collate`` makes its
    batches), so that handing it to the training process copies nothing."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=torch.uint8)
    storage = torch.UntypedStorage._new_shared(math.prod(shape))
    return torch.empty(0, dtype=torch.uint8).new(storage).view(shape)


def _worker_init(_: int) -> None:
    """One thread per worker (the training process owns the cores); deaf to Ctrl-C and SIGTERM.

    A Ctrl-C in a terminal (or a SIGTERM to the process group, as schedulers send) reaches the
    workers too: a worker that died of it would crash the training process, which instead finishes
    its step, saves its checkpoint and then stops the workers (they also exit when it dies).
    """
    torch.set_num_threads(1)
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)


def default_workers(device: torch.device) -> int:
    """``data.workers=-1``: worker processes per training process.

    On a GPU decoding is the bottleneck: a worker per spare core of this process's share, up
    to 8 (about 350-480 photos/s each at 224 px, BENCHMARKS.md). On the CPU the training
    step needs the cores and one worker keeps ahead of it (decoding a batch costs a few
    percent of a step).
    """
    share = max(1, len(usable_cpus()) // local_processes())
    return max(1, min(8, share - 1)) if device.type == "cuda" else 1


class StreamFeed:
    """This process's training batches from disk, one epoch at a time, and the files it could not read.

    Every file a worker replaced is counted (``unreadable``: this rank's, since the run started),
    the first :data:`SHOWN_UNREADABLE` are named on stderr, and all wait in ``unlogged`` until
    :meth:`take_unlogged` hands them to the metrics log. Under torchrun each rank reads its own
    files: :meth:`unreadable_total` and :meth:`take_unlogged` are collectives over the ranks.

    Example:
        >>> feed = StreamFeed(index, size=224, crops=crops, seed=0, batch_size=256,
        ...                   steps_per_epoch=len(index) // 256, rows=slice(0, 256), workers=4,
        ...                   prefetch=2, device=torch.device("cpu"))
        >>> for batch in feed.epoch(order, first=0, end=10): ...
    """

    def __init__(
        self,
        index: FileIndex,
        *,
        size: int,
        crops: tuple[Crop, Crop],
        seed: int,
        batch_size: int,
        steps_per_epoch: int,
        rows: slice,
        workers: int,
        prefetch: int,
        device: torch.device,
    ) -> None:
        self.sampler = StepSampler(batch_size, steps_per_epoch, rows)
        self.workers = workers
        self.loader = DataLoader(
            CropBatches(index, size, crops, seed, batch_size),
            sampler=self.sampler, batch_size=None, num_workers=workers,
            pin_memory=device.type == "cuda", prefetch_factor=prefetch if workers else None,
            persistent_workers=workers > 0, worker_init_fn=_worker_init if workers else None,
            generator=torch.Generator(),  # never draw the workers' base seed from the global RNG
        )
        self._iterator: Iterator[StreamBatch] | None = None
        self.unreadable = 0
        self.unlogged: list[tuple[int, str, str]] = []  # (step, relative path, reason)

    def epoch(self, order: torch.Tensor, first: int, end: int) -> Iterator[StreamBatch]:
        """The batches of steps ``[first, end)`` of the epoch whose permutation is ``order`` (N,)."""
        self.sampler.set_epoch(order, first, end)
        self._iterator = iter(self.loader)
        return self._iterator

    def next(self, step: int) -> StreamBatch:
        """The batch of ``step`` (the next of the current epoch); its replaced files are counted and noted."""
        if self._iterator is None:
            raise RuntimeError("StreamFeed.next before StreamFeed.epoch")
        batch = next(self._iterator)
        if batch.step != step:  # the sampler yields the steps in order: a bug, not a user error
            raise RuntimeError(f"the streaming loader gave step {batch.step}'s batch at step {step}")
        for path, reason in batch.skipped:
            self.unreadable += 1
            self.unlogged.append((step, path, reason))
            if self.unreadable <= SHOWN_UNREADABLE:
                more = " (further ones are only counted)" if self.unreadable == SHOWN_UNREADABLE else ""
                print(f"nnclr: warning: step {step}: skipped {path}: {reason}; the next file of the folder took "
                      f"its place{more}", file=sys.stderr)
        return batch

    def unreadable_total(self, device: torch.device) -> int:
        """Files every rank's loader replaced so far (a collective under torchrun)."""
        if distributed.world_size() == 1:
            return self.unreadable
        count = torch.tensor([self.unreadable], dtype=torch.float64, device=device)
        return int(distributed.all_reduce_sum(count).item())

    def take_unlogged(self) -> list[tuple[int, str, str]]:
        """Every rank's replaced files since the last call, sorted (a collective under torchrun)."""
        unlogged, self.unlogged = self.unlogged, []
        return sorted(entry for part in distributed.gather_objects(unlogged) for entry in part)

    def close(self) -> None:
        """Stop the worker processes."""
        iterator, self._iterator = self._iterator, None
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
