"""Where and how the math runs: device, precision, threads, and the glibc allocator setting.

Measured on a 2-core AMD EPYC with AVX512-BF16 (see the speed issue): glibc returning large
activation buffers to the kernel after every step cost a third of CPU time in page faults; two
``mallopt`` calls gave 1.3-1.7x. bf16 autocast gave another 1.9x on convolutions. Both are on by
default where they apply; ``NNCLR_NO_MALLOPT=1`` turns the allocator setting off.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import platform
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from nnclr import machine
from nnclr.config import device_problem
from nnclr.errors import UserError
from nnclr.machine import local_processes, usable_cpus

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
SYSFS_CPU = Path("/sys/devices/system/cpu")  # cpuN/topology/{physical_package_id,core_id}
CGROUP = Path("/sys/fs/cgroup")  # v2 cpu.max, v1 cpu/cpu.cfs_{quota,period}_us


@lru_cache(maxsize=1)
def tune_allocator() -> bool:
    """Keep freed memory in the process (glibc only): no page faults for every step's buffers.

    Returns True when the setting was applied.
    """
    if os.environ.get("NNCLR_NO_MALLOPT") == "1" or platform.system() != "Linux":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):
        return False


def resolve_device(name: str, what: str = "device") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; anything but auto, cpu, cuda and cuda:N, or CUDA where there is
    none, is a UserError naming ``what`` the user typed: a config key (``train.device``) or a flag (``--device``)."""
    said = f"{what}={name}" if "." in what else f"{what} {name}"
    cpu = f"{what}=cpu" if "." in what else f"{what} cpu"
    problem = device_problem(name)
    if problem:
        raise UserError(f"{said} {problem}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{said}: CUDA is not available here; use {cpu}")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"{said}: this machine has {torch.cuda.device_count()} CUDA devices (cuda:0 to "
                        f"cuda:{torch.cuda.device_count() - 1})")
    return device


def device_memory(device: torch.device) -> tuple[int, str]:
    """The memory a run on ``device`` has, in bytes (0 when unknown), and what it is: a GPU's, or this machine's."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return torch.cuda.get_device_properties(index).total_memory, f"cuda:{index}"
    return machine.total_memory(), "this machine"


@lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """True on CPUs with native bf16 matrix instructions (AVX512-BF16 or AMX), read from /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = cpuinfo.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The autocast dtype of ``precision`` (``auto``, ``bf16`` or ``fp32``): ``auto`` is bf16 where it is fast (CUDA
    with bf16, CPUs with AVX512-BF16/AMX)."""
    if precision not in ("auto", "bf16", "fp32"):  # the CLI's choices check this; nnclr.load(precision=) did not
        raise UserError(f"precision must be one of auto, bf16, fp32, got {precision!r}")
    if precision == "fp32":
        return torch.float32
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Autocast to ``dtype`` on ``device``, or nothing for fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def to_device(tree: Any, device: torch.device) -> Any:
    """Every tensor of ``tree`` (nested dicts, lists and tuples, e.g. a checkpoint's state) moved to ``device``."""
    if isinstance(tree, torch.Tensor):
        return tree.to(device)
    if isinstance(tree, dict):
        return {key: to_device(value, device) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(to_device(value, device) for value in tree)
    return tree


def physical_cores() -> int:
    """Physical cores this process may run on: the CPUs of its affinity mask with SMT siblings
    counted once (Linux sysfs topology), capped by a cgroup CPU quota (containers); at least 1.

    PyTorch's own default counts every core of the machine, so in a container limited to 2 CPUs
    of a 64-core host it starts 64 threads, which then wait for each other.
    """
    cpus = usable_cpus()
    cores = set()
    for cpu in cpus:
        topology = SYSFS_CPU / f"cpu{cpu}" / "topology"
        try:
            cores.add(((topology / "physical_package_id").read_text().strip(),
                       (topology / "core_id").read_text().strip()))
        except OSError:
            cores.add(("cpu", str(cpu)))
    quota = _cgroup_cpu_limit()
    return max(1, min(len(cores), quota) if quota else len(cores))


def _cgroup_cpu_limit() -> int | None:
    """CPUs allowed by the cgroup quota (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``), rounded up; None if unlimited."""
    for quota_file, period_file in (("cpu.max", None), ("cpu/cpu.cfs_quota_us", "cpu/cpu.cfs_period_us")):
        try:
            fields = (CGROUP / quota_file).read_text().split()
            if period_file is not None:
                fields.append((CGROUP / period_file).read_text().strip())
            quota, period = fields[0], fields[1]
        except (OSError, IndexError):
            continue
        if quota in ("max", "-1"):
            return None
        return max(1, math.ceil(int(quota) / int(period)))
    return None


def omp_threads() -> int | None:
    """``OMP_NUM_THREADS`` as a thread count: its first number (``4,2`` asks for nested levels), None when it is
    unset or not a positive whole number (torch ignores those too)."""
    text = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    return int(text) if text.isdigit() and int(text) > 0 else None


def default_threads() -> int:
    """The CPU threads of ``train.threads=0`` (and ``nnclr eval --threads 0``): this process's share of the cores.

    ``OMP_NUM_THREADS`` when set (``torchrun`` sets it to 1 for several processes per machine), else the physical
    cores (:func:`physical_cores`) divided among the processes ``torchrun`` started on this machine
    (``LOCAL_WORLD_SIZE``); never more than the CPUs this process may use. A number > 0 in ``train.threads`` or
    ``--threads`` wins over ``OMP_NUM_THREADS`` (:func:`set_threads`).
    """
    omp = omp_threads()
    if omp is not None:
        return min(omp, len(usable_cpus()))
    return max(1, physical_cores() // local_processes())


def set_threads(threads: int) -> None:
    """Use ``threads`` CPU threads (a number > 0 wins over ``OMP_NUM_THREADS``); 0 = :func:`default_threads`."""
    torch.set_num_threads(threads if threads > 0 else default_threads())


def hardware_info(
    device: torch.device | None = None, dtype: torch.dtype | None = None, processes: int = 1
) -> dict[str, Any]:
    """What ran (or runs) the math: CPU model and cores, GPU, torch version and threads, Python, OS.

    ``device``, ``dtype`` and ``processes`` (the torchrun world size) are added when given.
    """
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            names = [line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    info: dict[str, Any] = {"cpu": cpu, "cpu_cores": os.cpu_count()}
    if torch.cuda.is_available():
        info["gpu"] = f"{torch.cuda.get_device_name(0)} (x{torch.cuda.device_count()})"
    if device is not None:
        info["device"] = str(device)
    if dtype is not None:
        info["precision"] = str(dtype).removeprefix("torch.")
    info |= {"processes": processes, "torch": torch.__version__, "threads": torch.get_num_threads(),
             "python": platform.python_version(), "os": platform.platform(terse=True)}
    return info
