"""Tests of the file index (:mod:`nnclr.data.index`: packed paths, .npz files) and of listing folders into it
(:mod:`nnclr.data.scan`: layout rules, the cache).

Every test points ``NNCLR_CACHE_DIR`` into its ``tmp_path`` (autouse fixture): nothing is written
to ``~/.cache``. Folders are aged (mtimes set 60 s back) where a test needs the cache to be
trusted: a folder modified within ``RACY_NS`` of its listing is always listed again.
"""

from __future__ import annotations

import errno
import os
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import nnclr.data.index as index_module
import nnclr.data.scan as scan_module
from nnclr.data import load_dataset
from nnclr.data.decode import is_image_file
from nnclr.data.folder import scan_folder
from nnclr.data.index import FileIndex
from nnclr.data.scan import build_index, index_cache_dir, load_index
from nnclr.errors import UserError

pytestmark = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="POSIX file types (FIFO, symlinks) needed")


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("NNCLR_CACHE_DIR", str(cache))
    return cache / "index"


def _image(path: Path, seed: int = 0, fmt: str = "PNG") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, fmt)
    return path


def _age(*trees: Path, seconds: float = 60) -> None:
    """Set the mtime of every folder in ``trees`` ``seconds`` back (so a cache of them is trusted)."""
    when = time.time() - seconds
    for tree in trees:
        for top, _, _ in os.walk(tree):
            os.utime(top, (when, when))


def _no_hang(call: Callable[[], object], fifo: Path, timeout: float = 10) -> object:
    """``call()`` in a thread; if it blocks (e.g. opened ``fifo``), unblock the reader and fail."""
    pool = ThreadPoolExecutor(1)
    future = pool.submit(call)
    try:
        return future.result(timeout=timeout)
    except FutureTimeout:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # EOF for a reader blocked in open()
        pytest.fail(f"blocked for {timeout} s: {fifo} was opened")
    finally:
        pool.shutdown(wait=True)


def _old_scan_folder(path: Path) -> tuple[list[Path], list[int], list[str]]:
    """``scan_folder`` as it was before the index (commit 2c17010), the reference for the layout rules."""

    def images_below(sub: Path) -> list[Path]:
        seen: set[str] = set()
        found: list[Path] = []
        for top, dirs, files in os.walk(sub, followlinks=True):
            real = os.path.realpath(top)
            if real in seen:
                dirs[:] = []
                continue
            seen.add(real)
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            found.extend(Path(top) / f for f in files if is_image_file(Path(f)))
        return sorted(found, key=lambda p: p.relative_to(sub).as_posix())

    subdirs = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    loose = sorted(p for p in path.iterdir() if not p.is_dir() and is_image_file(p))
    files, labels, classes = [], [], []
    for sub in subdirs:
        below = images_below(sub)
        if below:
            files += below
            labels += [len(classes)] * len(below)
            classes.append(sub.name)
    if not classes:
        files, labels = loose, [-1] * len(loose)
    return files, labels, classes


def _tree(tmp_path: Path) -> tuple[Path, Path]:
    """A labelled folder with every kind of entry; returns (folder, the FIFO named x.png)."""
    root, outside = tmp_path / "data", tmp_path / "outside"
    _image(root / "cat" / "a.png", 1)
    _image(root / "cat" / "B.JPG", 2, "JPEG")
    _image(root / "cat" / "deep" / "deeper" / "c.png", 3)
    _image(root / "cat" / ".hidden.png", 4)
    _image(root / "cat" / ".hidden_dir" / "d.png", 5)
    (root / "cat" / "loop").symlink_to(root / "cat")  # a symlink loop: cut
    _image(root / "dog" / "x.jpeg", 6, "JPEG")
    (root / "dog" / "notes.txt").write_text("not an image")
    (root / "dog" / "linked").symlink_to(outside)  # a symlinked folder: followed
    (root / "dog" / "dangling.png").symlink_to(tmp_path / "missing.png")
    (root / "dog" / "self.png").symlink_to(root / "dog" / "self.png")  # a symlink pointing at itself
    fifo = root / "dog" / "x.png"
    os.mkfifo(fifo)
    _image(outside / "o1.png", 7)
    _image(outside / "sub" / "o2.png", 8)
    (root / "bird").symlink_to(outside / "sub")  # a symlinked class folder
    (root / "empty").mkdir()
    (root / ".git").mkdir()
    _image(root / ".git" / "e.png", 9)
    _image(root / "stray.png", 10)  # next to class folders: ignored with a warning
    return root, fifo


# ---------------------------------------------------------------------------- layout rules


