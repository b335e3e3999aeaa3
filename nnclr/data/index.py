"""The index of the image files of a split folder (:class:`FileIndex`) and its .npz files.

A :class:`FileIndex` holds the relative paths of the files (packed into one byte buffer), their
labels, class names, sizes and ``st_mtime_ns``. :meth:`FileIndex.fingerprint` and
:meth:`FileIndex.changes_from` compare two indexes; :meth:`FileIndex.save` and
:meth:`FileIndex.load` write (atomically) and read it as .npz, without pickle.

:mod:`nnclr.data.scan` lists a folder into a :class:`FileIndex` (in parallel, cached on disk)
under the layout rules of the ``folder:`` source.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nnclr import rundir
from nnclr.errors import UserError

FORMAT_VERSION = 1


# ---------------------------------------------------------------------------- packed strings


def pack_strings(strings: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Pack strings into one buffer: ``uint8 (B,)`` of the ``os.fsencode`` bytes and ``int64 (n + 1,)`` offsets."""
    encoded = [os.fsencode(s) for s in strings]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum(np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded)), out=offsets[1:])
    return np.frombuffer(b"".join(encoded), dtype=np.uint8), offsets


def unpack_strings(buffer: np.ndarray, offsets: np.ndarray) -> list[str]:
    """The strings :func:`pack_strings` packed."""
    raw, ends = buffer.tobytes(), offsets.tolist()
    return [os.fsdecode(raw[a:b]) for a, b in zip(ends, ends[1:])]


def check_packed(buffer: np.ndarray, offsets: np.ndarray, what: str) -> None:
    """Raise ValueError (naming ``what``) unless ``buffer`` and ``offsets`` are what :func:`pack_strings` makes."""
    if buffer.dtype != np.uint8 or offsets.dtype != np.int64 or buffer.ndim != 1 or offsets.ndim != 1:
        raise ValueError(f"{what}: expected uint8 (B,) and int64 (n + 1,) arrays")
    if len(offsets) == 0 or offsets[0] != 0 or offsets[-1] != len(buffer) or np.any(np.diff(offsets) < 0):
        raise ValueError(f"{what}: offsets do not index the buffer")


# ---------------------------------------------------------------------------- the index


