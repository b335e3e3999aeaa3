"""The evaluation protocols of ``nnclr eval``, each producing one JSON record in ``<run_dir>/eval/``.

A record (read by ``nnclr report``) has the top-level keys ``protocol``, ``data``, ``settings``,
``splits`` (sizes), ``top1``/``top5`` (percent, or null), ``metrics`` (extra numbers),
``wall_time_s``, ``checkpoint``, ``checkpoint_hash``, ``step`` and ``config``.

Protocols (docs/evaluation.md gives the exact settings, RESULTS.md the measured results):

* ``knn``: weighted kNN on cached features (:mod:`nnclr.evaluate.knn`), optionally a (k, T) sweep.
* ``linear``: linear probe, ``fast`` on cached features or ``paper`` on augmented images
  (:mod:`nnclr.evaluate.linear`).
* ``semi``: fine-tuning on class-balanced 1% / 10% label subsets (:mod:`nnclr.evaluate.semi`).
* ``transfer``: the fast linear probe on another data set than the pretraining one.
* ``retrieval``: test images as queries against the training images (:mod:`nnclr.evaluate.retrieval`).
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from nnclr import rundir
from nnclr.config import EVAL, to_dict
from nnclr.data import ImageDataset, load_dataset
from nnclr.data.lazy import select
from nnclr.data.pairs import align_labels, check_distinct
from nnclr.errors import UserError
from nnclr.evaluate import semi
from nnclr.evaluate.cache import SplitFeatures, safe_name, split_features
from nnclr.evaluate.knn import knn_accuracy, knn_sweep
from nnclr.evaluate.linear import PAPER_SGD, fast_linear_probe, paper_linear_probe
from nnclr.evaluate.preprocess import Preprocess
from nnclr.evaluate.retrieval import retrieval_metrics
from nnclr.evaluate.sgd import ClassifierTask
from nnclr.pretrained import Pretrained

PROTOCOLS = ("knn", "linear", "semi", "transfer", "retrieval")
SWEEP_KS = (10, 20, 50, 100, 200)
SWEEP_TEMPERATURES = (0.02, 0.05, 0.07, 0.1, 0.2, 0.5)


@dataclass
class Evaluation:
    """What every protocol shares: the encoder, where results go, the data set and its splits.

    Attributes:
        pretrained: the encoder (:func:`nnclr.load`), in eval mode.
        data: the data set to evaluate on (default: the one pretrained on).
        train_split, test_split: its splits (memory / classifier training, and test).
        run_dir: the checkpoint's folder; results go to ``eval/``, features to ``features/``.
        progress: progress bars (default: when stderr is a terminal).
        datasets: the images of each (data, split) loaded so far (:meth:`dataset`); one given here is used as it is.
    """

    pretrained: Pretrained
    data: str
    train_split: str = EVAL.train_split
    test_split: str = EVAL.test_split
    run_dir: Path = field(default_factory=Path)
    progress: bool | None = None
    datasets: dict[tuple[str, str], ImageDataset] = field(default_factory=dict, repr=False)

    @property
    def pretrain_data(self) -> str:
        return self.pretrained.config.data.name

    def dataset(self, data: str, split: str) -> ImageDataset:
        """The images of ``data``/``split`` at the encoder's input size (loaded once per evaluation).

        Any other split than ``train_split`` is checked to hold other images than it and its labels are put in
        its class numbering (:mod:`nnclr.data.pairs`). A ``folder:`` source is indexed, not decoded
        (``lazy=True``): its images are a :class:`~nnclr.data.lazy.FolderImages` that every protocol reads in
        batches, so memory does not grow with the number of images. The other sources are in-memory tensors.
        """
        key = (data, split)
        if key not in self.datasets:
            own = data == self.pretrain_data
            config = self.pretrained.config.data
            if split != self.train_split:  # the test split: other images than the training split's, its classes
                check_distinct(data, self.train_split, split, what="--test-split")
            dataset = load_dataset(
                data, split, root=config.root if own else None, image_size=self.pretrained.image_size,
                download=config.download if own else False, lazy=True,
            )
            if split != self.train_split and dataset.classes:
                align_labels(self.dataset(data, self.train_split), dataset, test_split=split)
            self.datasets[key] = dataset
        return self.datasets[key]

    def features(self, data: str, split: str) -> SplitFeatures:
        """Cached features of ``data``/``split`` (extracted on first use)."""
        return split_features(self.pretrained, self.run_dir, data, split, load=self.dataset, progress=self.progress)

    def record(
        self, protocol: str, data: str, settings: dict[str, Any], splits: dict[str, int], top1: float | None,
        top5: float | None, metrics: dict[str, Any], started: float,
    ) -> dict[str, Any]:
        """The JSON record of one protocol run."""
        return {
            "protocol": protocol, "data": data, "settings": settings, "splits": splits, "top1": top1, "top5": top5,
            "metrics": metrics, "wall_time_s": round(time.perf_counter() - started, 3),
            "checkpoint": str(self.pretrained.checkpoint), "checkpoint_hash": self.pretrained.checkpoint_hash,
            "step": self.pretrained.step, "config": to_dict(self.pretrained.config),
        }


def result_path(run_dir: Path, protocol: str, data: str, mode: str | None = None) -> Path:
    """``<run_dir>/eval/<protocol>-<safe data name>.json``; the paper linear probe is ``linear-paper-<data>.json``
    (so that it does not replace the fast probe's result)."""
    name = f"{protocol}-paper" if protocol == "linear" and mode == "paper" else protocol
    return run_dir / rundir.EVAL / f"{name}-{safe_name(data)}.json"


def write_record(run_dir: Path, record: dict[str, Any]) -> Path:
    """Write ``record`` as JSON (atomically) and return its path."""
    path = result_path(run_dir, record["protocol"], record["data"], record["settings"].get("mode"))
    rundir.make_dir(run_dir, rundir.EVAL)
    rundir.write_text_atomic(path, json.dumps(record, indent=2) + "\n", what=f"the {record['protocol']} result",
                             kept="the cached features are intact")
    return path


def labelled(features: SplitFeatures, protocol: str) -> SplitFeatures:
    """Only the entries with known labels; none at all is a UserError naming the protocol."""
    known = features.labelled
    if not bool(known.any()):
        raise UserError(
            f"{features.data} split {features.split!r} has no labels; the {protocol} protocol needs labelled "
            "images (a folder with one subfolder per class, or an .npz with 'labels')"
        )
    if bool(known.all()):
        return features
    return SplitFeatures(features.features[known], features.labels[known], features.classes, features.data,
                         features.split, features.cached)


def labelled_pair(evaluation: Evaluation, data: str, protocol: str) -> tuple[SplitFeatures, SplitFeatures]:
    """Labelled train and test features of ``data``."""
    if evaluation.train_split == evaluation.test_split:
        raise UserError(
            f"train and test split are both {evaluation.train_split!r}; pass different --train-split and --test-split"
        )
    train = labelled(evaluation.features(data, evaluation.train_split), protocol)
    test = labelled(evaluation.features(data, evaluation.test_split), protocol)
    return train, test


def num_classes_of(*labels: torch.Tensor) -> int:
    return int(max(int(t.max()) for t in labels)) + 1


def knn(
    evaluation: Evaluation, *, k: int = EVAL.knn_k, temperature: float = EVAL.knn_temperature, sweep: bool = False,
) -> dict[str, Any]:
    """Weighted kNN (Wu et al. 2018): cosine similarity, votes weighted exp(sim / T)."""
    started = time.perf_counter()
    train, test = labelled_pair(evaluation, evaluation.data, "knn")
    result = knn_accuracy(train.features, train.labels, test.features, test.labels, k=k, temperature=temperature)
    settings: dict[str, Any] = {"k": k, "temperature": temperature, "features": "backbone h, L2-normalised",
                                "train_split": evaluation.train_split, "test_split": evaluation.test_split}
    metrics: dict[str, Any] = {}
    top1, top5 = result.top1, result.top5
    if sweep:
        grid = knn_sweep(train.features, train.labels, test.features, test.labels, ks=SWEEP_KS,
                         temperatures=SWEEP_TEMPERATURES)
        best = max(grid, key=lambda r: r.top1)
        settings["sweep"] = {"k": list(SWEEP_KS), "temperature": list(SWEEP_TEMPERATURES)}
        metrics["grid"] = [{"k": r.k, "temperature": r.temperature, "top1": r.top1, "top5": r.top5} for r in grid]
        metrics["best"] = {"k": best.k, "temperature": best.temperature, "top1": best.top1, "top5": best.top5}
        metrics["default"] = {"k": k, "temperature": temperature, "top1": result.top1, "top5": result.top5}
        top1, top5 = best.top1, best.top5
    metrics["features_cached"] = train.cached and test.cached
    return evaluation.record("knn", evaluation.data, settings, {"train": len(train), "test": len(test)}, top1, top5,
                             metrics, started)


def linear(
    evaluation: Evaluation, *, mode: str = EVAL.linear_mode, data: str | None = None, protocol: str = "linear",
    epochs: int | None = None, batch_size: int = EVAL.batch_size, lr: float | None = None, seed: int = EVAL.seed,
) -> dict[str, Any]:
    """Linear probe on frozen features: ``fast`` (L-BFGS on cached features) or ``paper`` (SGD on augmented images).

    ``epochs`` and ``lr`` (at batch 256) of the paper probe default to ``EVAL.paper_epochs`` and ``EVAL.paper_lr``.
    """
    started = time.perf_counter()
    data = data or evaluation.data
    epochs = EVAL.paper_epochs if epochs is None else epochs
    lr = EVAL.paper_lr if lr is None else lr
    settings: dict[str, Any] = {"mode": mode, "train_split": evaluation.train_split,
                                "test_split": evaluation.test_split, "seed": seed}
    if protocol == "transfer":
        settings["pretrain_data"] = evaluation.pretrain_data
        settings["image_size"] = evaluation.pretrained.image_size
    if mode == "fast":
        train, test = labelled_pair(evaluation, data, protocol)
        result = fast_linear_probe(train.features, train.labels, test.features, test.labels, seed=seed)
        settings.update({"solver": "full-batch L-BFGS (strong Wolfe), multinomial logistic regression",
                         "features": "backbone h, L2-normalised, then standardised with train mean/std",
                         "l2_grid": sorted(float(v) for v in result.validation) or None,
                         "validation_fraction": 0.1, "refit_on": "all of train"})
        metrics: dict[str, Any] = {"l2": result.l2, "validation_top1": result.validation,
                                   "features_cached": train.cached and test.cached}
        splits = {"train": result.num_train - result.num_val, "val": result.num_val, "test": result.num_test}
    elif mode == "paper":
        train_set = evaluation.dataset(data, evaluation.train_split)
        test_set = evaluation.dataset(data, evaluation.test_split)
        if evaluation.train_split == evaluation.test_split:
            raise UserError("train and test split are the same; pass different --train-split and --test-split")
        train_known, test_known = train_set.labels >= 0, test_set.labels >= 0
        for known, split in ((train_known, evaluation.train_split), (test_known, evaluation.test_split)):
            if not bool(known.any()):
                raise UserError(f"{data} split {split!r} has no labels; the {protocol} protocol needs labelled images")
        pretrained = evaluation.pretrained
        task = ClassifierTask(
            pretrained.encoder, select(train_set.images, train_known), train_set.labels[train_known],
            select(test_set.images, test_known), test_set.labels[test_known],
            num_classes=num_classes_of(train_set.labels, test_set.labels), num_features=pretrained.feature_dim,
            preprocess=Preprocess.of(pretrained),
        )
        result = paper_linear_probe(task, replace(PAPER_SGD, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed),
                                    progress=evaluation.progress)
        settings.update({"epochs": epochs, "batch_size": batch_size, "lr": lr, "lr_scaled": lr * batch_size / 256,
                         "optimizer": f"SGD, Nesterov momentum {PAPER_SGD.momentum:g}, no weight decay",
                         "schedule": "cosine, per step",
                         "augmentation": "random resized crop (0.08-1) + horizontal flip",
                         "head": "BatchNorm1d(affine=False) + Linear", "backbone": "frozen, eval mode"})
        metrics = dict(result.extra)
        splits = {"train": result.num_train, "test": result.num_test}
    else:
        raise UserError(f"linear mode {mode!r} unknown; use fast or paper")
    return evaluation.record(protocol, data, settings, splits, result.top1, result.top5, metrics, started)


def transfer(evaluation: Evaluation, *, data: str | None = None, seed: int = EVAL.seed) -> dict[str, Any]:
    """Fast linear probe on another data set than the pretraining one (images resized to the encoder's size)."""
    target = data or evaluation.data
    if target == evaluation.pretrain_data:
        raise UserError(
            f"transfer evaluates on another data set than the one pretrained on ({target}); "
            "pass it with --transfer-data (e.g. folder:PATH or npz:PATH)"
        )
    return linear(evaluation, mode="fast", data=target, protocol="transfer", seed=seed)


def retrieval(evaluation: Evaluation, *, ks: tuple[int, ...] = EVAL.retrieval_ks) -> dict[str, Any]:
    """Test images as queries against the training images: recall@k and mAP@R by class label."""
    started = time.perf_counter()
    train, test = labelled_pair(evaluation, evaluation.data, "retrieval")
    result = retrieval_metrics(test.features, test.labels, train.features, train.labels, ks=ks)
    settings = {"queries": evaluation.test_split, "gallery": evaluation.train_split, "similarity": "cosine",
                "features": "backbone h, L2-normalised", "relevance": "same class label", "ks": list(ks)}
    metrics = {**{f"recall@{k}": v for k, v in result.recall.items()}, "mAP@R": result.map_at_r}
    return evaluation.record("retrieval", evaluation.data, settings,
                             {"train": result.num_gallery, "test": result.num_queries},
                             result.recall[1] if 1 in ks else None, None, metrics, started)


def semi_supervised(
    evaluation: Evaluation, *, fractions: tuple[float, ...] = EVAL.semi_fractions, subset_file: Path | None = None,
    epochs: int | None = None, batch_size: int = EVAL.batch_size, lr: float | None = None, seed: int = EVAL.seed,
    echo: Callable[..., None] = print,
) -> dict[str, Any]:
    """Fine-tune backbone + linear head on class-balanced label subsets; one result per fraction.

    ``epochs`` defaults to SimCLR's per fraction (:meth:`nnclr.config.EvalDefaults.semi_epochs`), ``lr`` (at
    batch 256) to ``EVAL.semi_lr``.
    """
    started = time.perf_counter()
    lr = EVAL.semi_lr if lr is None else lr
    data = evaluation.data
    if evaluation.train_split == evaluation.test_split:
        raise UserError("train and test split are the same; pass different --train-split and --test-split")
    train_set = evaluation.dataset(data, evaluation.train_split)
    test_set = evaluation.dataset(data, evaluation.test_split)
    for dataset, split in ((train_set, evaluation.train_split), (test_set, evaluation.test_split)):
        if not dataset.has_labels:
            raise UserError(f"{data} split {split!r} has no labels; the semi protocol needs labelled images")
    test_known = test_set.labels >= 0
    pretrained = evaluation.pretrained
    num_classes = num_classes_of(train_set.labels, test_set.labels)
    subsets: list[tuple[str, float, torch.Tensor, Path]] = []
    if subset_file is not None:
        indices = semi.read_subset(Path(subset_file), len(train_set), train_set.labels)
        fraction = len(indices) / int((train_set.labels >= 0).sum())  # for the default epochs, and the record
        subsets.append((Path(subset_file).stem, fraction, indices, Path(subset_file)))
    else:
        for fraction in fractions:
            indices = semi.balanced_subset(train_set.labels, fraction, seed)
            path = evaluation.run_dir / rundir.EVAL_SUBSETS / (
                f"{safe_name(data)}-{safe_name(evaluation.train_split)}-{semi.fraction_name(fraction)}-seed{seed}.txt"
            )
            if path.is_file():
                if not torch.equal(semi.read_subset(path, len(train_set), train_set.labels), indices):
                    raise UserError(f"{path} differs from the subset drawn now; delete it or pass --subset-file")
            else:
                rundir.make_dir(evaluation.run_dir, rundir.EVAL_SUBSETS)  # links planted there are not followed
                semi.write_subset(path, indices)
            subsets.append((semi.fraction_name(fraction), fraction, indices, path))
    per_subset = {}
    for name, fraction, indices, path in subsets:
        run_epochs = epochs if epochs is not None else EVAL.semi_epochs(fraction)
        echo(f"semi {name}: fine-tuning on {len(indices)} labelled images for {run_epochs} epochs", file=sys.stderr)
        task = ClassifierTask(
            pretrained.encoder, select(train_set.images, indices), train_set.labels[indices],
            select(test_set.images, test_known), test_set.labels[test_known], num_classes=num_classes,
            num_features=pretrained.feature_dim, preprocess=Preprocess.of(pretrained),
        )
        sgd = replace(semi.FINETUNE_SGD, epochs=run_epochs, batch_size=batch_size, lr=lr, seed=seed)
        result = semi.finetune(task, sgd, progress=evaluation.progress)
        per_subset[name] = {"fraction": round(fraction, 6), "labelled_images": len(indices), "subset_file": str(path),
                            "epochs": run_epochs, "top1": result.top1, "top5": result.top5,
                            "batch_size": result.extra["batch_size"], "final_loss": result.extra["final_loss"],
                            "epoch_losses": result.extra["epoch_losses"]}
    settings = {"fractions": [round(f, 6) for _, f, _, _ in subsets],
                "subset_file": str(subset_file) if subset_file else None,
                "seed": seed, "epochs": epochs if epochs is not None else (
                    f"{EVAL.semi_epochs_few} for <={EVAL.semi_few_labels:.0%}, {EVAL.semi_epochs_many} above (SimCLR)"),
                "batch_size": batch_size, "lr": lr,
                "optimizer": f"SGD, Nesterov momentum {semi.FINETUNE_SGD.momentum:g}, no weight decay",
                "schedule": "cosine, per step", "augmentation": "random resized crop (0.08-1) + horizontal flip",
                "batch_norm": "training mode while fine-tuning; running statistics then recomputed over the "
                              "labelled images (precise BN); eval mode on test",
                "train_split": evaluation.train_split, "test_split": evaluation.test_split}
    first = next(iter(per_subset.values()))
    splits = {"train": len(train_set), "test": int(test_known.sum()),
              **{f"labelled_{name}": v["labelled_images"] for name, v in per_subset.items()}}
    return evaluation.record("semi", data, settings, splits, first["top1"], first["top5"],
                             {"subsets": per_subset}, started)


def semi_fits(evaluation: Evaluation, fractions: tuple[float, ...]) -> str | None:
    """Why semi cannot run on this data (None when it can): every class needs >= 1/fraction labelled images."""
    labels = evaluation.features(evaluation.data, evaluation.train_split).labels
    labels = labels[labels >= 0]
    if labels.numel() == 0:
        return "no labels"
    smallest = int(torch.bincount(labels)[torch.bincount(labels) > 0].min())
    needed = math.ceil(1 / min(fractions) - 1e-9)
    if smallest < needed:
        return f"a class has only {smallest} labelled training images; {min(fractions):g} of them is less than one"
    return None
