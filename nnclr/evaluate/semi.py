"""Semi-supervised evaluation: fine-tune the whole network on 1% / 10% of the labels (SimCLR, NNCLR Table 2).

Subsets are class-balanced: the same fraction of every class's labelled training images,
rounded, at least one per class, drawn with a fixed seed. Their sample indices (0-based
positions in the training split) are written one per line, so the same subset can be reused
and compared (``--subset-file``); a list made elsewhere, such as the SimCLR authors' ImageNet
1% / 10% lists converted to indices, is read the same way.

Fine-tuning follows SimCLR (Chen et al. 2020, Appendix B.5): backbone + a linear head on its
features, SGD with Nesterov momentum, learning rate 0.05 x batch / 256, no warm-up, no weight
decay, cosine schedule, 60 epochs for 1% and 30 for 10%, random resized crop + flip (the loop of
:mod:`nnclr.evaluate.sgd`, shared with the paper linear probe).

Batch norm is in training mode while fine-tuning, as in SimCLR: it normalises with each labelled
batch's statistics. At the end its running statistics are recomputed over the labelled images
without augmentation ("precise BN", Wu & Johnson 2021, "Rethinking 'Batch' in BatchNorm"), and
the test images are evaluated with those (eval mode), so that a short fine-tune is not judged
with statistics still half-way from the pretrained ones. Keeping the pretrained statistics frozen
instead diverged: once the convolutions move, frozen statistics no longer normalise their
outputs, and at SimCLR's learning rate (0.05 at batch 256) the demo checkpoint's 10% subset
reached a NaN loss within 8 steps, in fp32 as in bf16. Each epoch is cut into near-equal
batches, so that no batch is a tiny remainder.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from nnclr import rundir
from nnclr.config import EVAL
from nnclr.data.lazy import FolderImages, batch_slices, prefetched
from nnclr.errors import UserError
from nnclr.evaluate.linear import LinearResult, evaluate_head
from nnclr.evaluate.preprocess import Preprocess
from nnclr.evaluate.sgd import ClassifierTask, SGDSettings, train_classifier


def fraction_name(fraction: float) -> str:
    """0.01 -> ``1pct``, 0.1 -> ``10pct``, 0.005 -> ``0.5pct``."""
    return f"{100 * fraction:g}pct"


def balanced_subset(labels: torch.Tensor, fraction: float, seed: int = 0) -> torch.Tensor:
    """Sorted indices (n,) of a class-balanced subset of the labelled entries of ``labels`` (N,).

    Each class c with N_c labelled images contributes ``max(1, round(fraction * N_c))`` of them,
    drawn without replacement by a generator seeded with ``seed`` (the same call gives the same
    subset on every machine).
    """
    if not 0 < fraction <= 1:
        raise UserError(f"label fraction {fraction:g} must be in (0, 1]")
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for c in torch.unique(labels[labels >= 0]).tolist():
        members = torch.nonzero(labels == c).flatten()
        take = max(1, int(round(fraction * members.numel())))
        chosen.append(members[torch.randperm(members.numel(), generator=generator)[:take]])
    if not chosen:
        return torch.zeros(0, dtype=torch.long)
    return torch.cat(chosen).sort().values


def write_subset(path: Path, indices: torch.Tensor) -> None:
    """One index per line, written atomically (a full or read-only disk: a UserError naming ``path``)."""
    rundir.make_dir(path.parent, "")
    rundir.write_text_atomic(path, "".join(f"{i}\n" for i in indices.tolist()), what="the label subset")


def read_subset(path: Path, num_train: int, labels: torch.Tensor) -> torch.Tensor:
    """Indices from a file of one 0-based training index per line (blank lines and ``#`` comments ignored).

    Raises:
        UserError: a missing file, a line that is not an index, an index out of range or unlabelled.
    """
    if not path.is_file():
        raise UserError(f"subset file {path} not found")
    indices = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        if not text.lstrip("-").isdigit():
            raise UserError(
                f"{path}:{number}: {text[:60]!r} is not a sample index; the file must hold one 0-based index "
                "into the training split per line (convert file names to indices first)"
            )
        index = int(text)
        if not 0 <= index < num_train:
            raise UserError(f"{path}:{number}: index {index} is outside the training split (0..{num_train - 1})")
        indices.append(index)
    if not indices:
        raise UserError(f"subset file {path} holds no indices")
    result = torch.tensor(sorted(set(indices)), dtype=torch.long)
    if bool((labels[result] < 0).any()):
        raise UserError(f"subset file {path} names training images that have no label")
    return result


@torch.no_grad()
def recompute_batchnorm(
    model: nn.Module, images: torch.Tensor | FolderImages, preprocess: Preprocess, batch_size: int,
) -> None:
    """Set every batch norm's running statistics to their average over ``images`` (uint8 (n, 3, H, W)).

    The images get the evaluation transform (centre, no augmentation), ``batch_size`` at a time; each batch's
    mean and variance count by its size (``momentum=None``: PyTorch's cumulative average). Leaves ``model``
    in eval mode.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    model.train()
    for batch in prefetched(images, batch_slices(images.shape[0], batch_size)):
        x = preprocess.centre(batch)
        with preprocess.autocast():
            model(x)
    for norm, momentum in zip(norms, momenta):
        norm.momentum = momentum
    model.eval()


FINETUNE_SGD = SGDSettings(epochs=EVAL.semi_epochs_many, lr=EVAL.semi_lr)
"""SimCLR's fine-tuning SGD: learning rate 0.05 at batch 256, batch 256, no weight decay; 30 epochs (60 for 1% of
the labels: :meth:`nnclr.config.EvalDefaults.semi_epochs`)."""


def finetune(
    task: ClassifierTask, settings: SGDSettings = FINETUNE_SGD, *, progress: bool | None = None
) -> LinearResult:
    """Fine-tune a copy of the task's encoder (left untouched) with a linear head on its labelled training images.

    The SGD is :func:`nnclr.evaluate.sgd.train_classifier` over every parameter of the copy (batch norm in training
    mode) and of the head (zero weights at first), in near-equal batches; then precise batch norm
    (:func:`recompute_batchnorm`) and the test.

    Args:
        task: the pretrained encoder, the labelled subset (train images and labels), the test images and their
            preprocessing.
        settings: epochs, batch size, learning rate at batch 256 (scaled linearly with the batch size used),
            momentum, weight decay, seed.
        progress: a progress bar (default: when stderr is a terminal).

    Returns:
        Test top-1/top-5 and, in ``extra``, the steps, the mean loss of every epoch and the last loss.

    Raises:
        UserError: the loss became NaN or infinite (the message suggests a lower ``--lr``).
    """
    torch.manual_seed(settings.seed)
    preprocess = task.preprocess
    model = copy.deepcopy(task.encoder).to(preprocess.device).train().requires_grad_(True)
    head = nn.Linear(task.num_features, task.num_classes).to(preprocess.device)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    if task.num_train < 2:
        raise UserError("semi-supervised fine-tuning needs at least 2 labelled images (batch norm trains on them)")

    def logits_of(x: torch.Tensor) -> torch.Tensor:
        with preprocess.autocast():
            return head(model(x).float())

    def stop_if_diverged(epoch: int, loss: torch.Tensor) -> None:
        if not bool(torch.isfinite(loss)):
            raise UserError(
                f"semi-supervised fine-tuning diverged: loss {loss.item()} at epoch {epoch + 1}/{settings.epochs} "
                f"(lr {settings.lr:g} at batch 256); pass a lower --lr"
            )

    run = train_classifier(logits_of, [*model.parameters(), *head.parameters()], task, settings, equal_batches=True,
                           desc="fine-tune", progress=progress, on_loss=stop_if_diverged)
    recompute_batchnorm(model, task.train_images, preprocess, run.batch_size)
    top1, top5 = evaluate_head(model, head, task.test_images, task.test_labels, preprocess)
    return LinearResult(
        top1=top1, top5=top5, num_train=task.num_train, num_test=task.num_test,
        extra={"epochs": settings.epochs, "steps": run.steps, "batch_size": run.batch_size,
               "final_loss": float(run.last_loss or 0.0),
               "epoch_losses": [round(sum(losses) / len(losses), 4) for losses in run.losses]},
    )
