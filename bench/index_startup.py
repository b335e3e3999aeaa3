"""Startup cost of a large image folder: :func:`build_index` against :func:`load_index` with a warm cache.

Builds a folder of ``--files`` files in ``--classes`` class folders as hard links to a handful of
small real JPEGs (fast, little disk), sets the folders' mtimes a minute back (a cache of folders
modified within ``RACY_NS`` of their listing is never trusted), then times, interleaved, median
of ``--repeats``: a fresh :func:`nnclr.data.scan.build_index` (no cache) and
:func:`nnclr.data.scan.load_index` reusing the cache (one ``stat`` per folder and per file, no
listing). The page and dentry caches are warm for both (a first call of each runs untimed).

Usage::

    python bench/index_startup.py [--files 100000] [--classes 1000] [--repeats 3] [--dir DIR]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from common import measure  # noqa: E402
from PIL import Image  # noqa: E402

from nnclr.data.scan import _THREADS, build_index, index_cache_dir, load_index  # noqa: E402
from nnclr.runtime import hardware_info  # noqa: E402

SOURCES = 5


def make_folder(root: Path, files: int, classes: int) -> None:
    """``files`` hard links to ``SOURCES`` small JPEGs, spread over ``classes`` class folders, aged 60 s."""
    sources = []
    for i in range(SOURCES):
        pixels = np.random.default_rng(i).integers(0, 256, (48, 64, 3), dtype=np.uint8)
        sources.append(root / f".source{i}.jpg")  # hidden: not indexed
        Image.fromarray(pixels).save(sources[-1], quality=85)
    folders = [root / f"class{c:04d}" for c in range(classes)]
    for folder in folders:
        folder.mkdir()
    for i in range(files):
        os.link(sources[i % SOURCES], folders[i % classes] / f"img{i:07d}.jpg")
    old = time.time() - 60
    for folder in [root, *folders]:
        os.utime(folder, (old, old))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None, help="where to make the temporary folder")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="nnclr-index-bench-", dir=args.dir) as tmp:
        os.environ["NNCLR_CACHE_DIR"] = str(Path(tmp) / "cache")  # never ~/.cache
        root = Path(tmp) / "images"
        root.mkdir()
        start = time.perf_counter()
        make_folder(root, args.files, args.classes)
        print(f"made {args.files} files in {args.classes} folders in {time.perf_counter() - start:.1f} s")
        cpus = len(os.sched_getaffinity(0))
        timed = {
            "build_index (no cache)": (lambda: build_index(root, progress=False), 1.0, "s"),
            "load_index (valid cache)": (lambda: load_index(root, progress=False), 1.0, "s"),
        }
        seconds, cpu = measure(timed, repeats=args.repeats, threads=1)  # warm-up call writes the cache
        index, _ = load_index(root, progress=False)
        cache_mib = next(index_cache_dir().glob("*.npz")).stat().st_size / 2**20
    print(f"cpu: {hardware_info()['cpu']} ({cpus} CPUs for this process, {_THREADS} listing threads)")
    print(f"{len(index)} files, {len(index.classes)} classes; cache file {cache_mib:.1f} MiB")
    for name, values in seconds.items():
        listed = ", ".join(f"{v:.3f}" for v in values)
        print(f"{name:26s} median {statistics.median(values):.3f} s  (runs: {listed}; CPU {cpu[name]:.3f} s)")
    build, load = (statistics.median(v) for v in seconds.values())
    print(f"cached load: {build / load:.1f}x faster, saves {build - load:.3f} s")


if __name__ == "__main__":
    main()
