"""Distributed helpers with a single-process fallback.

Every helper works without ``torch.distributed`` being initialised (tests, laptops): then rank is
0, world size is 1 and gathers/reductions are the identity. Under ``torchrun`` they use the default
process group (NCCL on GPUs, gloo on CPU), so that negatives, the support set and k-means statistics
are the same whatever way a global batch is split across ranks (DESIGN.md section 5).

Also here: the process group made from torchrun's environment (:func:`process_group`), the split
of a global batch (:func:`local_slice`) and of an evaluation set (:func:`shard`,
:func:`gather_in_order`) over ranks, and a batch-norm over the global batch that also runs on
the CPU (:class:`GlobalBatchNorm`), and the training loop's collectives: the model wrapped for
data parallelism (:func:`data_parallel`), a stop request any rank received (:func:`any_rank`), the
loss averaged over ranks (:func:`global_mean`) and the checkpoint sent from rank 0
(:func:`broadcast_object`). docs/distributed.md says what is gathered where and why.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor, nn

from nnclr.errors import UserError


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


class _AllReduceWithGrad(torch.autograd.Function):
    """Sum over ranks whose backward sums the incoming gradient over ranks.

    Every rank uses the sum in its own loss, so the gradient of the total loss with respect to
    each rank's addend is the sum of all ranks' gradients with respect to the sum.
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        x = x.contiguous().clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad


def all_reduce_with_grad(x: Tensor) -> Tensor:
    """Sum ``x`` over ranks out of place, with gradients (``x`` itself when single)."""
    return _AllReduceWithGrad.apply(x) if world_size() > 1 else x


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


# --- process group: torchrun's environment -> one process per device ------------------------------

DEFAULT_TIMEOUT_S = 1800  # a collective that waits longer than this fails instead of hanging forever


def launched_by_torchrun() -> bool:
    """True when torchrun (or the same environment) asks for more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def local_rank() -> int:
    """This process's index on its machine (torchrun's ``LOCAL_RANK``; 0 when not distributed)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def device_for_rank(device: torch.device) -> torch.device:
    """``cuda`` -> ``cuda:LOCAL_RANK`` under torchrun (one GPU per process); other devices unchanged."""
    if device.type == "cuda" and device.index is None and launched_by_torchrun():
        return torch.device("cuda", local_rank())
    return device


