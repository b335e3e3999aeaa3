"""The embedding directory (EMB_DIR) and resumable embedding of a folder or a data set.

An EMB_DIR holds three files, each written atomically (a temporary file, then ``os.replace``):

* ``embeddings.npy``: float32 ``(N, F)``, the L2-normalised backbone features ``h`` of NNCLR
  (Dwibedi et al., ICCV 2021: retrieval uses the encoder's pooled output), one row per image;
* ``index.csv``: one line per row: ``index`` (the row), ``path`` (relative to the folder, or
  ``NAME/SPLIT/I`` for a data set), ``label`` (-1 when unknown), ``class``, ``size`` and
  ``mtime_ns`` (what resuming keys a file by);
* ``manifest.json``: the checkpoint (path, SHA-256 prefix, step, config), the preprocessing, the
  source, the number of rows, a hash of the vectors, and the files that were skipped with the
  reason.

Resuming: a file is keyed by (relative path, size, mtime_ns). A re-run embeds only new or changed
files, drops removed ones and keeps the rest; unreadable files are not retried until they change.
A re-run with another checkpoint or another source is refused unless ``fresh`` is set, which
re-embeds everything.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from nnclr import __version__
from nnclr.config import to_dict
from nnclr.data.decode import IMAGE_EXTENSIONS, load_square
from nnclr.data.folder import _images_below
from nnclr.errors import UserError
from nnclr.pretrained import Pretrained

FORMAT_VERSION = 1
EMBEDDINGS_FILE = "embeddings.npy"
INDEX_FILE = "index.csv"
MANIFEST_FILE = "manifest.json"
INDEX_COLUMNS = ("index", "path", "label", "class", "size", "mtime_ns")
CHUNK = 256  # files decoded and embedded together
_THREADS = 2


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


@dataclass
class EmbedReport:
    """What one ``embed`` call did."""

    out: Path
    total: int
    embedded: int
    reused: int
    removed: int
    skipped: list[dict[str, Any]] = field(default_factory=list)
    embed_seconds: float = 0.0
    seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        """Images embedded per second of decoding + embedding (loading the checkpoint not counted)."""
        return self.embedded / self.embed_seconds if self.embed_seconds > 0 else 0.0


# ---------------------------------------------------------------- files


def write_atomic(path: Path, write: Callable[[io.BufferedWriter], None]) -> None:
    """Write ``path`` through ``write(file)`` into a temporary file beside it, then rename it."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as file:
        write(file)
        file.flush()
        os.fsync(file.fileno())
    os.replace(tmp, path)


def vectors_hash(vectors: np.ndarray) -> str:
    """16 hex digits of the SHA-256 of the vectors' bytes (detects a changed or corrupt .npy)."""
    return hashlib.sha256(np.ascontiguousarray(vectors, dtype=np.float32).tobytes()).hexdigest()[:16]


def save_embeddings(out: Path, vectors: np.ndarray, entries: Sequence[Entry], manifest: dict[str, Any]) -> None:
    """Write the three files of an EMB_DIR, the manifest last (it names the hash of the vectors)."""
    out.mkdir(parents=True, exist_ok=True)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    write_atomic(out / EMBEDDINGS_FILE, lambda f: np.save(f, vectors, allow_pickle=False))

    def write_index(file: io.BufferedWriter) -> None:
        text = io.StringIO()
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow(INDEX_COLUMNS)
        for i, e in enumerate(entries):
            writer.writerow((i, e.path, e.label, e.cls, e.size, e.mtime_ns))
        file.write(text.getvalue().encode("utf-8"))

    write_atomic(out / INDEX_FILE, write_index)
    manifest = {**manifest, "count": len(entries), "embeddings_sha256": vectors_hash(vectors)}
    write_atomic(out / MANIFEST_FILE, lambda f: f.write(json.dumps(manifest, indent=1).encode("utf-8")))


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


# ---------------------------------------------------------------- sources


def scan_images(folder: Path) -> tuple[list[Path], list[str]]:
    """All image files at any depth below ``folder`` (sorted), and the class names.

    A file inside a top-level subfolder gets that subfolder as its class (as torchvision's
    ``ImageFolder``); files directly in ``folder`` are unlabelled.

    Raises:
        UserError: ``folder`` is missing or holds no image files.
    """
    if not folder.is_dir():
        raise UserError(f"{folder}: no such directory; pass a folder of images or a data set name (e.g. demo)")
    files = _images_below(folder)
    if not files:
        extensions = " ".join(sorted(e.lstrip(".") for e in IMAGE_EXTENSIONS))
        raise UserError(f"no images found in {folder} (extensions: {extensions}); pass a folder that holds images")
    classes = sorted({f.relative_to(folder).parts[0] for f in files if len(f.relative_to(folder).parts) > 1})
    return files, classes


