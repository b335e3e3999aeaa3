"""Helpers of the ``test_use_*`` modules: a tiny checkpoint, a folder of real images, running the CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from tiny import HEADS

from nnclr.checkpoint import save_checkpoint
from nnclr.cli import main
from nnclr.config import load_config, to_dict
from nnclr.data import load_dataset
from nnclr.model import build_model


def make_checkpoint(path: Path, *overrides: str, seed: int = 0) -> Path:
    """A checkpoint of a small model with random weights and non-trivial batch-norm statistics."""
    config = load_config(None, [*HEADS, "data.name=demo", *overrides])
    torch.manual_seed(seed)
    model = build_model(config)
    with torch.no_grad():  # one train-mode pass: running statistics differ from their init
        model(torch.rand(4, 3, config.data.image_size, config.data.image_size) * 2 - 0.5)
    save_checkpoint({"config": to_dict(config), "model": model.state_dict(), "step": 0}, path)
    return path


def save_demo_image(index: int, path: Path) -> Path:
    """Image ``index`` of the demo's test split (real CIFAR-10) as a file (format from the extension)."""
    demo = load_dataset("demo", "test")
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(demo.images[index].permute(1, 2, 0).numpy()).save(path)
    return path


def make_image_folder(root: Path, n: int = 40) -> Path:
    """Demo images as PNG files in class folders (some nested), plus odd files a real folder has."""
    demo = load_dataset("demo", "test")
    for i in range(n):
        cls = demo.classes[int(demo.labels[i])]
        folder = root / cls / ("nested" if i % 7 == 0 else "")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(demo.images[i].permute(1, 2, 0).numpy()).save(folder / f"{i:03d}.png")
    rgb = Image.fromarray(demo.images[n].permute(1, 2, 0).numpy())
    rgb.convert("L").save(root / "gray.png")
    rgb.convert("P", palette=Image.Palette.ADAPTIVE).save(root / "palette.png")
    rgb.convert("RGBA").save(root / "rgba.png")
    rgb.resize((75, 50)).save(root / "wide.jpg")  # any size: shorter side scaled, centre square
    rgb.resize((64, 64)).save(root / "big.WEBP")  # any common format, upper-case extension
    rgb.save(root / "copy_of_40.png")
    png = (root / "gray.png").read_bytes()
    (root / "truncated.png").write_bytes(png[: len(png) // 2])
    (root / "not_an_image.jpg").write_text("hello, I am text")
    (root / "notes.txt").write_text("ignored: not an image extension")
    return root


UNREADABLE = {"truncated.png", "not_an_image.jpg"}
"""The files of :func:`make_image_folder` that are skipped."""


def nnclr_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m nnclr ARGS`` as a subprocess."""
    return subprocess.run([sys.executable, "-m", "nnclr", *args], capture_output=True, text=True, timeout=timeout)


def assert_user_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    """Exit code 2, one line on stderr naming the problem, no traceback."""
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nnclr: error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def run_main(capsys: pytest.CaptureFixture, *args: str) -> subprocess.CompletedProcess:
    """``nnclr ARGS`` in this process (``nnclr.cli.main``), as a CompletedProcess with its output."""
    capsys.readouterr()
    code = main(list(args))
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(["nnclr", *args], code, captured.out, captured.err)
