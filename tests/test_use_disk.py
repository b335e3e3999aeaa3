"""Guarantee 3 for every command that writes: ``eval``, ``embed``, ``search``, ``duplicates`` and ``report``.

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
from use_helpers import assert_user_error, make_checkpoint, make_image_folder, run_main

import nnclr
from nnclr import rundir
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


# ---------------------------------------------------------------------------- embed, search, duplicates


def _embed(checkpoint: Path, images: Path, out: Path) -> tuple[str, ...]:
    return ("embed", "--checkpoint", str(checkpoint), "--images", str(images), "--out", str(out), "--no-progress")


@pytest.mark.slow
@pytest.mark.parametrize("failure", ["full", "read-only"])
def test_embed_into_a_full_or_read_only_disk(
    tmp_path: Path, checkpoint: Path, images: Path, capsys: pytest.CaptureFixture, failure: str
) -> None:
    folder = tmp_path / "images"
    shutil.copytree(images, folder)
    with small_filesystem(tmp_path / "disk") as disk:
        fresh = disk.path / "fresh"
        _break(disk, failure)
        result = run_main(capsys, *_embed(checkpoint, folder, fresh))
        assert_user_error(result, "cannot write the", str(fresh), REASONS[failure])
        assert _snapshot(disk.path) == {}  # no staged, temporary or half-written file
        _mend(disk, failure)

        out = disk.path / "emb"
        assert run_main(capsys, *_embed(checkpoint, folder, out)).returncode == 0
        before = _snapshot(disk.path)
        shutil.copy(folder / "gray.png", folder / "new.png")  # something to embed: a new commit
        _break(disk, failure)
        result = run_main(capsys, *_embed(checkpoint, folder, out))
        if failure == "full":
            assert_user_error(result, "cannot write the new embeddings", str(out), REASONS[failure],
                              f"the previous embeddings in {out} are intact")
        else:  # refused at the first write, the lock (EMB_DIR/.lock), before any work
            assert_user_error(result, "cannot write the", str(out), REASONS[failure])
        assert _snapshot(disk.path) == before  # the previous EMB_DIR intact, nothing staged left
        query = str(folder / "gray.png")
        found = run_main(capsys, "search", "--embeddings", str(out), query, "-k", "1", "--json")
        assert found.returncode == 0, found.stderr  # still searchable, on the read-only disk too

        _mend(disk, failure)
        result = run_main(capsys, *_embed(checkpoint, folder, out))  # the same command, with room again
        assert result.returncode == 0 and "1 embedded" in result.stdout, result.stderr
        assert "new.png" in [e.path for e in open_embeddings(out).entries]
        assert {p.name for p in out.iterdir()} - {rundir.LOCK} == {EMBEDDINGS_FILE, INDEX_FILE, MANIFEST_FILE}


@pytest.mark.slow
@pytest.mark.parametrize("failure", ["full", "read-only"])
def test_search_approx_on_a_full_or_read_only_emb_dir_searches_without_saving_the_index(
    tmp_path: Path, checkpoint: Path, images: Path, capsys: pytest.CaptureFixture, failure: str
) -> None:
    pytest.importorskip("faiss", reason="the faiss extra (pip install 'nnclr[faiss]'; part of the dev extra)")
    with small_filesystem(tmp_path / "disk") as disk:
        out = disk.path / "emb"
        embed_folder(nnclr.load(checkpoint), images, out)
        before = _snapshot(disk.path)
        _break(disk, failure)
        query = str(images / "gray.png")
        result = run_main(capsys, "search", "--embeddings", str(out), query, "-k", "3", "--index", "approx")
        assert result.returncode == 0, result.stderr
        [line] = result.stderr.strip().splitlines()
        assert "faiss IVF index (built, not saved: cannot write" in line and str(out) in line, line
        assert REASONS[failure] in line and "the next search builds it again" in line, line
        assert "gray.png" in result.stdout.splitlines()[2]  # the query found itself
        assert _snapshot(disk.path) == before  # no index, no temporary file
        _mend(disk, failure)
        result = run_main(capsys, "search", "--embeddings", str(out), query, "-k", "3", "--index", "approx")
        assert "built and saved" in result.stderr
        assert "loaded" in run_main(capsys, "search", "--embeddings", str(out), query, "--index", "approx").stderr


@pytest.mark.slow
@pytest.mark.parametrize("failure", ["full", "read-only"])
@pytest.mark.parametrize("command", ["search", "duplicates"])
def test_html_gallery_on_a_full_or_read_only_disk(
    tmp_path: Path, checkpoint: Path, images: Path, capsys: pytest.CaptureFixture, failure: str, command: str
) -> None:
    out = tmp_path / "emb"
    embed_folder(nnclr.load(checkpoint), images, out)
    args = [str(images / "gray.png")] if command == "search" else ["--threshold", "0.99"]
    with small_filesystem(tmp_path / "disk", megabytes=1) as disk:
        html = disk.path / "gallery.html"
        _break(disk, failure)
        result = run_main(capsys, command, "--embeddings", str(out), *args, "--html", str(html))
        assert_user_error(result, f"cannot write the gallery {html}", REASONS[failure])
        assert _snapshot(disk.path) == {}  # nothing half-written
        _mend(disk, failure)
        assert run_main(capsys, command, "--embeddings", str(out), *args, "--html", str(html)).returncode == 0
        assert html.read_text().startswith("<!DOCTYPE html>")


# ---------------------------------------------------------------------------- report


@pytest.mark.slow
@pytest.mark.parametrize("failure", ["full", "read-only"])
def test_report_into_a_full_or_read_only_run_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture, failure: str
) -> None:
    """The report writes its galleries to TensorBoard first (an append-only event log, tensorboard's own writer,
    whose thread died with a traceback on a full disk), then report.html through rundir."""
    with small_filesystem(tmp_path / "disk") as disk:
        run_dir = disk.path / "run"
        make_checkpoint(run_dir / "checkpoint.pt", "data.image_size=16")
        before = _snapshot(disk.path)
        _break(disk, failure)
        result = run_main(capsys, "report", str(run_dir))
        assert_user_error(result, "cannot write the", str(run_dir / "tensorboard"), REASONS[failure])
        after = {name: digest for name, digest in _snapshot(disk.path).items() if "/tensorboard/" not in name}
        assert after == before  # no report or temporary file; only tensorboard's event log may have been opened
        _mend(disk, failure)
        assert run_main(capsys, "report", str(run_dir)).returncode == 0
        assert (run_dir / "report.html").stat().st_size > 0
