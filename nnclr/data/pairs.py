"""Two splits of one data set used together (memory and queries, classifier training and test): they must be
two different sets of images, and their labels must number the same classes.

* :func:`check_distinct`: ``npz:FILE.npz`` serves every split from its one file, so a "test" split would be
  the training images again, and kNN would find each query's own copy (issue 23: 56% instead of 38%). A
  split read from the same file or folder as the other is refused.
* :func:`align_labels`: a ``folder:`` source numbers the classes of each split from its own subfolders
  (torchvision's ``ImageFolder``), so a ``test/`` that lacks one of ``train/``'s classes would shift every
  label after it (issue 23: 0.0% kNN on trivially separable data). The test split's labels are renumbered
  by class name into the training split's numbering; a test class the training split lacks is refused.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from nnclr.data.arrays import npz_file_for
from nnclr.data.dataset import ImageDataset
from nnclr.data.folder import split_folder
from nnclr.data.registry import parse_name
from nnclr.errors import UserError


def split_path(name: str, split: str) -> Path | None:
    """The file or folder ``split`` of an ``npz:`` or ``folder:`` source is read from; None for named sets.

    Raises:
        UserError: If the split does not exist (as :func:`nnclr.data.load_dataset` would).
    """
    source, path = parse_name(name)
    if path is None:
        return None
    root = Path(path).expanduser()
    return npz_file_for(root, split) if source == "npz" else split_folder(root, split)


def check_distinct(name: str, train_split: str, test_split: str, *, what: str = "data.test_split") -> None:
    """Refuse ``test_split`` when it is read from the same file or folder as ``train_split``.

    Raises:
        UserError: Naming the file both splits would read and what to do instead.
    """
    train, test = split_path(name, train_split), split_path(name, test_split)
    if train is None or test is None or not os.path.samefile(train, test):
        return
    if train.is_file():
        advice = f"put the splits in one folder as {train_split}.npz and {test_split}.npz and pass npz:FOLDER"
    else:
        advice = f"put the images in {train_split}/ and {test_split}/ subfolders"
    raise UserError(
        f"{name}: the {test_split!r} split is {train} again, the same images as the {train_split!r} split, so "
        f"every query would find its own copy; {advice}, or set {what} to a split of other images"
    )


def align_labels(train: ImageDataset, test: ImageDataset, *, test_split: str = "test") -> ImageDataset:
    """``test`` with its labels in ``train``'s class numbering (matched by class name), in place.

    Unlabelled sets and sets that already list the same classes are returned as they are.

    Raises:
        UserError: If ``test`` has a class ``train`` lacks (its label could never be predicted).
    """
    if not train.classes or not test.classes or list(test.classes) == list(train.classes):
        return test
    number = {name: i for i, name in enumerate(train.classes)}
    missing = [name for name in test.classes if name not in number]
    if missing:
        shown = ", ".join(repr(m) for m in missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise UserError(
            f"{test.name}: the {test_split!r} split has classes the training split lacks ({shown}); "
            "a classifier or kNN trained on it could never predict them: give both splits the same class "
            "subfolders (a test split may lack some of the training classes, not add new ones)"
        )
    mapping = torch.tensor([number[name] for name in test.classes], dtype=torch.int64)
    labels = test.labels
    test.labels = torch.where(labels >= 0, mapping[labels.clamp(min=0)], labels)
    test.classes = list(train.classes)
    return test
