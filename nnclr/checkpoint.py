"""Checkpoints: written atomically, loaded strictly with ``torch.load(weights_only=True)``.

A checkpoint holds everything an exact resume needs: model, support set, selector state
(k-means prototypes), optimiser, step, the resolved config, and the kNN accuracy before
pretraining, and the nnclr version that wrote it. Randomness needs no saved state: data order
and augmentation are drawn from generators seeded by (seed, epoch) and (seed, step).

Loading never runs code from the file: ``torch.load(weights_only=True)`` only, and a file that
would need arbitrary unpickling is refused, naming what it would import (found without
unpickling it). A checkpoint of another format, version or configuration is explained in one
line, never left to a shape-mismatch traceback.

Every checkpoint carries the SHA-256 of its bytes (the zip's comment, :mod:`nnclr.integrity`), computed
while it is written and checked while it is read (one pass over the file, memory-mapped): a file damaged
on disk or in a copy is refused, naming it. A checkpoint without one (written before checksums) is
loaded unchecked. The fields a checkpoint holds are checked for their types (:func:`check_fields`), so that a
crafted or damaged file is one line, not a traceback deep in a ``load_state_dict``.
"""

from __future__ import annotations

import errno
import warnings
from pathlib import Path
from typing import Any

import torch

from nnclr.config import RETIRED, Config, flatten, to_dict
from nnclr.errors import UserError
from nnclr.integrity import ChecksumWriter, verify_zip
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

    def write(file: Any) -> None:  # hashed on the way to the disk: no second pass over the file
        checksummed = ChecksumWriter(file)
        torch.save(state, checksummed)
        checksummed.finish()

    write_atomic(path, write, what="the checkpoint", kept=kept)


def unsafe_globals(path: Path) -> list[str]:
    """What unpickling ``path`` would import beyond tensors and plain data, found without unpickling it."""
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # noqa: BLE001 - not a zip checkpoint at all
        return []


def load_failure(error: Exception) -> str:
    """Why ``torch.load(weights_only=True)`` failed, without torch's advice to retry with ``weights_only=False``
    (which would run whatever the file holds)."""
    text = str(error)
    detail = text.split("WeightsUnpickler error:", 1)[1] if "WeightsUnpickler error:" in text else text
    if detail is text and "weights_only" in text:
        return type(error).__name__
    return next((line.strip() for line in detail.splitlines() if line.strip()), type(error).__name__)[:200]


def _not_loadable(path: Path, error: Exception, zipped: bool) -> UserError:
    """The one line for a file ``torch.load(weights_only=True)`` refused."""
    unsafe = unsafe_globals(path) if zipped else []
    if unsafe:
        return UserError(
            f"refused to load {path}: it needs unpickling arbitrary Python objects ({', '.join(unsafe[:3])}), "
            "which can run code; nnclr loads checkpoints with torch.load(weights_only=True) only"
        )
    reason = load_failure(error)
    if not zipped:  # torch's zip format is all nnclr writes; an older torch.save format or a plain pickle
        return UserError(
            f"{path} cannot be read as a checkpoint: it is not in torch's zip format (a plain pickle or a "
            f"torch.save file of torch < 1.6), and reading it as tensors and plain data failed ({reason}); nnclr "
            "never unpickles code. Point to an nnclr run directory or checkpoint.pt, or re-save the weights "
            "alone from a copy you trust: torch.save(model.state_dict(), FILE)"
        )
    return UserError(
        f"checkpoint {path} cannot be read ({reason}); it is damaged or not an nnclr checkpoint: copy it again "
        "from where it came from, or delete it and start over (nnclr pretrain --fresh)"
    )


def _unreadable(path: Path, error: OSError) -> UserError:
    """The one line for a checkpoint the operating system will not let us read."""
    reason = error.strerror or type(error).__name__
    advice = {
        errno.EACCES: f"give this user read permission (e.g. chmod u+r {path}) or run as its owner",
        errno.EPERM: f"give this user read permission (e.g. chmod u+r {path}) or run as its owner",
        errno.EISDIR: "pass a run directory or a checkpoint file",
        errno.ENAMETOOLONG: "a name in it is longer than the file system allows (255 bytes); pass a shorter path",
    }.get(error.errno or 0, "check the disk and the path, then rerun")
    return UserError(f"checkpoint {path} cannot be read ({reason}); {advice}")


