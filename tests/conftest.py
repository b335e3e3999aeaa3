"""Shared fixtures: CPU only, fixed seeds, the tiny run and small data sets, the local CIFAR-10 copy.

The tiny run and the small data sets the training tests share are ``tiny_run``, ``tiny_data`` and ``demo_data``
(their values are defined in ``tiny.py``).

Tests that need ``../shared/data/cifar10`` skip when it is absent; with ``NNCLR_REQUIRE_DATA=1``
(set by ``.ci/run``) the skip becomes a failure, so CI cannot pass by silently skipping them.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import tiny
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


@pytest.fixture(scope="session")
def tiny_run() -> tuple[str, ...]:
    """``--set`` overrides of a tiny run (:data:`tiny.RUN`): small heads, batches of 32, no warm-up, a record every
    step. A module adds its own, e.g. ``[*tiny_run, "method.support_size=100"]``."""
    return tiny.RUN


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of random 16x16 images in 4 classes, ``train.npz`` (256) and ``test.npz`` (64), written once.

    Read-only: a test that changes data writes its own."""
    return tiny.random_npz(tmp_path_factory.mktemp("tiny-data"))


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The ``data.name`` (``npz:FOLDER``) of the first 96 training and 40 test images of the demo data (real
    CIFAR-10, labels and class names), written once: 3 steps of 32 per epoch. Read-only."""
    return tiny.demo_npz(tmp_path_factory.mktemp("demo-data"), {"train": 96, "test": 40})


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


def pytest_sessionfinish(session: pytest.Session) -> None:
    """A pytest-xdist worker hands its campaign figures to the controller, which prints the summary."""
    if hasattr(session.config, "workeroutput"):
        session.config.workeroutput["figures"] = "\n".join(_FIGURES)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error) -> None:
    """pytest-xdist's hook on the controller when a worker ends: its figures join the summary."""
    _FIGURES.extend(line for line in getattr(node, "workeroutput", {}).get("figures", "").splitlines() if line)


def pytest_terminal_summary(terminalreporter) -> None:
    if _FIGURES:
        terminalreporter.section("robustness campaigns")
        for line in _FIGURES:
            terminalreporter.write_line(line)
