"""Optimizers, parameter groups and learning-rate schedules.

NNCLR (Dwibedi et al., ICCV 2021, arXiv 2104.14548) trains with LARS and the recipe of
SimCLR/BYOL: base learning rate 0.3 scaled linearly with the batch size
(lr = 0.3 x batch / 256), 10 warm-up epochs then a cosine decay, weight decay 1e-6, and bias and
batch-norm parameters excluded from both the weight decay and the LARS adaptation.

Schedules are precomputed per optimizer step (the DINO pattern): the training loop sets
``group["lr"] = schedule[step] * group.get("lr_scale", 1.0)`` for each group before each step,
and the position in the schedule is the step counter it saves in checkpoints.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from nnclr.errors import UserError

__all__ = ["LARS", "OPTIMIZERS", "build_optimizer", "param_groups", "scaled_lr", "warmup_cosine"]


class LARS(torch.optim.Optimizer):
    """Layer-wise Adaptive Rate Scaling (You et al., 2017, arXiv 1708.03888), SGD with momentum.

    For each parameter tensor ``w`` with gradient ``g`` in a group that is not excluded::

        trust = eta * ||w|| / (||g|| + weight_decay * ||w||)   (1 if ||w|| or ||g|| is 0)
        d     = trust * (g + weight_decay * w)
        m     = momentum * m + d
        w     = w - lr * m

    This is the LARS of SimCLR, BYOL and NNCLR (momentum 0.9, trust coefficient 0.001) in the
    form written for PyTorch by NVIDIA apex (LARC) and solo-learn: weight decay is
    added to the gradient before the adaptation, and the learning rate multiplies the momentum
    buffer on the way out, as in ``torch.optim.SGD`` (the TensorFlow originals fold ``lr`` into
    the buffer, which differs only while ``lr`` changes).

    A group with ``lars_exclude=True`` (biases and normalisation parameters, see
    :func:`param_groups`) skips the trust ratio: plain momentum SGD on ``g + weight_decay * w``,
    where :func:`param_groups` sets that group's ``weight_decay`` to 0.

    Being a ``torch.optim.Optimizer``, its ``state_dict``/``load_state_dict`` save and restore
    the momentum buffers and every group's hyper-parameters.

    Args:
        params: Parameters or parameter groups (dicts, as from :func:`param_groups`).
        lr: Learning rate (usually overwritten each step from a schedule).
        momentum: Momentum factor (0.9 in the paper).
        weight_decay: L2 penalty added to the gradient (1e-6 in the paper).
        trust_coefficient: eta, the LARS trust coefficient (0.001 in the paper).
        eps: Added to the trust ratio's denominator for numerical safety.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 0.0,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 0.001,
        eps: float = 1e-8,
    ) -> None:
        if lr < 0.0:
            raise ValueError(f"invalid learning rate: {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"invalid momentum: {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"invalid weight_decay: {weight_decay}")
        if trust_coefficient <= 0.0:
            raise ValueError(f"invalid trust_coefficient: {trust_coefficient}")
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "trust_coefficient": trust_coefficient,
            "eps": eps,
            "lars_exclude": False,
        }
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(  # type: ignore[override]
        self, closure: Callable[[], float] | None = None
    ) -> float | None:
        """Perform one optimization step.

        Args:
            closure: Optional; re-evaluates the model and returns the loss.

        Returns:
            The closure's loss, or ``None``.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            weight_decay = group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if group["lars_exclude"]:
                    update = grad.add(p, alpha=weight_decay) if weight_decay else grad
                else:
                    # Norms in at least fp32, also for low-precision parameters.
                    dtype = torch.promote_types(p.dtype, torch.float32)
                    w_norm = torch.linalg.vector_norm(p, dtype=dtype)
                    g_norm = torch.linalg.vector_norm(grad, dtype=dtype)
                    trust = group["trust_coefficient"] * w_norm / (
                        g_norm + weight_decay * w_norm + group["eps"]
                    )
                    trust = torch.where((w_norm > 0) & (g_norm > 0), trust, torch.ones_like(trust))
                    update = grad.add(p, alpha=weight_decay).mul_(trust.to(p.dtype))
                state = self.state[p]
                buf = state.get("momentum_buffer")
                if buf is None:  # first step: the buffer is the update itself, as in SGD
                    buf = state["momentum_buffer"] = update.clone()
                else:
                    buf.mul_(group["momentum"]).add_(update)
                p.add_(buf, alpha=-group["lr"])
        return loss


# Normalisation layers; ``_NormBase`` is the base of BatchNorm*, SyncBatchNorm and InstanceNorm*.
# Their parameters are 1-D except LayerNorm's over several dimensions, hence the explicit list.
_NORM_LAYERS: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.RMSNorm,
)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Split a model's trainable parameters into a decay group and a no-decay group.

    Biases and the parameters of normalisation layers (every parameter with ``ndim <= 1``, which
    covers ``BatchNorm``/``LayerNorm``/``GroupNorm`` weights and biases and all ``Linear``/``Conv``
    biases) get no weight decay and are marked ``lars_exclude=True`` so that :class:`LARS` does
    not adapt their learning rate either (SimCLR/BYOL/NNCLR exclude bias and batch-norm
    parameters from both). Every other parameter (convolution and linear weights) is in the decay
    group. Parameters with ``requires_grad=False`` are left out; empty groups are dropped.

    Args:
        model: The module whose parameters to group.
        weight_decay: Weight decay of the decay group.

    Returns:
        Parameter groups for a ``torch.optim.Optimizer``: dicts with ``params``,
        ``weight_decay`` and ``lars_exclude`` (other optimizers ignore the extra key).
    """
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    seen: set[int] = set()  # a parameter shared by two modules must be in one group only
    for module in model.modules():
        is_norm = isinstance(module, _NORM_LAYERS)
        for param in module.parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            (no_decay if is_norm or param.ndim <= 1 else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "lars_exclude": False},
        {"params": no_decay, "weight_decay": 0.0, "lars_exclude": True},
    ]
    return [group for group in groups if group["params"]]


