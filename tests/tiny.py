"""The tiny model and run, and the small data sets, that the training tests share.

``conftest.py``'s fixtures return these (``tiny_run``, ``tiny_data``, ``demo_data``); helper modules and module
constants, which cannot take fixtures, import them from here. Each test module adds its own overrides (a support
size, a number of epochs, ...) where its assertions depend on them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from nnclr.data import load_dataset

HEADS = ("model.proj_hidden_dim=64", "model.proj_dim=32", "model.pred_hidden_dim=64")
"""Small projection and prediction heads (the defaults are 2048, 256 and 4096 wide)."""

SMALLER_HEADS = ("model.proj_hidden_dim=32", "model.proj_dim=16", "model.pred_hidden_dim=32")
"""Smaller still, for the tests that build many models (every method, two processes, streamed folders)."""

RUN = (*HEADS, "optim.batch_size=32", "optim.warmup_epochs=0", "train.log_every=1")
"""A tiny run: small heads, batches of 32, no warm-up, a metrics record every step."""


def random_npz(folder: Path) -> Path:
    """``train.npz`` (256 images) and ``test.npz`` (64) of random 16x16 images in 4 classes; returns ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", 256), ("test", 64)):
        images = rng.integers(0, 256, (n, 16, 16, 3), dtype=np.uint8)
        np.savez(folder / f"{split}.npz", images=images, labels=rng.integers(0, 4, n))
    return folder


def demo_npz(folder: Path, splits: dict[str, int], classes: bool = True) -> str:
    """The first images of the demo's splits (real CIFAR-10) as ``folder/{split}.npz`` with their labels (and the
    class names unless ``classes`` is false); returns the ``data.name``."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in splits.items():
        demo = load_dataset("demo", split)
        arrays = {"images": demo.images[:n].permute(0, 2, 3, 1).numpy(), "labels": demo.labels[:n].numpy()}
        if classes:
            arrays["classes"] = np.array(demo.classes)
        np.savez(folder / f"{split}.npz", **arrays)
    return f"npz:{folder}"
