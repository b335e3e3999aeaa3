"""Shared fixtures: CPU only, fixed seeds, the local CIFAR-10 copy.

Tests that need ``../shared/data/cifar10`` skip when it is absent; with ``NNCLR_REQUIRE_DATA=1``
(set by ``.ci/run``) the skip becomes a failure, so CI cannot pass by silently skipping them.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _index_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Folder indexes are cached in a per-session temporary folder, never in the user's ~/.cache."""
    if "NNCLR_CACHE_DIR" not in os.environ:
        monkeypatch.setenv("NNCLR_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "nnclr-cache"))


def _cifar10_dir() -> Path:
    env = os.environ.get("NNCLR_CIFAR10_DIR")
    return Path(env) if env else REPO.parent / "shared" / "data" / "cifar10"


@pytest.fixture
def cifar10_dir() -> Path:
    """The directory holding CIFAR-10 ``train.npz`` and ``test.npz`` (see shared/data/cifar10/README.md)."""
    path = _cifar10_dir()
    if not (path / "train.npz").is_file() or not (path / "test.npz").is_file():
        message = f"CIFAR-10 arrays not found in {path} (set NNCLR_CIFAR10_DIR)"
        if os.environ.get("NNCLR_REQUIRE_DATA") == "1":
            pytest.fail(message + "; NNCLR_REQUIRE_DATA=1 forbids skipping")
        pytest.skip(message)
    return path


_FIGURES: list[str] = []


@pytest.fixture(scope="session")
def figures() -> list[str]:
    """Lines the fuzz and kill campaigns report (inputs tried, kills survived), printed at the end."""
    return _FIGURES


def pytest_terminal_summary(terminalreporter) -> None:
    if _FIGURES:
        terminalreporter.section("robustness campaigns")
        for line in _FIGURES:
            terminalreporter.write_line(line)