def test_layout_matches_previous_scan_folder_minus_non_regular_files(tmp_path: Path) -> None:
    root, fifo = _tree(tmp_path)
    with pytest.warns(UserWarning, match=r"ignoring 1 image\(s\) .*\(e.g. stray.png\)"):
        index, unreadable = _no_hang(lambda: build_index(root), fifo)
    old_files, old_labels, old_classes = _old_scan_folder(root)
    reasons = {path.name: reason for path, reason in unreadable}
    assert reasons == {
        "dangling.png": "No such file or directory",
        "self.png": "Too many levels of symbolic links",
        "x.png": "not a regular file (a FIFO)",
    }
    kept = [(f, label) for f, label in zip(old_files, old_labels) if f.name not in reasons]
    assert index.paths() == [f for f, _ in kept] and index.labels.tolist() == [label for _, label in kept]
    assert index.classes == old_classes == ["bird", "cat", "dog"]
    assert index.relpaths() == [
        "bird/o2.png", "cat/B.JPG", "cat/a.png", "cat/deep/deeper/c.png",
        "dog/linked/o1.png", "dog/linked/sub/o2.png", "dog/x.jpeg",
    ]  # fmt: skip
    assert index.labels.dtype == np.int64 and index.labels.tolist() == [0, 1, 1, 1, 2, 2, 2]
    assert index.sizes.tolist() == [os.stat(index.path(i)).st_size for i in range(len(index))]
    assert index.mtimes.tolist() == [os.stat(index.path(i)).st_mtime_ns for i in range(len(index))]


def test_in_memory_loader_lists_the_index_and_skips_the_fifo(tmp_path: Path, capsys) -> None:
    root, fifo = _tree(tmp_path)
    with pytest.warns(UserWarning, match="ignoring 1 image"):
        files, labels, classes = scan_folder(root)
        index, _ = load_index(root)
        ds = _no_hang(lambda: load_dataset(f"folder:{root}", image_size=4), fifo)
    assert files == index.paths() and labels == index.labels.tolist() and classes == index.classes
    assert len(ds) == len(index) == 7 and ds.labels.tolist() == index.labels.tolist()
    warning = capsys.readouterr().err.strip().splitlines()[-1]
    assert "skipped 3 unreadable" in warning and f"{fifo}: not a regular file (a FIFO)" in warning


def test_unlabelled_folder_and_subfolders_without_images(tmp_path: Path) -> None:
    for name in ("b.png", "a.png", "C.gif"):
        _image(tmp_path / "data" / name)
    (tmp_path / "data" / "empty" / "deeper").mkdir(parents=True)
    _image(tmp_path / "data" / ".hidden.png")
    (tmp_path / "data" / "readme.txt").write_text("hi")
    index, unreadable = build_index(tmp_path / "data")
    assert unreadable == [] and index.classes == [] and index.labels.tolist() == [-1, -1, -1]
    assert index.relpaths() == ["C.gif", "a.png", "b.png"]
    assert index.paths() == _old_scan_folder(tmp_path / "data")[0]


def test_folder_reached_twice_is_listed_once_under_its_first_path(tmp_path: Path) -> None:
    _image(tmp_path / "shared" / "s.png")
    for name in ("l2", "l1"):
        (tmp_path / "data" / "cls").mkdir(parents=True, exist_ok=True)
        (tmp_path / "data" / "cls" / name).symlink_to(tmp_path / "shared")
    (tmp_path / "data" / "other").symlink_to(tmp_path / "shared")  # another class: listed again
    index, _ = build_index(tmp_path / "data")
    assert index.relpaths() == ["cls/l1/s.png", "other/s.png"] and index.classes == ["cls", "other"]


