"""TensorBoard logging of the training scalars and the report's galleries; a no-op without ``tensorboard``.

Uses :class:`torch.utils.tensorboard.SummaryWriter` (the ``tensorboard`` extra), writing to
``RUN_DIR/tensorboard``, so ``tensorboard --logdir runs`` shows every run. Scalars are named
``<record type>/<key>`` (``train/loss``, ``train/nn_label_agreement``, ``knn/top1``...).
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Any

import torch

SKIP = ("type", "step", "epoch")


def available() -> bool:
    """True when the ``tensorboard`` package is installed."""
    return importlib.util.find_spec("tensorboard") is not None


class TensorBoardLog:
    """Scalars and images to ``RUN_DIR/tensorboard``; every method does nothing when tensorboard is absent.

    Args:
        run_dir: the run directory.
        enabled: False forces the no-op.
    """

    def __init__(self, run_dir: str | Path, enabled: bool = True) -> None:
        self.writer = None
        if enabled and available():
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))

    @property
    def active(self) -> bool:
        return self.writer is not None

    def scalars(self, record: dict[str, Any], step: int) -> None:
        """Log every finite number of a ``metrics.jsonl`` record (``train`` or ``knn``) at ``step``."""
        if self.writer is None:
            return
        kind = record.get("type", "train")
        for key, value in record.items():
            if key in SKIP or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if math.isfinite(value):
                self.writer.add_scalar(f"{kind}/{key}", value, step)

    def images(self, tag: str, image_grid: torch.Tensor, step: int) -> None:
        """Log one uint8 (3, H, W) image, e.g. :func:`nnclr.report.galleries.gallery_grid`."""
        if self.writer is None:
            return
        self.writer.add_image(tag, image_grid, step, dataformats="CHW")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def __enter__(self) -> TensorBoardLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
