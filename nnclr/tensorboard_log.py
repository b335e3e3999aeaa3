"""TensorBoard logging of the training scalars and the report's galleries; a no-op without ``tensorboard``.

Uses :class:`torch.utils.tensorboard.SummaryWriter` (``pip install nnclr[tensorboard]``), writing to
``RUN_DIR/tensorboard``, so ``tensorboard --logdir runs`` shows every run. Scalars are the numbers
of the ``metrics.jsonl`` records, named ``<record type>/<key>`` (``train/loss``,
``train/nn_label_agreement``, ``knn/top1``...); the report adds its neighbour galleries as an image.
On resume, events past the checkpoint's step are purged, as ``metrics.jsonl`` drops its records.
"""

from __future__ import annotations

import importlib.util
import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from nnclr.rundir import TENSORBOARD, disk_error, make_dir

SKIP = ("type", "step", "epoch")


def available() -> bool:
    """True when the ``tensorboard`` package is installed."""
    return importlib.util.find_spec("tensorboard") is not None


_previous_excepthook = threading.excepthook


def _writer_thread_hook(args: threading.ExceptHookArgs) -> None:
    """tensorboard's event-writer thread dies on a full or read-only disk and its flush re-raises the OSError in
    the caller (:class:`TensorBoardLog` turns it into one line); without this its thread would also print a
    traceback."""
    if isinstance(args.exc_value, OSError) and type(args.thread).__module__.startswith("tensorboard."):
        return
    _previous_excepthook(args)


class TensorBoardLog:
    """Scalars and images to ``RUN_DIR/tensorboard``; every method does nothing when tensorboard is absent.

    Args:
        run_dir: the run directory.
        purge_step: drop events logged at this step or later by an earlier, interrupted session
            (a resumed run passes its checkpoint step + 1).
        enabled: False forces the no-op.
    """

    def __init__(self, run_dir: str | Path, purge_step: int | None = None, enabled: bool = True) -> None:
        self.writer = None
        self.log_dir = Path(run_dir) / TENSORBOARD
        if enabled and available():
            from torch.utils.tensorboard import SummaryWriter

            threading.excepthook = _writer_thread_hook
            make_dir(Path(run_dir), TENSORBOARD)  # a link planted there is refused, not followed
            with self._one_line():
                self.writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=purge_step)

    @contextmanager
    def _one_line(self) -> Iterator[None]:
        """An OSError of tensorboard's writer as the one-line error of a refused write (guarantee 3); the writer is
        dropped, so that closing it afterwards does not raise again."""
        try:
            yield
        except OSError as error:
            self.writer = None
            raise disk_error(self.log_dir, error, "the TensorBoard events in") from None

    @property
    def active(self) -> bool:
        """True when events are being written."""
        return self.writer is not None

    def write(self, record: dict[str, Any]) -> None:
        """Log every finite number of a ``metrics.jsonl`` record (``train`` or ``knn``) at its ``step``."""
        if self.writer is None:
            return
        kind, step = record.get("type", "train"), int(record.get("step", 0))
        for key, value in record.items():
            if key in SKIP or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if math.isfinite(value):
                with self._one_line():
                    self.writer.add_scalar(f"{kind}/{key}", value, step)
        with self._one_line():
            self.writer.flush()

    def image(self, tag: str, image: torch.Tensor, step: int) -> None:
        """Log one uint8 image (3, H, W), e.g. :func:`nnclr.report.galleries.gallery_grid`."""
        if self.writer is None:
            return
        with self._one_line():
            self.writer.add_image(tag, image, step, dataformats="CHW")
            self.writer.flush()

    def close(self) -> None:
        """Flush and close the event file."""
        if self.writer is not None:
            with self._one_line():
                self.writer.close()
            self.writer = None

    def __enter__(self) -> TensorBoardLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

