"""Helpers of the backbone tests: timm (required under CI), tiny labelled colour data, the three kinds of backbone.

timm is an optional extra: its tests skip when it is not installed, and fail instead with
``NNCLR_REQUIRE_TIMM=1`` (set by ``.ci/run``, which installs the ``dev`` extra and so timm), so that CI cannot
pass by silently skipping them (as ``NNCLR_REQUIRE_DATA`` does for the CIFAR-10 copy, tests/conftest.py).
"""

from __future__ import annotations

import os
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from torch import nn

# One of each kind, tiny: a timm ResNet (one block per stage), a timm ViT (one block; patch 4 with the small-image
# variant), the user's own module (tests/user_models.py).
TIMM_RESNET = "timm:resnet18(layers=(1, 1, 1, 1))"
TIMM_VIT = "timm:vit_tiny_patch16_224(depth=1)"
CUSTOM = "py:user_models:TinyCNN"
PALETTE = [(220, 40, 40), (40, 200, 60), (50, 60, 220), (200, 200, 200)]  # red, green, blue, grey
OTHER_PALETTE = [(230, 220, 40), (40, 220, 220), (220, 40, 220)]  # yellow, cyan, magenta: a transfer set


def require_timm() -> ModuleType:
    """timm, or a skip (a failure with NNCLR_REQUIRE_TIMM=1)."""
    try:
        import timm
    except ImportError:
        message = "timm is not installed (pip install 'nnclr[timm]'; part of the dev extra)"
        if os.environ.get("NNCLR_REQUIRE_TIMM") == "1":
            pytest.fail(message + "; NNCLR_REQUIRE_TIMM=1 forbids skipping")
        pytest.skip(message)
    return timm


def needs_timm(spec: str) -> None:
    """Skip (or fail, see :func:`require_timm`) a case whose backbone is a timm model when timm is missing."""
    if spec.startswith("timm:"):
        require_timm()


def colour_npz(folder: Path, palette: list[tuple[int, int, int]], train: int, test: int, side: int) -> Path:
    """``train.npz`` / ``test.npz``: class c is colour ``palette[c]`` plus uniform noise of +-60 per pixel."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(palette))
    for split, n in (("train", train), ("test", test)):
        labels = np.arange(n) % len(palette)
        rng.shuffle(labels)
        base = np.asarray(palette, dtype=np.int64)[labels][:, None, None, :]
        images = np.clip(base + rng.integers(-60, 61, (n, side, side, 3)), 0, 255).astype(np.uint8)
        np.savez(folder / f"{split}.npz", images=images, labels=labels)
    return folder


def assert_trains_bf16_channels_last(model: nn.Module, features: int, size: int, batch: int = 4) -> None:
    """The fast CPU path of the training loop: bf16 autocast + channels_last, forward and backward; finite
    gradients for every parameter, which stays float32."""
    model = model.to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.shape == (batch, features)
    out.float().square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters())
