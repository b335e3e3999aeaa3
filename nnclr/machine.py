"""Facts about the machine a process runs on, without importing torch: CPUs, memory, local processes, a C++ compiler."""

from __future__ import annotations

import os
import shutil
import sys


def usable_cpus() -> list[int]:
    """The logical CPUs this process may run on (its affinity mask; every CPU where there is none)."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))


def total_memory() -> int:
    """The machine's physical memory in bytes (0 when unknown)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def local_processes() -> int:
    """Training processes on this machine (``torchrun`` sets ``LOCAL_WORLD_SIZE``; 1 without it)."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))


def cpp_compiler() -> tuple[str, str | None]:
    """The C++ compiler torch.compile's inductor would use and its path (None when there is none).

    Inductor's rule (``torch._inductor.config.cpp.cxx``): ``$CXX``, else ``g++`` (``clang++`` on macOS), found on
    the PATH.
    """
    name = os.environ.get("CXX") or ("clang++" if sys.platform == "darwin" else "g++")
    return name, shutil.which(name)
