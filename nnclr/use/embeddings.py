"""The embedding directory (EMB_DIR): its files, committing them together, opening and checking them.

An EMB_DIR holds three files:

* ``embeddings.npy``: float32 ``(N, F)``, the L2-normalised backbone features ``h`` of NNCLR
  (Dwibedi et al., ICCV 2021: retrieval uses the encoder's pooled output), one row per image;
* ``index.csv``: one line per row: ``index`` (the row), ``path`` (relative to the folder, or
  ``NAME/SPLIT/I`` for a data set), ``label`` (-1 when unknown), ``class``, ``size`` and
  ``mtime_ns`` (what resuming keys a file by);
* ``manifest.json``: the checkpoint (path, SHA-256 prefix, step, config), the preprocessing, the
  source, the number of rows, a hash of the vectors, the files that were skipped with the
  reason, and the ``commit`` that wrote the files.

Committing (:func:`save_embeddings`). The three files must change together, and no file system
renames three files at once. So the new ``embeddings.npy`` and ``index.csv`` are first written in
full beside the old ones under names of this commit (``.embeddings.npy.<commit>``,
``.index.csv.<commit>``, each written atomically and flushed to disk); then ``manifest.json``,
naming the commit, replaces the old manifest in one atomic rename: *that rename is the commit*.
Last, the two staged files are renamed over ``embeddings.npy`` and ``index.csv``. A kill before the
manifest's rename leaves the previous EMB_DIR as it was (the next write removes the staged
files); a kill after it leaves a manifest whose staged files are still there: every reader
(:func:`open_embeddings`) reads those, and finishes the renames when it may write. Why this
design: it keeps the documented file names (a generation folder or a symbolic link would not),
a folder cannot atomically replace a non-empty one, and recovering needs no hashing, only the
manifest's ``commit``. A full or read-only disk: one line naming the file, the previous EMB_DIR
intact, nothing staged left (:mod:`nnclr.rundir` writes each file).

:mod:`nnclr.use.embed` fills an EMB_DIR (resumably); search and duplicates read it with
:func:`open_embeddings`, which refuses files that do not belong together, and crafted or damaged
ones, in one line.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import secrets
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nnclr import rundir
from nnclr.errors import UserError

FORMAT_VERSION = 1
EMBEDDINGS_FILE = "embeddings.npy"
INDEX_FILE = "index.csv"
MANIFEST_FILE = "manifest.json"
INDEX_COLUMNS = ("index", "path", "label", "class", "size", "mtime_ns")
STAGED_FILES = (EMBEDDINGS_FILE, INDEX_FILE)  # written under the commit's name first, renamed after the manifest
_COMMIT = re.compile(r"[0-9a-f]{16}")
_STAGED = re.compile(r"\.(?:embeddings\.npy|index\.csv)\.([0-9a-f]{16})")

_move = os.replace
"""The renames of staged files into place (with :mod:`nnclr.rundir`'s ``_open``/``_replace``, the seam
where ``tests/test_embed_kills.py`` kills ``nnclr embed``)."""


@dataclass
class Entry:
    """One image of an EMB_DIR (a row of ``index.csv``; ``index`` is its row)."""

    path: str
    label: int = -1
    cls: str = ""
    size: int = 0
    mtime_ns: int = 0

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.path, self.size, self.mtime_ns)


@dataclass
class Embeddings:
    """An opened EMB_DIR: vectors (N, F) float32, their entries and the manifest."""

    root: Path
    vectors: np.ndarray
    entries: list[Entry]
    manifest: dict[str, Any]

    @property
    def checkpoint_hash(self) -> str:
        return str(self.manifest["checkpoint_hash"])

    @property
    def source(self) -> dict[str, Any]:
        return dict(self.manifest["source"])

    def __len__(self) -> int:
        return len(self.entries)

    def tensor(self) -> torch.Tensor:
        """The vectors as a float32 tensor (N, F) sharing memory with :attr:`vectors`."""
        return torch.from_numpy(self.vectors)


# ---------------------------------------------------------------- files


def vectors_hash(vectors: np.ndarray) -> str:
    """16 hex digits of the SHA-256 of the vectors' bytes (detects a changed or corrupt .npy)."""
    return hashlib.sha256(np.ascontiguousarray(vectors, dtype=np.float32).tobytes()).hexdigest()[:16]


