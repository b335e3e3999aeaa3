"""Listing a split folder into a :class:`~nnclr.data.index.FileIndex`, in parallel, cached on disk.

:func:`load_index` lists a split folder (see :mod:`nnclr.data.folder` for ``train/``, ``test/``)
under the layout rules of the ``folder:`` source:

* Every subfolder of the folder that holds images (at any depth below it) is a class: sorted
  names give labels ``0..C-1``, as in torchvision's ``ImageFolder``. Images lying directly in the
  folder next to class subfolders are ignored, with a warning.
* With no class subfolders, the images directly in the folder are indexed unlabelled
  (labels ``-1``, ``classes == []``).
* Hidden files and folders (name starting with ``.``) are skipped; symlinked folders are
  followed, each real folder once per class (symlink loops are cut). Where one real folder is
  reached by several paths, the shallowest path wins, then the first in sorted order.
* Order: by class, then by relative posix path (for unlabelled folders: by path).
* Only regular files (after following symlinks) are indexed, with their size and ``st_mtime_ns``
  from one ``stat``; no file is opened. FIFOs, sockets, devices, dangling symlinks and symlink
  loops with an image name, and folders that cannot be listed, are returned as unreadable with
  the reason.

Folders are listed on a thread pool (``stat`` releases the GIL; network file systems gain most),
one depth level at a time so the result does not depend on which thread finishes first. A tqdm
bar on stderr counts the files found once there are more than ``PROGRESS_MIN_FILES`` (shown only
on a terminal).

The cache, ``index_cache_dir()/<sha256 of the real path and the format version>.npz``, holds the
index, the folders listed with their ``st_mtime_ns`` and inode, and the unreadable entries. It is
reused when every folder has the same mtime (no file added, removed or renamed), every indexed
file the same size and mtime (none modified in place: one ``stat`` each, in parallel) and every
unreadable entry the same reason; otherwise the folder is listed again and the cache overwritten.
A folder modified less than ``RACY_NS`` before the listing started is not trusted (a change in
the same file-system clock tick would leave its mtime unchanged). A cache file that cannot be
read or written is ignored (one warning line for large folders).

Measured with ``python bench/index_startup.py`` (100,000 hard-linked JPEGs in 1,000 class
folders on ext4 (virtio disk), page cache warm, 2 shared cores of an AMD EPYC, median of 3
interleaved runs, 2026-12-06): a fresh :func:`build_index` 1.18 s, :func:`load_index` with a
valid cache 0.51 s (2.3x faster, 0.67 s saved; cache file 5.4 MiB). The cached load is almost all
the one ``stat`` per file that proves no file changed (about 4 us each here; the thread pool does
not speed that up on 2 busy cores, it is there for network file systems where a ``stat`` waits
on the server).
"""

from __future__ import annotations

import functools
import hashlib
import os
import stat
import sys
import time
import warnings
from collections import defaultdict
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from nnclr.data.decode import IMAGE_EXTENSIONS, is_image_file
from nnclr.data.index import (
    FORMAT_VERSION,
    FileIndex,
    check_packed,
    one_line,
    pack_strings,
    read_npz,
    unpack_strings,
    write_npz,
)
from nnclr.errors import UserError
from nnclr.machine import usable_cpus

PROGRESS_MIN_FILES = 200
RACY_NS = 2_000_000_000  # 2 s: the coarsest common mtime resolution (FAT); ext4, xfs, NFS are finer
EXTENSIONS = " ".join(sorted(e.lstrip(".") for e in IMAGE_EXTENSIONS))


_THREADS = min(8, 4 * len(usable_cpus()))


# ---------------------------------------------------------------------------- listing


@functools.lru_cache(maxsize=1024)
def _image_suffix(suffix: str) -> bool:
    return is_image_file(Path("f" + suffix))


def is_image_name(name: str) -> bool:
    """:func:`is_image_file` of a file name, memoised on its extension (4x faster than a ``Path`` each)."""
    return not name.startswith(".") and _image_suffix(os.path.splitext(name)[1])


