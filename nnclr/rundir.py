"""The run directory of ``nnclr pretrain``: the one module that names its files, writes and reads them.

Layout (every other module asks this one for a name, e.g. ``run_dir / rundir.CHECKPOINT``)::

    RUN_DIR/
      config.yaml      CONFIG        the resolved config, rewritten at every start
      checkpoint.pt    CHECKPOINT    model, optimiser, support set, selector state, step (nnclr.checkpoint)
      metrics.jsonl    METRICS       one JSON record per line: train, knn, clustering, unreadable (MetricsLog)
      results.json     RESULTS       written when the run ends: steps, kNN before/after, timings, hardware
      data-index.npz   DATA_INDEX    the files of a folder: training split when the run started
      tensorboard/     TENSORBOARD   TensorBoard events of the metrics (when tensorboard is installed)
      .lock            LOCK          who holds the run directory (acquire_lock locks the directory itself)
      report.html      REPORT        ``nnclr report``'s page
      features/        FEATURES      ``nnclr eval``'s cached features, one file per checkpoint, data set and split
      eval/            EVAL          ``nnclr eval``'s results, one JSON file per protocol and data set
      eval/subsets/    EVAL_SUBSETS  the labelled subsets semi-supervised evaluation drew
      .NAME.nnclr.tmp                a write in progress (write_atomic); one a kill left is removed by the next write

Writing, so that a kill, a full disk or a read-only folder never breaks a file:

* :func:`write_atomic` writes a whole file (checkpoint, ``config.yaml``, ``results.json``, a
  rewritten ``metrics.jsonl``, the report, features, exports) into a temporary file beside it
  (``.NAME.nnclr.tmp``), flushes it to disk, then renames it over the old one: at every moment the
  file is either the complete old one or the complete new one. A kill leaves at most a stray
  temporary file, which the next write into that folder removes (:func:`remove_stale_tmps`).
* Nothing is written through a symbolic link nnclr did not create: files are opened with
  ``O_NOFOLLOW``, a link at a file's name is replaced by the rename, one at a folder of the run
  (``features/``, ``eval/``, ``tensorboard/``) is refused (:func:`make_dir`). The run directory
  itself may be a link: the user chose it.
* :func:`append_line` adds one line to ``metrics.jsonl``; a kill leaves at most a cut last line,
  which :class:`MetricsLog` drops on resume and the readers skip.
* A write the operating system refuses (no space left, read-only file system, no permission)
  becomes a :class:`~nnclr.errors.UserError` that names the file and the reason, says what is
  still intact and what to do; the temporary file is removed and the old file is untouched.

``_open`` and ``_replace`` are the only calls of these writers that touch the disk; the kill
campaign (``tests/test_kill_campaign.py``) replaces them to kill the process inside a write. The
atomic writers also serve files outside a run directory (``nnclr embed``, ``nnclr export``).

One process per run directory (and EMB_DIR): :func:`acquire_lock` takes an advisory ``flock`` on
the directory.

This module does not import torch (``nnclr report`` checks a run directory before importing it).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import stat
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

# what earlier versions left: .NAME.tmp of the run's files, report.html.tmp
_OLD_STABLE = {f".{name}.tmp" for name in (CONFIG, CHECKPOINT, METRICS, RESULTS, DATA_INDEX, LOCK, REPORT)} | {
    f"{REPORT}.tmp"}
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
    for name in (*FRESH_DELETES, TENSORBOARD):
        path = run_dir / name
        try:
            if name == TENSORBOARD and path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)  # a file, or a link (removed, its target untouched)
        except OSError as error:
            raise UserError(f"--fresh cannot delete {path} ({error.strerror or error}); delete it yourself or make "
                            f"{run_dir} writable, then rerun the same command") from None


# --- atomic writes ----------------------------------------------------------------------------------
#
# Never through a link nnclr did not create: every file is opened with O_NOFOLLOW (a symbolic link at
# its name is refused, a FIFO or device is refused), and whole files are written to the temporary
# file and renamed over the name, which replaces a link planted there instead of writing through it.
# The temporary file has a stable name (``.NAME.tmp``, at most one per file) and is held with an
# ``flock`` while it is written: a second process writing the same file waits, and a temporary file
# no process holds is one a killed writer left, removed by the next write into its folder.

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)  # 0 on Windows: the previous behaviour
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)  # opening a planted FIFO must not hang
_FLAGS = os.O_WRONLY | os.O_CREAT | _NOFOLLOW | _NONBLOCK | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)
_SUFFIX = ".nnclr.tmp"  # write_atomic's temporary files: .NAME.nnclr.tmp, a name no other program uses
# the temporary files of earlier versions: features and eval records NAME.<pid>.tmp, indexes .NAME.<pid>.<n>.tmp
_LEGACY = re.compile(r"(?:.+?\.(?:pt|json)\.(\d+)|\..+?\.npz\.(\d+)\.\d+)\.tmp")


def _open(path: Path, mode: str) -> IO[bytes]:
    """Open ``path`` for writing (``"wb"``: created if missing, *not* truncated; ``"ab"``: appended to).

    A symbolic link at ``path`` is not followed (OSError ELOOP), nor is anything but a regular file
    opened. With :func:`_replace`, the only calls of the writers that touch the disk (the kill
    campaign's seam).
    """
    fd = os.open(path, _FLAGS | (os.O_APPEND if mode == "ab" else 0), 0o644)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        if _NONBLOCK and fcntl is not None:
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~_NONBLOCK)
        return os.fdopen(fd, mode)
    except BaseException:
        os.close(fd)
        raise


_replace = os.replace


def tmp_path(path: Path) -> Path:
    """The temporary sibling ``.NAME.nnclr.tmp`` that :func:`write_atomic` writes first."""
    return path.with_name(f".{path.name}{_SUFFIX}")


_ADVICE = {
    errno.ENOSPC: "free space on that disk",
    errno.EDQUOT: "free space within your disk quota",
    errno.EISDIR: "move that folder out of the way",
    errno.ELOOP: "remove the symbolic link (nnclr does not write through links it did not create)",
    errno.EINVAL: "move that file out of the way",
    errno.ENOTDIR: "a part of that path is a file, not a folder: move it out of the way",
    errno.ENAMETOOLONG: "choose a shorter path",
}


def disk_error(path: Path, error: OSError, what: str, kept: str = "") -> UserError:
    """The one-line error for a refused write of ``what`` (e.g. "the checkpoint") to ``path``.

    The advice follows the reason: free space, a writable folder, a link or folder in the way.
    """
    reason = error.strerror or type(error).__name__
    kept = f"{kept}; " if kept else ""
    advice = _ADVICE.get(error.errno or 0, f"free space on that disk or make {path.parent} writable")
    return UserError(f"cannot write {what} {path} ({reason}); {kept}{advice}, then rerun the same command")


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

    def __getattr__(self, name: str) -> Any:  # tell, seek, fileno, ... (zipfile and np.savez need them)
        return getattr(self.file, name)


def sync_folder(folder: Path) -> None:
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


def _same_file(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the file open as ``fd`` (not renamed, removed or replaced meanwhile)."""
    try:
        seen = os.lstat(path)
    except OSError:
        return False
    mine = os.fstat(fd)
    return (seen.st_dev, seen.st_ino) == (mine.st_dev, mine.st_ino)


def _claim(tmp: Path) -> IO[bytes]:
    """Open the temporary file ``tmp`` for this write, emptied, held (flock) until it is renamed.

    What is at its name and is not a regular file (a planted link, FIFO, socket) is removed first;
    a writer of the same file in another process is waited for.
    """
    while True:
        try:
            file = _open(tmp, "wb")
        except OSError:
            if not os.path.islink(tmp) and (not os.path.lexists(tmp) or os.path.isdir(tmp)):
                raise
            tmp.unlink()  # a link or a special file at a name that is ours: never opened, never followed
            continue
        if fcntl is None:
            break
        try:
            fcntl.flock(file.fileno(), fcntl.LOCK_EX)  # another process writing the same file: wait for it
        except OSError:
            break  # a file system without flock: as without fcntl
        if _same_file(file.fileno(), tmp):  # not renamed or removed by the writer we waited for
            break
        file.close()
    try:
        file.truncate(0)
    except BaseException:
        file.close()
        raise
    return file


def remove_stale_tmps(folder: Path) -> None:
    """Remove the temporary files killed writers left in ``folder``; those being written are kept.

    Ours (``.NAME.nnclr.tmp``) are stale when no process holds them (flock); those of earlier
    versions (``NAME.pt.<pid>.tmp``, ``.NAME.<pid>.<n>.tmp``) when their process is gone, or
    (``.config.yaml.tmp``, ...) when no process holds them. Nothing else is touched; errors are ignored.
    """
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    for entry in entries:
        legacy = _LEGACY.fullmatch(entry.name)
        if legacy is not None:
            if not _alive(int(legacy.group(1) or legacy.group(2))):
                _unlink_quietly(entry.path)
        elif entry.name.endswith(_SUFFIX) or entry.name in _OLD_STABLE:
            if entry.is_symlink():
                _unlink_quietly(entry.path)
            elif fcntl is not None and entry.is_file(follow_symlinks=False):
                _unlink_unless_held(Path(entry.path))


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _unlink_unless_held(path: Path) -> None:
    """Remove ``path`` unless a writer holds it (flock)."""
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW | _NONBLOCK)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # fails while a writer holds it
        if _same_file(fd, path):
            os.unlink(path)
    except OSError:
        pass
    finally:
        os.close(fd)


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists (on this machine)."""
    if pid <= 0 or pid == os.getpid():
        return pid == os.getpid()
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):
        return True  # another user's process, or cannot tell: keep its file
    return True


def write_atomic(path: Path, write: Callable[[Any], object], *, what: str, kept: str = "") -> None:
    """Write ``path`` through ``write(file)`` (a binary file), atomically and durably.

    A symbolic link at ``path`` or at its temporary name is replaced, never written through. Stale
    temporary files other (killed) writers left in the folder are removed (:func:`remove_stale_tmps`).

    Args:
        path: The file to (re)place.
        write: Writes the content into the binary file it is given (e.g. ``torch.save(state, f)``).
        what: What the file is, for the error message ("the checkpoint").
        kept: What is still intact when the write fails, for the error message.

    Raises:
        UserError: The operating system refused the write (no space, read-only, permission, a folder
            in the way); ``path`` is left as it was.
    """
    try:
        replace_file(path, write)
    except OSError as error:
        raise disk_error(path, error, what, kept) from None


def replace_file(path: Path, write: Callable[[Any], object]) -> None:
    """:func:`write_atomic` raising the OSError itself (for callers with their own message)."""
    tmp = tmp_path(path)
    file = _claim(tmp)
    recording = _Recording(file)
    try:
        try:
            write(recording)
            recording.flush()
            os.fsync(file.fileno())
            if fcntl is None:
                file.close()  # Windows renames no open file
            _replace(tmp, path)  # still held: a writer waiting for tmp sees it is no longer its file
        except BaseException as error:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
            if recording.error is not None and isinstance(error, Exception) and not isinstance(error, OSError):
                raise recording.error from None  # torch.save turned it into a RuntimeError
            raise
    finally:
        file.close()
    sync_folder(path.parent)
    remove_stale_tmps(path.parent)


def write_text_atomic(path: Path, text: str, *, what: str, kept: str = "") -> None:
    """:func:`write_atomic` of a UTF-8 text."""
    write_atomic(path, lambda file: file.write(text.encode("utf-8")), what=what, kept=kept)


def write_bytes_atomic(path: Path, data: bytes, *, what: str, kept: str = "") -> None:
    """:func:`write_atomic` of bytes."""
    write_atomic(path, lambda file: file.write(data), what=what, kept=kept)


def append_line(path: Path, line: str, *, what: str, kept: str = "") -> None:
    """Append ``line`` and a newline to ``path`` in one write (never through a symbolic link at ``path``).

    Raises:
        UserError: The operating system refused the write.
    """
    try:
        with _open(path, "ab") as file:
            file.write((line + "\n").encode("utf-8"))
    except OSError as error:
        raise disk_error(path, error, what, kept) from None


def make_dir(root: Path, name: str) -> Path:
    """``root / name`` (e.g. :data:`FEATURES`, :data:`EVAL_SUBSETS`), created if missing; returns it.

    ``root`` is the user's choice (created if missing, may be a link); every folder of ``name`` below
    it must be a real folder: a symbolic link planted there is not followed.

    Raises:
        UserError: A part of ``name`` is a symbolic link or a file, or the folder cannot be created.
    """
    folder = root
    try:
        root.mkdir(parents=True, exist_ok=True)
        for part in Path(name).parts:
            folder = folder / part
            if folder.is_symlink():
                raise UserError(
                    f"{folder} is a symbolic link; nnclr writes only into real folders inside {root} and does not "
                    f"follow links it did not create: remove the link (rm {folder}) and rerun the same command"
                )
            try:
                folder.mkdir()
            except FileExistsError:
                if not folder.is_dir():
                    raise UserError(f"{folder} is a file, not a folder; move it out of the way and rerun the same "
                                    "command") from None
    except OSError as error:
        raise disk_error(folder, error, "the folder") from None
    return folder


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
    """Each line of a JSON-lines file with its record; lines that are not a JSON object (cut by a kill) are skipped,
    and so are lines that are not UTF-8 or whose ``step`` is not a whole number (not records nnclr wrote)."""
    for raw in path.read_bytes().splitlines():
        try:
            line = raw.decode("utf-8")
            record = json.loads(line)
        except ValueError:  # a line cut by a kill, or bytes that are not UTF-8 (UnicodeDecodeError, JSONDecodeError)
            continue
        if isinstance(record, dict) and type(record.get("step", 0)) is int:
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
# ``nnclr pretrain`` (from before it reads the run until its report is written) and ``nnclr embed``
# hold an exclusive ``flock`` on the directory itself (a descriptor of the folder): unlike a lock
# file, it cannot be deleted from under the holder. A second process pointed at the same directory
# is refused with a message naming the holder (pid, command, start time, from the note ``.lock``),
# whatever its arguments: resuming or ``--fresh`` while the first one writes would interleave two
# runs' files. The kernel releases the lock when the holder exits in any way (including ``kill -9``
# and a crash), so rerunning the same command after the first process died resumes as usual; a
# ``.lock`` left behind means nothing. Where a folder cannot be locked (some network file systems)
# ``.lock`` itself is locked; where ``fcntl`` does not exist (Windows) there is no lock.
#
# The lock is re-entrant within a process: ``nnclr pretrain``'s command takes it around the
# training (which takes it again) and the report.


@dataclass
class _Held:
    fd: int
    pid: int
    count: int


_HELD: dict[tuple[int, int], _Held] = {}  # (device, inode) of a locked directory -> this process's hold


@dataclass
class RunLock:
    """A held lock; :meth:`release` (or the process ending) lets the next process in."""

    path: Path  # the note .lock
    fd: int | None  # the descriptor holding the flock (None: released, or no lock on this platform)
    key: tuple[int, int] | None = None  # the directory's (device, inode), for a re-entrant hold

    def release(self) -> None:
        """Let the next process in (once every hold of this process is released)."""
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        held = _HELD.get(self.key) if self.key is not None else None
        if held is not None and held.fd == fd:
            held.count -= 1
            if held.count > 0:
                return
            del _HELD[self.key]  # type: ignore[arg-type]
        os.close(fd)  # closing the only descriptor releases the flock

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_note(path: Path) -> str:
    """The note's text: never through a link, never blocking on a FIFO; "" when it cannot be read."""
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW | _NONBLOCK)
    except OSError:
        return ""
    try:
        return os.read(fd, 4096).decode("utf-8", "replace") if stat.S_ISREG(os.fstat(fd).st_mode) else ""
    except OSError:
        return ""
    finally:
        os.close(fd)


