"""Embedding a folder of images or a data set into an EMB_DIR, resumably, on one or several processes.

Folders: every image file at any depth (any format Pillow reads; grayscale, palette, 16-bit and
alpha images become RGB) is decoded as training decodes folders (shorter side to the encoder's
``image_size``, centred square; :mod:`nnclr.data.decode`), on a thread pool one chunk ahead of
the encoder. A file Pillow cannot read is skipped and listed in the manifest with the reason.

Resuming: a file is keyed by (relative path, size, mtime_ns). A re-run embeds only new or changed
files, drops removed ones and keeps the rest; unreadable files are not retried until they change.
A re-run with another checkpoint or another source is refused unless ``fresh`` is set, which
re-embeds everything. In a single process what has been embedded is also saved on Ctrl-C and
every ``save_every`` seconds, so an interrupted run continues where it stopped.

Under ``torchrun`` each process embeds a contiguous block of the files (or rows) in order
(:func:`nnclr.distributed.shard`), the blocks are gathered back into file order
(:func:`nnclr.distributed.gather_in_order`): every image is embedded exactly once, and only
rank 0 writes.
"""

from __future__ import annotations

import stat
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from nnclr import distributed
from nnclr.config import to_dict
from nnclr.data.decode import IMAGE_EXTENSIONS, try_load_square
from nnclr.data.folder import images_below
from nnclr.data.lazy import FolderImages, prefetched
from nnclr.errors import UserError
from nnclr.pretrained import Pretrained, precision_name
from nnclr.use.embeddings import (
    FORMAT_VERSION,
    MANIFEST_FILE,
    Embeddings,
    Entry,
    open_embeddings,
    save_embeddings,
)
from nnclr.use.outputs import output_folder
from nnclr.version import __version__

BATCH = 256  # files decoded and embedded together
SAVE_EVERY = 600.0  # seconds between saves of the progress of a long folder run
_THREADS = 2  # decoding threads: Pillow releases the GIL while decoding and resizing


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


@dataclass
class Embedded:
    """Result of :func:`embed_files`: ``vectors`` (M, F) float32 of the files at ``positions``."""

    vectors: np.ndarray
    positions: list[int]
    failed: dict[int, str]


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
    files = images_below(folder)
    if not files:
        extensions = " ".join(sorted(e.lstrip(".") for e in IMAGE_EXTENSIONS))
        raise UserError(f"no images found in {folder} (extensions: {extensions}); pass a folder that holds images")
    classes = sorted({f.relative_to(folder).parts[0] for f in files if len(f.relative_to(folder).parts) > 1})
    return files, classes


def folder_entries(
    folder: Path, unreadable: list[tuple[str, str]] | None = None
) -> tuple[list[Entry], list[str]]:
    """The entries of every image below ``folder`` with the keys resuming compares.

    Only regular files (after following symlinks) are entries, as in :mod:`nnclr.data.scan`: a
    dangling symlink, a symlink loop, a FIFO, socket or device with an image name is left out and
    ``(relative path, reason)`` appended to ``unreadable`` (opening a FIFO would block the decoder).
    """
    files, classes = scan_images(folder)
    label_of = {name: i for i, name in enumerate(classes)}
    entries = []
    for f in files:
        rel = f.relative_to(folder)
        try:
            st = f.stat()
        except OSError as error:
            reason = " ".join((error.strerror or type(error).__name__).split())
        else:
            if stat.S_ISREG(st.st_mode):
                top = rel.parts[0] if len(rel.parts) > 1 else ""
                entries.append(Entry(rel.as_posix(), label_of.get(top, -1), top, st.st_size, st.st_mtime_ns))
                continue
            reason = "not a regular file"
        if unreadable is not None:
            unreadable.append((rel.as_posix(), reason))
    return entries, classes


# ---------------------------------------------------------------- embedding


