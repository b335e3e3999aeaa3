"""``kill -9`` inside ``nnclr embed``'s commits of an EMB_DIR: search, duplicates and embed never see a broken one.

An EMB_DIR is committed as three files (:mod:`nnclr.use.embeddings`: the vectors and the index
staged, the manifest renamed over the old one, the staged files renamed into place), at every
periodic save and at the end. A child process embeds 6 images 4 at a time, saving after each
batch (3 commits of 5 renames each: the first, one over a previous EMB_DIR, the final one), and
SIGKILLs itself

* just before or just after every one of those 15 renames (each of the 30 points once), or
* after the n-th byte written through :mod:`nnclr.rundir`'s writers (a few n drawn with a fixed seed).

After each kill the EMB_DIR must open (or hold nothing yet) with exactly the vectors of the files it
lists, as an uninterrupted run gives them (``nnclr search`` and ``nnclr duplicates`` are run on it
where the kill cut a commit short, staged files left); the same ``nnclr embed`` command must
resume (keep what was committed) and finish with the EMB_DIR of an uninterrupted run, leaving no
staged or temporary file behind.

The children are forked from a forkserver that imported torch once (as ``test_kill_campaign.py``).
"""

from __future__ import annotations

import multiprocessing
import os
import random
import re
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
from robust_helpers import DyingFile, preloaded_forkserver
from use_helpers import make_checkpoint, run_main, save_demo_image

import nnclr
from nnclr import rundir
from nnclr.errors import UserError
from nnclr.use.embed import embed_folder
from nnclr.use.embeddings import EMBEDDINGS_FILE, INDEX_FILE, MANIFEST_FILE, open_embeddings

pytestmark = pytest.mark.slow  # 36 kills, about a minute

IMAGES, BATCH = 6, 4
COMMITS = -(-IMAGES // BATCH) + 1  # a save after every batch, then the final one (complete: true)
RENAMES = 5 * COMMITS  # per commit: 2 staged files + the manifest (rundir), 2 staged files into place
BYTE_KILLS = 6
SEED = 23  # issue 23


# ---------------------------------------------------------------------------- in the child


def _say(text: str) -> None:
    os.write(2, (text + "\n").encode())


def _install(fault: tuple) -> None:
    from nnclr import rundir
    from nnclr.use import embeddings

    if fault[0] == "byte":
        budget = [fault[1]]
        real_open = rundir._open
        rundir._open = lambda path, mode: DyingFile(real_open(path, mode), Path(path), budget,
                                                    lambda path, byte: f"killed inside a write (byte {fault[1]})")
        return
    _, target, when = fault
    count = [0]

    def dying(real):
        def rename(src, dst) -> None:
            count[0] += 1
            if count[0] == target and when == "before":
                _say(f"killed before renaming {Path(src).name}")
                os.kill(os.getpid(), signal.SIGKILL)
            real(src, dst)
            if count[0] == target:
                _say(f"killed after renaming {Path(src).name}")
                os.kill(os.getpid(), signal.SIGKILL)
        return rename

    rundir._replace = dying(rundir._replace)
    embeddings._move = dying(embeddings._move)


def _child(checkpoint: str, folder: str, out: str, fault: tuple, log: str) -> None:
    import torch

    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 2)
    torch.set_num_threads(1)
    _install(fault)
    embed_folder(nnclr.load(checkpoint), folder, out, batch=BATCH, save_every=0)
    _say("finished without being killed")
    os._exit(0)


# ---------------------------------------------------------------------------- in the test


@pytest.fixture(scope="module")
def forkserver() -> multiprocessing.context.BaseContext:
    return preloaded_forkserver("torch", "nnclr.use.embed", "test_embed_kills")


def _bytes_written(pretrained, folder: Path, out: Path, monkeypatch: pytest.MonkeyPatch) -> int:
    """What the child writes through rundir's writers when it is not killed."""
    from nnclr import rundir

    total = [0]
    real_open = rundir._open

    class Counting:
        def __init__(self, file) -> None:
            self.file = file

        def write(self, data) -> int:
            total[0] += len(bytes(data))
            return self.file.write(data)

        def __getattr__(self, name: str):
            return getattr(self.file, name)

    with monkeypatch.context() as patch:
        patch.setattr(rundir, "_open", lambda path, mode: Counting(real_open(path, mode)))
        embed_folder(pretrained, folder, out, batch=BATCH, save_every=0)
    return total[0]