def staged_path(root: Path, name: str, commit: str) -> Path:
    """Where commit ``commit`` writes ``name`` (``embeddings.npy`` or ``index.csv``) before it is renamed into place."""
    return root / f".{name}.{commit}"


def _index_bytes(entries: Sequence[Entry]) -> bytes:
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(INDEX_COLUMNS)
    for i, e in enumerate(entries):
        writer.writerow((i, e.path, e.label, e.cls, e.size, e.mtime_ns))
    return text.getvalue().encode("utf-8")


def save_embeddings(out: Path, vectors: np.ndarray, entries: Sequence[Entry], manifest: dict[str, Any]) -> None:
    """Write the three files of an EMB_DIR as one commit (see the module's docstring).

    A commit an earlier process was killed in is finished first, and staged files of commits that
    never happened are removed.

    Raises:
        UserError: The disk is full or read-only (one line naming the file and the reason); the
            previous EMB_DIR is left as it was and nothing of this commit is left behind.
    """
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise rundir.disk_error(out, error, "the embedding directory", "nothing was written") from None
    previous = committed(out)
    if previous is not None:
        finish_commit(out, previous)
    _remove_staged(out, keep=previous)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    commit = secrets.token_hex(8)
    manifest = {**manifest, "count": len(entries), "embeddings_sha256": vectors_hash(vectors), "commit": commit}
    kept = f"the previous embeddings in {out} are intact" if (out / MANIFEST_FILE).exists() else "nothing was saved"
    try:
        rundir.write_atomic(staged_path(out, EMBEDDINGS_FILE, commit),
                            lambda file: np.save(file, vectors, allow_pickle=False), what="the new embeddings",
                            kept=kept)
        index = _index_bytes(entries)
        rundir.write_atomic(staged_path(out, INDEX_FILE, commit), lambda file: file.write(index),
                            what="the new index", kept=kept)
        text = json.dumps(manifest, indent=1).encode("utf-8")
        rundir.write_atomic(out / MANIFEST_FILE, lambda file: file.write(text), what="the manifest", kept=kept)
    except BaseException:
        if committed(out) != commit:  # not committed: nothing of it stays (a full disk gets its space back)
            _remove_staged(out, keep=previous)
        raise
    finish_commit(out, commit)