def _decoded_chunks(files: list[Path], size: int, batch: int) -> Iterator[list[np.ndarray | str]]:
    """Decode ``files`` in chunks of ``batch`` on a thread pool, one chunk ahead of the caller."""
    with ThreadPoolExecutor(max_workers=_THREADS) as pool:
        pending = None
        for start in range(0, len(files), batch):
            future = [pool.submit(try_load_square, f, size) for f in files[start : start + batch]]
            if pending is not None:
                yield [f.result() for f in pending]
            pending = future
        if pending is not None:
            yield [f.result() for f in pending]


def _bar(total: int, progress: bool) -> tqdm:
    show = progress and distributed.is_main() and total >= BATCH
    return tqdm(total=total, desc="embedding", unit="img", file=sys.stderr, disable=not show)


def _embed_local(
    pretrained: Pretrained, files: list[Path], batch: int, progress: bool, total: int,
    save: Callable[[Embedded], None] | None, save_every: float,
) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
    """Embed ``files``: (vectors (n, F) with zero rows for failures, ok (n,) uint8, {position: reason}).

    ``save(partial)`` is called every ``save_every`` seconds and on Ctrl-C (then re-raised).
    """
    vectors = np.zeros((len(files), pretrained.feature_dim), np.float32)
    ok = np.zeros(len(files), np.uint8)
    failed: dict[int, str] = {}

    def partial() -> Embedded:
        done = np.flatnonzero(ok)
        return Embedded(vectors[done], done.tolist(), dict(failed))

    last_save = time.monotonic()
    with _bar(total, progress) as bar:
        start = 0
        try:
            for chunk in _decoded_chunks(files, pretrained.image_size, batch):
                arrays = [item for item in chunk if not isinstance(item, str)]
                rows = [start + i for i, item in enumerate(chunk) if not isinstance(item, str)]
                failed.update({start + i: item for i, item in enumerate(chunk) if isinstance(item, str)})
                if arrays:
                    vectors[rows] = pretrained.embed(torch.from_numpy(np.stack(arrays)), batch_size=batch).numpy()
                    ok[rows] = 1
                start += len(chunk)
                bar.update(len(chunk) * distributed.world_size())
                if save is not None and time.monotonic() - last_save > save_every:
                    save(partial())
                    last_save = time.monotonic()
        except KeyboardInterrupt:
            if save is not None:
                save(partial())
            raise
    return vectors, ok, failed


def embed_files(
    pretrained: Pretrained, files: list[Path], *, batch: int = BATCH, progress: bool = False,
    save: Callable[[Embedded], None] | None = None, save_every: float = SAVE_EVERY,
) -> Embedded:
    """Embed image files, skipping unreadable ones; split over the processes under torchrun.

    Args:
        files: the image files, in the order of the result's positions.
        save: called with what has been embedded so far, every ``save_every`` seconds and on
            Ctrl-C (single process only: under torchrun an interrupted run starts its files over).

    Returns:
        The vectors (M, F) of the M readable files, their positions in ``files``, and the
        reason for each of the others; the same on every rank.
    """
    n = len(files)
    part = distributed.shard(n)
    single = distributed.world_size() == 1
    vectors, ok, failed = _embed_local(
        pretrained, files[part.start : part.stop], batch, progress, n, save if single else None, save_every
    )
    device = pretrained.device  # NCCL gathers CUDA tensors; gloo and a single process take these as they are
    all_vectors = distributed.gather_in_order(torch.from_numpy(vectors).to(device), n).cpu().numpy()
    all_ok = distributed.gather_in_order(torch.from_numpy(ok).to(device), n).cpu().numpy().astype(bool)
    reasons: dict[int, str] = {}
    for shard_failed in distributed.gather_objects({part.start + i: reason for i, reason in failed.items()}):
        reasons.update(shard_failed)
    done = np.flatnonzero(all_ok)
    return Embedded(all_vectors[done], done.tolist(), reasons)


