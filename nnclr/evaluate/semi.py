"""Semi-supervised evaluation: fine-tune the whole network on 1% / 10% of the labels (SimCLR, NNCLR Table 2).

Subsets are class-balanced: the same fraction of every class's labelled training images,
rounded, at least one per class, drawn with a fixed seed. Their sample indices (0-based
positions in the training split) are written one per line, so the same subset can be reused
and compared (``--subset-file``); a list made elsewhere, such as the SimCLR authors' ImageNet
1% / 10% lists converted to indices, is read the same way.

Fine-tuning follows SimCLR (Chen et al. 2020, Appendix B.5): backbone + a linear head on its
features, SGD with Nesterov momentum, learning rate 0.05 x batch / 256, no warm-up, no weight
decay, cosine schedule, 60 epochs for 1% and 30 for 10%, random resized crop + flip.

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
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from nnclr import runtime
from nnclr.augment import eval_transform
from nnclr.data.lazy import FolderImages, batch_slices, prefetched
from nnclr.errors import UserError
from nnclr.evaluate.linear import LinearResult, augmented_batch, evaluate_head


def default_epochs(fraction: float) -> int:
    """SimCLR's fine-tuning length: 60 epochs for 1% of the labels or less, 30 above."""
    return 60 if fraction <= 0.01 + 1e-9 else 30


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
    """One index per line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{i}\n" for i in indices.tolist()))


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
    model: nn.Module, images: torch.Tensor | FolderImages, *, size: int, mean: tuple[float, ...],
    std: tuple[float, ...], device: torch.device, dtype: torch.dtype, batch_size: int,
) -> None:
    """Set every batch norm's running statistics to their average over ``images`` (uint8 (n, 3, H, W)).

    The images get the evaluation transform (centre, no augmentation); each batch's mean and
    variance count by its size (``momentum=None``: PyTorch's cumulative average). Leaves ``model``
    in eval mode.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    model.train()
    for batch in prefetched(images, batch_slices(images.shape[0], batch_size)):
        x = eval_transform(batch.to(device), size, mean=mean, std=std)
        with runtime.autocast(device, dtype):
            model(x)
    for norm, momentum in zip(norms, momenta):
        norm.momentum = momentum
    model.eval()


def finetune(
    backbone: nn.Module,
    train_images: torch.Tensor | FolderImages,
    train_labels: torch.Tensor,
    test_images: torch.Tensor | FolderImages,
    test_labels: torch.Tensor,
    *,
    num_classes: int,
    num_features: int,
    size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    epochs: int = 30,
    batch_size: int = 256,
    lr: float = 0.05,
    momentum: float = 0.9,
    seed: int = 0,
    progress: bool | None = None,
) -> LinearResult:
    """Fine-tune a copy of ``backbone`` (left untouched) with a linear head on labelled images.

    Args:
        backbone: the pretrained encoder f; a deep copy is trained, batch norm in training mode.
        train_images: uint8 (n, 3, H, W), the labelled subset; train_labels (n,).
        test_images: uint8 (M, 3, H, W); test_labels (M,). Either may be a folder decoded on demand
            (:class:`~nnclr.data.lazy.FolderImages`, read one mini-batch at a time, by index).
        lr: learning rate for batch 256, scaled linearly with the batch size.

    Returns:
        Test top-1/top-5 and, in ``extra``, the steps, the mean loss of every epoch and the last loss.

    Raises:
        UserError: the loss became NaN or infinite (the message suggests a lower ``--lr``).
    """
    if progress is None:
        progress = sys.stderr.isatty()
    torch.manual_seed(seed)
    model = copy.deepcopy(backbone).to(device).train().requires_grad_(True)
    head = nn.Linear(num_features, num_classes).to(device)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    if train_images.shape[0] < 2:
        raise UserError("semi-supervised fine-tuning needs at least 2 labelled images (batch norm trains on them)")
    steps_per_epoch = math.ceil(train_images.shape[0] / batch_size)
    batch_size = math.ceil(train_images.shape[0] / steps_per_epoch)  # the largest of the near-equal batches
    optimizer = torch.optim.SGD(
        [*model.parameters(), *head.parameters()], lr=lr * batch_size / 256, momentum=momentum, nesterov=True,
    )
    total = epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total))
    generator = torch.Generator(device=device).manual_seed(seed)
    order_generator = torch.Generator().manual_seed(seed)
    mean_t = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=device).view(1, 3, 1, 1)
    loss = torch.zeros(())
    epoch_losses: list[float] = []
    with tqdm(total=total, disable=not progress, unit="step", desc="fine-tune", dynamic_ncols=True,
              leave=False) as bar:
        for epoch in range(epochs):
            order = torch.randperm(train_images.shape[0], generator=order_generator)
            losses = []
            batches = order.tensor_split(steps_per_epoch)  # near-equal batches: no tiny last batch for batch norm
            for idx, images in zip(batches, prefetched(train_images, batches)):
                x = augmented_batch(images.to(device), size, mean_t, std_t, generator)
                with runtime.autocast(device, dtype):
                    logits = head(model(x).float())
                loss = F.cross_entropy(logits.float(), train_labels[idx].to(device))
                if not bool(torch.isfinite(loss)):
                    raise UserError(
                        f"semi-supervised fine-tuning diverged: loss {loss.item()} at epoch {epoch + 1}/{epochs} "
                        f"(lr {lr:g} at batch 256); pass a lower --lr"
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                losses.append(loss.item())
                bar.update(1)
            epoch_losses.append(sum(losses) / len(losses))
    recompute_batchnorm(model, train_images, size=size, mean=mean, std=std, device=device, dtype=dtype,
                        batch_size=batch_size)
    top1, top5 = evaluate_head(
        model, head, test_images, test_labels, size=size, mean=mean, std=std, device=device, dtype=dtype,
    )
    return LinearResult(
        top1=top1, top5=top5, num_train=int(train_images.shape[0]), num_test=int(test_images.shape[0]),
        extra={"epochs": epochs, "steps": total, "batch_size": batch_size, "final_loss": float(loss.item()),
               "epoch_losses": [round(v, 4) for v in epoch_losses]},
    )