def test_errors_as_before(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(UserError, match=f"cannot list {tmp_path / 'missing'} \\(No such file or directory\\)"):
        build_index(tmp_path / "missing")
    (tmp_path / "sub").mkdir()
    (tmp_path / "readme.txt").write_text("hi")
    with pytest.raises(UserError, match=f"no images found in {tmp_path} \\(extensions: bmp gif jpeg jpg png"):
        load_index(tmp_path)
    _image(tmp_path / "locked" / "a.png")
    _image(tmp_path / "open" / "b.png")
    real_scandir = os.scandir

    def scandir(path: str):  # chmod 000 does not stop root: refuse the listing here instead
        if os.path.basename(path) == "locked" or path == str(tmp_path / "data"):
            raise PermissionError(errno.EACCES, "Permission denied", path)
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    index, unreadable = build_index(tmp_path)
    assert index.relpaths() == ["open/b.png"] and unreadable == [(tmp_path / "locked", "Permission denied")]
    (tmp_path / "data").mkdir()
    with pytest.raises(UserError, match=f"^cannot list {tmp_path / 'data'} \\(Permission denied\\); check its perm"):
        build_index(tmp_path / "data")


def test_image_names_agree_with_is_image_file() -> None:
    names = ["a.png", "a.PNG", "a.", ".png", "..png", "a..jpg", "a.tar.gz", "a.jpeg.txt", "noext", "A.TiFf",
             "x.png ", "x .webp", "dot.", "a.bmp.", "ü.JpEg"]  # fmt: skip
    assert [scan_module.is_image_name(n) for n in names] == [is_image_file(Path(n)) for n in names]


# ---------------------------------------------------------------------------- packed paths and files


def test_packed_paths_round_trip_non_ascii_names(tmp_path: Path) -> None:
    names = ["café/naïve 图.png", "café/Ω.jpg", "zürich/😀.png", "zürich/" + os.fsdecode(b"\xff\xfe.png")]
    for i, name in enumerate(names):
        _image(tmp_path / "data" / name, i)
    index, _ = build_index(tmp_path / "data")
    assert index.relpaths() == sorted(names[:2]) + sorted(names[2:])
    assert [index.relpath(i) for i in range(len(index))] == index.relpaths()
    assert index.relpath(-1) == index.relpaths()[-1]
    assert index.path(0) == os.path.join(str(tmp_path / "data"), index.relpath(0)) and os.path.isfile(index.path(3))
    assert index.path_bytes.dtype == np.uint8 and index.path_offsets.dtype == np.int64
    assert len(index.path_bytes) == sum(len(os.fsencode(n)) for n in names)
    assert not any(isinstance(v, list) and len(v) == len(index) for v in vars(index).values())  # no list of N str
    index.save(tmp_path / "i.npz")
    assert FileIndex.load(tmp_path / "i.npz").relpaths() == index.relpaths()
    with pytest.raises(IndexError):
        index.relpath(len(index))


def test_save_load_round_trip(tmp_path: Path) -> None:
    root, _ = _tree(tmp_path)
    with pytest.warns(UserWarning):
        index, _ = build_index(root)
    index.save(tmp_path / "index.npz")
    again = FileIndex.load(tmp_path / "index.npz")
    assert again.root == root and again.classes == index.classes and again.relpaths() == index.relpaths()
    for name in ("labels", "sizes", "mtimes"):
        assert np.array_equal(getattr(again, name), getattr(index, name)) and getattr(again, name).dtype == np.int64
    assert again.fingerprint() == index.fingerprint() and again.changes_from(index) is None
    assert sorted(np.load(tmp_path / "index.npz", allow_pickle=False).files) == sorted(index.to_arrays())
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


@pytest.mark.parametrize("damage", ["garbage", "truncated", "npy", "missing key", "bad offsets", "empty"])
def test_load_of_a_corrupt_file_is_one_line_user_error(tmp_path: Path, damage: str) -> None:
    _image(tmp_path / "data" / "a.png")
    index, _ = build_index(tmp_path / "data")
    path = tmp_path / "index.npz"
    index.save(path)
    arrays = index.to_arrays()
    if damage == "garbage":
        path.write_bytes(b"not an npz at all")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:300])
    elif damage == "npy":
        np.save(path.with_suffix(""), np.arange(3))
        path.with_suffix(".npy").replace(path)
    elif damage == "missing key":
        np.savez(path, **{k: v for k, v in arrays.items() if k != "sizes"})
    elif damage == "bad offsets":
        np.savez(path, **{**arrays, "path_offsets": arrays["path_offsets"] + 1})
    else:
        path.write_bytes(b"")
    with pytest.raises(UserError) as error:
        FileIndex.load(path)
    assert str(error.value).startswith(f"{path}: ") and "\n" not in str(error.value)


