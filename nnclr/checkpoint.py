"""Checkpoints: written atomically, loaded strictly with ``torch.load(weights_only=True)``.

A checkpoint holds everything an exact resume needs: model, support set, selector state
(k-means prototypes), optimiser, step, the resolved config, and the kNN accuracy before
pretraining, and the nnclr version that wrote it. Randomness needs no saved state: data order
and augmentation are drawn from generators seeded by (seed, epoch) and (seed, step).

Loading never runs code from the file: ``torch.load(weights_only=True)`` only, and a file that
would need arbitrary unpickling is refused, naming what it would import (found without
unpickling it). A checkpoint of another format, version or configuration is explained in one
line, never left to a shape-mismatch traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from nnclr.config import RETIRED, Config, flatten, to_dict
from nnclr.errors import UserError
from nnclr.rundir import CHECKPOINT, write_atomic
from nnclr.version import __version__

FORMAT_VERSION = 1
CHECKPOINT_NAME = CHECKPOINT  # the file in a run directory (nnclr.rundir names it)

# Keys that may differ between the run that wrote a checkpoint and the one resuming it.
RESUMABLE_CHANGES = (
    "train.run_dir", "train.threads", "train.log_every", "train.device", "train.max_steps", "train.report",
    "train.nonfinite", "train.compile", "data.workers", "data.prefetch", "data.memory_gb",
)


def save_checkpoint(state: dict[str, Any], path: Path, previous_step: int | None = None) -> None:
    """Write ``state`` to ``path`` atomically (:func:`nnclr.rundir.write_atomic`).

    Raises:
        UserError: The disk is full or read-only; the previous checkpoint (``previous_step``)
            is left intact.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    kept = (
        f"the previous checkpoint (step {previous_step}) is intact" if previous_step is not None
        else "no checkpoint had been written yet"
    )
    state = {"format_version": FORMAT_VERSION, "nnclr_version": __version__, **state}
    write_atomic(path, lambda file: torch.save(state, file), what="the checkpoint", kept=kept)


def unsafe_globals(path: Path) -> list[str]:
    """What unpickling ``path`` would import beyond tensors and plain data, found without unpickling it."""
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # noqa: BLE001 - not a zip checkpoint at all
        return []


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` with ``torch.load(weights_only=True)``.

    Raises:
        UserError: The file is missing, truncated or not a checkpoint; it would need unpickling
            arbitrary objects (refused, nothing in it runs); or it has another format version.
    """
    if not path.is_file():
        raise UserError(f"checkpoint {path} not found; pass a run directory or a checkpoint file")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unpickling failure means the same to a user
        unsafe = unsafe_globals(path)
        if unsafe:
            raise UserError(
                f"refused to load {path}: it needs unpickling arbitrary Python objects ({', '.join(unsafe[:3])}), "
                "which can run code; nnclr loads checkpoints with torch.load(weights_only=True) only"
            ) from None
        reason = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
        raise UserError(
            f"checkpoint {path} cannot be read ({reason}); it may be truncated or not an nnclr "
            "checkpoint — delete it to start over"
        ) from None
    if not isinstance(state, dict) or "format_version" not in state:
        raise UserError(f"checkpoint {path} is not an nnclr checkpoint (format {FORMAT_VERSION})")
    if state["format_version"] != FORMAT_VERSION:
        raise UserError(
            f"checkpoint {path} has format {state['format_version']!r}, written by nnclr "
            f"{state.get('nnclr_version', 'unknown')}; this nnclr {__version__} reads format {FORMAT_VERSION}: "
            "use the nnclr version that wrote it, or start over with --fresh"
        )
    return state


def written_by(state: dict[str, Any]) -> str:
    """``" by nnclr X"`` when another nnclr version wrote ``state``, else ``""`` (for error messages)."""
    version = state.get("nnclr_version", "unknown (before 0.1.0)")
    return "" if version == __version__ else f" (written by nnclr {version}, this is {__version__})"


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Keys whose values differ between two config dicts, ignoring :data:`RESUMABLE_CHANGES`.

    A key the saved config lacks (it was added in a later nnclr version) counts as its default; a key that
    is no longer used (:data:`nnclr.config.RETIRED`) is ignored.
    """
    a, b = {**flatten(to_dict(Config())), **flatten(saved)}, flatten(current)
    a = {key: value for key, value in a.items() if key not in RETIRED}
    keys = sorted(set(a) | set(b))
    return [
        f"{key}: {a.get(key)!r} -> {b.get(key)!r}"
        for key in keys
        if key not in RESUMABLE_CHANGES and a.get(key) != b.get(key)
    ]


def load_state_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str, origin: str = "") -> None:
    """Strict ``load_state_dict``; a key or shape mismatch is a UserError naming the problem.

    ``origin`` (e.g. :func:`written_by`) is added to the message to say where the state came from.
    """
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        detail = lines[1] if len(lines) > 1 else lines[0]
        raise UserError(
            f"the checkpoint's {what}{origin} does not match this model ({detail[:200]}); "
            "it was written by a different configuration or nnclr version"
        ) from None
