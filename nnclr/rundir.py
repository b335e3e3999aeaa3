"""The run directory of ``nnclr pretrain``: the one module that names its files, writes and reads them.

Layout (every other module asks this one for a name, e.g. ``run_dir / rundir.CHECKPOINT``)::

    RUN_DIR/
      config.yaml      CONFIG        the resolved config, rewritten at every start
      checkpoint.pt    CHECKPOINT    model, optimiser, support set, selector state, step (nnclr.checkpoint)
      metrics.jsonl    METRICS       one JSON record per line: train, knn, clustering, unreadable (MetricsLog)
      results.json     RESULTS       written when the run ends: steps, kNN before/after, timings, hardware
      data-index.npz   DATA_INDEX    the files of a folder: training split when the run started
      tensorboard/     TENSORBOARD   TensorBoard events of the metrics (when tensorboard is installed)
      .lock            LOCK          who holds the run directory (acquire_lock)
      report.html      REPORT        ``nnclr report``'s page
      features/        FEATURES      ``nnclr eval``'s cached features, one file per checkpoint, data set and split
      eval/            EVAL          ``nnclr eval``'s results, one JSON file per protocol and data set
      eval/subsets/    EVAL_SUBSETS  the labelled subsets semi-supervised evaluation drew
      .NAME.tmp                      a write in progress (write_atomic); a kill may leave one, replaced next time

Writing, so that a kill, a full disk or a read-only folder never breaks a file:

* :func:`write_atomic` writes a whole file (checkpoint, ``config.yaml``, ``results.json``, a
  rewritten ``metrics.jsonl``) into a temporary file beside it (``.NAME.tmp``), flushes it to
  disk, then renames it over the old one: at every moment the file is either the complete old
  one or the complete new one. A kill leaves at most a stray ``.NAME.tmp``, replaced next time.
* :func:`append_line` adds one line to ``metrics.jsonl``; a kill leaves at most a cut last line,
  which :class:`MetricsLog` drops on resume and the readers skip.
* A write the operating system refuses (no space left, read-only file system, no permission)
  becomes a :class:`~nnclr.errors.UserError` that names the file and the reason, says what is
  still intact and what to do; the temporary file is removed and the old file is untouched.

``_open`` and ``_replace`` are the only calls of these writers that touch the disk; the kill
campaign (``tests/test_kill_campaign.py``) replaces them to kill the process inside a write. The
atomic writers also serve files outside a run directory (``nnclr embed``, ``nnclr export``).

One process per run directory: :func:`acquire_lock` takes an advisory ``flock`` on ``.lock``.

This module does not import torch (``nnclr report`` checks a run directory before importing it).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

from nnclr.errors import UserError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

CONFIG = "config.yaml"
CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
RESULTS = "results.json"
DATA_INDEX = "data-index.npz"
TENSORBOARD = "tensorboard"
LOCK = ".lock"
REPORT = "report.html"
FEATURES = "features"
EVAL = "eval"
EVAL_SUBSETS = f"{EVAL}/subsets"

FRESH_DELETES = (CHECKPOINT, METRICS, RESULTS, DATA_INDEX)  # and TENSORBOARD/: what --fresh starts over from


def default_run_dir(method: str, data: str) -> Path:
    """``runs/<method>-<data>``, with the data name made safe for a path."""
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in data).strip("-")
    return Path("runs") / f"{method}-{safe}"


def clear_for_fresh(run_dir: Path) -> None:
    """What ``--fresh`` deletes: checkpoint, metrics, results, data index and TensorBoard events.

    ``config.yaml`` is rewritten at every start; evaluation results, cached features and the
    report are kept (they name the checkpoint they came from).
    """
    for name in FRESH_DELETES:
        (run_dir / name).unlink(missing_ok=True)
    shutil.rmtree(run_dir / TENSORBOARD, ignore_errors=True)


# --- atomic writes ----------------------------------------------------------------------------------

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


def write_config(run_dir: Path, text: str) -> None:
    """Write ``config.yaml`` (the resolved config as YAML text) atomically."""
    write_text_atomic(run_dir / CONFIG, text, what="the config")


def write_results(run_dir: Path, results: dict[str, Any]) -> None:
    """Write ``results.json`` atomically, once the final checkpoint is written."""
    write_text_atomic(run_dir / RESULTS, json.dumps(results, indent=2), what="the results",
                      kept="the final checkpoint is intact")


# --- reading back ---------------------------------------------------------------------------------


def read_json(path: Path) -> Any:
    """The JSON value in ``path``, or None when it is missing or cannot be read or parsed."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _lines_and_records(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """Each line of a JSON-lines file with its record; lines that are not a JSON object (cut by a kill) are skipped."""
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill
        if isinstance(record, dict):
            yield line, record


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records (JSON objects, one a line) of ``path``; [] when it is missing; cut lines are skipped."""
    if not path.is_file():
        return []
    return [record for _, record in _lines_and_records(path)]


