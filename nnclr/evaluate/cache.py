"""Backbone features of a whole split, extracted once per (checkpoint, data set, split) and cached on disk.

Every protocol that works on frozen features (kNN, fast linear probe, transfer, retrieval) reads
them from ``<run_dir>/features/<checkpoint_hash>-<data>-<split>.pt``. The checkpoint's hash (of its
bytes) is part of the file name, so a changed checkpoint never reuses stale features; the file also
records the hash, data name, split and size, which are checked again on load.

Extraction runs the encoder in eval mode (batch-norm statistics frozen), in batches, under bf16
autocast where :func:`nnclr.runtime.resolve_dtype` says it is fast, with a progress bar.
"""

from __future__ import annotations

import hashlib
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from nnclr import rundir
from nnclr.data import ImageDataset
from nnclr.data.lazy import batch_slices, prefetched
from nnclr.evaluate.features import extract_features
from nnclr.evaluate.preprocess import Preprocess
from nnclr.pretrained import Pretrained

CACHE_FORMAT = 2  # 2: a test split's labels in the training split's class numbering (nnclr.data.pairs)
CHUNK = 4096  # images per progress-bar tick
BATCH = 512  # images per encoder call (and per decode of a folder read on demand)


def safe_name(name: str, limit: int = 60) -> str:
    """A data name such as ``npz:/data/cifar10`` as a file-name part: ``npz-data-cifar10``.

    Names longer than ``limit`` are cut and get 8 hex digits of their SHA-256, so that two long
    paths never share a name.
    """
    safe = re.sub(r"[^A-Za-z0-9._]+", "-", name).strip("-") or "data"
    if len(safe) > limit:
        safe = f"{safe[:limit]}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"
    return safe


@dataclass
class SplitFeatures:
    """Frozen features of one split.

    Attributes:
        features: float32 (N, F), L2-normalised backbone features h.
        labels: int64 (N,), -1 where unknown.
        classes: class names of the data set ([] when unlabelled).
        data: the data name, e.g. ``demo``.
        split: the split, e.g. ``train``.
        cached: True when read from the cache rather than extracted now.
    """

    features: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    data: str
    split: str
    cached: bool = False

    def __len__(self) -> int:
        return int(self.features.shape[0])

    @property
    def labelled(self) -> torch.Tensor:
        """bool (N,): where the label is known."""
        return self.labels >= 0


def cache_path(pretrained: Pretrained, run_dir: Path, data: str, split: str) -> Path:
    """``<run_dir>/features/<checkpoint_hash>-<data>-<split>.pt``."""
    return run_dir / rundir.FEATURES / f"{pretrained.checkpoint_hash}-{safe_name(data)}-{safe_name(split)}.pt"


def extract_split(
    pretrained: Pretrained, dataset: ImageDataset, *, batch_size: int | None = None, progress: bool | None = None
) -> torch.Tensor:
    """uint8 images (N, 3, H, W) of ``dataset`` -> L2-normalised float32 features (N, F) on the CPU.

    In-memory images are encoded ``CHUNK`` at a time; a folder's :class:`~nnclr.data.lazy.FolderImages`
    is decoded ``batch_size`` images at a time (memory bounded by one batch, not the split).
    """
    if progress is None:
        progress = sys.stderr.isatty()
    batch_size = batch_size or BATCH
    images = dataset.images
    # a folder decoded on demand is read one batch at a time, the next decoded while this one is encoded
    chunk_size = CHUNK if isinstance(images, torch.Tensor) else batch_size
    out = []
    with tqdm(total=len(images), disable=not progress, unit="img", desc=f"features {dataset.name}",
              dynamic_ncols=True, leave=False) as bar:
        for chunk in prefetched(images, batch_slices(len(images), chunk_size)):
            out.append(extract_features(pretrained.encoder, chunk, Preprocess.of(pretrained), batch_size=batch_size,
                                        channels_last=pretrained.config.train.channels_last).cpu())
            bar.update(len(chunk))
    if not out:
        return torch.zeros(0, pretrained.feature_dim)
    return torch.cat(out)


def load_cached(path: Path, pretrained: Pretrained, data: str, split: str) -> SplitFeatures | None:
    """The cached features at ``path`` if they belong to this checkpoint, data set and split; else None."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - a truncated or foreign file is simply re-extracted
        return None
    expected = {"format": CACHE_FORMAT, "checkpoint_hash": pretrained.checkpoint_hash, "data": data, "split": split}
    if not isinstance(state, dict) or any(state.get(key) != value for key, value in expected.items()):
        return None
    return SplitFeatures(state["features"], state["labels"], list(state["classes"]), data, split, cached=True)


def split_features(
    pretrained: Pretrained,
    run_dir: Path,
    data: str,
    split: str,
    *,
    load: Callable[[str, str], ImageDataset] | None = None,
    progress: bool | None = None,
) -> SplitFeatures:
    """Features of ``data``/``split`` for this checkpoint: from the cache, or extracted and cached.

    Args:
        pretrained: the encoder (:func:`nnclr.load`).
        run_dir: where ``features/`` lives (the checkpoint's folder).
        data, split: the data name and split, as :func:`nnclr.data.load_dataset` takes them.
        load: a callable ``(data, split) -> ImageDataset`` used on a cache miss.
        progress: progress bar (default: when stderr is a terminal).
    """
    path = cache_path(pretrained, run_dir, data, split)
    hit = load_cached(path, pretrained, data, split)
    if hit is not None:
        return hit
    if load is None:
        raise ValueError(f"features of {data}/{split} are not cached and no loader was given")
    dataset = load(data, split)
    features = extract_split(pretrained, dataset, progress=progress)
    state = {
        "format": CACHE_FORMAT, "checkpoint_hash": pretrained.checkpoint_hash, "data": data, "split": split,
        "features": features, "labels": dataset.labels.clone(), "classes": list(dataset.classes),
    }
    rundir.make_dir(run_dir, rundir.FEATURES)
    rundir.write_atomic(path, lambda file: torch.save(state, file), what="the feature cache",
                        kept="nothing else was changed")
    return SplitFeatures(features, dataset.labels.clone(), list(dataset.classes), data, split)
