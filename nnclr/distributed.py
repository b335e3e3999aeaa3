"""Distributed helpers with a single-process fallback.

Every helper works without ``torch.distributed`` being initialised (tests, laptops): then rank is
0, world size is 1 and gathers/reductions are the identity. Under ``torchrun`` they use the default
process group (NCCL on GPUs, gloo on CPU), so that negatives, the support set and k-means statistics
are the same whatever way a global batch is split across ranks (DESIGN.md section 5).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def is_initialized() -> bool:
    """Return True when a default process group exists."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """Return this process's rank in the default group (0 when not distributed)."""
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    """Return the number of processes in the default group (1 when not distributed)."""
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    """Return True on rank 0 (always True in a single process)."""
    return rank() == 0


class _GatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0 whose backward returns this rank's slice of the summed gradient.

    Every rank computes a loss from the full gathered tensor, so the gradient of the total loss
    with respect to the local slice is the sum over ranks of each rank's gradient for that slice:
    the backward all-reduces the incoming gradient and keeps the local rows (as in SimCLR/lightly).
    All ranks must pass tensors of the same shape.
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        parts = [torch.empty_like(x) for _ in range(world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()  # never reduce the caller's buffer in place
        dist.all_reduce(grad)
        n = grad.shape[0] // world_size()
        return grad[rank() * n : (rank() + 1) * n]


def gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate ``x`` (B, ...) from every rank along dim 0, keeping gradients to the local slice.

    Args:
        x: (B, ...) tensor; the same shape on every rank.

    Returns:
        (world_size * B, ...) tensor, rank r's rows at [r*B, (r+1)*B); ``x`` itself when single.
    """
    if world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


@torch.no_grad()
def gather_no_grad(x: Tensor) -> Tensor:
    """Concatenate ``x`` (B, ...) from every rank along dim 0, without gradients.

    Returns:
        (world_size * B, ...) tensor; ``x`` detached when single.
    """
    if world_size() == 1:
        return x.detach()
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    return torch.cat(parts, dim=0)


def all_reduce_sum(x: Tensor) -> Tensor:
    """Sum ``x`` over ranks in place and return it (identity when single)."""
    if world_size() > 1:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def broadcast(x: Tensor, src: int = 0) -> Tensor:
    """Overwrite ``x`` in place with rank ``src``'s copy and return it (identity when single)."""
    if world_size() > 1:
        dist.broadcast(x, src=src)
    return x
