"""Where and how the math runs: device, precision, threads, and the glibc allocator setting.

Measured on a 2-core AMD EPYC with AVX512-BF16 (see the speed issue): glibc returning large
activation buffers to the kernel after every step cost a third of CPU time in page faults; two
``mallopt`` calls gave 1.3-1.7x. bf16 autocast gave another 1.9x on convolutions. Both are on by
default where they apply; ``NNCLR_NO_MALLOPT=1`` turns the allocator setting off.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
from functools import lru_cache
from typing import Any

import torch

from nnclr.errors import UserError

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


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


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; a CUDA name without CUDA is a UserError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"config key train.device={name!r} is not a device; use auto, cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"train.device={name!r} but CUDA is not available here; use train.device=cpu")
    return device


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
    """The autocast dtype: bf16 where it is fast (CUDA with bf16, CPUs with AVX512-BF16/AMX)."""
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


def set_threads(threads: int) -> None:
    """Use ``threads`` CPU threads (0 keeps PyTorch's default, one per physical core)."""
    if threads > 0:
        torch.set_num_threads(threads)


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
