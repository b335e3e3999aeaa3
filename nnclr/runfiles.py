"""Writing the files of a run so that a kill, a full disk or a read-only folder never breaks one.

* :func:`write_atomic` writes a whole file (checkpoint, ``config.yaml``, ``results.json``, a
  rewritten ``metrics.jsonl``) into a temporary file beside it (``.NAME.tmp``), flushes it to
  disk, then renames it over the old one: at every moment the file is either the complete old
  one or the complete new one. A kill leaves at most a stray ``.NAME.tmp``, replaced next time.
* :func:`append_line` adds one line to ``metrics.jsonl``; a kill leaves at most a cut last line,
  which :class:`nnclr.train.MetricsLog` drops on resume.
* A write the operating system refuses (no space left, read-only file system, no permission)
  becomes a :class:`~nnclr.errors.UserError` that names the file and the reason, says what is
  still intact and what to do; the temporary file is removed and the old file is untouched.

``_open`` and ``_replace`` are the only calls that touch the disk; the kill campaign of
``tests/test_robustness.py`` wraps them to kill the process inside a write.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from nnclr.errors import UserError

_open = open
_replace = os.replace


def tmp_path(path: Path) -> Path:
    """The temporary sibling ``.NAME.tmp`` that :func:`write_atomic` writes first."""
    return path.with_name(f".{path.name}.tmp")


def disk_error(path: Path, error: OSError, what: str, kept: str = "") -> UserError:
    """The one-line error for a refused write of ``what`` (e.g. "the checkpoint") to ``path``."""
    reason = error.strerror or type(error).__name__
    kept = f"{kept}; " if kept else ""
    return UserError(
        f"cannot write {what} {path} ({reason}); {kept}free space on that disk or make {path.parent} "
        "writable, then rerun the same command"
    )


class _Recording:
    """A binary file that remembers the OSError a write raised (torch.save turns it into a RuntimeError)."""

    def __init__(self, file: IO[bytes]) -> None:
        self.file = file
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self.file.write(data)
        except OSError as error:
            self.error = error
            raise

    def flush(self) -> None:
        try:
            self.file.flush()
        except OSError as error:
            self.error = error
            raise


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable (POSIX); a no-op where directories cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: Path, write: Callable[[Any], object], *, what: str, kept: str = "") -> None:
    """Write ``path`` through ``write(file)`` (a binary file), atomically and durably.

    Args:
        path: The file to (re)place.
        write: Writes the content into the binary file it is given (e.g. ``torch.save(state, f)``).
        what: What the file is, for the error message ("the checkpoint").
        kept: What is still intact when the write fails, for the error message.

    Raises:
        UserError: The operating system refused the write (no space, read-only, permission);
            ``path`` is left as it was.
    """
    tmp = tmp_path(path)
    recording: _Recording | None = None
    try:
        with _open(tmp, "wb") as file:
            recording = _Recording(file)
            write(recording)
            recording.flush()
            os.fsync(file.fileno())
        _replace(tmp, path)
    except BaseException as error:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        cause = recording.error if recording is not None and recording.error is not None else error
        if isinstance(cause, OSError):
            raise disk_error(path, cause, what, kept) from None
        raise
    _fsync_dir(path.parent)


def write_text_atomic(path: Path, text: str, *, what: str, kept: str = "") -> None:
    """:func:`write_atomic` of a UTF-8 text."""
    write_atomic(path, lambda file: file.write(text.encode("utf-8")), what=what, kept=kept)


def append_line(path: Path, line: str, *, what: str, kept: str = "") -> None:
    """Append ``line`` and a newline to ``path`` in one write.

    Raises:
        UserError: The operating system refused the write.
    """
    try:
        with _open(path, "ab") as file:
            file.write((line + "\n").encode("utf-8"))
    except OSError as error:
        raise disk_error(path, error, what, kept) from None