_KINDS = {stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a character device",
          stat.S_IFBLK: "a block device", stat.S_IFDIR: "a directory"}  # fmt: skip


def _not_regular(mode: int) -> str:
    return f"not a regular file ({_KINDS.get(stat.S_IFMT(mode), 'special file')})"


@dataclass
class _Listing:
    """What listing one folder found (paths relative to the split folder, posix)."""

    files: list[tuple[str, int, int]] = field(default_factory=list)  # (relpath, size, mtime_ns)
    subdirs: list[tuple[str, tuple[int, int], int]] = field(default_factory=list)  # (relpath, (dev, ino), mtime_ns)
    bad: list[tuple[str, str]] = field(default_factory=list)  # (relpath, reason)


@dataclass
class _Dir:
    """A folder to list: its relative path, its top-level class folder (-1: the split folder), identity, mtime."""

    rel: str
    top: int
    key: tuple[int, int]
    mtime_ns: int


def _add_entry(listing: _Listing, entry: os.DirEntry, rel: str) -> None:
    """Sort one directory entry into ``listing``: one ``stat`` (following symlinks) for folders and image names."""
    name = entry.name
    if name.startswith("."):
        return
    try:
        if not entry.is_dir() and not is_image_name(name):  # is_dir follows symlinks; raises for a loop
            return
        st = entry.stat()
    except OSError as error:  # vanished, dangling symlink, symlink loop
        if is_image_name(name):
            listing.bad.append((rel, one_line(error)))
        return
    if stat.S_ISDIR(st.st_mode):
        listing.subdirs.append((rel, (st.st_dev, st.st_ino), st.st_mtime_ns))
    elif not is_image_name(name):
        return
    elif stat.S_ISREG(st.st_mode):
        listing.files.append((rel, st.st_size, st.st_mtime_ns))
    else:
        listing.bad.append((rel, _not_regular(st.st_mode)))


def _list_dir(folder: str, rel: str) -> _Listing | str:
    """List ``folder/rel``; the reason as text if it cannot be listed."""
    listing = _Listing()
    try:
        with os.scandir(os.path.join(folder, rel) if rel else folder) as entries:
            for entry in entries:
                _add_entry(listing, entry, f"{rel}/{entry.name}" if rel else entry.name)
    except OSError as error:
        return one_line(error)
    return listing


class _Progress:
    """Counts files on a tqdm bar (stderr) created once the count passes ``PROGRESS_MIN_FILES``.

    ``show``: ``True`` always, ``False`` never, ``None`` past the threshold and only on a terminal.
    """

    def __init__(self, desc: str, show: bool | None) -> None:
        self.desc, self.show, self.count, self.bar = desc, show, 0, None

    def update(self, n: int) -> None:
        self.count += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.show or (self.show is None and self.count > PROGRESS_MIN_FILES):
            self.bar = tqdm(desc=self.desc, unit="file", file=sys.stderr, initial=self.count,
                            disable=None if self.show is None else False)  # fmt: skip

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _walk(
    folder: str, tops: list[_Dir], pool: Executor, progress: _Progress
) -> tuple[list[_Dir], dict[int, list[tuple[str, int, int]]], list[tuple[str, str]]]:
    """List the ``tops`` folders and everything below them, one depth level at a time on ``pool``.

    A real folder (device, inode) is listed once per top-level folder: the first of its paths in
    (depth, sorted path) order is kept, later ones (symlinked twice, symlink loops) are cut.

    Returns:
        The folders listed, the ``(relpath, size, mtime_ns)`` of the files below each top-level
        folder (by its ``top``), and the ``(relpath, reason)`` of the unreadable entries.
    """
    seen = {(d.top, d.key) for d in tops}
    listed: list[_Dir] = []
    files: dict[int, list[tuple[str, int, int]]] = defaultdict(list)
    bad: list[tuple[str, str]] = []
    level = tops
    while level:
        below: list[_Dir] = []
        for d, listing in zip(level, pool.map(functools.partial(_list_dir, folder), [d.rel for d in level])):
            if isinstance(listing, str):
                bad.append((d.rel, listing))
                continue
            listed.append(d)
            files[d.top].extend(listing.files)
            bad.extend(listing.bad)
            progress.update(len(listing.files))
            for rel, key, mtime in sorted(listing.subdirs):
                if (d.top, key) not in seen:
                    seen.add((d.top, key))
                    below.append(_Dir(rel, d.top, key, mtime))
        level = below
    return listed, files, bad