def committed(root: Path) -> str | None:
    """The commit ``manifest.json`` names, or None (no manifest, an unreadable one, or one written before commits)."""
    try:
        manifest = json.loads((root / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    commit = manifest.get("commit") if isinstance(manifest, dict) else None
    return commit if isinstance(commit, str) and _COMMIT.fullmatch(commit) else None


def finish_commit(root: Path, commit: str) -> None:
    """Rename the staged files of ``commit`` (the one ``manifest.json`` names) into place, if any are left.

    A folder that cannot be written (read-only) is left as it is: readers read the staged files.
    """
    moved = False
    for name in STAGED_FILES:
        staged = staged_path(root, name, commit)
        if not staged.is_file():
            continue
        try:
            _move(staged, root / name)
            moved = True
        except FileNotFoundError:
            continue  # another process finished this commit meanwhile
        except OSError:
            return
    if moved:
        rundir.sync_folder(root)


def _remove_staged(root: Path, keep: str | None) -> None:
    """Remove the staged files of every commit but ``keep`` (commits that were never made); errors are ignored."""
    try:
        names = [entry.name for entry in os.scandir(root)]
    except OSError:
        return
    for name in names:
        match = _STAGED.fullmatch(name)
        if match is not None and match.group(1) != keep:
            try:
                (root / name).unlink()
            except OSError:
                pass


def _current(root: Path, name: str, commit: str | None) -> Path:
    """The file to read for ``name``: the committed staged file while it has not been renamed, else ``root / name``."""
    if commit is not None:
        staged = staged_path(root, name, commit)
        if staged.is_file():
            return staged
    return root / name


# ---------------------------------------------------------------- opening and checking


def _broken(root: Path, what: str, manifest: Any = None) -> UserError:
    """The one-line error for an EMB_DIR that cannot be used, with the command that re-creates it."""
    checkpoint, source = "RUN", "DIR_OR_DATASET"
    if isinstance(manifest, dict):
        if isinstance(manifest.get("checkpoint"), str):
            checkpoint = manifest["checkpoint"]
        given = manifest.get("source")
        if isinstance(given, dict) and isinstance(given.get("path"), str):
            source = given["path"]
        elif isinstance(given, dict) and isinstance(given.get("name"), str):
            source = given["name"]
    return UserError(
        f"{root} is not a usable embedding directory: {what}; re-create it with "
        f"`nnclr embed --checkpoint {checkpoint} --images {source} --out {root} --fresh`"
    )


def _type_name(value: Any) -> str:
    """What a JSON value is, in words."""
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, int):
        return "a whole number"
    return {dict: "an object", list: "a list", str: "a string", float: "a number", type(None): "null"}.get(
        type(value), type(value).__name__)


_FIELDS: dict[str, tuple[type, ...]] = {  # key: its JSON types; the first five are required
    "format_version": (int,),
    "checkpoint_hash": (str,),
    "source": (dict,),
    "count": (int,),
    "embeddings_sha256": (str,),
    "skipped": (list,),
    "checkpoint": (str,),
    "feature_dim": (int,),
    "classes": (list,),
    "complete": (bool,),
    "commit": (str,),
    "precision": (str,),
    "data_root": (str, type(None)),
}
_REQUIRED = ("format_version", "checkpoint_hash", "source", "count", "embeddings_sha256")
_SKIPPED_FIELDS = {"path": str, "reason": str, "size": int, "mtime_ns": int}


def _is(value: Any, kinds: tuple[type, ...]) -> bool:
    """``isinstance`` where a JSON true/false is not a whole number."""
    return isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)


def check_manifest(manifest: Any) -> str | None:
    """What is wrong with a manifest (read from JSON) that nnclr relies on, or None when it is usable."""
    if not isinstance(manifest, dict):
        return f"{MANIFEST_FILE} holds {_type_name(manifest)}, not a JSON object"
    if manifest.get("format_version") != FORMAT_VERSION:
        return f"{MANIFEST_FILE} has format_version {manifest.get('format_version')!r}, expected {FORMAT_VERSION}"
    for key, kinds in _FIELDS.items():
        if key not in manifest:
            if key in _REQUIRED:
                return f"{MANIFEST_FILE} has no {key!r}"
            continue
        value = manifest[key]
        if not _is(value, kinds):
            expected = " or ".join(_type_name(kind()) for kind in kinds)
            return f"{MANIFEST_FILE}: {key!r} is {_type_name(value)}, not {expected}"
    source = manifest["source"]
    wanted = {"folder": ("path",), "dataset": ("name", "split")}.get(source.get("kind"))
    if wanted is None or any(not isinstance(source.get(key), str) for key in wanted):
        return f"{MANIFEST_FILE}: 'source' is not a folder (kind, path) or a data set (kind, name, split)"
    if "commit" in manifest and not _COMMIT.fullmatch(manifest["commit"]):
        return f"{MANIFEST_FILE}: 'commit' is not 16 hex digits"
    if manifest.get("precision", "fp32") not in ("auto", "bf16", "fp32"):
        return f"{MANIFEST_FILE}: 'precision' is {manifest['precision'][:20]!r}, not auto, bf16 or fp32"
    for item in manifest.get("skipped", []):
        if not isinstance(item, dict) or any(not _is(item.get(key), (kind,)) for key, kind in _SKIPPED_FIELDS.items()):
            return f"{MANIFEST_FILE}: an entry of 'skipped' is not an object with path, reason, size and mtime_ns"
    if any(not isinstance(name, str) for name in manifest.get("classes", [])):
        return f"{MANIFEST_FILE}: 'classes' holds something else than names"
    return None