def test_changes_from_names_each_kind() -> None:
    def make(rels: list[str], sizes: list[int], mtimes: list[int], classes: list[str]) -> FileIndex:
        labels = [classes.index(r.split("/")[0]) for r in rels]
        return FileIndex.from_relpaths(Path("r"), rels, labels, classes, sizes, mtimes)

    old = make(["cats/a.jpg", "cats/z.jpg", "dogs/y.jpg"], [1, 100, 3], [10, 20, 30], ["cats", "dogs"])
    assert old.changes_from(make(["cats/a.jpg", "cats/z.jpg", "dogs/y.jpg"], [1, 100, 3], [10, 20, 30],
                                 ["cats", "dogs"])) is None  # fmt: skip
    new = make(["cats/a.jpg", "cats/x.jpg", "cats/z.jpg", "emus/e.jpg"], [1, 5, 120, 7], [10, 40, 50, 60],
               ["cats", "emus"])  # fmt: skip
    assert new.changes_from(old) == (
        "1 class added (emus), 1 class removed (dogs), 2 files added (e.g. cats/x.jpg), "
        "1 removed (e.g. dogs/y.jpg), 1 modified (e.g. cats/z.jpg: size 100 -> 120 bytes)"
    )
    touched = make(["cats/a.jpg", "cats/z.jpg", "dogs/y.jpg"], [1, 100, 3], [10, 20, 2_000_000_030], ["cats", "dogs"])
    assert touched.changes_from(old) == "1 file modified (e.g. dogs/y.jpg: same size, mtime +2 s)"
    removed = make(["cats/a.jpg"], [1], [10], ["cats", "dogs"])
    assert removed.changes_from(old) == "2 files removed (e.g. cats/z.jpg)"


# ---------------------------------------------------------------------------- the cache


def _count_builds(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    calls: list[Path] = []
    real = scan_module._scan

    def counting(folder, *args, **kwargs):
        calls.append(folder)
        return real(folder, *args, **kwargs)

    monkeypatch.setattr(scan_module, "_scan", counting)
    return calls


def _classes_folder(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    for i, name in enumerate(["cats/a.png", "cats/b.png", "dogs/c.png", "dogs/deep/d.png"]):
        _image(root / name, i)
    (root / "dogs" / "broken.png").symlink_to(tmp_path / "nowhere.png")
    _age(root)
    return root


def test_cache_reused_when_nothing_changed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, _cache_dir: Path) -> None:
    root = _classes_folder(tmp_path)
    builds = _count_builds(monkeypatch)
    first, bad = load_index(root)
    assert len(builds) == 1 and len(list(_cache_dir.glob("*.npz"))) == 1
    second, bad_again = load_index(root)
    assert len(builds) == 1, "a valid cache was listed again"
    assert second.fingerprint() == first.fingerprint() and second.relpaths() == first.relpaths()
    assert bad_again == bad == [(root / "dogs" / "broken.png", "No such file or directory")]
    relative = load_index(Path(os.path.relpath(root)))[0]  # the same folder by another path: same cache
    assert len(builds) == 1 and relative.root == Path(os.path.relpath(root))
    load_index(root, cache=False)
    assert len(builds) == 2


def test_recently_modified_folder_is_not_trusted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _image(tmp_path / "data" / "a.png")  # mtime: now, within RACY_NS of the listing
    builds = _count_builds(monkeypatch)
    load_index(tmp_path / "data")
    load_index(tmp_path / "data")
    assert len(builds) == 2


def _add(root: Path) -> str:
    _image(root / "cats" / "new.png", 9)
    return "1 file added (e.g. cats/new.png)"


def _remove(root: Path) -> str:
    (root / "dogs" / "deep" / "d.png").unlink()
    return "1 file removed (e.g. dogs/deep/d.png)"


def _rename(root: Path) -> str:
    (root / "cats" / "a.png").rename(root / "cats" / "renamed.png")
    return "1 file added (e.g. cats/renamed.png), 1 removed (e.g. cats/a.png)"


def _touch(root: Path) -> str:
    path = root / "dogs" / "c.png"
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))  # same size, new mtime
    return "1 file modified (e.g. dogs/c.png: same size, mtime +5 s)"


def _rewrite(root: Path) -> str:
    path = root / "cats" / "b.png"
    size, mtime = path.stat().st_size, path.stat().st_mtime_ns
    with open(path, "ab") as file:  # in place: the folder's mtime does not change
        file.write(b"\0" * 20)
    os.utime(path, ns=(mtime, mtime))  # even with the old mtime, the new size is seen
    return f"1 file modified (e.g. cats/b.png: size {size} -> {size + 20} bytes)"


def _fix_symlink(root: Path) -> str:
    _image(root.parent / "nowhere.png", 5)  # the dangling symlink now points at an image
    return "1 file added (e.g. dogs/broken.png)"


@pytest.mark.parametrize("change", [_add, _remove, _rename, _touch, _rewrite, _fix_symlink])
def test_cache_rebuilt_after_a_change(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, change) -> None:
    root = _classes_folder(tmp_path)
    builds = _count_builds(monkeypatch)
    before, _ = load_index(root)
    expected = change(root)
    after, _ = load_index(root)
    assert len(builds) == 2, "the cache was reused after a change"
    assert after.changes_from(before) == expected
    fresh, _ = build_index(root)
    assert fresh.fingerprint() == after.fingerprint()


