"""SGD on augmented labelled images: the training loop of the paper linear probe and of semi-supervised fine-tuning.

Both protocols (SimCLR, Chen et al. 2020, Appendix B.5 fine-tuning and B.6 linear evaluation; used by BYOL and
NNCLR, Dwibedi et al. 2021, Sec. 4.2) train a classifier on the labelled training images the same way:

* every epoch, the images in a fresh random order (a CPU generator seeded with ``seed``), in batches;
* one random resized crop + horizontal flip of each image (:meth:`Preprocess.augmented`, a generator on the
  device seeded with ``seed``);
* cross-entropy of the logits, SGD with Nesterov momentum, learning rate ``lr x batch / 256`` (linear scaling),
  cosine-annealed to 0 per step over the whole run, no warm-up.

Both then test on centre (un-augmented) images in eval mode (:func:`nnclr.evaluate.linear.evaluate_head`).

What differs is the caller's: which parameters move (the head; or the encoder too) and how the logits come
from a batch (a frozen encoder under ``no_grad``, or the whole network under autocast), the batches (fixed
``batch_size`` with a smaller last one, never of one image: that one joins the batch before it, for batch norm in
training mode; or near-equal), weight decay, and what a non-finite loss means.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from nnclr.config import EVAL
from nnclr.data.lazy import FolderImages, prefetched
from nnclr.evaluate.preprocess import Preprocess


@dataclass(frozen=True)
class ClassifierTask:
    """What the paper linear probe and fine-tuning work on: an encoder and labelled training and test images.

    Attributes:
        encoder: the pretrained encoder f, images (B, 3, S, S) -> features (B, ``num_features``).
        train_images, test_images: uint8 (N, 3, H, W) / (M, 3, H, W): tensors, or folders decoded on demand
            (:class:`~nnclr.data.lazy.FolderImages`; read one mini-batch at a time, by index).
        train_labels, test_labels: int64 (N,) / (M,), all known, in [0, ``num_classes``).
        num_classes: C, the classifier's outputs.
        num_features: F, the encoder's feature dimension.
        preprocess: the encoder's input size, normalisation, device and autocast precision.
    """

    encoder: nn.Module
    train_images: torch.Tensor | FolderImages
    train_labels: torch.Tensor
    test_images: torch.Tensor | FolderImages
    test_labels: torch.Tensor
    num_classes: int
    num_features: int
    preprocess: Preprocess

    @property
    def num_train(self) -> int:
        return int(self.train_images.shape[0])

    @property
    def num_test(self) -> int:
        return int(self.test_images.shape[0])


@dataclass(frozen=True)
class SGDSettings:
    """The SGD of one evaluation run.

    Attributes:
        epochs: passes over the labelled images.
        lr: learning rate at batch 256; the one used is ``lr x batch / 256``.
        batch_size: images per step.
        momentum: Nesterov momentum.
        weight_decay: L2 penalty on every trained parameter (SGD's ``weight_decay``).
        seed: seeds the image order and the augmentations.
    """

    epochs: int
    lr: float
    batch_size: int = EVAL.batch_size
    momentum: float = EVAL.momentum
    weight_decay: float = 0.0
    seed: int = EVAL.seed


@dataclass
class SGDRun:
    """What :func:`train_classifier` did.

    Attributes:
        steps: optimiser steps.
        batch_size: the largest batch, which the learning rate was scaled with.
        losses: the loss of every step, one list per epoch.
    """

    steps: int
    batch_size: int
    losses: list[list[float]]

    @property
    def last_loss(self) -> float | None:
        """The loss of the last step (None without any)."""
        return next((epoch[-1] for epoch in reversed(self.losses) if epoch), None)


def train_classifier(
    logits_of: Callable[[torch.Tensor], torch.Tensor],
    parameters: Iterable[nn.Parameter],
    task: ClassifierTask,
    settings: SGDSettings,
    *,
    equal_batches: bool = False,
    desc: str = "sgd",
    progress: bool | None = None,
    on_loss: Callable[[int, torch.Tensor], None] | None = None,
) -> SGDRun:
    """Train ``parameters`` with SGD on augmented views of the task's training images; the caller puts its modules
    in train mode.

    Args:
        logits_of: normalised views float32 (B, 3, S, S) on the device -> logits (B, C).
        parameters: what the optimiser moves.
        task: the training images and labels (read one batch at a time) and their preprocessing.
        settings: epochs, batch size, learning rate, momentum, weight decay, seed.
        equal_batches: cut each epoch into ``ceil(N / batch_size)`` near-equal batches (no small last batch, for
            batch norm in training mode); the learning rate is scaled with the largest of them.
        desc: the progress bar's label.
        progress: a progress bar (default: when stderr is a terminal).
        on_loss: called with (epoch, loss) before each step's backward pass; it may raise to stop.
    """
    if progress is None:
        progress = sys.stderr.isatty()
    images, labels, preprocess = task.train_images, task.train_labels, task.preprocess
    num = task.num_train
    batch_size = settings.batch_size
    steps_per_epoch = max(1, math.ceil(num / batch_size))
    if not equal_batches and num > 1 and num % batch_size == 1:
        steps_per_epoch -= 1  # a last batch of one image joins the one before: batch norm in training mode needs two
    if equal_batches:
        batch_size = math.ceil(num / steps_per_epoch)  # the largest of the near-equal batches
    optimizer = torch.optim.SGD(
        parameters, lr=settings.lr * batch_size / 256, momentum=settings.momentum,
        weight_decay=settings.weight_decay, nesterov=True,
    )
    total = settings.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total))
    generator = torch.Generator(device=preprocess.device).manual_seed(settings.seed)
    order_generator = torch.Generator().manual_seed(settings.seed)
    losses: list[list[float]] = []
    with tqdm(total=total, disable=not progress, unit="step", desc=desc, dynamic_ncols=True, leave=False) as bar:
        for epoch in range(settings.epochs):
            order = torch.randperm(num, generator=order_generator)
            if equal_batches:
                batches = list(order.tensor_split(steps_per_epoch))
            else:
                batches = [order[start : start + batch_size] for start in range(0, num, batch_size)]
                if len(batches) > steps_per_epoch:
                    batches[-2:] = [torch.cat(batches[-2:])]
            losses.append([])
            for idx, batch in zip(batches, prefetched(images, batches)):
                x = preprocess.augmented(batch, generator)
                loss = F.cross_entropy(logits_of(x).float(), labels[idx].to(preprocess.device))
                if on_loss is not None:
                    on_loss(epoch, loss)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                losses[-1].append(loss.item())
                bar.update(1)
    return SGDRun(steps=total, batch_size=batch_size, losses=losses)

