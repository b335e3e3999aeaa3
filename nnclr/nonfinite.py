"""Non-finite losses, gradients and weights: stop the run (default) or skip the step; never save them.

``train.nonfinite=stop``: a step whose loss or any gradient is NaN or infinite ends the run with a
one-line error naming the step (and the first parameter with a bad gradient); the optimiser has
not stepped and the last good checkpoint is intact. ``train.nonfinite=skip``: such a step is
skipped (no optimiser step, batch-norm statistics restored to those before it, nothing
enqueued into the support set: the model is as if the step had not been taken), counted in the checkpoint
and in ``metrics.jsonl`` (``skipped_steps``), and reported on stderr; more than
:data:`MAX_CONSECUTIVE_SKIPS` in a row stop the run all the same, since it is not recovering.

Weights can also become non-finite from finite gradients (a learning rate far too high): every
checkpoint is checked before it is written, and a model with a NaN or infinite weight or
buffer stops the run instead of replacing the last good checkpoint, in both modes.

The gradient check is one fused norm over all gradients (``torch._foreach_norm``) and one
host sync per step; under DDP the gradients are already averaged, so every rank decides alike.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from pathlib import Path

import torch

from nnclr import distributed
from nnclr.errors import UserError

MAX_CONSECUTIVE_SKIPS = 20


def _first_bad(named: Iterable[tuple[str, torch.Tensor]]) -> str | None:
    """The name of the first tensor holding a NaN or an infinity, or None (one sync for all)."""
    names, tensors = [], []
    for name, tensor in named:
        if tensor is not None and tensor.is_floating_point():
            names.append(name)
            tensors.append(tensor.detach())
    if not tensors:
        return None
    finite = torch.stack([norm.isfinite() for norm in torch._foreach_norm(tensors)])
    if bool(finite.all()):
        return None
    return names[int((~finite).nonzero()[0])]


def gradient_problem(model: torch.nn.Module) -> str | None:
    """``"the gradient of NAME is not finite"`` for the first such parameter, else None."""
    name = _first_bad((n, p.grad) for n, p in model.named_parameters() if p.grad is not None)
    return f"the gradient of {name} is not finite" if name else None


def weights_problem(model: torch.nn.Module) -> str | None:
    """``"the weight NAME is not finite"`` for the first such parameter or buffer, else None."""
    name = _first_bad(model.state_dict().items())
    return f"the weight {name} is not finite" if name else None


def save_buffers(model: torch.nn.Module) -> list[torch.Tensor]:
    """Copies of the model's buffers (batch-norm statistics), which every training forward updates."""
    return [b.detach().clone() for b in model.buffers()]


def restore_buffers(model: torch.nn.Module, saved: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for buffer, value in zip(model.buffers(), saved):
            buffer.copy_(value)


def _kept(run_dir: Path, last_checkpoint_step: int | None) -> str:
    if last_checkpoint_step is None:
        return "no checkpoint had been written yet"
    return f"the last good checkpoint (step {last_checkpoint_step}) in {run_dir} is intact"


def stop(problem: str, step: int, run_dir: Path, last_checkpoint_step: int | None, advice: str = "") -> UserError:
    """The error that ends a run at (1-based) ``step`` because of ``problem``."""
    advice = advice or (
        "rerun with --set train.nonfinite=skip to skip such steps, or lower optim.lr or use train.precision=fp32 "
        "and start over with --fresh"
    )
    return UserError(f"{problem} at step {step}, so the run stopped; {_kept(run_dir, last_checkpoint_step)}; {advice}")


def skip(problem: str, step: int, skipped: int) -> None:
    """Report a skipped (1-based) ``step`` on rank 0's stderr; ``skipped`` counts this one."""
    if distributed.is_main():
        print(f"nnclr: warning: step {step} skipped: {problem} ({skipped} skipped so far)", file=sys.stderr)