def embed_tensor(
    pretrained: Pretrained, images: torch.Tensor | FolderImages, *, batch: int = 512, progress: bool = False
) -> np.ndarray:
    """Embed uint8 images (N, 3, H, W) -> float32 (N, F); split over the processes under torchrun.

    ``images`` is an in-memory tensor or a folder decoded on demand (:class:`~nnclr.data.lazy.FolderImages`,
    read ``batch`` images at a time, the next batch decoded while this one is embedded).
    """
    n = images.shape[0]
    part = distributed.shard(n)
    local = [torch.zeros(0, pretrained.feature_dim)]
    keys = [slice(start, min(start + batch, part.stop)) for start in range(part.start, part.stop, batch)]
    with _bar(n, progress) as bar:
        for chunk in prefetched(images, keys):
            local.append(pretrained.embed(chunk, batch_size=batch))
            bar.update(chunk.shape[0] * distributed.world_size())
    return distributed.gather_in_order(torch.cat(local).to(pretrained.device), n).cpu().numpy()


# ---------------------------------------------------------------- EMB_DIR


def _base_manifest(pretrained: Pretrained, source: dict[str, Any]) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "nnclr_version": __version__,
        "checkpoint": str(pretrained.checkpoint.resolve()),
        "checkpoint_hash": pretrained.checkpoint_hash,
        "step": pretrained.step,
        "config": to_dict(pretrained.config),
        "preprocessing": pretrained.preprocessing(),
        "precision": precision_name(pretrained.dtype),
        "features": "backbone h (pooled), L2-normalised",
        "feature_dim": pretrained.feature_dim,
        "source": source,
    }


def _previous(out: Path, pretrained: Pretrained, source: dict[str, Any], fresh: bool) -> Embeddings | None:
    """The EMB_DIR's current contents to resume from, or None; refuses a mismatch unless ``fresh``."""
    output_folder(out, "--out")
    if fresh or not (out / MANIFEST_FILE).exists():
        return None
    old = open_embeddings(out)
    if old.vectors.shape[1] != pretrained.feature_dim:
        raise UserError(
            f"{out} holds vectors of width {old.vectors.shape[1]}, but {pretrained.checkpoint} gives "
            f"{pretrained.feature_dim}; pass --fresh to re-embed everything, or choose another --out"
        )
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


def _write(out: Path, vectors: np.ndarray, entries: list[Entry], manifest: dict[str, Any]) -> None:
    """Rank 0 writes the EMB_DIR; the others wait until it is written."""
    if distributed.is_main():
        save_embeddings(out, vectors, entries, manifest)
    distributed.barrier()


