"""nnclr: self-supervised contrastive learning of visual representations (NNCLR, SimCLR, KMCLR).

``nnclr.load(RUN_DIR_OR_CHECKPOINT)`` returns a trained encoder with its preprocessing
(:class:`nnclr.pretrained.Pretrained`); torch is imported on first use, not on ``import nnclr``.
"""

from __future__ import annotations

from typing import Any

from nnclr.version import __version__

__all__ = ["__version__", "load"]


def load(path: Any, device: str = "cpu", precision: str = "auto") -> Any:
    """Load a trained encoder: see :func:`nnclr.pretrained.load`."""
    from nnclr.pretrained import load as _load

    return _load(path, device=device, precision=precision)