def read_yaml(path: Path) -> Any:
    """The YAML value in ``path`` (e.g. ``config.yaml``), or None when it does not parse."""
    import yaml

    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        return None


# --- metrics.jsonl ----------------------------------------------------------------------------------


class Mirror(Protocol):
    """Where :class:`MetricsLog` also sends its records (:class:`nnclr.tensorboard_log.TensorBoardLog`)."""

    def write(self, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class MetricsLog:
    """``metrics.jsonl``: one JSON record per line; on resume, records past the checkpoint are dropped.

    A record of step s was written before the checkpoint of step s, except DeepCluster's
    ``clustering`` record, written after it at the start of the next epoch: resuming from step s
    drops that one too (the resumed run clusters again).

    The file is rewritten atomically on resume and appended to one line at a time
    (:func:`write_text_atomic`, :func:`append_line`), so a kill costs at most the records after
    the checkpoint. Every record is also sent to ``mirror`` (TensorBoard, when installed).
    """

    KEPT = "the last checkpoint is intact"

    def __init__(self, path: Path, resume_step: int, mirror: Mirror | None = None) -> None:
        self.path = path
        self.mirror = mirror
        kept: list[tuple[str, dict[str, Any]]] = []  # (line, record)
        if resume_step > 0 and path.is_file():
            for line, record in _lines_and_records(path):
                step = record.get("step", 0)
                if step < resume_step or (step == resume_step and record.get("type") != "clustering"):
                    kept.append((line, record))
        self.logged = {(record.get("type"), record.get("step")) for _, record in kept}
        write_text_atomic(path, "".join(line + "\n" for line, _ in kept), what="the metrics", kept=self.KEPT)

    def has(self, kind: str, step: int) -> bool:
        """Whether a record of this type and step was logged (by this or an interrupted session)."""
        return (kind, step) in self.logged

    def write(self, record: dict[str, Any]) -> None:
        """Append ``record`` to the file (and send it to the mirror)."""
        append_line(self.path, json.dumps(record), what="the metrics", kept=self.KEPT)
        self.logged.add((record.get("type"), record.get("step")))
        if self.mirror is not None:
            self.mirror.write(record)

    def close(self) -> None:
        """Close the mirror (the file is closed after every write)."""
        if self.mirror is not None:
            self.mirror.close()


class NoLog:
    """What ranks other than 0 log to: nothing (every record counts as logged)."""

    def write(self, record: dict[str, Any]) -> None:
        pass

    def has(self, kind: str, step: int) -> bool:
        return True

    def close(self) -> None:
        pass


Log = MetricsLog | NoLog


# --- one process per run directory --------------------------------------------------------------------
#
# ``nnclr pretrain`` holds an exclusive ``flock`` on ``.lock`` for as long as it runs. A second
# process pointed at the same run directory, concurrently, is refused with a message naming the
# holder (pid, command, start time), whatever its arguments: resuming or ``--fresh`` while the
# first one writes would interleave two runs' checkpoints and metrics. The kernel releases the
# lock when the holder exits in any way (including ``kill -9`` and a crash), so rerunning the same
# command after the first process died resumes as usual; a lock file left behind means nothing.
# Where ``fcntl`` does not exist (Windows) there is no lock.


@dataclass
class RunLock:
    """A held lock; :meth:`release` (or the process ending) lets the next process in."""

    path: Path
    fd: int | None

    def release(self) -> None:
        """Let the next process in."""
        if self.fd is not None:
            os.close(self.fd)  # closing the only descriptor releases the flock
            self.fd = None


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text())
        return f"pid {info['pid']}, `{info['command']}`, since {info['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "pid unknown"


def acquire_lock(run_dir: Path) -> RunLock:
    """Lock ``run_dir`` (created if missing) for this process.

    Raises:
        UserError: Another live process holds the lock, or the folder cannot be written.
    """
    path = run_dir / LOCK
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as error:
        raise disk_error(path, error, "the run's lock file") from None
    if fcntl is None:
        return RunLock(path, fd)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise UserError(
            f"{run_dir} is in use by another nnclr process ({_holder(path)}); wait for it to end or stop it "
            "(it saves a checkpoint on Ctrl-C), then rerun to resume, or use another --run-dir"
        ) from None
    info = {"pid": os.getpid(), "command": " ".join(["nnclr", *sys.argv[1:]]),
            "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    try:
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(info).encode())
    except OSError:
        pass  # the lock holds without the note; a full disk is reported by the first real write
    return RunLock(path, fd)
