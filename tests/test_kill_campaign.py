"""Kill campaign: ``kill -9`` at random moments of a run, again and again, loses nothing.

A tiny run (16 steps over 2 epochs of 8x8 images, kNN before and after; a checkpoint every 2 steps and a
record every step, or, every other run, a checkpoint every 3 and a record every 2, so that kills land between
a checkpoint and the record after it: issue 23, item 5) is started, killed with SIGKILL at a random point,
started again with the same command, killed again, ..., until a start is let finish. Then its checkpoint
(weights, support set, optimiser state), ``metrics.jsonl`` (every record, the wall-clock ``images_per_s``
aside) and kNN results must equal those of a run that was never killed. After every kill the checkpoint on
disk must load and never go back in steps, and the next start must say it resumes from exactly that step.

Kill points are drawn with a fixed seed, of three kinds:

* ``timer``: the parent sends SIGKILL after a random delay (anywhere: start-up, data loading,
  kNN, a step, a write);
* ``byte``: the process SIGKILLs itself after writing the n-th byte through
  :mod:`nnclr.rundir`'s atomic writers (n uniform over what is left to write: most land inside checkpoint
  writes, which are most of the bytes, the rest inside metrics, config and results writes);
* ``rename``: the process SIGKILLs itself just before or just after the k-th atomic rename.

Each start is ``nnclr.cli.main`` with the command's arguments in a process forked from a
forkserver that has imported torch once (a fresh ``python -m nnclr`` costs seconds of imports per
start; ``test_cli.py::test_kill_and_rerun_resumes_exactly`` does that once, with real processes).

CI runs at least 20 kills (``NNCLR_KILLS`` changes it); ``NNCLR_LONG_CAMPAIGN=1`` runs 200. The
figures are printed in the test summary; docs/robustness.md records the latest long campaign.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import re
import signal
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from robust_helpers import DyingFile, metrics_without_timing, preloaded_forkserver, run_overrides

from nnclr.checkpoint import CHECKPOINT_NAME, load_checkpoint

pytestmark = pytest.mark.slow  # a campaign of 20+ runs

LONG = os.environ.get("NNCLR_LONG_CAMPAIGN") == "1"
KILLS = int(os.environ.get("NNCLR_KILLS", "200" if LONG else "20"))
SEED = 8  # issue 8
TOTAL_STEPS = 16
KILLS_PER_CHAIN = 6
# (train.checkpoint_every, train.log_every) of the runs, in turn; the second is not a multiple of the first
SETTINGS = ((2, 1), (3, 2))


# ---------------------------------------------------------------------------- in the child


def _say(text: str) -> None:
    os.write(2, (text + "\n").encode())


def _KILLED_AT(path: Path, byte: int) -> str:
    return f"campaign: killed at inside {path.name} (byte {byte})"


def _install(fault: tuple) -> None:
    from nnclr import rundir

    kind = fault[0]
    if kind == "byte":
        budget = [fault[1]]
        real_open = rundir._open
        rundir._open = lambda path, mode: DyingFile(real_open(path, mode), Path(path), budget, _KILLED_AT)
    elif kind == "rename":
        count, when = [0], fault[2]
        real_replace = rundir._replace

        def replace(src, dst) -> None:
            count[0] += 1
            if count[0] == fault[1] and when == "before":
                _say(f"campaign: killed at before renaming {Path(src).name}")
                os.kill(os.getpid(), signal.SIGKILL)
            real_replace(src, dst)
            if count[0] == fault[1]:
                _say(f"campaign: killed at after renaming {Path(src).name}")
                os.kill(os.getpid(), signal.SIGKILL)

        rundir._replace = replace


def _child(args: list[str], fault: tuple | None, log: str) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout = os.fdopen(1, "w", buffering=1)
    sys.stderr = os.fdopen(2, "w", buffering=1)
    if fault is not None:
        _install(fault)
    from nnclr.cli import main

    code = main(args)
    sys.stdout.flush()
    os._exit(code)


# ---------------------------------------------------------------------------- in the test


@pytest.fixture(scope="module")
def forkserver() -> multiprocessing.context.BaseContext:
    """A forkserver that has imported torch, nnclr and this module (so that ``_child`` can be its target)."""
    return preloaded_forkserver("torch", "nnclr.cli", "nnclr.train", "test_kill_campaign")


def _start(context, args: list[str], fault: tuple | None, log: Path) -> multiprocessing.Process:
    process = context.Process(target=_child, args=(args, fault, str(log)))
    process.start()
    return process


def _step(run_dir: Path) -> int | None:
    path = run_dir / CHECKPOINT_NAME
    return load_checkpoint(path)["step"] if path.is_file() else None  # a broken file fails the test here


def _assert_same_run(a: Path, b: Path) -> None:
    x, y = load_checkpoint(a / CHECKPOINT_NAME), load_checkpoint(b / CHECKPOINT_NAME)
    assert x["step"] == y["step"] == TOTAL_STEPS
    for part in ("model", "support", "selector"):
        assert x[part].keys() == y[part].keys()
        for key in x[part]:
            assert torch.equal(x[part][key], y[part][key]), f"{b.name}: {part}.{key} differs"
    for key, state in x["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, y["optimizer"]["state"][key][name]), f"{b.name}: optimizer {key}.{name}"
    assert x["knn_before"] == y["knn_before"]
    assert metrics_without_timing(a) == metrics_without_timing(b), f"{b.name}: metrics.jsonl differs"


def test_kill_campaign_loses_nothing(forkserver, tmp_path: Path, tiny_data: Path, figures: list[str]) -> None:
    def command(run_dir: Path, every: tuple[int, int]) -> list[str]:
        overrides = run_overrides(tiny_data, f"train.checkpoint_every={every[0]}", f"train.log_every={every[1]}",
                                  "data.image_size=8")  # ~0.7 CPU s
        return ["pretrain", "--run-dir", str(run_dir), "--no-progress", "--set", *overrides]

    references = {}  # settings -> (run directory, duration, bytes written through nnclr.rundir, renames)
    for every in SETTINGS:
        reference = tmp_path / f"reference-{every[0]}-{every[1]}"
        started = time.monotonic()
        process = _start(forkserver, command(reference, every), None, tmp_path / f"{reference.name}.log")
        process.join(120)
        duration = time.monotonic() - started
        assert process.exitcode == 0, (tmp_path / f"{reference.name}.log").read_text()
        # what a whole run writes through nnclr.rundir: its checkpoints, the small files (about) once
        checkpoints = -(-TOTAL_STEPS // every[0])
        written = sum(f.stat().st_size for f in reference.iterdir() if f.is_file())
        written += (reference / CHECKPOINT_NAME).stat().st_size * (checkpoints - 1)
        renames = checkpoints + 3  # checkpoints; config.yaml, metrics.jsonl (rewritten), results.json
        references[every] = (reference, duration, written, renames)

    rng = random.Random(SEED)
    kinds: Counter = Counter()
    where: Counter = Counter()
    chains = 0
    while sum(kinds.values()) < KILLS:
        every = SETTINGS[chains % len(SETTINGS)]
        reference, duration, written, renames = references[every]
        run_dir = tmp_path / f"chain{chains}"
        chains += 1
        resumed_from = None
        for attempt in range(KILLS_PER_CHAIN + 1):
            left = 1 - (resumed_from or 0) / TOTAL_STEPS
            kind = "none" if attempt == KILLS_PER_CHAIN else rng.choice(["timer", "byte", "byte", "rename"])
            fault = {
                "byte": ("byte", rng.randrange(int(written * left) + 1)),
                "rename": ("rename", rng.randint(1, max(1, round(renames * left))), rng.choice(["before", "after"])),
            }.get(kind)
            log = tmp_path / f"{run_dir.name}-{attempt}.log"
            process = _start(forkserver, command(run_dir, every), fault, log)
            if kind == "timer":
                process.join(rng.uniform(0, duration * left))
                if process.exitcode is None:
                    os.kill(process.pid, signal.SIGKILL)
            process.join(120)
            # a timer kill can land before the child has opened its log: it had done nothing yet
            output = log.read_text() if log.exists() else ""
            resumed = re.search(r"resuming \S+ from step (\d+)/", output)
            if resumed or process.exitcode == 0:  # from the last complete checkpoint
                assert (int(resumed[1]) if resumed else None) == resumed_from, output
            if process.exitcode == 0:
                break
            assert process.exitcode == -signal.SIGKILL, output
            kinds[kind] += 1
            note = next((line for line in output.splitlines() if line.startswith("campaign: killed at ")), "")
            where[note.removeprefix("campaign: killed at ").split(" (")[0] or "a random time"] += 1
            step = _step(run_dir)
            assert step is None or resumed_from is None or step >= resumed_from  # never goes back
            resumed_from = step
        _assert_same_run(reference, run_dir)

    summary = (f"kill campaign (seed {SEED}): {sum(kinds.values())} kills survived in {chains} runs "
               f"(checkpoint/record every {' or '.join(f'{c}/{r}' for c, r in SETTINGS)} steps) "
               f"({', '.join(f'{n} {k}' for k, n in sorted(kinds.items()))}); kill points: "
               f"{', '.join(f'{n} {w}' for w, n in where.most_common())}; every run equal to the uninterrupted one")
    figures.append(summary)
    assert sum(kinds.values()) >= KILLS
