"""``nnclr embed`` on a folder of real images (CIFAR-10 demo images written as PNG files)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from use_helpers import (
    UNREADABLE,
    assert_user_error,
    make_checkpoint,
    make_image_folder,
    nnclr_cli,
    run_main,
    save_demo_image,
)

import nnclr
from nnclr.data import load_dataset
from nnclr.data.decode import load_square
from nnclr.errors import UserError
from nnclr.pretrained import Pretrained
from nnclr.use import embeddings
from nnclr.use.embed import embed_folder
from nnclr.use.embeddings import EMBEDDINGS_FILE, INDEX_FILE, MANIFEST_FILE, Entry, open_embeddings, save_embeddings


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("run") / "checkpoint.pt")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("images"))


def _image_files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.suffix != ".txt")


@pytest.mark.slow
def test_embed_folder_cli_writes_normalised_vectors_index_and_manifest(
    checkpoint: Path, folder: Path, tmp_path: Path
) -> None:
    out = tmp_path / "emb"
    result = nnclr_cli("embed", "--checkpoint", str(checkpoint), "--images", str(folder), "--out", str(out))
    assert result.returncode == 0, result.stderr
    emb = open_embeddings(out)
    paths = [e.path for e in emb.entries]
    assert paths == [p for p in _image_files(folder) if p not in UNREADABLE]  # recursive, sorted, any format
    assert {"gray.png", "palette.png", "rgba.png", "wide.jpg", "big.WEBP", "dog/nested/021.png"} <= set(paths)
    assert emb.vectors.dtype == np.float32 and emb.vectors.shape == (len(paths), 256)
    np.testing.assert_allclose(np.linalg.norm(emb.vectors, axis=1), 1.0, atol=1e-5)
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    skipped = {s["path"]: s["reason"] for s in manifest["skipped"]}
    assert set(skipped) == UNREADABLE and all(skipped.values())
    assert manifest["checkpoint_hash"] == nnclr.load(checkpoint).checkpoint_hash
    assert manifest["preprocessing"]["image_size"] == 32 and manifest["config"]["model"]["backbone"] == "small_cnn"
    assert f"{len(paths)} images in {out}: {len(paths)} embedded" in result.stdout
    assert "2 skipped" in result.stdout and "skipped truncated.png: " in result.stderr
    # labels come from the class folders; loose files are unlabelled
    index = (out / INDEX_FILE).read_text().splitlines()
    assert index[0] == "index,path,label,class,size,mtime_ns" and len(index) == 1 + len(paths)
    by_path = {e.path: e for e in emb.entries}
    assert by_path["gray.png"].label == -1 and by_path["gray.png"].cls == ""
    demo = load_dataset("demo", "test")
    first = next(p for p in paths if p.endswith("/000.png"))
    assert by_path[first].cls == demo.classes[int(demo.labels[0])] == first.split("/")[0]
    assert by_path[first].label == sorted({p.split("/")[0] for p in paths if "/" in p}).index(by_path[first].cls)


def test_vectors_equal_the_encoder_on_the_decoded_files(checkpoint: Path, folder: Path, tmp_path: Path) -> None:
    pretrained = nnclr.load(checkpoint)
    emb = open_embeddings(embed_folder(pretrained, folder, tmp_path / "emb").out)
    names = ("gray.png", "palette.png", "rgba.png", "wide.jpg", "big.WEBP")
    rows = [i for i, e in enumerate(emb.entries) if e.path in names]
    decoded = torch.from_numpy(np.stack([load_square(folder / emb.entries[i].path, 32) for i in rows]))
    expected = pretrained.embed(decoded)
    torch.testing.assert_close(torch.from_numpy(emb.vectors[rows]), expected, atol=1e-5, rtol=0)
    # the same images through the PIL path of .transform give the same vectors (RGBA, palette... included)
    direct = pretrained.embed([Image.open(folder / emb.entries[i].path) for i in rows])
    torch.testing.assert_close(direct, expected, atol=2e-2, rtol=0)  # JPEG draft decoding differs slightly


def test_rerun_embeds_only_new_or_changed_files(checkpoint: Path, folder: Path, tmp_path: Path) -> None:
    pretrained = nnclr.load(checkpoint)
    images = tmp_path / "images"
    shutil.copytree(folder, images)
    out = tmp_path / "emb"
    first = embed_folder(pretrained, images, out)
    before = open_embeddings(out)
    mtime = (out / EMBEDDINGS_FILE).stat().st_mtime_ns
    again = embed_folder(pretrained, images, out)
    assert (again.embedded, again.reused, again.removed) == (0, first.total, 0)
    assert (out / EMBEDDINGS_FILE).stat().st_mtime_ns == mtime  # nothing to do: nothing rewritten

    (images / "gray.png").unlink()  # removed
    Image.open(images / "rgba.png").rotate(90).save(images / "rgba.png")  # changed
    shutil.copy(images / "palette.png", images / "new.png")  # new
    (images / "truncated.png").write_bytes((images / "palette.png").read_bytes())  # repaired: retried
    third = embed_folder(pretrained, images, out)
    after = open_embeddings(out)
    assert (third.embedded, third.removed, third.reused) == (3, 1, first.total - 2)
    paths = [e.path for e in after.entries]
    assert "gray.png" not in paths and {"new.png", "truncated.png"} <= set(paths)
    assert [s["path"] for s in after.manifest["skipped"]] == ["not_an_image.jpg"]
    old = {e.path: before.vectors[i] for i, e in enumerate(before.entries)}
    new = {e.path: after.vectors[i] for i, e in enumerate(after.entries)}
    unchanged = [p for p in new if p in old and p != "rgba.png"]
    assert len(unchanged) == first.total - 2 and all(np.array_equal(old[p], new[p]) for p in unchanged)
    assert not np.allclose(old["rgba.png"], new["rgba.png"])
    np.testing.assert_allclose(new["new.png"], new["palette.png"], atol=1e-6)


@pytest.mark.slow
def test_ctrl_c_keeps_what_was_embedded_and_a_rerun_finishes_it(
    checkpoint: Path, folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    pretrained = nnclr.load(checkpoint)
    whole = open_embeddings(embed_folder(pretrained, folder, tmp_path / "whole").out)
    calls = {"n": 0}
    real_embed = Pretrained.embed

    def interrupted_on_third_batch(self: Pretrained, images: object, batch_size: int = 512) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_embed(self, images, batch_size)

    out = tmp_path / "emb"
    monkeypatch.setattr(Pretrained, "embed", interrupted_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        embed_folder(pretrained, folder, out, batch=8)
    monkeypatch.undo()
    partial = open_embeddings(out)
    assert len(partial) == 16 and partial.manifest["complete"] is False  # two batches of 8
    assert "interrupted `nnclr embed`" in run_main(capsys, "duplicates", "--embeddings", str(out)).stderr
    rerun = embed_folder(pretrained, folder, out, batch=8)
    assert (rerun.reused, rerun.embedded) == (16, len(whole) - 16)
    done = open_embeddings(out)
    assert done.entries == whole.entries and done.manifest["complete"] is True
    np.testing.assert_allclose(done.vectors, whole.vectors, atol=1e-6)


@pytest.mark.slow
def test_another_checkpoint_is_refused_without_fresh_and_nothing_is_lost(
    checkpoint: Path, folder: Path, tmp_path: Path
) -> None:
    out = tmp_path / "emb"
    embed_folder(nnclr.load(checkpoint), folder, out)
    files = {name: (out / name).read_bytes() for name in (EMBEDDINGS_FILE, INDEX_FILE, MANIFEST_FILE)}
    other = nnclr.load(make_checkpoint(tmp_path / "other.pt", seed=1))
    with pytest.raises(UserError, match="--fresh"):
        embed_folder(other, folder, out)
    assert files == {name: (out / name).read_bytes() for name in files}
    report = embed_folder(other, folder, out, fresh=True)
    assert report.embedded == report.total and open_embeddings(out).checkpoint_hash == other.checkpoint_hash


@pytest.mark.slow
def test_embed_a_data_set_records_index_and_label(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    demo = load_dataset("demo", "test")
    images, labels = demo.images[:100], demo.labels[:100]  # 100 real images as an npz: source
    np.savez(tmp_path / "test.npz", images=images.permute(0, 2, 3, 1).numpy(), labels=labels.numpy(),
             classes=np.array(demo.classes))
    out = tmp_path / "emb"
    embed = ("embed", "--checkpoint", str(checkpoint), "--images", f"npz:{tmp_path}", "--split", "test",
             "--out", str(out), "--no-progress")
    result = run_main(capsys, *embed)
    assert result.returncode == 0, result.stderr
    emb = open_embeddings(out)
    assert len(emb) == 100 and emb.entries[5].path == f"npz:{tmp_path}/test/5"
    assert [e.label for e in emb.entries] == labels.tolist()
    assert emb.entries[7].cls == demo.classes[int(labels[7])]
    expected = nnclr.load(checkpoint).embed(images)
    torch.testing.assert_close(torch.from_numpy(emb.vectors), expected, atol=1e-5, rtol=0)
    assert "0 embedded, 100 unchanged" in run_main(capsys, *embed).stdout  # a re-run does nothing
    query, html = save_demo_image(7, tmp_path / "query.png"), tmp_path / "gallery.html"
    result = run_main(capsys, "search", "--embeddings", str(out), str(query), "-k", "2", "--html", str(html))
    assert result.returncode == 0 and result.stdout.splitlines()[2].split()[-1] == f"npz:{tmp_path}/test/7"
    assert html.read_text().count('src="data:image/png;base64,') == 3  # the data set's images, loaded again


def test_bad_input_exits_2_with_one_line_and_writes_nothing(
    checkpoint: Path, folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "readme.txt").write_text("no images here")
    out = tmp_path / "emb"
    embed = ("embed", "--checkpoint", str(checkpoint), "--out", str(out), "--no-progress")
    assert_user_error(run_main(capsys, *embed, "--images", str(empty)), "no images found", str(empty))
    assert_user_error(run_main(capsys, *embed, "--images", str(folder / "gray.png")), "is a file")
    # what the user typed is --images, not the config key data.name (issue 23, item 14)
    assert_user_error(run_main(capsys, *embed, "--images", "no_such_set"), "--images no_such_set", "no such folder",
                      "not a data set name", "demo, cifar10")
    assert_user_error(run_main(capsys, *embed, "--images", "npz:/no/such/dir"), "--images 'npz:/no/such/dir'",
                      "no such file or folder")
    assert_user_error(run_main(capsys, *embed, "--images", "demo", "--split", "nosuch"), "--split nosuch",
                      "valid splits: train, test")
    unreadable = tmp_path / "unreadable"
    unreadable.mkdir()
    shutil.copy(folder / "truncated.png", unreadable / "a.png")
    assert_user_error(run_main(capsys, *embed, "--images", str(unreadable)), "none of the 1 image files")
    assert not out.exists()


class _RunsCodeWhenUnpickled:
    """Unpickling this calls os.system: what a malicious checkpoint does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_that_would_run_code_is_refused_without_running_it(
    folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    marker = tmp_path / "code_ran"
    evil = tmp_path / "evil.pt"
    torch.save({"format_version": 1, "config": {}, "model": _RunsCodeWhenUnpickled(marker)}, evil)
    result = run_main(capsys, "embed", "--checkpoint", str(evil), "--images", str(folder), "--out", str(tmp_path / "e"))
    assert_user_error(result, "refused", "weights_only=True", "posix.system")
    assert not marker.exists() and not (tmp_path / "e").exists()
    with pytest.raises(UserError, match="refused"):
        nnclr.load(evil)
    assert not marker.exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_two_processes_give_the_embeddings_of_one(checkpoint: Path, folder: Path, tmp_path: Path) -> None:
    """``torchrun --nproc_per_node=2 -m nnclr embed``: each file once, in order, the same vectors; rank 0 writes."""
    out = tmp_path / "emb2"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(_free_port()),
               "-m", "nnclr", "embed", "--checkpoint", str(checkpoint), "--images", str(folder), "--out", str(out),
               "--precision", "fp32", "--batch-size", "8", "--no-progress"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("images in") == 1  # one summary: rank 0's
    two = open_embeddings(out)
    one = open_embeddings(embed_folder(nnclr.load(checkpoint, precision="fp32"), folder, tmp_path / "emb1").out)
    assert two.entries == one.entries  # no file lost or duplicated, same order
    assert two.manifest["skipped"] == one.manifest["skipped"]  # reasons gathered from both ranks
    np.testing.assert_allclose(two.vectors, one.vectors, atol=1e-5, rtol=0)


def test_dangling_symlinks_and_fifos_are_skipped_not_fatal(checkpoint: Path, tmp_path: Path) -> None:
    images = tmp_path / "images"
    save_demo_image(0, images / "cat" / "a.png")
    save_demo_image(1, images / "cat" / "b.png")
    (images / "cat" / "dangling.png").symlink_to("nowhere.png")
    os.mkfifo(images / "cat" / "pipe.png")  # opening it to decode would wait for a writer forever
    report = embed_folder(nnclr.load(checkpoint), images, tmp_path / "emb")
    assert report.total == 2
    assert [e.path for e in open_embeddings(tmp_path / "emb").entries] == ["cat/a.png", "cat/b.png"]
    skipped = {s["path"]: s["reason"] for s in report.skipped}
    assert set(skipped) == {"cat/dangling.png", "cat/pipe.png"} and skipped["cat/pipe.png"] == "not a regular file"
    again = embed_folder(nnclr.load(checkpoint), images, tmp_path / "emb")
    assert (again.embedded, again.reused) == (0, 2) and len(again.skipped) == 2


def test_a_commit_whose_renames_were_cut_short_is_read_and_then_finished(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The manifest is the commit; its staged files are what readers read until they are renamed into place."""
    root = tmp_path / "emb"
    manifest = {"format_version": 1, "checkpoint_hash": "x", "source": {"kind": "folder", "path": "/x"}, "skipped": []}
    old = np.eye(3, 8, dtype=np.float32)
    new = np.eye(4, 8, k=1, dtype=np.float32)
    save_embeddings(root, old, [Entry(f"{i}.png") for i in range(3)], manifest)

    def read_only(src: Path, dst: Path) -> None:
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(embeddings, "_move", read_only)  # a disk turned read-only between the commit and the renames
    save_embeddings(root, new, [Entry(f"{i}.png") for i in range(4)], manifest)
    assert np.array_equal(np.load(root / EMBEDDINGS_FILE), old)  # not renamed into place yet
    emb = open_embeddings(root)  # the committed files, read where they are
    assert np.array_equal(emb.vectors, new) and [e.path for e in emb.entries] == [f"{i}.png" for i in range(4)]
    monkeypatch.undo()
    emb = open_embeddings(root)  # writable again: the renames are finished
    assert np.array_equal(np.load(root / EMBEDDINGS_FILE), new) and len(emb) == 4
    assert sorted(p.name for p in root.iterdir()) == sorted([EMBEDDINGS_FILE, INDEX_FILE, MANIFEST_FILE])


def test_a_failed_commit_leaves_the_previous_emb_dir_and_nothing_staged(tmp_path: Path) -> None:
    root = tmp_path / "emb"
    manifest = {"format_version": 1, "checkpoint_hash": "x", "source": {"kind": "folder", "path": "/x"}, "skipped": []}
    save_embeddings(root, np.eye(3, 8, dtype=np.float32), [Entry(f"{i}.png") for i in range(3)], manifest)
    before = {p.name: p.read_bytes() for p in root.iterdir()}
    (root / MANIFEST_FILE.replace(".json", ".json.d")).mkdir()  # noise that is not ours stays
    with pytest.raises(TypeError):  # a manifest that cannot be written: the commit never happens
        save_embeddings(root, np.eye(4, 8, dtype=np.float32), [Entry(f"{i}.png") for i in range(4)],
                        {**manifest, "bad": object()})
    assert {p.name: p.read_bytes() for p in root.iterdir() if p.is_file()} == before
    assert len(open_embeddings(root)) == 3