def read_checkpoint(
    path: Path, map_location: str | torch.device = "cpu", whole: bool = True
) -> tuple[dict[str, Any], str | None]:
    """:func:`load_checkpoint` and the SHA-256 (hex) of the whole file, found in the same pass over it (``whole``;
    else None for a file without a stored checksum, which then is not hashed at all)."""
    try:
        if not path.is_file():
            raise UserError(f"checkpoint {path} not found; pass a run directory or a checkpoint file")
        with open(path, "rb") as file:
            verified = verify_zip(file, whole)
            if verified.damaged:
                raise UserError(
                    f"checkpoint {path} is damaged: its bytes no longer match the SHA-256 written with it (changed "
                    "on disk or in a copy); copy it again from where it came from, or delete it and start over "
                    "(nnclr pretrain --fresh)"
                )
            file.seek(0)
            head = file.read(4)
            if not head:
                raise UserError(f"checkpoint {path} is empty; delete it and start over (nnclr pretrain --fresh)")
            zipped = head == b"PK\x03\x04"
            file.seek(0)
            with warnings.catch_warnings():  # torch warns about pickle protocols: the error below says it all
                warnings.simplefilter("ignore")
                try:
                    state = torch.load(file, map_location=map_location, weights_only=True)
                except OSError:
                    raise
                except Exception as error:  # noqa: BLE001 - any unpickling failure means the same to a user
                    raise _not_loadable(path, error, zipped) from None
    except OSError as error:
        raise _unreadable(path, error) from None
    if not isinstance(state, dict) or "format_version" not in state:
        raise UserError(f"checkpoint {path} is not an nnclr checkpoint (format {FORMAT_VERSION})")
    if state["format_version"] != FORMAT_VERSION:
        raise UserError(
            f"checkpoint {path} has format {_shown(state['format_version'])}, written by nnclr "
            f"{str(state.get('nnclr_version', 'unknown'))[:40]}; this nnclr {__version__} reads format "
            f"{FORMAT_VERSION}: use the nnclr version that wrote it, or start over with --fresh"
        )
    check_fields(state, path)
    return state, verified.file_sha256


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` with ``torch.load(weights_only=True)``.

    Raises:
        UserError: The file is missing, unreadable (named with the reason), empty, damaged (its checksum does
            not match), truncated or not a checkpoint; it would need unpickling arbitrary objects (refused,
            nothing in it runs); it has another format version; or a field has the wrong type (:func:`check_fields`).
    """
    return read_checkpoint(path, map_location, whole=False)[0]


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_tensors(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())


def _is_optimizer(value: Any) -> bool:
    if not isinstance(value, dict) or not isinstance(value.get("state"), dict):
        return False
    groups = value.get("param_groups")
    return isinstance(groups, list) and all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups)


def _is_window(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[0], float) and isinstance(item[1], dict)
        for item in value
    )


# What each field of a checkpoint must be: (test, description for the message).
FIELDS: dict[str, tuple[Any, str]] = {
    "step": (_is_count, "a whole number >= 0"),
    "config": (lambda v: isinstance(v, dict) and all(isinstance(k, str) for k in v), "a mapping of config sections"),
    "model": (_is_tensors, "a mapping of names to tensors"),
    "support": (_is_tensors, "a mapping of names to tensors"),
    "selector": (_is_tensors, "a mapping of names to tensors"),
    "optimizer": (_is_optimizer, "an optimiser state dict (state, param_groups)"),
    "knn_before": (lambda v: v is None or isinstance(v, dict), "a mapping or None"),
    "loader": (lambda v: v in ("memory", "stream"), "'memory' or 'stream'"),
    "skipped_steps": (_is_count, "a whole number >= 0"),
    "consecutive_skips": (_is_count, "a whole number >= 0"),
    "unreadable_files": (_is_count, "a whole number >= 0"),
    "data": (lambda v: isinstance(v, dict) and all(isinstance(k, str) for k in v), "a mapping"),
    "log_window": (_is_window, "a list of (loss, diagnostics) pairs"),
    "nnclr_version": (lambda v: isinstance(v, str), "a version string"),
}
PRETRAINING_FIELDS = ("step", "config", "model")  # what every pretraining checkpoint holds
RESUME_FIELDS = (*PRETRAINING_FIELDS, "selector", "optimizer")  # what a resume needs besides (and "support")


def _shown(value: Any) -> str:
    text = repr(value) if not isinstance(value, (dict, list, tuple)) else f"a {type(value).__name__} of {len(value)}"
    return text if len(text) <= 40 else text[:37] + "..."


def check_fields(state: dict[str, Any], path: Path, required: tuple[str, ...] = ()) -> None:
    """Refuse, in one line, a checkpoint whose known fields (:data:`FIELDS`) have the wrong type or lack ``required``.

    Raises:
        UserError: Names the field, what it holds and what it should be.
    """
    missing = [key for key in required if key not in state]
    if missing:
        raise UserError(f"checkpoint {path} has no {', '.join(missing)}; it is not a whole nnclr pretraining "
                        "checkpoint (damaged or crafted): use the checkpoint.pt of a run directory, or start over "
                        "with --fresh")
    for key, (valid, what) in FIELDS.items():
        if key in state and not valid(state[key]):
            raise UserError(f"checkpoint {path}: field {key!r} is {_shown(state[key])}, not {what}; the file is "
                            "damaged or crafted: use the checkpoint.pt of a run directory, or start over with --fresh")


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
