"""Two splits used together are two sets of images numbering the same classes (issue 23, item 9)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from use_helpers import make_checkpoint, run_main

from nnclr.config import DataConfig
from nnclr.data.loaders import load_training_data
from nnclr.errors import UserError

COLOURS = {"apple": (220, 30, 30), "grass": (30, 200, 40), "sky": (40, 60, 230)}


def _colour_folder(root: Path, splits: dict[str, tuple[str, ...]], per_class: int = 6) -> Path:
    """``root/SPLIT/CLASS/i.png``: solid images, one colour per class (a random encoder separates them)."""
    for split, classes in splits.items():
        for name in classes:
            (root / split / name).mkdir(parents=True)
            for i in range(per_class):
                shade = np.clip(np.array(COLOURS[name]) + 3 * i, 0, 255).astype(np.uint8)
                Image.fromarray(np.broadcast_to(shade, (16, 16, 3)).copy()).save(root / split / name / f"{i}.png")
    return root


def test_a_test_folder_lacking_a_class_keeps_the_training_numbering(tmp_path: Path) -> None:
    root = _colour_folder(tmp_path / "d", {"train": ("apple", "grass", "sky"), "test": ("grass", "sky")})
    data = load_training_data(DataConfig(name=f"folder:{root}", image_size=16, loader="memory"))
    assert data.train_set.classes == data.test_set.classes == ["apple", "grass", "sky"]
    assert data.test_set.labels.tolist() == [1] * 6 + [2] * 6  # grass and sky, as the training split numbers them


def test_knn_on_a_test_folder_lacking_a_class_is_not_zero(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Solid colours are trivially separable: a misnumbered test split gave 0.0%."""
    root = _colour_folder(tmp_path / "d", {"train": ("apple", "grass", "sky"), "test": ("grass", "sky")})
    checkpoint = make_checkpoint(tmp_path / "run" / "checkpoint.pt", "data.image_size=16")
    result = run_main(capsys, "eval", "knn", "--checkpoint", str(checkpoint), "--data", f"folder:{root}")
    assert result.returncode == 0, result.stderr
    (record,) = (tmp_path / "run" / "eval").glob("knn-*.json")
    assert json.loads(record.read_text())["top1"] == pytest.approx(100.0)


def test_a_test_class_the_training_split_lacks_is_refused(tmp_path: Path) -> None:
    root = _colour_folder(tmp_path / "d", {"train": ("apple", "grass"), "test": ("grass", "sky")})
    with pytest.raises(UserError, match="classes the training split lacks \\('sky'\\)"):
        load_training_data(DataConfig(name=f"folder:{root}", image_size=16, loader="memory"))


def test_one_npz_file_is_not_its_own_test_split(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    file = tmp_path / "all.npz"
    labels = np.arange(40) % 4
    np.savez(file, images=np.random.default_rng(0).integers(0, 255, (40, 8, 8, 3), dtype=np.uint8), labels=labels)
    with pytest.raises(UserError, match="the 'test' split is .*all.npz again"):
        load_training_data(DataConfig(name=f"npz:{file}", image_size=8, loader="memory"))
    assert load_training_data(DataConfig(name=f"npz:{file}", image_size=8, test_split="")).test_set is None
    checkpoint = make_checkpoint(tmp_path / "run" / "checkpoint.pt", "data.image_size=8")
    result = run_main(capsys, "eval", "knn", "--checkpoint", str(checkpoint), "--data", f"npz:{file}")
    assert result.returncode == 2 and "every query would find its own copy" in result.stderr
    assert "--test-split" in result.stderr


def test_labels_are_matched_by_name_whatever_the_order(tmp_path: Path) -> None:
    from nnclr.data.dataset import ImageDataset
    from nnclr.data.pairs import align_labels

    images = torch.zeros(4, 3, 2, 2, dtype=torch.uint8)
    train = ImageDataset(images, torch.tensor([0, 1, 2, 0]), ["a", "b", "c"], "x")
    test = ImageDataset(images, torch.tensor([0, 1, -1, 0]), ["c", "a"], "x")
    align_labels(train, test)
    assert test.labels.tolist() == [2, 0, -1, 2] and test.classes == ["a", "b", "c"]
