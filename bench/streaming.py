"""Streaming a folder as users run it: memory, step time and start-up of ``nnclr pretrain`` (issue 19).

    python bench/streaming.py [--parts memory step startup] [--steps 8] [--rounds 2]

Every measurement runs the real command (``python -m nnclr pretrain``) in its own process on a folder
of photo-like 500 x 375 JPEGs (``loader.write_jpegs``: ~110 KiB each). Large folders are hard links to
400 distinct files in 100 class folders: the index, the sample order and every read are those of a
folder of that many files; the page cache holds the 400 distinct files, so disk speed is not measured.

* ``memory``: peak memory of a streaming run (ResNet-18, 224 px, batch 32, 1 loader worker) on 4,000
  and on 40,000 files (``--rounds`` runs each, alternating; the in-memory loader once each, for
  contrast): the training process's peak RSS (the kernel's high-water mark, exact), and the peak of
  the summed PSS (proportional set size: shared pages counted once) of the training process and its
  workers, sampled every 0.1 s from ``/proc/PID/smaps_rollup``.
* ``step``: the same run's seconds per step, streaming against the in-memory loader on the same 4,000
  files (decoded into memory first), runs alternating (memory, stream, memory, stream, ...); the
  medians of the per-step times (``metrics.jsonl``, every step logged) after the first two steps.
* ``startup``: wall time of a 1-step run (small CNN, 64 px) on 100,000 files, without and with the
  cached index (a new cache folder, then the same one), beside the time Python takes to import
  nnclr and torch (the floor of any run).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from loader import cpu_model, write_jpegs  # noqa: E402

DISTINCT = 400
MODEL = ["model.backbone=resnet18", "model.cifar_stem=false", "data.image_size=224", "optim.batch_size=32"]
QUIET = ["data.test_split=", "train.report=false", "train.checkpoint_every=1000", "train.log_every=1"]


def hard_link_folder(distinct: Path, root: Path, files: int) -> Path:
    """``files`` hard links to the JPEGs of ``distinct`` in 100 class folders under ``root``."""
    sources = sorted(distinct.rglob("*.jpg"))
    for i in range(files):
        folder = root / f"c{i % 100:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        os.link(sources[i % len(sources)], folder / f"{i:07d}.jpg")
    return root


def tree_pss(pid: int) -> int:
    """Summed PSS in bytes of ``pid`` and its descendants (0 for processes that are gone)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError):
            continue
    return total


# Runs the command and prints, last on stderr, the kernel's high-water mark of resident memory of its
# process tree's largest member (the training process): ru_maxrss of the waited-for descendants.
PEAK_RSS = "import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; " \
    "print('peak_rss_kib', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(code)"


@dataclass
class Measured:
    wall: float  # seconds
    peak_pss: int  # bytes, process + workers, sampled
    peak_rss: int  # bytes, the training process, exact
    per_step: list[float]  # seconds per step


