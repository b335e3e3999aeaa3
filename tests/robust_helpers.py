"""Helpers of the robustness tests: a tiny run's config, a small filesystem, a file that kills its process after
n bytes and a forkserver that has imported torch once (the kill campaigns of pretrain and embed).

The run is the one of ``test_train.py`` (tiny heads, batch 32) on conftest's ``tiny_data`` (256 random 16x16
images with a 64-image test split), so that a whole run, kNN before and after included, takes about two seconds.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from tiny import RUN

from nnclr.config import Config, load_config


def run_overrides(data: Path, *overrides: str) -> list[str]:
    """``--set`` overrides of a tiny run on ``tiny_data``: 8 steps per epoch, 2 epochs, a checkpoint every 2 steps."""
    return [*RUN, "method.support_size=100", "method.num_prototypes=8", "train.checkpoint_every=2",
            f"data.name=npz:{data}", "data.image_size=16", "data.test_split=test", "train.epochs=2",
            "train.threads=1", "train.report=false", *overrides]


def tiny_config(data: Path, run_dir: Path, *overrides: str) -> Config:
    return load_config(None, [*run_overrides(data, *overrides), f"train.run_dir={run_dir}"])


def metrics_without_timing(run_dir: Path) -> list[dict]:
    """The records of ``metrics.jsonl`` without the wall-clock field (the only one a rerun may change)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for record in records:
        record.pop("images_per_s", None)
    return records


class SmallFilesystem:
    """A tmpfs of a few megabytes mounted at ``path``: filled up or made read-only on demand."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.filler = path / "filler"

    def fill(self, leave: int = 0) -> None:
        """Take all free space but ``leave`` bytes (rounded to the 4 KiB pages tmpfs counts in)."""
        stats = os.statvfs(self.path)
        free = stats.f_bavail * stats.f_frsize
        with open(self.filler, "ab") as file:
            file.truncate(0)
            file.write(b"\0" * max(0, free - leave))

    def free(self) -> None:
        self.filler.unlink(missing_ok=True)

    def read_only(self, on: bool = True) -> None:
        """Make the folder read-only (a read-only bind mount over it: files already open stay writable,
        as on a disk remounted read-only under a running process) or writable again."""
        if on:
            subprocess.run(["mount", "--bind", str(self.path), str(self.path)], check=True)
            subprocess.run(["mount", "-o", "remount,bind,ro", str(self.path)], check=True)
        else:
            subprocess.run(["umount", str(self.path)], check=True)


@contextmanager
def small_filesystem(path: Path, megabytes: int = 40) -> Iterator[SmallFilesystem]:
    """Mount a tmpfs at ``path`` (needs root, as CI has); skips where mounting is not allowed."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root")
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(path)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield SmallFilesystem(path)
    finally:
        while subprocess.run(["umount", "-l", str(path)], capture_output=True).returncode == 0:
            pass  # the tmpfs and any read-only bind mount over it


class DyingFile:
    """A file that SIGKILLs its process once the process has written ``budget[0]`` bytes through such files.

    ``budget`` is shared by every file of the process (a one-element list); the file's bytes up to the budget
    reach the disk first, and ``say(path, byte)`` is written to stderr just before the kill.
    """

    def __init__(self, file, path: Path, budget: list[int], say) -> None:
        self.file, self.path, self.budget, self.say, self.written = file, path, budget, say, 0

    def write(self, data) -> int:
        data = bytes(data)
        if len(data) >= self.budget[0]:
            self.file.write(data[: self.budget[0]])
            self.file.flush()
            os.write(2, (self.say(self.path, self.written + self.budget[0]) + "\n").encode())
            os.kill(os.getpid(), signal.SIGKILL)
        self.budget[0] -= len(data)
        self.written += len(data)
        return self.file.write(data)

    def __getattr__(self, name: str):
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()


def preloaded_forkserver(*modules: str) -> multiprocessing.context.BaseContext:
    """A forkserver context that has imported ``modules`` (torch, nnclr, the test module whose function is the
    target), with the tests folder on its PYTHONPATH, so that each killed start costs a fork, not the imports."""
    from multiprocessing import forkserver

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(list(modules))
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(Path(__file__).parent), saved) if p)
    try:
        forkserver.ensure_running()
    finally:
        if saved is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = saved
    return context