@dataclass
class _Scan:
    """One listing of a split folder: the index, and what :func:`load_index` needs to trust it later."""

    index: FileIndex
    unreadable: list[tuple[str, str]]  # (relpath, reason)
    ignored: list[str]  # loose images next to class folders
    dirs: list[_Dir]  # the folders listed, with the mtime they had before being listed
    started_ns: int  # time.time_ns() before listing


def _list_root(folder: str) -> tuple[_Dir, _Listing]:
    """Stat and list the split folder itself.

    Raises:
        UserError: If it cannot be listed.
    """
    try:
        st = os.stat(folder)
        listing = _list_dir(folder, "")
        if isinstance(listing, str):
            raise OSError(0, listing)
    except OSError as error:
        raise UserError(f"cannot list {folder} ({one_line(error)}); check its permissions") from None
    return _Dir("", -1, (st.st_dev, st.st_ino), st.st_mtime_ns), listing


def _scan(folder: Path, pool: Executor, show: bool | None) -> _Scan:
    """List ``folder`` under the layout rules of the module docstring.

    Every listing goes through here, never a cache hit: the tests patch it to count listings (a seam).

    Raises:
        UserError: If ``folder`` cannot be listed or holds no image.
    """
    started = time.time_ns()
    where = str(folder)
    root, top = _list_root(where)
    tops = [_Dir(rel, i, key, mtime) for i, (rel, key, mtime) in enumerate(sorted(top.subdirs))]
    progress = _Progress(f"indexing {folder}", show)
    try:
        progress.update(len(top.files))
        listed, by_top, bad = _walk(where, tops, pool, progress)
    finally:
        progress.close()
    classes = [d.rel for d in tops if by_top[d.top]]
    groups = [sorted(by_top[d.top]) for d in tops if by_top[d.top]]
    ignored = sorted(rel for rel, *_ in top.files + top.bad) if classes else []
    if not classes:
        groups, bad = [sorted(top.files)], top.bad + bad
    rows = [row for group in groups for row in group]
    if not rows:
        raise UserError(
            f"no images found in {folder} (extensions: {EXTENSIONS}); put images in it, "
            "or one subfolder of images per class"
        )
    if classes:
        labels = np.repeat(np.arange(len(groups), dtype=np.int64), [len(group) for group in groups])
    else:
        labels = np.full(len(rows), -1, dtype=np.int64)
    index = FileIndex.from_relpaths(folder, [r[0] for r in rows], labels, classes,
                                    [r[1] for r in rows], [r[2] for r in rows])  # fmt: skip
    return _Scan(index, sorted(bad), ignored, [root, *listed], started)


def _finish(folder: Path, scan: _Scan) -> tuple[FileIndex, list[tuple[Path, str]]]:
    """Warn about ignored loose images; the index rooted at ``folder`` as given, and the unreadable entries."""
    if scan.ignored:
        warnings.warn(
            f"{folder}: ignoring {len(scan.ignored)} image(s) lying next to the class subfolders "
            f"(e.g. {scan.ignored[0]}); move them into a class subfolder to use them",
            stacklevel=3,
        )
    scan.index.root = Path(folder)
    return scan.index, [(Path(folder, rel) if rel else Path(folder), reason) for rel, reason in scan.unreadable]


def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=_THREADS, thread_name_prefix="nnclr-index")


