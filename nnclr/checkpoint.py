"""Checkpoints: written atomically, loaded strictly with ``torch.load(weights_only=True)``.

A checkpoint holds everything an exact resume needs: model, support set, selector state
(k-means prototypes), optimiser, step, the resolved config, and the kNN accuracy before
pretraining. Randomness needs no saved state: data order and augmentation are drawn from
generators seeded by (seed, epoch) and (seed, step).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from nnclr.config import flatten
from nnclr.errors import UserError

FORMAT_VERSION = 1
CHECKPOINT_NAME = "checkpoint.pt"

# Keys that may differ between the run that wrote a checkpoint and the one resuming it.
RESUMABLE_CHANGES = (
    "train.run_dir", "train.threads", "train.log_every", "train.device", "train.max_steps", "train.report",
    "train.compile",
)


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Write ``state`` to ``path`` atomically: a temp file beside it, then a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"format_version": FORMAT_VERSION, **state}, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint`; a bad file is a UserError."""
    if not path.is_file():
        raise UserError(f"checkpoint {path} not found; pass a run directory or a checkpoint file")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unpickling failure means the same to a user
        reason = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
        raise UserError(
            f"checkpoint {path} cannot be read ({reason}); it may be truncated or not an nnclr "
            "checkpoint — delete it to start over"
        ) from None
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise UserError(f"checkpoint {path} is not an nnclr checkpoint (format {FORMAT_VERSION})")
    return state


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Keys whose values differ between two config dicts, ignoring :data:`RESUMABLE_CHANGES`."""
    a, b = flatten(saved), flatten(current)
    keys = sorted(set(a) | set(b))
    return [
        f"{key}: {a.get(key)!r} -> {b.get(key)!r}"
        for key in keys
        if key not in RESUMABLE_CHANGES and a.get(key) != b.get(key)
    ]


def load_state_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Strict ``load_state_dict``; a key or shape mismatch is a UserError naming the problem."""
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        detail = lines[1] if len(lines) > 1 else lines[0]
        raise UserError(
            f"the checkpoint's {what} does not match this model ({detail[:200]}); "
            "it was written by a different configuration"
        ) from None
