"""Linear evaluation of a frozen encoder (the linear-probe protocol of SimCLR, BYOL and NNCLR).

Two modes:

* ``fast``: multinomial logistic regression on cached features, full-batch L-BFGS
  (``torch.optim.LBFGS`` with a strong-Wolfe line search), minimising
  ``mean cross-entropy + l2/2 * ||W||^2`` (the bias is not penalised, as in scikit-learn). The
  features are standardised with the training mean and standard deviation. ``l2`` is chosen
  on a validation split carved from train (seeded), then the classifier is refitted on all of
  train. This is scikit-learn's ``LogisticRegression(C=1 / (l2 * N))`` solved with PyTorch
  (tested against it).
* ``paper``: SGD on augmented images (random resized crop + horizontal flip, the ``crops``
  recipe of :mod:`nnclr.augment`; the loop of :mod:`nnclr.evaluate.sgd`) with the backbone frozen
  in eval mode, a cosine learning-rate schedule, evaluated on centre (un-augmented) test images.
  The head is batch-norm without affine parameters followed by a linear layer (as in MAE, He et
  al. 2022, Sec. A.1, which is a linear map at test time). The backbone's weights and buffers
  are checked to be bit-identical before and after.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from nnclr.config import EVAL
from nnclr.data.lazy import FolderImages, batch_slices, prefetched
from nnclr.evaluate.preprocess import Preprocess
from nnclr.evaluate.sgd import ClassifierTask, SGDSettings, train_classifier

L2_GRID = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
EVAL_BATCH = 512  # test images per forward pass (and per decode of a folder read on demand)


@dataclass
class LinearResult:
    """Top-1/top-5 test accuracy (percent) of a linear classifier and how it was chosen."""

    top1: float
    top5: float
    num_train: int
    num_test: int
    l2: float | None = None
    validation: dict[str, float] = field(default_factory=dict)  # l2 -> validation top-1
    num_val: int = 0
    extra: dict[str, object] = field(default_factory=dict)


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Top-1 and top-5 accuracy in percent of logits (M, C) against labels (M,)."""
    if labels.numel() == 0:
        return 0.0, 0.0
    ranked = logits.topk(min(5, logits.shape[1]), dim=1).indices == labels[:, None]  # (M, 5)
    return 100.0 * ranked[:, 0].float().mean().item(), 100.0 * ranked.any(dim=1).float().mean().item()