def embed_folder(
    pretrained: Pretrained, folder: str | Path, out: str | Path, *, fresh: bool = False, progress: bool = False,
    batch: int = BATCH, save_every: float = SAVE_EVERY,
) -> EmbedReport:
    """Embed every image below ``folder`` into the EMB_DIR ``out``, resuming what is already there.

    Raises:
        UserError: no images, no readable image, a previous EMB_DIR of another checkpoint or source
            (without ``fresh``), or a broken one.
    """
    begin = time.perf_counter()
    folder, out = Path(folder).expanduser().resolve(), Path(out).expanduser()
    not_files: list[tuple[str, str]] = []
    entries, classes = folder_entries(folder, not_files)
    source = {"kind": "folder", "path": str(folder)}
    old = _previous(out, pretrained, source, fresh)
    old_rows = {e.key: i for i, e in enumerate(old.entries)} if old else {}
    old_skipped = {(s["path"], s["size"], s["mtime_ns"]): s["reason"] for s in old.manifest["skipped"]} if old else {}
    todo = [i for i, e in enumerate(entries) if e.key not in old_rows and e.key not in old_skipped]
    manifest = {**_base_manifest(pretrained, source), "classes": classes}

    def assemble(new: Embedded) -> tuple[np.ndarray, list[Entry], list[dict[str, Any]]]:
        """Old rows still valid + the new ones, in folder order; the skipped files with their reason."""
        row_of_new = {todo[j]: r for r, j in enumerate(new.positions)}
        reason_of = {todo[j]: reason for j, reason in new.failed.items()}
        rows, kept, skipped = [], [], []
        for i, entry in enumerate(entries):
            if entry.key in old_rows:
                rows.append(old.vectors[old_rows[entry.key]])
            elif i in row_of_new:
                rows.append(new.vectors[row_of_new[i]])
            else:
                reason = old_skipped.get(entry.key) or reason_of.get(i)
                if reason is not None:
                    skipped.append(
                        {"path": entry.path, "reason": reason, "size": entry.size, "mtime_ns": entry.mtime_ns}
                    )
                continue
            kept.append(entry)
        skipped += [{"path": rel, "reason": reason, "size": -1, "mtime_ns": -1} for rel, reason in not_files]
        vectors = np.stack(rows) if rows else np.zeros((0, pretrained.feature_dim), np.float32)
        return vectors, kept, skipped

    def save_partial(new: Embedded) -> None:
        vectors, kept, skipped = assemble(new)
        if kept:
            save_embeddings(out, vectors, kept, {**manifest, "skipped": skipped, "complete": False})

    embed_start = time.perf_counter()
    new = embed_files(pretrained, [folder / entries[i].path for i in todo], batch=batch, progress=progress,
                      save=save_partial, save_every=save_every)
    embed_seconds = time.perf_counter() - embed_start
    vectors, kept, skipped = assemble(new)
    if not kept:
        first = f" (first: {skipped[0]['path']}: {skipped[0]['reason']})" if skipped else ""
        raise UserError(f"none of the {len(entries)} image files in {folder} could be read{first}")
    current = {e.path for e in entries}
    removed = sum(e.path not in current for e in old.entries) if old else 0
    unchanged = old is not None and old.entries == kept and old.manifest["skipped"] == skipped \
        and old.manifest.get("complete", True)
    if not unchanged:
        _write(out, vectors, kept, {**manifest, "skipped": skipped, "complete": True})
    reused = sum(e.key in old_rows for e in kept)
    return EmbedReport(out, len(kept), len(new.positions), reused, removed, skipped, embed_seconds,
                       time.perf_counter() - begin)


def embed_dataset(
    pretrained: Pretrained, name: str, split: str, out: str | Path, *, root: str | None = None,
    fresh: bool = False, progress: bool = False, batch: int = 512,
) -> EmbedReport:
    """Embed a data set of :mod:`nnclr.data` (``demo``, ``cifar10``, ``npz:PATH``, ...) into the EMB_DIR ``out``.

    Rows are in data-set order; ``index.csv`` has the data-set index, the label and the class.
    ``root`` defaults to the checkpoint's ``data.root`` when ``name`` is the data set it was
    trained on. A re-run with the same checkpoint and source does nothing.
    """
    from nnclr.data import load_dataset

    begin = time.perf_counter()
    out = Path(out).expanduser()
    source = {"kind": "dataset", "name": name, "split": split}
    old = _previous(out, pretrained, source, fresh)
    if old is not None:
        return EmbedReport(out, len(old), 0, len(old), 0, [], 0.0, time.perf_counter() - begin)
    if root is None and name == pretrained.config.data.name:
        root = pretrained.config.data.root
    # lazy: a folder: data set is indexed and decoded one batch at a time (memory bounded by a batch)
    dataset = load_dataset(name, split, root=root, image_size=pretrained.image_size, download=False, lazy=True)
    if len(dataset) == 0:
        raise UserError(f"data set {name} (split {split}) holds no images")
    embed_start = time.perf_counter()
    vectors = embed_tensor(pretrained, dataset.images, batch=batch, progress=progress)
    embed_seconds = time.perf_counter() - embed_start
    classes = list(dataset.classes)
    entries = [
        Entry(f"{name}/{split}/{i}", int(y), classes[y] if 0 <= y < len(classes) else "")
        for i, y in enumerate(dataset.labels.tolist())
    ]
    manifest = {**_base_manifest(pretrained, source), "data_root": root, "classes": classes, "skipped": []}
    _write(out, vectors, entries, manifest)
    return EmbedReport(out, len(entries), len(entries), 0, 0, [], embed_seconds, time.perf_counter() - begin)