def _holder(path: Path) -> str:
    try:
        info = json.loads(_read_note(path))
        return f"pid {info['pid']}, `{info['command']}`, since {info['started']}"
    except (ValueError, KeyError, TypeError):
        return "pid unknown"


def _lock_fd(run_dir: Path, path: Path) -> tuple[int, bool]:
    """A descriptor of ``run_dir`` flocked by this process (or of ``.lock`` where folders cannot be locked).

    Returns the descriptor and whether it is ``.lock``'s; raises BlockingIOError when another process holds it.
    """
    fd = os.open(run_dir, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return fd, False
    except BlockingIOError:
        os.close(fd)
        raise
    except OSError:  # e.g. NFS: no flock on a read-only descriptor of a folder
        os.close(fd)
    while True:  # lock .lock, making sure the file locked is the one at the name (not one deleted meanwhile)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | _NOFOLLOW | _NONBLOCK | getattr(os, "O_CLOEXEC", 0), 0o644)
        except OSError:
            if not os.path.islink(path):
                raise
            path.unlink()
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BaseException:
            os.close(fd)
            raise
        if _same_file(fd, path):
            return fd, True
        os.close(fd)


def acquire_lock(run_dir: Path, *, flag: str = "--run-dir") -> RunLock:
    """Lock ``run_dir`` (created if missing) for this process; re-entrant within a process.

    Args:
        run_dir: The run directory (or EMB_DIR).
        flag: How the user named it, for the messages (``--run-dir``, ``--out``).

    Raises:
        UserError: Another live process holds the lock, ``run_dir`` is a file, or the folder cannot be written.
    """
    path = run_dir / LOCK
    what = "the run's lock file" if "run" in flag else "the lock file"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        if isinstance(error, FileExistsError) or (run_dir.exists() and not run_dir.is_dir()):
            raise UserError(f"{flag} {run_dir} is a file, not a folder; pass a folder to {flag} or move the file "
                            "out of the way") from None
        raise disk_error(path, error, what) from None
    if fcntl is None:
        _write_note(path)
        return RunLock(path, None)
    try:
        info = os.stat(run_dir)
        key = (info.st_dev, info.st_ino)
        held = _HELD.get(key)
        if held is not None and held.pid == os.getpid():
            held.count += 1
            return RunLock(path, held.fd, key)
        fd, on_note = _lock_fd(run_dir, path)
    except BlockingIOError:
        raise UserError(
            f"{run_dir} is in use by another nnclr process ({_holder(path)}); wait for it to end or stop it "
            f"(it saves what it has done on Ctrl-C), then rerun the same command, or use another {flag}"
        ) from None
    except OSError as error:
        raise disk_error(path, error, what) from None
    _HELD[key] = _Held(fd, os.getpid(), 1)
    if on_note:
        try:
            os.ftruncate(fd, 0)
            os.write(fd, _note().encode())
        except OSError:
            pass  # the lock holds without the note; a full disk is reported by the first real write
    else:
        _write_note(path)
    return RunLock(path, fd, key)


def _note() -> str:
    return json.dumps({"pid": os.getpid(), "command": " ".join(["nnclr", *sys.argv[1:]]),
                       "started": time.strftime("%Y-%m-%d %H:%M:%S")})


def _write_note(path: Path) -> None:
    """Who holds the lock, for the message of the processes refused (atomically: a link there is replaced)."""
    try:
        write_text_atomic(path, _note(), what="the lock note")
    except UserError:
        pass  # the lock holds without the note; a full disk is reported by the first real write