def build_index(folder: Path, *, progress: bool | None = None) -> tuple[FileIndex, list[tuple[Path, str]]]:
    """List the image files of a split folder (no cache; see the module docstring for the rules).

    Args:
        folder: The split folder (:func:`nnclr.data.folder.split_folder` picks it).
        progress: Show a bar: ``True`` always, ``False`` never, ``None`` for large folders on a terminal.

    Returns:
        The index, and ``(path, reason)`` of the folders that could not be listed and the entries
        with an image name that are not readable regular files.

    Raises:
        UserError: If ``folder`` cannot be listed or holds no image.
    """
    with _pool() as pool:
        return _finish(Path(folder), _scan(Path(folder), pool, progress))


# ---------------------------------------------------------------------------- cache


def index_cache_dir() -> Path:
    """``$NNCLR_CACHE_DIR/index`` if that variable is set, else ``~/.cache/nnclr/index``."""
    base = os.environ.get("NNCLR_CACHE_DIR")
    return Path(base).expanduser() / "index" if base else Path.home() / ".cache" / "nnclr" / "index"


def index_cache_path(folder: Path) -> Path:
    """The cache file of ``folder``'s index in :func:`index_cache_dir` (one per real path and format version)."""
    key = f"{os.path.realpath(folder)}\0{FORMAT_VERSION}"
    return index_cache_dir() / f"{hashlib.sha256(os.fsencode(key)).hexdigest()}.npz"


def _cache_arrays(folder: Path, scan: _Scan) -> dict[str, np.ndarray]:
    """The index plus what proves it still valid, as named arrays."""
    arrays = scan.index.to_arrays()
    for key, strings in (("real", [os.path.realpath(folder)]), ("dirs", [d.rel for d in scan.dirs]),
                         ("bad", [r for r, _ in scan.unreadable]), ("reasons", [r for _, r in scan.unreadable]),
                         ("ignored", scan.ignored)):  # fmt: skip
        arrays[key], arrays[f"{key}_offsets"] = pack_strings(strings)
    arrays["dir_mtimes"] = np.array([d.mtime_ns for d in scan.dirs], dtype=np.int64)
    arrays["dir_inos"] = np.array([d.key[1] for d in scan.dirs], dtype=np.int64)
    arrays["started_ns"] = np.array([scan.started_ns], dtype=np.int64)
    return arrays


def _read_cache(path: Path, folder: Path) -> _Scan | None:
    """The cached listing of ``folder`` (``None`` if there is none).

    Raises:
        UserError: If the cache file is unreadable, corrupt or for another folder.
    """
    if not os.path.lexists(path):
        return None
    arrays = read_npz(path)
    try:
        index = FileIndex.from_arrays(arrays)
        text = {}
        for key in ("real", "dirs", "bad", "reasons", "ignored"):
            check_packed(arrays[key], arrays[f"{key}_offsets"], key)
            text[key] = unpack_strings(arrays[key], arrays[f"{key}_offsets"])
        if text["real"] != [os.path.realpath(folder)]:
            raise ValueError(f"made for {text['real']}")
        stats = zip(text["dirs"], arrays["dir_mtimes"].tolist(), arrays["dir_inos"].tolist(), strict=True)
        dirs = [_Dir(rel, -1, (0, ino), mtime) for rel, mtime, ino in stats]
        unreadable = list(zip(text["bad"], text["reasons"], strict=True))
        return _Scan(index, unreadable, text["ignored"], dirs, int(arrays["started_ns"][0]))
    except (KeyError, ValueError, IndexError) as error:
        raise UserError(f"{path}: not a valid file index cache ({one_line(error)})") from None