def fit_logistic(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    l2: float,
    *,
    max_iter: int = 200,
    init: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression by full-batch L-BFGS.

    Args:
        x: float32 features (N, F).
        y: int64 labels (N,) in [0, C).
        num_classes: C.
        l2: strength of ``l2/2 * ||W||^2`` added to the mean cross-entropy.
        max_iter: L-BFGS iterations.
        init: optional warm start (W (C, F), b (C,)).

    Returns:
        W (C, F) and b (C,).
    """
    weight = torch.zeros(num_classes, x.shape[1]) if init is None else init[0].clone()
    bias = torch.zeros(num_classes) if init is None else init[1].clone()
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    optimizer = torch.optim.LBFGS(
        [weight, bias], lr=1.0, max_iter=max_iter, history_size=20, tolerance_grad=1e-6,
        tolerance_change=1e-9, line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight.T + bias, y) + 0.5 * l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weight.detach(), bias.detach()


def standardise(train: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    """Subtract the training mean and divide by the training standard deviation (per feature)."""
    mean = train.mean(dim=0)
    std = train.std(dim=0).clamp_min(1e-6)
    return [(t - mean) / std for t in (train, *others)]


def fast_linear_probe(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    *,
    l2_grid: tuple[float, ...] = L2_GRID,
    val_fraction: float = 0.1,
    seed: int = 0,
    max_iter: int = 200,
) -> LinearResult:
    """Linear probe on frozen features (N, F) / (M, F) with labels (N,) / (M,); l2 chosen on validation."""
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    train_x, test_x = train_x.float(), test_x.float()
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(train_x.shape[0], generator=generator)
    num_val = int(round(val_fraction * train_x.shape[0])) if len(l2_grid) > 1 else 0
    validation: dict[str, float] = {}
    best = l2_grid[0]
    if num_val > 0:
        val_idx, fit_idx = order[:num_val], order[num_val:]
        fit_x, val_x = standardise(train_x[fit_idx], train_x[val_idx])
        init = None
        best_acc = -1.0
        for l2 in sorted(l2_grid, reverse=True):  # strong to weak, warm-started
            init = fit_logistic(fit_x, train_y[fit_idx], num_classes, l2, max_iter=max_iter // 2, init=init)
            acc = topk_accuracy(val_x @ init[0].T + init[1], train_y[val_idx])[0]
            validation[f"{l2:g}"] = acc
            if acc > best_acc:
                best, best_acc = l2, acc
    all_x, test_x = standardise(train_x, test_x)
    weight, bias = fit_logistic(all_x, train_y, num_classes, best, max_iter=max_iter)
    top1, top5 = topk_accuracy(test_x @ weight.T + bias, test_y)
    return LinearResult(
        top1=top1, top5=top5, num_train=int(train_x.shape[0]), num_test=int(test_x.shape[0]), l2=best,
        validation=validation, num_val=num_val,
    )


def state_snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every parameter and buffer (for the bit-identity check)."""
    return {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}


def unchanged(module: nn.Module, snapshot: dict[str, torch.Tensor]) -> bool:
    """True when every parameter and buffer of ``module`` equals ``snapshot`` bit for bit."""
    state = module.state_dict()
    return state.keys() == snapshot.keys() and all(torch.equal(state[k], snapshot[k]) for k in snapshot)


@torch.no_grad()
def evaluate_head(
    backbone: nn.Module, head: nn.Module, images: torch.Tensor | FolderImages, labels: torch.Tensor,
    preprocess: Preprocess, batch_size: int | None = None,
) -> tuple[float, float]:
    """Top-1/top-5 (percent) of ``head(backbone(x))``, both in eval mode, on centre test images x (uint8 (M, 3, H, W))
    with labels (M,), ``batch_size`` (default ``EVAL_BATCH``) at a time."""
    batch_size = batch_size or EVAL_BATCH
    backbone.eval()
    head.eval()
    logits = []
    for batch in prefetched(images, batch_slices(images.shape[0], batch_size)):
        x = preprocess.centre(batch)
        with preprocess.autocast():
            h = backbone(x)
        logits.append(head(h.float()).float().cpu())
    return topk_accuracy(torch.cat(logits), labels.cpu())


PAPER_SGD = SGDSettings(epochs=EVAL.paper_epochs, lr=EVAL.paper_lr, weight_decay=EVAL.paper_weight_decay)
"""The paper linear probe's SGD: 100 epochs, learning rate 0.1 at batch 256, batch 256, no weight decay."""


def paper_linear_probe(
    task: ClassifierTask, settings: SGDSettings = PAPER_SGD, *, progress: bool | None = None
) -> LinearResult:
    """The standard linear protocol: SGD on augmented images (:func:`nnclr.evaluate.sgd.train_classifier`), frozen
    encoder, cosine schedule; the head is ``BatchNorm1d(affine=False)`` + ``Linear``, the latter initialised at zero.

    Args:
        task: the encoder (kept in eval mode and checked bit-identical afterwards), the labelled training and
            test images and their preprocessing.
        settings: epochs, batch size, learning rate at batch 256 (scaled linearly), momentum, weight decay, seed.
        progress: a progress bar (default: when stderr is a terminal).

    Raises:
        RuntimeError: if the encoder's weights or buffers changed (a bug, never expected).
    """
    backbone, num_features = task.encoder, task.num_features
    head = nn.Sequential(nn.BatchNorm1d(num_features, affine=False), nn.Linear(num_features, task.num_classes))
    head = head.to(task.preprocess.device)
    nn.init.zeros_(head[1].weight)
    nn.init.zeros_(head[1].bias)
    snapshot = state_snapshot(backbone)
    was_training = backbone.training
    requires_grad = [p.requires_grad for p in backbone.parameters()]
    backbone.eval().requires_grad_(False)

    def logits_of(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), task.preprocess.autocast():
            h = backbone(x)
        return head(h.float())

    try:
        head.train()
        run = train_classifier(logits_of, head.parameters(), task, settings, desc="linear (paper)", progress=progress)
        top1, top5 = evaluate_head(backbone, head, task.test_images, task.test_labels, task.preprocess)
    finally:
        for parameter, flag in zip(backbone.parameters(), requires_grad):
            parameter.requires_grad_(flag)
        backbone.train(was_training)
    if not unchanged(backbone, snapshot):
        raise RuntimeError("the frozen backbone changed during linear evaluation")
    return LinearResult(
        top1=top1, top5=top5, num_train=task.num_train, num_test=task.num_test,
        extra={"backbone_bit_identical": True, "steps": run.steps, "final_loss": run.last_loss},
    )