def _lars(params: Any, *, lr: float, momentum: float, weight_decay: float) -> LARS:
    return LARS(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


def _sgd(params: Any, *, lr: float, momentum: float, weight_decay: float) -> torch.optim.SGD:
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


def _adamw(params: Any, *, lr: float, momentum: float, weight_decay: float) -> torch.optim.AdamW:
    del momentum  # AdamW's first-moment decay is betas[0] (0.9 by default)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "lars": _lars,
    "sgd": _sgd,
    "adamw": _adamw,
}
"""Registered optimizers: name -> ``(params, *, lr, momentum, weight_decay) -> Optimizer``."""


def build_optimizer(
    name: str,
    params_groups: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
    *,
    lr: float,
    momentum: float = 0.9,
    weight_decay: float,
) -> torch.optim.Optimizer:
    """Build an optimizer by name.

    ``weight_decay`` is the default for groups that do not set their own; the groups from
    :func:`param_groups` set it (0 for biases and norms), so they keep their exclusions with
    every optimizer.

    Args:
        name: ``"lars"`` (the paper's), ``"sgd"`` (momentum SGD) or ``"adamw"``
            (``momentum`` ignored).
        params_groups: Parameters or parameter groups, usually from :func:`param_groups`.
        lr: Initial learning rate (the training loop overwrites it from the schedule).
        momentum: Momentum for LARS and SGD.
        weight_decay: Default weight decay.

    Returns:
        The optimizer.

    Raises:
        UserError: If ``name`` is unknown (the message lists the valid names) or a
            hyper-parameter is negative.
    """
    try:
        factory = OPTIMIZERS[name]
    except KeyError:
        valid = ", ".join(sorted(OPTIMIZERS))
        raise UserError(f"unknown optimizer {name!r}; choose one of: {valid}") from None
    for key, value in (("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay)):
        if value < 0 or not math.isfinite(value):
            raise UserError(f"optimizer {key} must be a finite number >= 0, got {value}")
    return factory(params_groups, lr=lr, momentum=momentum, weight_decay=weight_decay)


def warmup_cosine(
    base_lr: float, total_steps: int, warmup_steps: int, final_lr: float = 0.0
) -> torch.Tensor:
    """Per-step learning rates: linear warm-up, then cosine decay (SGDR, Loshchilov & Hutter 2017).

    Step ``s`` (0-based) of warm-up has ``base_lr * (s + 1) / warmup_steps``, so the first
    step is small but not zero and the last warm-up step reaches ``base_lr``. The remaining
    ``n = total_steps - warmup_steps`` steps follow
    ``final_lr + (base_lr - final_lr) * (1 + cos(pi * t)) / 2`` with ``t = j / (n - 1)``, going
    from ``base_lr`` at their first step to exactly ``final_lr`` at the last step
    (``t = 0`` when ``n == 1``).

    Edge cases: ``warmup_steps = 0`` gives a pure cosine from ``base_lr``; ``total_steps = 1``
    without warm-up gives ``[base_lr]``; ``warmup_steps >= total_steps`` gives only the first
    ``total_steps`` values of the warm-up ramp (its slope does not depend on ``total_steps``).

    Args:
        base_lr: Peak learning rate (after :func:`scaled_lr`).
        total_steps: Number of optimizer steps of the whole run (>= 1).
        warmup_steps: Number of warm-up steps (>= 0).
        final_lr: Learning rate at the last step.

    Returns:
        A float64 tensor of shape ``(total_steps,)``.

    Raises:
        ValueError: If ``total_steps < 1`` or ``warmup_steps < 0``.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    steps = torch.arange(total_steps, dtype=torch.float64)
    num_warmup = min(warmup_steps, total_steps)
    warmup = base_lr * (steps[:num_warmup] + 1) / max(warmup_steps, 1)
    num_cosine = total_steps - num_warmup
    t = torch.arange(num_cosine, dtype=torch.float64) / max(num_cosine - 1, 1)
    cosine = final_lr + (base_lr - final_lr) * 0.5 * (1.0 + torch.cos(math.pi * t))
    return torch.cat([warmup, cosine])


def scaled_lr(lr: float, batch_size: int) -> float:
    """The linear scaling rule of SimCLR/BYOL/NNCLR: ``lr * batch_size / 256``.

    Args:
        lr: Base learning rate for a batch of 256 (0.3 for NNCLR with LARS).
        batch_size: Global batch size (all ranks; images, not views).

    Returns:
        The learning rate for ``batch_size``.

    Raises:
        ValueError: If ``batch_size < 1``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return lr * batch_size / 256