def _stat_all(folder: str, names: np.ndarray, offsets: np.ndarray, pool: Executor, progress: _Progress) -> np.ndarray:
    """``int64 (n, 4)``: file type (``S_IFMT``), size, ``st_mtime_ns``, inode of each ``folder/name``; -1 if missing."""
    prefix, raw, ends = os.fsencode(folder) + b"/", names.tobytes(), offsets.tolist()
    out = np.full((len(ends) - 1, 4), -1, dtype=np.int64)

    def run(lo: int, hi: int) -> int:
        for i in range(lo, hi):
            try:
                st = os.stat(prefix + raw[ends[i] : ends[i + 1]])
            except OSError:
                continue
            out[i] = (stat.S_IFMT(st.st_mode), st.st_size, st.st_mtime_ns, st.st_ino)
        return hi - lo

    step = max(256, len(out) // (8 * _THREADS) + 1)
    starts = range(0, len(out), step)
    for done in pool.map(run, starts, [min(s + step, len(out)) for s in starts]):
        progress.update(done)
    return out


def _unreadable_reason(folder: str, rel: str) -> str | None:
    """Why ``folder/rel`` is not a listable folder or a regular file, as :func:`_scan` words it; ``None`` if it is."""
    path = os.path.join(folder, rel) if rel else folder
    try:
        st = os.stat(path)
    except OSError as error:
        return one_line(error)
    if stat.S_ISDIR(st.st_mode):
        listing = _list_dir(path, "")
        return listing if isinstance(listing, str) else None
    return None if stat.S_ISREG(st.st_mode) else _not_regular(st.st_mode)


def _still_valid(folder: Path, scan: _Scan, pool: Executor, show: bool | None) -> bool:
    """Whether no folder, file or unreadable entry of ``scan`` changed since it was listed."""
    mtimes = np.array([d.mtime_ns for d in scan.dirs], dtype=np.int64)
    if not len(mtimes) or mtimes.max() >= scan.started_ns - RACY_NS:
        return False  # a folder changed just before the listing: a later change may keep its mtime
    where = str(folder)
    progress = _Progress(f"checking the index of {folder}", show)
    try:
        dirs = _stat_all(where, *pack_strings([d.rel for d in scan.dirs]), pool, progress)
        if not (np.all(dirs[:, 0] == stat.S_IFDIR) and np.array_equal(dirs[:, 2], mtimes)
                and np.array_equal(dirs[:, 3], [d.key[1] for d in scan.dirs])):  # fmt: skip
            return False
        files = _stat_all(where, scan.index.path_bytes, scan.index.path_offsets, pool, progress)
    finally:
        progress.close()
    index = scan.index
    if not (np.all(files[:, 0] == stat.S_IFREG) and np.array_equal(files[:, 1], index.sizes)
            and np.array_equal(files[:, 2], index.mtimes)):  # fmt: skip
        return False
    return all(_unreadable_reason(where, rel) == reason for rel, reason in scan.unreadable)


def load_index(
    folder: Path, *, cache: bool = True, progress: bool | None = None
) -> tuple[FileIndex, list[tuple[Path, str]]]:
    """:func:`build_index`, reusing the cached index of ``folder`` while it is still valid.

    Args:
        folder: The split folder.
        cache: Read and write the cache in :func:`index_cache_dir`; ``False``: always build.
        progress: As for :func:`build_index`.

    Returns:
        As :func:`build_index`.

    Raises:
        UserError: If ``folder`` cannot be listed or holds no image. A cache that cannot be read
            or written is not an error (one warning line on stderr, for large folders).
    """
    if not cache:
        return build_index(folder, progress=progress)
    folder, path = Path(folder), index_cache_path(folder)
    problem = None
    with _pool() as pool:
        try:
            scan = _read_cache(path, folder)
        except UserError as error:
            scan, problem = None, f"ignoring the file index cache: {error}"
        if scan is None or not _still_valid(folder, scan, pool, progress):
            scan = _scan(folder, pool, progress)
            try:
                path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                write_npz(path, _cache_arrays(folder, scan))
            except OSError as error:
                problem = f"cannot write the file index cache {path} ({one_line(error)}); indexing again next time"
    if problem and len(scan.index) >= PROGRESS_MIN_FILES:
        print(f"nnclr: warning: {folder}: {problem}", file=sys.stderr)
    return _finish(folder, scan)