def folder_entries(folder: Path) -> tuple[list[Entry], list[str]]:
    """The entries of every image below ``folder`` with the keys resuming compares."""
    files, classes = scan_images(folder)
    label_of = {name: i for i, name in enumerate(classes)}
    entries = []
    for f in files:
        rel = f.relative_to(folder)
        stat = f.stat()
        top = rel.parts[0] if len(rel.parts) > 1 else ""
        entries.append(Entry(rel.as_posix(), label_of.get(top, -1), top, stat.st_size, stat.st_mtime_ns))
    return entries, classes


# ---------------------------------------------------------------- embedding


def _try_load(path: Path, size: int) -> np.ndarray | str:
    """A decoded uint8 (3, S, S) array, or the reason the file cannot be read."""
    try:
        return load_square(path, size)
    except UserError as error:
        text = str(error)
        start, end = text.find("("), text.rfind(")")
        return text[start + 1 : end] if 0 <= start < end else text


def _decoded_chunks(files: list[Path], size: int) -> Iterator[list[np.ndarray | str]]:
    """Decode ``files`` in chunks on two threads, one chunk ahead of the caller's compute."""
    with ThreadPoolExecutor(max_workers=_THREADS) as pool:
        starts = range(0, len(files), CHUNK)
        pending = None
        for start in starts:
            future = [pool.submit(_try_load, f, size) for f in files[start : start + CHUNK]]
            if pending is not None:
                yield [f.result() for f in pending]
            pending = future
        if pending is not None:
            yield [f.result() for f in pending]


def _bar(total: int, desc: str, progress: bool) -> tqdm:
    return tqdm(total=total, desc=desc, unit="img", file=sys.stderr, disable=not progress or total < CHUNK)


def embed_files(
    pretrained: Pretrained, files: list[Path], progress: bool = False
) -> tuple[np.ndarray, list[int], dict[int, str]]:
    """Embed image files, skipping unreadable ones.

    Returns:
        ``(vectors (M, F) float32, positions in files of the M embedded ones, {position: reason})``.
    """
    vectors: list[torch.Tensor] = []
    done: list[int] = []
    failed: dict[int, str] = {}
    with _bar(len(files), "embedding", progress) as bar:
        start = 0
        for chunk in _decoded_chunks(files, pretrained.image_size):
            arrays = []
            for offset, item in enumerate(chunk):
                if isinstance(item, str):
                    failed[start + offset] = item
                else:
                    arrays.append(item)
                    done.append(start + offset)
            if arrays:
                vectors.append(pretrained.embed(torch.from_numpy(np.stack(arrays))))
            start += len(chunk)
            bar.update(len(chunk))
    out = torch.cat(vectors).numpy() if vectors else np.zeros((0, pretrained.feature_dim), np.float32)
    return out, done, failed


def embed_tensor(pretrained: Pretrained, images: torch.Tensor, progress: bool = False, chunk: int = 1024) -> np.ndarray:
    """Embed an in-memory uint8 batch (N, 3, H, W) -> float32 (N, F), in chunks."""
    out = []
    with _bar(images.shape[0], "embedding", progress) as bar:
        for start in range(0, images.shape[0], chunk):
            out.append(pretrained.embed(images[start : start + chunk]))
            bar.update(min(chunk, images.shape[0] - start))
    return torch.cat(out).numpy()


def _base_manifest(pretrained: Pretrained, source: dict[str, Any]) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "nnclr_version": __version__,
        "checkpoint": str(pretrained.checkpoint.resolve()),
        "checkpoint_hash": pretrained.checkpoint_hash,
        "step": pretrained.step,
        "config": to_dict(pretrained.config),
        "preprocessing": pretrained.preprocessing(),
        "precision": str(pretrained.dtype).removeprefix("torch."),
        "features": "backbone h (pooled), L2-normalised",
        "feature_dim": pretrained.feature_dim,
        "source": source,
    }


def _previous(out: Path, pretrained: Pretrained, source: dict[str, Any], fresh: bool) -> Embeddings | None:
    """The EMB_DIR's current contents to resume from, or None; refuses a mismatch unless ``fresh``."""
    if fresh or not (out / MANIFEST_FILE).exists():
        return None
    old = open_embeddings(out)
    if old.checkpoint_hash != pretrained.checkpoint_hash:
        raise UserError(
            f"{out} holds embeddings of checkpoint {old.checkpoint_hash} ({old.manifest.get('checkpoint')}), "
            f"not of {pretrained.checkpoint} ({pretrained.checkpoint_hash}); pass --fresh to re-embed everything "
            "with this checkpoint, or choose another --out"
        )
    if old.source != source:
        raise UserError(
            f"{out} holds embeddings of {old.source}, not of {source}; pass --fresh to replace them, "
            "or choose another --out"
        )
    return old


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; pass a directory for the embeddings")


