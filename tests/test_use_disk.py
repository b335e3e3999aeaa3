"""Guarantee 3 for every command that writes: ``eval``, ``embed``, ``search`` and ``duplicates``.

A full disk or a read-only folder while writing (the feature cache and the eval records, an
EMB_DIR, the faiss index, an HTML gallery): one line naming the file and the reason, the files
that were there before intact, no temporary or staged file left, and the same command works once
there is room again. On a real small tmpfs (:func:`robust_helpers.small_filesystem`).
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
from robust_helpers import small_filesystem
from use_helpers import assert_user_error, make_checkpoint, make_image_folder, run_main, save_demo_image

import nnclr
from nnclr.use.embed import embed_folder
from nnclr.use.embeddings import EMBEDDINGS_FILE, INDEX_FILE, MANIFEST_FILE, open_embeddings

REASONS = {"full": "No space left on device", "read-only": "Read-only file system"}


def _snapshot(folder: Path) -> dict[str, str]:
    """Every file below ``folder`` (hidden ones too) and the SHA-256 of its bytes."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "filler"}


def _break(disk, failure: str) -> None:
    disk.fill() if failure == "full" else disk.read_only()


def _mend(disk, failure: str) -> None:
    disk.free() if failure == "full" else disk.read_only(False)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("run") / "checkpoint.pt")


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("images"), n=20)


# ---------------------------------------------------------------------------- eval


@pytest.mark.slow
@pytest.mark.parametrize("failure", ["full", "read-only"])
@pytest.mark.parametrize("protocol", ["knn", "linear"])
def test_eval_on_a_full_or_read_only_run_directory(
    tmp_path: Path, tiny_data: Path, capsys: pytest.CaptureFixture, failure: str, protocol: str
) -> None:
    with small_filesystem(tmp_path / "disk") as disk:
        run_dir = disk.path / "run"
        make_checkpoint(run_dir / "checkpoint.pt", "data.image_size=16")
        before = _snapshot(disk.path)
        command = ("eval", protocol, "--checkpoint", str(run_dir), "--data", f"npz:{tiny_data}", "--no-progress",
                   "--threads", "1")
        _break(disk, failure)
        result = run_main(capsys, *command)
        assert_user_error(result, "cannot write the", str(run_dir / "features"), REASONS[failure])
        assert _snapshot(disk.path) == before  # the checkpoint intact, no temporary file left
        _mend(disk, failure)
        assert run_main(capsys, *command).returncode == 0
        cached = _snapshot(disk.path)
        assert any(name.startswith("run/features/") for name in cached)

        # the features are cached: now the record (eval/*.json) is what cannot be written
        for name in list(cached):
            if name.startswith("run/eval/"):
                (disk.path / name).unlink()
        cached = _snapshot(disk.path)
        _break(disk, failure)
        result = run_main(capsys, *command)
        assert_user_error(result, f"cannot write the {protocol} result", str(run_dir / "eval"), REASONS[failure])
        assert _snapshot(disk.path) == cached
