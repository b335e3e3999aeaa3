"""Facts about the machine a process runs on, without importing torch: CPUs, memory, local processes."""

from __future__ import annotations

import os


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
