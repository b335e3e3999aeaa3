"""The training loops the benchmarks compare: nnclr's own, and lightly's NNCLR modules as its example wires them.

Both run for ``n`` steps (:meth:`steps`, what the throughput benchmark times) or for a wall-clock
budget (:meth:`train_for`, the time-to-accuracy benchmark), and report the CIFAR-10 weighted-kNN
top-1 of their backbone with the same evaluation (:func:`knn`). Each is built inside a
:class:`common.Worker` process, so that its allocator setting, threads and memory are its own.

``OurLoop`` is ``nnclr.train``'s step (data in memory as uint8, both views made on the device in
one batch, bf16 autocast, channels_last, the bf16 support-set lookup, mallopt: the defaults).

``LightlyLoop`` is lightly's ``examples/pytorch/nnclr.py`` (lightly 1.6.0): ``SimCLRTransform``
on PIL images in a ``DataLoader`` with ``MultiViewCollate``, ``NNCLRProjectionHead`` and
``NNCLRPredictionHead``, ``NNMemoryBankModule``, ``NTXentLoss``, the two views forwarded one after
the other, ``SGD(lr=0.06)``, fp32. Changed, so that both sides compute the same model on the same
data: the backbone is ours (ResNet-18 with the CIFAR stem, or the small CNN), the heads have the
paper's sizes (lightly's own defaults: projection 2048-2048-256, prediction 4096-256) instead of
the example's 512-512-128 and 512-128, the memory bank has our support-set size, and the loader
has ``num_workers`` = the physical cores instead of 8 (this is a 2-core machine).
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision.datasets import VisionDataset

from nnclr.augment import normalization_for
from nnclr.backbones import build_backbone
from nnclr.config import load_config, to_dict
from nnclr.data import ImageDataset, load_dataset
from nnclr.evaluate.features import extract_features
from nnclr.evaluate.knn import knn_accuracy
from nnclr.evaluate.preprocess import Preprocess
from nnclr.runtime import resolve_dtype

IMAGENET_NORMALIZE = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # lightly's SimCLRTransform default
CALIBRATION_STEPS = 6  # steps timed to fit our learning-rate schedule into a wall-clock budget


def data_overrides(data: str) -> list[str]:
    """Config overrides for a data source: ``cifar10:ROOT`` (``ROOT/{train,test}.npz``) or any ``data.name``."""
    if data.startswith("cifar10:"):
        return ["data.name=cifar10", f"data.root={data.removeprefix('cifar10:')}", "data.download=false"]
    return [f"data.name={data}"]


def load_split(data: str, split: str) -> ImageDataset:
    """The split of a data source named as in :func:`data_overrides`."""
    config = load_config(None, data_overrides(data))
    return load_dataset(config.data.name, split, root=config.data.root, download=False)


def knn(backbone: nn.Module, train: ImageDataset, test: ImageDataset, mean: Any, std: Any,
        precision: str = "auto", limit: int = 0) -> dict[str, float]:
    """Weighted-kNN top-1/top-5 (k=20, T=0.07, nnclr's defaults) of ``backbone``'s features, on the CPU in
    ``precision`` (``auto``: bf16 where fast), train split as the memory, test split as queries
    (only their first ``limit`` images when > 0: a smoke test)."""
    if limit:
        train, test = (ImageDataset(d.images[:limit], d.labels[:limit]) for d in (train, test))
    device = torch.device("cpu")
    preprocess = Preprocess(train.images.shape[-1], tuple(mean), tuple(std), device, resolve_dtype(precision, device))
    extract = dict(preprocess=preprocess, channels_last=True)
    start = time.perf_counter()
    result = knn_accuracy(extract_features(backbone, train.images, **extract), train.labels,
                          extract_features(backbone, test.images, **extract), test.labels)
    return {"top1": result.top1, "top5": result.top5, "seconds": time.perf_counter() - start}


def _timed(fn: Any, images_per_call: int, calls: int) -> dict[str, float]:
    from common import cpu_seconds

    start, start_cpu = time.perf_counter(), cpu_seconds()
    for _ in range(calls):
        fn()
    return {"seconds": time.perf_counter() - start, "cpu_seconds": cpu_seconds() - start_cpu,
            "images": images_per_call * calls}


class OurLoop:
    """``nnclr.train``'s training step on a config made of ``overrides``.

    Args:
        overrides: ``KEY=VALUE`` config overrides (data, backbone, method, batch, support size...).
        prefill: fill the support set with random unit vectors first, so that every timed lookup
            scans all of it, as after ``support_size / batch_size`` steps of a real run.
    """

    def __init__(self, overrides: list[str], prefill: bool = False) -> None:
        self.overrides = list(overrides)
        self._build(self.overrides)
        if prefill and self.run.support is not None:
            size, dim = self.run.support.size, self.run.support.dim
            self.run.support.enqueue(F.normalize(torch.randn(size, dim), dim=1), None, None, step=-1)

    def _build(self, overrides: list[str]) -> None:
        from nnclr.train import build_run

        self.config = load_config(None, overrides)
        self.run = build_run(self.config)
        self.step, self.epoch, self.order = 0, -1, None

    def _one_step(self) -> float:
        from nnclr.train import epoch_order, train_step

        run = self.run
        if self.step // run.steps_per_epoch != self.epoch:
            self.epoch = self.step // run.steps_per_epoch
            self.order = epoch_order(run, self.epoch)
        loss, _ = train_step(run, self.step, self.order)
        self.step += 1
        return loss

    def planned_steps(self) -> int:
        """The steps of the run's schedule (``train.epochs``)."""
        return self.run.total_steps

    def steps(self, n: int) -> dict[str, float]:
        """Run ``n`` training steps; seconds, CPU seconds and images (samples; each gives 2 views)."""
        return _timed(self._one_step, self.config.optim.batch_size, n)

    def train_for(self, seconds: float, calibration_steps: int = CALIBRATION_STEPS) -> dict[str, Any]:
        """Pretrain for ``seconds`` of wall clock with the schedule fitted to it.

        The learning-rate schedule needs the run's length in advance: ``calibration_steps`` steps
        (after one warm-up step, not counted in the budget) give the step rate, the run is rebuilt
        from scratch with ``train.epochs`` set to what 97% of the budget holds at that rate, and it
        trains until the schedule ends or the budget is spent.
        """
        self._one_step()
        rate = calibration_steps / self.steps(calibration_steps)["seconds"]
        total = max(1, math.floor(0.97 * seconds * rate))
        epochs = total / self.run.steps_per_epoch
        self._build([*self.overrides, f"train.epochs={epochs!r}"])
        start = time.perf_counter()
        while self.step < self.run.total_steps and time.perf_counter() - start < seconds:
            loss = self._one_step()
        return {"seconds": time.perf_counter() - start, "steps": self.step, "planned_steps": self.run.total_steps,
                "epochs": self.step / self.run.steps_per_epoch, "loss": loss,
                "images": self.step * self.config.optim.batch_size}

    def knn(self, precision: str = "auto", limit: int = 0) -> dict[str, float]:
        """kNN accuracy of the backbone (:func:`knn`) on the config's train and test splits."""
        d = self.config.data
        train = self.run.train_set
        test = self.run.test_set or load_dataset(d.name, d.test_split or "test", root=d.root, download=False)
        return knn(self.run.model.backbone, train, test, *normalization_for(d.name), precision=precision,
                   limit=limit)

    def save(self, path: str) -> None:
        """The model and its config (``torch.load(weights_only=True)``), for the support-set lookup benchmark."""
        torch.save({"config": to_dict(self.config), "model": self.run.model.state_dict()}, path)


class _PILImages(VisionDataset):
    """uint8 images (N, 3, H, W) and labels as (PIL image, label) items with ``transform`` applied, as
    ``torchvision.datasets.CIFAR10`` gives them (what lightly's example wraps)."""

    def __init__(self, data: ImageDataset) -> None:
        super().__init__(root="")
        self.images = np.ascontiguousarray(data.images.permute(0, 2, 3, 1).numpy())  # (N, H, W, 3)
        self.labels = data.labels.tolist()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        image = Image.fromarray(self.images[i])
        return (self.transform(image) if self.transform is not None else image), self.labels[i]


class _LightlyNNCLR(nn.Module):
    """lightly's example model: backbone, projection head, prediction head; returns (z detached, p)."""

    def __init__(self, backbone: nn.Module, features: int, proj_dim: int) -> None:
        from lightly.models.modules import NNCLRPredictionHead, NNCLRProjectionHead

        super().__init__()
        self.backbone = backbone
        self.projection_head = NNCLRProjectionHead(features, 2048, proj_dim)
        self.prediction_head = NNCLRPredictionHead(proj_dim, 4096, proj_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.backbone(x).flatten(start_dim=1)
        z = self.projection_head(y)
        p = self.prediction_head(z)
        return z.detach(), p


class LightlyLoop:
    """lightly's NNCLR example loop (see the module docstring) on our backbone, batch and support size."""

    def __init__(self, data: str, backbone: str, batch: int, support: int, workers: int, seed: int = 0,
                 proj_dim: int = 256) -> None:
        from lightly.data import LightlyDataset
        from lightly.data.multi_view_collate import MultiViewCollate
        from lightly.loss import NTXentLoss
        from lightly.models.modules import NNMemoryBankModule
        from lightly.transforms.simclr_transform import SimCLRTransform

        torch.manual_seed(seed)
        self.data, self.batch = data, batch
        encoder, features = build_backbone(backbone, cifar_stem=True)
        self.model = _LightlyNNCLR(encoder, features, proj_dim)
        self.memory_bank = NNMemoryBankModule(size=(support, proj_dim))
        self.criterion = NTXentLoss()
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.06)
        self.train_set = load_split(data, "train")
        dataset = LightlyDataset.from_torch_dataset(_PILImages(self.train_set),
                                                    transform=SimCLRTransform(input_size=self.train_set.images.shape[-1]))
        self.loader = torch.utils.data.DataLoader(dataset, batch_size=batch, collate_fn=MultiViewCollate(),
                                                  shuffle=True, drop_last=True, num_workers=workers)

    def _step(self, x0: torch.Tensor, x1: torch.Tensor) -> float:
        z0, p0 = self.model(x0)
        z1, p1 = self.model(x1)
        z0 = self.memory_bank(z0, update=False)
        z1 = self.memory_bank(z1, update=True)
        loss = 0.5 * (self.criterion(z0, p1) + self.criterion(z1, p0))
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        return loss.item()

    def _batches(self, n: int | None, seconds: float | None = None) -> dict[str, Any]:
        """Train on ``n`` batches or for ``seconds``; a new loader iterator per call, so that no worker
        prepares batches while another alternative is being timed."""
        from common import cpu_seconds

        self.model.train()
        start, start_cpu, done, loss = time.perf_counter(), cpu_seconds(), 0, math.nan
        while (n is None or done < n) and (seconds is None or time.perf_counter() - start < seconds):
            for (x0, x1), _, _ in self.loader:
                loss = self._step(x0, x1)
                done += 1
                if (n is not None and done >= n) or (seconds is not None and time.perf_counter() - start >= seconds):
                    break
        return {"seconds": time.perf_counter() - start, "cpu_seconds": cpu_seconds() - start_cpu,
                "images": done * self.batch, "steps": done, "loss": loss,
                "epochs": done / len(self.loader)}

    def steps(self, n: int) -> dict[str, float]:
        """Run ``n`` training steps (data loading included); seconds, CPU seconds (with the loader's
        workers, which end with the iterator) and images."""
        return self._batches(n)

    def train_for(self, seconds: float) -> dict[str, Any]:
        """Train for ``seconds`` of wall clock (epochs of the example's loader, constant learning rate)."""
        return self._batches(None, seconds)

    def knn(self, precision: str = "auto", limit: int = 0) -> dict[str, float]:
        """kNN accuracy (:func:`knn`) with the normalisation lightly trained with (ImageNet's)."""
        return knn(self.model.backbone, self.train_set, load_split(self.data, "test"), *IMAGENET_NORMALIZE,
                   precision=precision, limit=limit)


def lightly_available() -> bool:
    """Whether lightly's NNCLR modules import (``pip install --no-deps -r bench/requirements.txt``)."""
    try:
        import lightly.loss  # noqa: F401
        import lightly.models.modules  # noqa: F401
    except ImportError:
        return False
    return True