def test_corrupt_cache_is_ignored_and_rebuilt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, _cache_dir: Path,
                                              capsys) -> None:  # fmt: skip
    root = _classes_folder(tmp_path)
    builds = _count_builds(monkeypatch)
    first, _ = load_index(root)
    (cached,) = _cache_dir.glob("*.npz")
    cached.write_bytes(cached.read_bytes()[:500])
    again, _ = load_index(root)
    assert len(builds) == 2 and again.fingerprint() == first.fingerprint()
    assert FileIndex.load(cached).fingerprint() == first.fingerprint()  # overwritten with a good one
    assert capsys.readouterr().err == ""  # small folder: no warning
    load_index(root)
    assert len(builds) == 2


def test_cache_dir_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, _cache_dir: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert index_cache_dir() == _cache_dir
    _image(tmp_path / "data" / "a.png")
    load_index(tmp_path / "data")
    assert len(list(_cache_dir.glob("*.npz"))) == 1 and not (tmp_path / "home").exists()
    monkeypatch.delenv("NNCLR_CACHE_DIR")
    assert index_cache_dir() == tmp_path / "home" / ".cache" / "nnclr" / "index"


def test_unwritable_cache_dir_still_works(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    root = _classes_folder(tmp_path)
    (tmp_path / "file").write_text("in the way")
    monkeypatch.setenv("NNCLR_CACHE_DIR", str(tmp_path / "file" / "cache"))  # mkdir fails, also for root
    monkeypatch.setattr(scan_module, "PROGRESS_MIN_FILES", 0)  # warn as for a large folder
    index, _ = load_index(root)
    assert len(index) == 4
    err = capsys.readouterr().err
    assert err.startswith(f"nnclr: warning: {root}: cannot write the file index cache") and err.count("\n") == 1
    assert "Traceback" not in err


def test_full_disk_leaves_no_tmp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, _cache_dir: Path,
                                      capsys) -> None:  # fmt: skip
    root = _classes_folder(tmp_path)

    def full(file, **arrays) -> None:
        file.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "savez", full)
    index, _ = load_index(root)
    assert len(index) == 4 and list(_cache_dir.iterdir()) == []
    assert capsys.readouterr().err == ""  # small folder: no warning
    with pytest.raises(UserError, match=f"cannot write the file index {tmp_path / 'i.npz'} \\(No space"):
        index.save(tmp_path / "i.npz")  # one line, as every write of nnclr.rundir's writer
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "data"]


def test_planted_symlink_at_the_tmp_name_is_not_followed(tmp_path: Path, _cache_dir: Path) -> None:
    _image(tmp_path / "data" / "a.png")
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    cache_file = scan_module.index_cache_path(tmp_path / "data")
    _cache_dir.mkdir(parents=True)
    planted = index_module.tmp_path(cache_file, 0)
    planted.symlink_to(victim)
    index, _ = load_index(tmp_path / "data")
    assert victim.read_text() == "precious" and planted.is_symlink() and os.readlink(planted) == str(victim)
    assert FileIndex.load(cache_file).relpaths() == ["a.png"]
    own = tmp_path / "own.npz"
    index_module.tmp_path(own, 0).symlink_to(victim)
    index.save(own)
    assert victim.read_text() == "precious" and FileIndex.load(own).relpaths() == ["a.png"]


def test_progress_bar_only_when_asked_or_large_on_a_terminal(tmp_path: Path, capsys) -> None:
    for i in range(3):
        _image(tmp_path / "data" / f"{i}.png", i)
    build_index(tmp_path / "data")
    assert capsys.readouterr().err == ""
    build_index(tmp_path / "data", progress=True)
    assert "indexing" in capsys.readouterr().err
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_index(tmp_path / "data", progress=False)
    assert capsys.readouterr().err == ""


@pytest.mark.slow
def test_any_damaged_byte_or_truncation_is_a_user_error(tmp_path: Path) -> None:
    rels = [f"c{i % 3}/f{i}.png" for i in range(40)]
    index = FileIndex.from_relpaths(Path("r"), rels, [i % 3 for i in range(40)], ["c0", "c1", "c2"], [1] * 40, [2] * 40)
    path = tmp_path / "index.npz"
    index.save(path)
    data, rng = path.read_bytes(), np.random.default_rng(0)
    damaged = [data[:cut] for cut in range(0, len(data), 61)]
    for _ in range(400):
        flipped = bytearray(data)
        flipped[rng.integers(len(data))] = rng.integers(256)
        damaged.append(bytes(flipped))
    for content in damaged:
        path.write_bytes(content)
        try:
            FileIndex.load(path)
        except UserError as error:
            assert "\n" not in str(error)