@contextmanager
def process_group(device: torch.device) -> Iterator[torch.device]:
    """Initialise the default process group from torchrun's environment, yield this rank's device.

    When ``WORLD_SIZE`` > 1 (set by torchrun with ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``,
    ``MASTER_PORT``) and no group exists yet, ``init_process_group`` uses NCCL for CUDA devices
    and gloo for the CPU, with a timeout (``NNCLR_DIST_TIMEOUT`` seconds, default 30 min) so
    that a rank which fails leaves the others with an error, not a hang; the group is destroyed
    on exit. Otherwise (a single process, or a group the caller already made) nothing happens.
    """
    device = device_for_rank(device)
    created = False
    if launched_by_torchrun() and not is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        timeout = timedelta(seconds=float(os.environ.get("NNCLR_DIST_TIMEOUT", DEFAULT_TIMEOUT_S)))
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=timeout,
                                device_id=device if device.type == "cuda" else None)
        created = True
    try:
        yield device
    finally:
        if created and is_initialized():
            dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (no-op when single)."""
    if world_size() > 1:
        dist.barrier()


def all_reduce_max(x: Tensor) -> Tensor:
    """Max of ``x`` over ranks in place (identity when single); e.g. a stop flag any rank raised."""
    if world_size() > 1:
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return x


def local_slice(global_batch: int) -> slice:
    """This rank's contiguous rows of a global batch that ``world_size()`` divides.

    Rank r takes rows [r*b, (r+1)*b) with b = global_batch / W, so that the rank-major
    concatenation of :func:`gather_no_grad` is the global batch in its original order.
    """
    w = world_size()
    if global_batch % w:
        raise ValueError(f"a global batch of {global_batch} cannot be split evenly over {w} processes")
    b = global_batch // w
    return slice(rank() * b, (rank() + 1) * b)


# --- evaluation: each sample exactly once, in index order ------------------------------------------


def shard(n: int) -> range:
    """The sample indices of ``n`` this rank handles: a contiguous block, sizes differing by <= 1.

    Unlike ``DistributedSampler`` nothing is padded or repeated: the blocks of all ranks
    partition ``range(n)`` in order (rank r gets [r*n//W, (r+1)*n//W)).
    """
    w, r = world_size(), rank()
    return range(r * n // w, (r + 1) * n // w)


@torch.no_grad()
def gather_in_order(local: Tensor, n: int) -> Tensor:
    """Gather per-rank results of :func:`shard` back into index order: (n, ...) on every rank.

    Args:
        local: (len(shard(n)), ...) this rank's rows, e.g. features of its images.
        n: the total number of samples.

    Returns:
        (n, ...) tensor, row i the result for sample i, each sample exactly once (the padding
        that all-gather needs for unequal blocks is removed).
    """
    w = world_size()
    if local.shape[0] != len(shard(n)):
        raise ValueError(f"rank {rank()} holds {local.shape[0]} rows but its shard of {n} has {len(shard(n))}")
    if w == 1:
        return local.detach()
    longest = -(-n // w)
    padded = local.new_zeros((longest, *local.shape[1:]))
    padded[: local.shape[0]] = local.detach()
    parts = [torch.empty_like(padded) for _ in range(w)]
    dist.all_gather(parts, padded.contiguous())
    sizes = [(r + 1) * n // w - r * n // w for r in range(w)]
    return torch.cat([part[:size] for part, size in zip(parts, sizes)])


def gather_objects(obj: object) -> list[object]:
    """Every rank's picklable ``obj``, in rank order (``[obj]`` when single); e.g. per-shard error lists."""
    if world_size() == 1:
        return [obj]
    parts: list[object] = [None] * world_size()
    dist.all_gather_object(parts, obj)
    return parts


# --- batch-norm over the global batch ---------------------------------------------------------------


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch-norm over the global batch on the CPU (gloo), where ``torch.nn.SyncBatchNorm`` refuses to run.

    In training under a process group of more than one rank, the per-channel mean and biased
    variance are those of all ranks' rows, computed in (at least) fp32 with two differentiable
    all-reduces (:func:`all_reduce_with_grad`, whose backward sums the gradient over ranks), so
    forward and gradients equal one process's ``BatchNorm`` on the whole batch. In eval mode or
    in a single process it is plain batch-norm. Inputs (N, C) or (N, C, ...); the same parameters
    and buffers (``state_dict``) as ``BatchNorm1d/2d``. (Not a subclass of ``nn.SyncBatchNorm``:
    DistributedDataParallel rejects those on the CPU.)
    """

    def _check_input_dim(self, input: Tensor) -> None:  # noqa: A002 - torch's name
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002 - torch's name
        if not (self.training and world_size() > 1):
            return super().forward(input)
        self._check_input_dim(input)
        dims = [0, *range(2, input.dim())]
        shape = [1, -1] + [1] * (input.dim() - 2)
        x = input.to(torch.promote_types(input.dtype, torch.float32))  # at least fp32
        count = x.numel() // x.shape[1]
        total = all_reduce_with_grad(torch.cat([x.sum(dims), x.new_tensor([count])]))
        n = total[-1]
        mean = total[:-1] / n  # (C,)
        centred = x - mean.view(shape)
        var = all_reduce_with_grad(centred.pow(2).sum(dims)) / n  # (C,) biased
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * (n / (n - 1)), alpha=m)
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(input.dtype)


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Batch-norm over the global batch in ``module``: every ``BatchNorm1d/2d/3d`` is replaced.

    On CUDA by ``torch.nn.SyncBatchNorm`` (fused kernels), elsewhere by :class:`GlobalBatchNorm`;
    parameters and running statistics are kept. Returns the converted module.

    Raises:
        UserError: If ``module`` holds a subclass of batch-norm (e.g. timm's ``BatchNormAct2d``, batch-norm
            fused with its activation): replacing it by plain batch-norm would silently drop what it adds.
    """
    other = sorted({type(m).__name__ for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                    and type(m) not in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
                                        GlobalBatchNorm)})
    if other:
        raise UserError(
            f"model.sync_bn: the network has batch-norm layers that do more than batch-norm ({', '.join(other)}); "
            "nnclr cannot compute them over the global batch without dropping that: use model.sync_bn=heads "
            "(the projection and prediction MLPs, as in the paper) or none"
        )
    return _convert(module, device)


def _convert(module: nn.Module, device: torch.device) -> nn.Module:
    if device.type != "cpu":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, GlobalBatchNorm):
        like = next((t for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)]
                     if t.is_floating_point()), None)
        factory = {"device": like.device, "dtype": like.dtype} if like is not None else {}
        converted = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                    module.track_running_stats, **factory)
        converted.load_state_dict(module.state_dict())
        converted.train(module.training)
        return converted
    for name, child in module.named_children():
        module.add_module(name, _convert(child, device))
    return module