def open_embeddings(root: str | Path) -> Embeddings:
    """Open and check an EMB_DIR written by :func:`save_embeddings` (finishing a commit a kill interrupted).

    Raises:
        UserError: missing directory or files, a corrupt or truncated ``.npy``, a manifest that is
            not what ``nnclr embed`` writes, or files that do not belong together (row counts,
            vector width or the vectors' hash differ from the manifest).
    """
    root = Path(root).expanduser()
    try:
        if not root.is_dir():
            raise UserError(f"embedding directory {root} not found; create it with `nnclr embed --out {root}`")
        manifest_path = root / MANIFEST_FILE
        if not manifest_path.is_file():
            raise UserError(f"{root} has no {MANIFEST_FILE}; is it an output folder of `nnclr embed`?")
    except OSError as error:  # a name too long for the file system, a folder we may not enter
        raise UserError(f"embedding directory {root} cannot be opened ({error.strerror or error}); pass the "
                        "folder `nnclr embed --out` wrote") from None
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as error:
        reason = " ".join(str(error).split())[:160]
        raise _broken(root, f"{MANIFEST_FILE} cannot be read ({reason})") from None
    problem = check_manifest(manifest)
    if problem is not None:
        raise _broken(root, problem, manifest)
    commit = manifest.get("commit")
    if commit is not None:
        finish_commit(root, commit)
    vectors_path = _current(root, EMBEDDINGS_FILE, commit)
    try:
        vectors = np.load(vectors_path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        reason = " ".join(str(error).split())[:160] or type(error).__name__
        raise _broken(root, f"{EMBEDDINGS_FILE} is corrupt or missing ({reason})", manifest) from None
    if vectors.dtype != np.float32 or vectors.ndim != 2:
        raise _broken(root, f"{EMBEDDINGS_FILE} holds {vectors.dtype} {vectors.shape}, not float32 (N, F)", manifest)
    if vectors_hash(vectors) != manifest["embeddings_sha256"]:
        raise _broken(root, f"{EMBEDDINGS_FILE} does not match the hash in {MANIFEST_FILE} (changed or corrupt)",
                      manifest)
    if "feature_dim" in manifest and vectors.shape[1] != manifest["feature_dim"]:
        raise _broken(root, f"{EMBEDDINGS_FILE} holds vectors of width {vectors.shape[1]}, but {MANIFEST_FILE} says "
                      f"the encoder's features have {manifest['feature_dim']}", manifest)
    try:
        with open(_current(root, INDEX_FILE, commit), encoding="utf-8", newline="") as file:
            rows = list(csv.DictReader(file))
        entries = [
            Entry(r["path"], int(r["label"]), r["class"], int(r["size"]), int(r["mtime_ns"])) for r in rows
        ]
    except (OSError, KeyError, ValueError, TypeError) as error:
        reason = " ".join(str(error).split())[:160]
        raise _broken(root, f"{INDEX_FILE} cannot be read ({reason})", manifest) from None
    if not len(entries) == vectors.shape[0] == manifest["count"]:
        raise _broken(root, f"the files do not belong together: {INDEX_FILE} has {len(entries)} rows, "
                      f"{EMBEDDINGS_FILE} {vectors.shape[0]} vectors, {MANIFEST_FILE} says {manifest['count']}",
                      manifest)
    return Embeddings(root, vectors, entries, manifest)


def warn_if_incomplete(embeddings: Embeddings) -> None:
    """Say on stderr when an EMB_DIR holds the saved progress of an interrupted ``nnclr embed``."""
    if embeddings.manifest.get("complete") is False:
        print(
            f"note: {embeddings.root} holds {len(embeddings)} images of an interrupted `nnclr embed`; "
            "run the same command again to embed the rest", file=sys.stderr,
        )
