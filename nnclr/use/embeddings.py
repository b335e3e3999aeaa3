"""The embedding directory (EMB_DIR): its files, writing them atomically, opening and checking them.

An EMB_DIR holds three files, each written atomically (a temporary file, then ``os.replace``):

* ``embeddings.npy``: float32 ``(N, F)``, the L2-normalised backbone features ``h`` of NNCLR
  (Dwibedi et al., ICCV 2021: retrieval uses the encoder's pooled output), one row per image;
* ``index.csv``: one line per row: ``index`` (the row), ``path`` (relative to the folder, or
  ``NAME/SPLIT/I`` for a data set), ``label`` (-1 when unknown), ``class``, ``size`` and
  ``mtime_ns`` (what resuming keys a file by);
* ``manifest.json``: the checkpoint (path, SHA-256 prefix, step, config), the preprocessing, the
  source, the number of rows, a hash of the vectors, and the files that were skipped with the
  reason.

:mod:`nnclr.use.embed` fills an EMB_DIR (resumably); search and duplicates read it with
:func:`open_embeddings`, which refuses files that do not belong together.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nnclr import rundir
from nnclr.errors import UserError
from nnclr.rundir import tmp_path

FORMAT_VERSION = 1
EMBEDDINGS_FILE = "embeddings.npy"
INDEX_FILE = "index.csv"
MANIFEST_FILE = "manifest.json"
INDEX_COLUMNS = ("index", "path", "label", "class", "size", "mtime_ns")


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


def _write_tmp(path: Path, write: Callable[[io.BufferedWriter], None]) -> Path:
    """Write ``path``'s temporary sibling through ``write(file)``, flushed to disk; returns it."""
    tmp = tmp_path(path)
    with open(tmp, "wb") as file:
        write(file)
        file.flush()
        os.fsync(file.fileno())
    return tmp


def write_atomic(path: Path, write: Callable[[io.BufferedWriter], None]) -> None:
    """Write ``path`` through ``write(file)`` into a temporary file beside it, then rename it.

    Raises:
        UserError: The disk is full or read-only (``path`` is left as it was).
    """
    rundir.write_atomic(path, write, what="the file")


def vectors_hash(vectors: np.ndarray) -> str:
    """16 hex digits of the SHA-256 of the vectors' bytes (detects a changed or corrupt .npy)."""
    return hashlib.sha256(np.ascontiguousarray(vectors, dtype=np.float32).tobytes()).hexdigest()[:16]


def save_embeddings(out: Path, vectors: np.ndarray, entries: Sequence[Entry], manifest: dict[str, Any]) -> None:
    """Write the three files of an EMB_DIR.

    All three are written to temporary files first and renamed only when all are complete, the
    manifest (which names the vectors' hash) last: an interruption while writing leaves the
    previous EMB_DIR as it was.
    """
    out.mkdir(parents=True, exist_ok=True)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)

    def write_index(file: io.BufferedWriter) -> None:
        text = io.StringIO()
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow(INDEX_COLUMNS)
        for i, e in enumerate(entries):
            writer.writerow((i, e.path, e.label, e.cls, e.size, e.mtime_ns))
        file.write(text.getvalue().encode("utf-8"))

    manifest = {**manifest, "count": len(entries), "embeddings_sha256": vectors_hash(vectors)}
    written = [
        (_write_tmp(out / EMBEDDINGS_FILE, lambda f: np.save(f, vectors, allow_pickle=False)), out / EMBEDDINGS_FILE),
        (_write_tmp(out / INDEX_FILE, write_index), out / INDEX_FILE),
        (_write_tmp(out / MANIFEST_FILE, lambda f: f.write(json.dumps(manifest, indent=1).encode("utf-8"))),
         out / MANIFEST_FILE),
    ]
    for tmp, path in written:
        os.replace(tmp, path)


def _broken(root: Path, what: str) -> UserError:
    return UserError(
        f"{root} is not a usable embedding directory: {what}; re-create it with `nnclr embed ... --out {root} --fresh`"
    )


def open_embeddings(root: str | Path) -> Embeddings:
    """Open and check an EMB_DIR written by :func:`save_embeddings`.

    Raises:
        UserError: missing directory or files, a corrupt or truncated ``.npy``, or files that do not
            belong together (row counts or the vectors' hash differ from the manifest).
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise UserError(f"embedding directory {root} not found; create it with `nnclr embed --out {root}`")
    manifest_path = root / MANIFEST_FILE
    if not manifest_path.is_file():
        raise UserError(f"{root} has no {MANIFEST_FILE}; is it an output folder of `nnclr embed`?")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        if manifest.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"format_version {manifest.get('format_version')!r}, expected {FORMAT_VERSION}")
    except (ValueError, OSError) as error:
        raise _broken(root, f"{MANIFEST_FILE} cannot be read ({error})") from None
    try:
        vectors = np.load(root / EMBEDDINGS_FILE, allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        reason = " ".join(str(error).split())[:160] or type(error).__name__
        raise _broken(root, f"{EMBEDDINGS_FILE} is corrupt or missing ({reason})") from None
    if vectors.dtype != np.float32 or vectors.ndim != 2:
        raise _broken(root, f"{EMBEDDINGS_FILE} holds {vectors.dtype} {vectors.shape}, not float32 (N, F)")
    if vectors_hash(vectors) != manifest.get("embeddings_sha256"):
        raise _broken(root, f"{EMBEDDINGS_FILE} does not match the hash in {MANIFEST_FILE} (changed or corrupt)")
    try:
        with open(root / INDEX_FILE, encoding="utf-8", newline="") as file:
            rows = list(csv.DictReader(file))
        entries = [
            Entry(r["path"], int(r["label"]), r["class"], int(r["size"]), int(r["mtime_ns"])) for r in rows
        ]
    except (OSError, KeyError, ValueError, TypeError) as error:
        raise _broken(root, f"{INDEX_FILE} cannot be read ({error})") from None
    if not len(entries) == vectors.shape[0] == manifest.get("count"):
        raise _broken(root, f"{INDEX_FILE} has {len(entries)} rows, {EMBEDDINGS_FILE} {vectors.shape[0]}")
    return Embeddings(root, vectors, entries, manifest)



def warn_if_incomplete(embeddings: Embeddings) -> None:
    """Say on stderr when an EMB_DIR holds the saved progress of an interrupted ``nnclr embed``."""
    if embeddings.manifest.get("complete") is False:
        print(
            f"note: {embeddings.root} holds {len(embeddings)} images of an interrupted `nnclr embed`; "
            "run the same command again to embed the rest", file=sys.stderr,
        )