@dataclass(eq=False, repr=False)
class FileIndex:
    """The image files of one split folder, their labels, sizes and mtimes.

    The relative paths are stored packed (``path_bytes``: ``uint8 (B,)`` UTF-8 bytes, ``path_offsets``:
    ``int64 (N + 1,)``), not as ``N`` Python strings: a million paths cost tens of MB, and forked
    ``DataLoader`` workers share those pages (no reference count is written into them).

    Attributes:
        root: The split folder listed, as given (not resolved).
        labels: ``int64 (N,)`` class of each file, ``-1`` when unlabelled.
        classes: Class names (``[]`` when unlabelled).
        sizes: ``int64 (N,)`` file sizes in bytes.
        mtimes: ``int64 (N,)`` ``st_mtime_ns`` of each file.
    """

    root: Path
    labels: np.ndarray
    classes: list[str]
    sizes: np.ndarray
    mtimes: np.ndarray
    path_bytes: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint8))
    path_offsets: np.ndarray = field(default_factory=lambda: np.zeros(1, np.int64))

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        self.classes = list(self.classes)
        for name in ("labels", "sizes", "mtimes"):
            array = np.asarray(getattr(self, name))
            if array.ndim != 1 or (array.size and array.dtype.kind not in "iu"):
                raise ValueError(f"{name}: expected a 1-D integer array")
            setattr(self, name, np.ascontiguousarray(array, dtype=np.int64))
        check_packed(self.path_bytes, self.path_offsets, "paths")
        n = len(self.path_offsets) - 1
        if not len(self.labels) == len(self.sizes) == len(self.mtimes) == n:
            counts = f"{len(self.labels)} labels, {len(self.sizes)} sizes, {len(self.mtimes)} mtimes"
            raise ValueError(f"{n} paths but {counts}")
        low = 0 if self.classes else -1
        high = len(self.classes) - 1 if self.classes else -1
        if n and (self.labels.min() < low or self.labels.max() > high):
            raise ValueError(f"labels outside {low}..{high} for {len(self.classes)} classes")

    @classmethod
    def from_relpaths(
        cls,
        root: Path,
        relpaths: Sequence[str],
        labels: Sequence[int] | np.ndarray,
        classes: Sequence[str],
        sizes: Sequence[int] | np.ndarray,
        mtimes: Sequence[int] | np.ndarray,
    ) -> FileIndex:
        """Build an index from posix relative paths (packed here) and the per-file arrays (N,)."""
        names, offsets = pack_strings(relpaths)
        return cls(Path(root), np.asarray(labels), list(classes), np.asarray(sizes), np.asarray(mtimes), names, offsets)

    def __len__(self) -> int:
        return len(self.path_offsets) - 1

    def __repr__(self) -> str:
        return f"FileIndex(root={str(self.root)!r}, files={len(self)}, classes={len(self.classes)})"

    def relpath(self, i: int) -> str:
        """The posix path of file ``i`` relative to :attr:`root`."""
        i = range(len(self))[i]  # negative indices as for a list; IndexError past the end
        return os.fsdecode(self.path_bytes[self.path_offsets[i] : self.path_offsets[i + 1]].tobytes())

    def relpaths(self) -> list[str]:
        """All relative paths (N Python strings: for small folders and comparisons)."""
        return unpack_strings(self.path_bytes, self.path_offsets)

    def path(self, i: int) -> str:
        """``os.path.join(str(root), relpath(i))``."""
        return os.path.join(str(self.root), self.relpath(i))

    def paths(self) -> list[Path]:
        """All files as ``root / relpath`` (N ``Path`` objects: for small folders)."""
        return [self.root / rel for rel in self.relpaths()]

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The index as named arrays (what :meth:`save` writes)."""
        root, root_offsets = pack_strings([str(self.root)])
        classes, class_offsets = pack_strings(self.classes)
        return {
            "format": np.array([FORMAT_VERSION], dtype=np.int64),
            "root": root, "root_offsets": root_offsets,
            "paths": self.path_bytes, "path_offsets": self.path_offsets,
            "classes": classes, "class_offsets": class_offsets,
            "labels": self.labels, "sizes": self.sizes, "mtimes": self.mtimes,
        }  # fmt: skip

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> FileIndex:
        """The index :meth:`to_arrays` described.

        Raises:
            KeyError, ValueError: A missing array, another format version, inconsistent arrays.
        """
        version = arrays["format"].tolist()
        if version != [FORMAT_VERSION]:
            raise ValueError(f"format version {version}, expected {FORMAT_VERSION}")
        check_packed(arrays["root"], arrays["root_offsets"], "root")
        check_packed(arrays["classes"], arrays["class_offsets"], "classes")
        roots = unpack_strings(arrays["root"], arrays["root_offsets"])
        if len(roots) != 1:
            raise ValueError("expected one root")
        classes = unpack_strings(arrays["classes"], arrays["class_offsets"])
        return cls(Path(roots[0]), arrays["labels"], classes, arrays["sizes"], arrays["mtimes"],
                   arrays["paths"], arrays["path_offsets"])  # fmt: skip

    def fingerprint(self) -> str:
        """SHA-256 (hex) over the relative paths, labels, classes, sizes and mtimes (not the root)."""
        digest = hashlib.sha256(b"nnclr.FileIndex")
        classes, class_offsets = pack_strings(self.classes)
        for array in (self.path_bytes, self.path_offsets, self.labels, classes, class_offsets, self.sizes, self.mtimes):
            data = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
            digest.update(len(data).to_bytes(8, "little") + data)
        return digest.hexdigest()

    def changes_from(self, old: FileIndex) -> str | None:
        """What changed from ``old`` to this index, in one line; ``None`` when nothing did.

        Example: ``"2 files added (e.g. cats/x.jpg), 1 removed (e.g. dogs/y.jpg), 3 modified
        (e.g. cats/z.jpg: size 100 -> 120 bytes)"``; class names added or removed come first.
        """
        if self.fingerprint() == old.fingerprint():
            return None
        parts = _class_changes(old.classes, self.classes) + _file_changes(old, self)
        return ", ".join(parts) or "same files, classes, sizes and mtimes, but other labels or order"

    def save(self, path: Path) -> None:
        """Write the index to ``path`` (.npz, no pickle) with :func:`nnclr.rundir.write_atomic`: atomically,
        never through a symlink it did not create.

        Raises:
            UserError: If the file cannot be written, naming it and the reason (no temporary file is left behind).
        """
        arrays = self.to_arrays()
        rundir.write_atomic(Path(path), lambda file: np.savez(file, **arrays), what="the file index")

    @classmethod
    def load(cls, path: Path) -> FileIndex:
        """Read an index :meth:`save` wrote.

        Raises:
            UserError: One line, if the file is missing, unreadable, corrupt or of another format.
        """
        arrays = read_npz(Path(path))
        try:
            return cls.from_arrays(arrays)
        except (KeyError, ValueError) as error:
            raise UserError(f"{path}: not a valid file index ({one_line(error)}); delete it to rebuild it") from None


def _some(names: Sequence[str], shown: int = 3) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def _class_changes(old: list[str], new: list[str]) -> list[str]:
    """``["1 class added (emu)", "2 classes removed (cat, dog)"]``, or ``[]``."""
    parts = []
    for verb, names in (("added", sorted(set(new) - set(old))), ("removed", sorted(set(old) - set(new)))):
        if names:
            parts.append(f"{len(names)} {'class' if len(names) == 1 else 'classes'} {verb} ({_some(names)})")
    return parts


def _modification(rel: str, size: tuple[int, int], mtime: tuple[int, int]) -> str:
    if size[0] != size[1]:
        return f"{rel}: size {size[0]} -> {size[1]} bytes"
    return f"{rel}: same size, mtime {(mtime[1] - mtime[0]) / 1e9:+.6g} s"


def _file_changes(old: FileIndex, new: FileIndex) -> list[str]:
    """``["2 files added (e.g. a/x.jpg)", "1 removed (e.g. ...)", "3 modified (e.g. ...)"]``, or ``[]``."""
    old_rel, new_rel = old.relpaths(), new.relpaths()
    old_at = {rel: i for i, rel in enumerate(old_rel)}
    new_at = set(new_rel)
    added = [rel for rel in new_rel if rel not in old_at]
    removed = [rel for rel in old_rel if rel not in new_at]
    common = [(i, old_at[rel]) for i, rel in enumerate(new_rel) if rel in old_at]
    pairs = np.array(common, dtype=np.int64).reshape(-1, 2)
    n, o = pairs[:, 0], pairs[:, 1]
    changed = np.flatnonzero((new.sizes[n] != old.sizes[o]) | (new.mtimes[n] != old.mtimes[o]))
    parts = []
    if added:
        parts.append(f"{len(added)} added (e.g. {added[0]})")
    if removed:
        parts.append(f"{len(removed)} removed (e.g. {removed[0]})")
    if len(changed):
        i, j = n[changed[0]], o[changed[0]]
        example = _modification(new_rel[i], (old.sizes[j], new.sizes[i]), (old.mtimes[j], new.mtimes[i]))
        parts.append(f"{len(changed)} modified (e.g. {example})")
    if parts:
        count = parts[0].split(" ", 1)
        parts[0] = f"{count[0]} {'file' if count[0] == '1' else 'files'} {count[1]}"
    return parts


# ---------------------------------------------------------------------------- .npz files


def one_line(error: BaseException) -> str:
    """The reason an error gives, on one line (an OSError's ``strerror``, else its message, else its type)."""
    text = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
    return " ".join(text.split()) or type(error).__name__


def tmp_path(path: Path, attempt: int) -> Path:
    """The temporary file :func:`write_npz` tries at ``attempt`` (next to ``path``, for ``os.replace``)."""
    return path.with_name(f".{path.name}.{os.getpid()}.{attempt}.tmp")


def _create_tmp(path: Path, attempts: int = 8) -> tuple[int, Path]:
    """Create a new temporary file next to ``path``; an existing entry (a planted symlink) is never opened."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    for attempt in range(attempts):
        tmp = tmp_path(path, attempt)
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"{tmp_path(path, 0)} and {attempts - 1} more temporary names exist")


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write ``arrays`` to ``path`` as .npz through a temporary file and ``os.replace``."""
    fd, tmp = _create_tmp(path)
    try:
        with os.fdopen(fd, "wb") as file:
            np.savez(file, **arrays)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# What np.load raises on a damaged .npz (RuntimeError covers zipfile's NotImplementedError for odd flags).
_CORRUPT = (OSError, ValueError, EOFError, KeyError, OverflowError, RuntimeError, zipfile.BadZipFile, zlib.error)


def read_npz(path: Path) -> dict[str, np.ndarray]:
    """All arrays of an .npz file, without pickle.

    Raises:
        UserError: One line, if the file is missing, unreadable or not an .npz archive.
    """
    try:
        npz = np.load(path, allow_pickle=False)
        if not isinstance(npz, np.lib.npyio.NpzFile):
            raise ValueError("not an .npz archive")
        with npz:
            return {key: npz[key] for key in npz.files}
    except _CORRUPT as error:
        raise UserError(f"{path}: cannot read this file index ({one_line(error)}); delete it to rebuild it") from None