# --- the training loop's collectives ------------------------------------------------------------------


def data_parallel(model: nn.Module, sync_bn: str, device: torch.device) -> nn.Module:
    """Under a process group: global batch-norm where ``sync_bn`` says, then DDP; else ``model``.

    ``sync_bn`` is ``model.sync_bn``: ``heads`` converts the ``projector``, the ``predictor`` and the method's own
    modules (``extras``), ``all`` the ``backbone`` too (:func:`convert_sync_batchnorm`), and the same parts of a
    target network. The loss calls ``extras`` outside DDP's forward; their gradients are averaged all the same
    (DDP's hooks are on every parameter's gradient) and every parameter of them gets one every step.
    DDP averages gradients over ranks; each rank's loss is the mean over its anchors of a loss whose
    negatives are gathered with gradient (``nnclr.losses``), so the average is the gradient of the
    global batch's mean loss, as in one process.
    """
    if world_size() == 1:
        return model
    heads = ("projector", "predictor", "extras")
    for name in {"heads": heads, "all": ("backbone", *heads)}.get(sync_bn, ()):
        if getattr(model, name, None) is not None:
            setattr(model, name, convert_sync_batchnorm(getattr(model, name), device))
    target = getattr(model, "target", None)  # BYOL's target network (backbone, projector): as the online ones
    for part in {"heads": (1,), "all": (0, 1)}.get(sync_bn, ()) if target is not None else ():
        target[part] = convert_sync_batchnorm(target[part], device).requires_grad_(False)  # new modules' weights
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def any_rank(flag: bool, device: torch.device) -> bool:
    """True when ``flag`` is True on any rank (a Ctrl-C/SIGTERM may reach the ranks at different steps)."""
    if world_size() == 1:
        return flag
    return bool(all_reduce_max(torch.tensor([int(flag)], device=device)))


def global_mean(loss: Tensor, diagnostics: dict[str, float]) -> tuple[float, dict[str, float]]:
    """The loss and diagnostics averaged over ranks (one all-reduce); NaN diagnostics are skipped.

    Every rank's loss is the mean over its equally many anchors, so the average is the global
    batch's loss, the number one process would report; every rank gets the same values.
    """
    if world_size() == 1:
        return loss.item(), {k: float(v) for k, v in diagnostics.items()}
    keys = sorted(diagnostics)
    values = torch.tensor([float(loss)] + [float(diagnostics[k]) for k in keys], dtype=torch.float64,
                          device=loss.device)
    finite = torch.isfinite(values)
    finite[0] = True  # a non-finite loss must reach every rank
    packed = all_reduce_sum(torch.cat([torch.where(finite, values, 0.0), finite.double()]))
    sums, counts = packed.chunk(2)
    means = torch.where(counts > 0, sums / counts.clamp_min(1), float("nan")).tolist()
    return means[0], dict(zip(keys, means[1:]))


def broadcast_object(obj: object, device: torch.device) -> object:
    """Rank 0's picklable ``obj`` on every rank (``obj`` itself when single); e.g. the checkpoint to resume from.

    ``device`` is this rank's: NCCL sends the pickled bytes through it, gloo through the CPU.
    """
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=device if device.type == "cuda" else None)
    return box[0]