def embed_folder(
    pretrained: Pretrained, folder: str | Path, out: str | Path, *, fresh: bool = False, progress: bool = False
) -> EmbedReport:
    """Embed every image below ``folder`` into the EMB_DIR ``out``, resuming what is already there.

    Raises:
        UserError: no images, no readable image, a previous EMB_DIR of another checkpoint or source
            (without ``fresh``), or a broken one.
    """
    begin = time.perf_counter()
    folder, out = Path(folder).expanduser().resolve(), Path(out).expanduser()
    _check_out(out)
    entries, classes = folder_entries(folder)
    source = {"kind": "folder", "path": str(folder)}
    old = _previous(out, pretrained, source, fresh)
    old_rows = {e.key: i for i, e in enumerate(old.entries)} if old else {}
    old_skipped = {(s["path"], s["size"], s["mtime_ns"]): s for s in old.manifest["skipped"]} if old else {}

    todo = [i for i, e in enumerate(entries) if e.key not in old_rows and e.key not in old_skipped]
    embed_start = time.perf_counter()
    new_vectors, done, failed = embed_files(pretrained, [folder / entries[i].path for i in todo], progress)
    embed_seconds = time.perf_counter() - embed_start
    row_of_new = {todo[j]: r for r, j in enumerate(done)}
    reason_of = {todo[j]: reason for j, reason in failed.items()}
    reason_of.update({i: old_skipped[e.key]["reason"] for i, e in enumerate(entries) if e.key in old_skipped})

    kept, rows, skipped = [], [], []
    for i, entry in enumerate(entries):
        if entry.key in old_rows:
            kept.append(entry)
            rows.append(old.vectors[old_rows[entry.key]])
        elif i in row_of_new:
            kept.append(entry)
            rows.append(new_vectors[row_of_new[i]])
        else:
            skipped.append(
                {"path": entry.path, "reason": reason_of[i], "size": entry.size, "mtime_ns": entry.mtime_ns}
            )
    if not kept:
        first = f" (first: {skipped[0]['path']}: {skipped[0]['reason']})" if skipped else ""
        raise UserError(f"none of the {len(entries)} image files in {folder} could be read{first}")
    current = {e.path for e in entries}
    removed = sum(e.path not in current for e in old.entries) if old else 0
    reused = sum(e.key in old_rows for e in kept)
    manifest = {**_base_manifest(pretrained, source), "classes": classes, "skipped": skipped}
    unchanged = old is not None and old.entries == kept and old.manifest["skipped"] == skipped
    if not unchanged:
        save_embeddings(out, np.stack(rows), kept, manifest)
    return EmbedReport(out, len(kept), len(done), reused, removed, skipped, embed_seconds, time.perf_counter() - begin)


def embed_dataset(
    pretrained: Pretrained, name: str, split: str, out: str | Path, *, fresh: bool = False, progress: bool = False
) -> EmbedReport:
    """Embed a data set of :mod:`nnclr.data` (``demo``, ``npz:PATH``, ...) into the EMB_DIR ``out``.

    Rows are in data-set order; ``index.csv`` has the data-set index, the label and the class.
    A re-run with the same checkpoint and source does nothing.
    """
    from nnclr.data import load_dataset

    begin = time.perf_counter()
    out = Path(out).expanduser()
    _check_out(out)
    source = {"kind": "dataset", "name": name, "split": split}
    old = _previous(out, pretrained, source, fresh)
    if old is not None:
        return EmbedReport(out, len(old), 0, len(old), 0, [], 0.0, time.perf_counter() - begin)
    dataset = load_dataset(name, split, image_size=pretrained.image_size, download=False)
    if len(dataset) == 0:
        raise UserError(f"data set {name} (split {split}) holds no images")
    embed_start = time.perf_counter()
    vectors = embed_tensor(pretrained, dataset.images, progress)
    embed_seconds = time.perf_counter() - embed_start
    classes = list(dataset.classes)
    entries = [
        Entry(f"{name}/{split}/{i}", int(y), classes[y] if 0 <= y < len(classes) else "")
        for i, y in enumerate(dataset.labels.tolist())
    ]
    manifest = {**_base_manifest(pretrained, source), "classes": classes, "skipped": []}
    save_embeddings(out, vectors, entries, manifest)
    return EmbedReport(out, len(entries), len(entries), 0, 0, [], embed_seconds, time.perf_counter() - begin)


def entry_dict(embeddings: Embeddings, row: int) -> dict[str, Any]:
    """A row's index entry as plain data (for JSON output)."""
    return {"index": row, **{k: v for k, v in asdict(embeddings.entries[row]).items() if k in ("path", "label")}}
