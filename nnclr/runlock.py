"""One process per run directory: an advisory lock on ``RUN_DIR/.lock``.

``nnclr pretrain`` holds an exclusive ``flock`` on the lock file for as long as it runs. A second
process pointed at the same run directory, concurrently, is refused with a message naming the
holder (pid, command, start time), whatever its arguments: resuming or ``--fresh`` while the
first one writes would interleave two runs' checkpoints and metrics. The kernel releases the
lock when the holder exits in any way (including ``kill -9`` and a crash), so rerunning the same
command after the first process died resumes as usual; a lock file left behind means nothing.

Where ``fcntl`` does not exist (Windows) there is no lock.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from nnclr.errors import UserError
from nnclr.runfiles import disk_error

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".lock"


@dataclass
class RunLock:
    """A held lock; :meth:`release` (or the process ending) lets the next process in."""

    path: Path
    fd: int | None

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the only descriptor releases the flock
            self.fd = None


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text())
        return f"pid {info['pid']}, `{info['command']}`, since {info['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "pid unknown"


def acquire(run_dir: Path) -> RunLock:
    """Lock ``run_dir`` (created if missing) for this process.

    Raises:
        UserError: Another live process holds the lock, or the folder cannot be written.
    """
    path = run_dir / LOCK_NAME
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
