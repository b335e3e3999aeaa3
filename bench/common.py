"""What the benchmark scripts share: interleaved timing, worker processes, and the machine they ran on.

* :func:`measure`: time several cases in rounds (A B C A B C ...), so that load from other
  processes on a shared machine hits them alike; also the rate from the process's CPU time.
* :class:`Worker`: one alternative in its own process (started by a fork server that has
  imported torch once), driven by method calls over a pipe. Only the worker that is called
  computes; the others wait on the pipe. Its peak resident memory (``ru_maxrss``) is then that
  alternative's alone.
* :func:`spread`, :func:`machine`, :func:`load_average`: min / median / max, and what the
  numbers were measured on.

The scripts import this as a plain module (``bench/`` on ``sys.path``): ``bench/`` is not part of
the installed package.
"""

from __future__ import annotations

import multiprocessing
import os
import resource
import statistics
import subprocess
import sys
import time
import traceback
import types
from collections.abc import Callable, Sequence
from importlib import metadata
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
for _path in (str(REPO), str(BENCH)):  # run from a checkout: this nnclr, these scripts
    if _path not in sys.path:
        sys.path.insert(0, _path)

import torch  # noqa: E402

# The project's CIFAR-10 copy ({train,test}.npz, see its README), beside the checkout; --data overrides.
CIFAR10 = f"cifar10:{os.environ.get('NNCLR_CIFAR10_DIR') or REPO.parent / 'shared' / 'data' / 'cifar10'}"


def spread(values: Sequence[float]) -> tuple[float, float, float]:
    """(min, median, max)."""
    return min(values), statistics.median(values), max(values)


def load_average() -> float:
    """The 1-minute load average (0 where the OS has none)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return 0.0


def cpu_seconds() -> float:
    """User + system CPU time of this process and of its children that have ended (data-loader workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def peak_rss_mib() -> dict[str, float]:
    """Peak resident memory in MiB of this process (``self``) and of its largest ended child (``children``)."""
    scale = 1 / 1024 if sys.platform != "darwin" else 1 / 2**20  # Linux reports KiB, macOS bytes
    return {"self": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale,
            "children": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * scale}


def measure(
    timed: dict[str, tuple[Callable[[], object], float, str]], repeats: int, threads: int, warm_up: bool = True
) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Rates (work/s) or seconds (unit ``"s"``) of every case ``name -> (function, work, unit)``, ``repeats``
    times, interleaved, after one warm-up call each; and per case the best of the same from CPU time
    (``CPU seconds / threads``): what the process would reach with the cores to itself."""
    for fn, _, _ in timed.values() if warm_up else ():
        fn()
    values: dict[str, list[float]] = {name: [] for name in timed}
    cpu: dict[str, list[float]] = {name: [] for name in timed}
    for _ in range(repeats):
        for name, (fn, work, unit) in timed.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            seconds, cpu_time = time.perf_counter() - start, (time.process_time() - start_cpu) / threads
            values[name].append(seconds if unit == "s" else work / seconds)
            cpu[name].append(cpu_time if unit == "s" else work / cpu_time)
    best_cpu = {name: (min(v) if timed[name][2] == "s" else max(v)) for name, v in cpu.items()}
    return values, best_cpu


def _serve(connection: Connection, factory: Callable[..., Any], args: tuple, threads: int) -> None:
    """A worker's loop: build ``factory(*args)``, then answer ``(method, args)`` calls until ``None``."""
    torch.set_num_threads(threads)
    try:
        target = factory(*args)
        connection.send(("ok", None))
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises
        connection.send(("error", traceback.format_exc()))
        return
    while (call := connection.recv()) is not None:
        name, call_args = call
        try:
            result = peak_rss_mib() if name == "peak_rss" else getattr(target, name)(*call_args)
            connection.send(("ok", result))
        except BaseException:  # noqa: BLE001
            connection.send(("error", traceback.format_exc()))


class Worker:
    """``factory(*args)`` built in its own process; ``worker.call("method", ...)`` runs a method there.

    ``worker.call("peak_rss")`` returns the process's peak RSS (:func:`peak_rss_mib`). Processes come
    from a fork server that imported torch once, so a worker starts in about a second and its memory
    is its own (not a copy of the parent's). Use as a context manager, or call :meth:`close`.
    """

    start_method = "forkserver"  # "fork" starts at once, but the worker's memory then includes the parent's

    def __init__(self, factory: Callable[..., Any], *args: Any, threads: int = 2) -> None:
        context = multiprocessing.get_context(self.start_method)
        if self.start_method == "forkserver":
            context.set_forkserver_preload(["torch", "torchvision", "numpy"])
        self.connection, child = context.Pipe()
        self.process = context.Process(target=_serve, args=(child, factory, args, threads), daemon=False)
        self.process.start()
        child.close()
        self.name = getattr(factory, "__name__", str(factory))
        self._started = False

    def wait_ready(self) -> Worker:
        """Block until the worker has built its target (raises what the build raised)."""
        if not self._started:
            self._started = True
            self._answer()
        return self

    def call(self, name: str, *args: Any) -> Any:
        self.wait_ready()
        self.connection.send((name, args))
        return self._answer()

    def _answer(self) -> Any:
        try:
            status, value = self.connection.recv()
        except EOFError:
            raise RuntimeError(f"benchmark worker {self.name} died (exit code {self.process.exitcode})") from None
        if status == "error":
            raise RuntimeError(f"benchmark worker {self.name} failed:\n{value}")
        return value

    def close(self) -> None:
        if self.process.is_alive():
            try:
                self.connection.send(None)
            except (BrokenPipeError, OSError):
                pass
            self.process.join(timeout=60)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join()
        self.connection.close()

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def module_at(revision: str, path: str) -> types.ModuleType:
    """The module at ``path`` (e.g. ``nnclr/support.py``) as of git ``revision``, loaded as a module of its own:
    the ``--baseline REV`` of the scripts that compare a change with the code before it."""
    source = subprocess.run(["git", "-C", str(REPO), "show", f"{revision}:{path}"], check=True,
                            capture_output=True, text=True).stdout
    module = types.ModuleType(f"{Path(path).stem}_{revision}")
    sys.modules[module.__name__] = module  # dataclasses look their module up there
    exec(compile(source, f"{revision}:{path}", "exec"), module.__dict__)  # noqa: S102 - our own file
    return module


def version(package: str) -> str:
    """The installed version of ``package``, or ``not installed``."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine() -> dict[str, Any]:
    """CPU, cores, memory, bf16 support, versions: the header of BENCHMARKS.md."""
    from nnclr import runtime

    info = runtime.hardware_info()
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        memory = float("nan")
    return {
        "cpu": info["cpu"], "logical CPUs": info["cpu_cores"],
        "physical cores (this process)": runtime.physical_cores(),
        "memory": f"{memory:.0f} GiB", "fast bf16 (AVX512-BF16/AMX)": runtime.cpu_has_fast_bf16(),
        "gpu": info.get("gpu", "none"), "python": info["python"], "os": info["os"],
        **{package: version(package) for package in ("torch", "torchvision", "numpy", "lightly")},
    }