def _faults(written: int) -> list[tuple]:
    rng = random.Random(SEED)
    renames = [("rename", k, when) for k in range(1, RENAMES + 1) for when in ("before", "after")]
    return renames + [("byte", rng.randrange(1, written)) for _ in range(BYTE_KILLS)]


def _assert_clean(out: Path) -> None:
    """Only the three files (and the lock of ``nnclr embed``): no staged file, no temporary file."""
    assert {p.name for p in out.iterdir()} - {rundir.LOCK} == {EMBEDDINGS_FILE, INDEX_FILE, MANIFEST_FILE}


def test_kill_around_every_rename_of_embed_leaves_a_usable_emb_dir(
    forkserver, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkpoint = make_checkpoint(tmp_path / "run" / "checkpoint.pt")
    folder = tmp_path / "images"
    for i in range(IMAGES):
        save_demo_image(i, folder / ("cat" if i % 2 else "dog") / f"{i:02d}.png")
    pretrained = nnclr.load(checkpoint)
    reference = open_embeddings(embed_folder(pretrained, folder, tmp_path / "reference").out)
    row_of = {e.path: i for i, e in enumerate(reference.entries)}
    embed = ("embed", "--checkpoint", str(checkpoint), "--images", str(folder), "--no-progress")

    written = _bytes_written(pretrained, folder, tmp_path / "counted", monkeypatch)
    seen: dict[str, int] = {}
    for n, fault in enumerate(_faults(written)):
        out, log = tmp_path / f"emb{n}", tmp_path / f"kill{n}.log"
        process = forkserver.Process(target=_child, args=(str(checkpoint), str(folder), str(out), fault, str(log)))
        process.start()
        process.join(120)
        said = log.read_text()
        assert process.exitcode == -signal.SIGKILL, said  # every fault point is reached
        note = next(line for line in said.splitlines() if line.startswith("killed "))
        where = re.sub(r"[0-9a-f]{16}", "<commit>", re.sub(r" \(byte \d+\)", "", note))
        seen[where] = seen.get(where, 0) + 1

        pending = any(out.glob(".embeddings.npy.*")) or any(out.glob(".index.csv.*")) if out.is_dir() else False
        try:
            emb = open_embeddings(out)  # what search and duplicates open; finishes a commit a kill cut short
        except UserError as error:  # killed before the first commit: nothing to open
            assert "has no manifest.json" in str(error) or "not found" in str(error), (fault, str(error))
            committed = 0
        else:
            rows = [row_of[e.path] for e in emb.entries]
            assert rows == sorted(rows) and emb.entries == [reference.entries[r] for r in rows], fault
            np.testing.assert_allclose(emb.vectors, reference.vectors[rows], atol=1e-6, err_msg=str(fault))
            committed = len(emb)
            for command in () if not pending else (("duplicates", "--embeddings", str(out)),
                            ("search", "--embeddings", str(out), str(folder / "dog" / "00.png"), "-k", "2")):
                result = run_main(capsys, *command)
                assert result.returncode == 0, (fault, result.stderr)

        result = run_main(capsys, *embed, "--out", str(out))  # the same command: resumes and finishes
        assert result.returncode == 0, (fault, result.stderr)
        assert f"{committed} unchanged" in result.stdout, (fault, result.stdout)
        done = open_embeddings(out)
        assert done.entries == reference.entries and done.manifest["complete"] is True, fault
        np.testing.assert_allclose(done.vectors, reference.vectors, atol=1e-6, err_msg=str(fault))
        _assert_clean(out)

    print(f"embed kills: {sum(seen.values())} ({', '.join(f'{n} {w}' for w, n in sorted(seen.items()))})",
          file=sys.stderr)
    assert sum(n for w, n in seen.items() if "renaming" in w) == 2 * RENAMES