def pretrain(folder: Path, run_dir: Path, settings: list[str], env: dict[str, str]) -> Measured:
    """Run ``nnclr pretrain`` (in a wrapper that reports its peak RSS); times, memory, per-step seconds."""
    command = [sys.executable, "-m", "nnclr", "pretrain", "--fresh", "--no-progress", "--run-dir", str(run_dir),
               "--set", f"data.name=folder:{folder}", *QUIET, *settings]
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-c", PEAK_RSS, *command], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=env)
    peak = 0
    while process.poll() is None:
        peak = max(peak, tree_pss(process.pid))
        time.sleep(0.1)
    wall = time.perf_counter() - started
    out, err = process.communicate()
    if process.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{out}\n{err}")
    rss = int(err.split("peak_rss_kib")[-1].split()[0]) * 1024
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    per_step = [32 / r["images_per_s"] for r in records if r["type"] == "train"]
    return Measured(wall, peak, rss, per_step)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", default=["memory", "step", "startup"])
    parser.add_argument("--steps", type=int, default=8, help="steps per run of the memory and step parts")
    parser.add_argument("--rounds", type=int, default=2, help="memory/stream pairs of the step part")
    parser.add_argument("--startup-files", type=int, default=100_000)
    args = parser.parse_args(argv)
    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory(prefix="nnclr-streaming-") as tmp:
        scratch = Path(tmp)
        print(f"{DISTINCT} distinct JPEGs, mean {write_jpegs(scratch / 'distinct', DISTINCT):.0f} KiB")
        env = {**os.environ, "NNCLR_CACHE_DIR": str(scratch / "cache")}
        steps = [*MODEL, f"train.max_steps={args.steps}", "train.threads=2", "data.workers=1"]
        if "memory" in args.parts:
            folders = {files: hard_link_folder(scratch / "distinct", scratch / f"f{files}", files)
                       for files in (4_000, 40_000)}
            peaks: dict[tuple[int, str], list[Measured]] = {}
            runs = [(files, "stream") for _ in range(args.rounds) for files in folders]
            runs += [(files, "memory") for files in folders]  # the in-memory loader once, for contrast
            for files, loader in runs:
                m = pretrain(folders[files], scratch / "run", [*steps, f"data.loader={loader}"], env)
                peaks.setdefault((files, loader), []).append(m)
                print(f"  {files:,} files, {loader}: peak RSS {m.peak_rss / 2**30:.3f} GiB, peak PSS "
                      f"{m.peak_pss / 2**30:.3f} GiB, {m.wall:.0f} s", flush=True)
            print("| files | loader | peak RSS, trainer (median) | peak PSS, + workers (median) | runs (RSS) |")
            print("| --- | --- | --- | --- | --- |")
            for (files, loader), values in peaks.items():
                rss = [m.peak_rss / 2**30 for m in values]
                pss = [m.peak_pss / 2**30 for m in values]
                print(f"| {files:,} | {loader} | {statistics.median(rss):.3f} GiB | {statistics.median(pss):.3f} GiB | "
                      f"{', '.join(f'{v:.3f}' for v in rss)} |")
            small, large = (statistics.median(m.peak_rss for m in peaks[(files, "stream")]) for files in folders)
            print(f"streaming, peak RSS 40,000 / 4,000 files: {large / small:.3f}")
        if "step" in args.parts:
            folder = scratch / "f4000"
            if not folder.is_dir():
                hard_link_folder(scratch / "distinct", folder, 4_000)
            times: dict[str, list[float]] = {"memory": [], "stream": []}
            walls: dict[str, list[float]] = {"memory": [], "stream": []}
            for _ in range(args.rounds):
                for loader in ("memory", "stream"):
                    m = pretrain(folder, scratch / "run", [*steps, f"data.loader={loader}"], env)
                    times[loader] += m.per_step[2:]
                    walls[loader].append(m.wall)
            print("| loader (4,000 files, ResNet-18, 224 px, batch 32) | median s/step | steps | wall per run |")
            print("| --- | --- | --- | --- |")
            for loader, values in times.items():
                print(f"| {loader} | {statistics.median(values):.3f} | {len(values)} | "
                      f"{', '.join(f'{w:.0f} s' for w in walls[loader])} |")
            ratio = statistics.median(times["stream"]) / statistics.median(times["memory"])
            print(f"stream / memory step time: {ratio:.3f}")
        if "startup" in args.parts:
            files = args.startup_files
            folder = hard_link_folder(scratch / "distinct", scratch / f"f{files}", files)
            small = ["model.backbone=small_cnn", "data.image_size=64", "optim.batch_size=32", "train.max_steps=1",
                     "data.loader=stream", "data.workers=1", "train.threads=2"]
            print(f"| {files:,} files, 1 step (small CNN, 64 px) | wall |")
            print("| --- | --- |")
            cache = scratch / "startup-cache"
            started = time.perf_counter()
            subprocess.run([sys.executable, "-c", "import nnclr.train"], check=True)
            imports = time.perf_counter() - started
            print(f"| (baseline: python -c 'import nnclr.train', torch included) | {imports:.1f} s |")
            for label in ("first run (no index cache)", "second run (cached index)"):
                m = pretrain(folder, scratch / "run", small, {**env, "NNCLR_CACHE_DIR": str(cache)})
                print(f"| {label} | {m.wall:.1f} s |", flush=True)


if __name__ == "__main__":
    main()
