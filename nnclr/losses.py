"""Contrastive losses as pure functions: the NNCLR objective and SimCLR's NT-Xent.

Both L2-normalise their inputs, compute logits and the cross-entropy in float32 (autocast is
switched off inside, so bf16/fp16 training does not round the logits), and take their negatives
from the global batch: embeddings are gathered across ranks with gradients flowing back to the
local slice (:func:`nnclr.distributed.gather_with_grad`). Each returns the mean over the local
anchors; with DDP's gradient averaging over ranks that is the mean over the global batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from nnclr import distributed


def at_least_fp32(x: Tensor) -> Tensor:
    """``x`` in float32 if it is in a lower precision (bf16/fp16), else unchanged (fp32/fp64)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _fp32_normalised(x: Tensor) -> Tensor:
    """L2-normalise the rows of ``x`` in at least float32."""
    return F.normalize(at_least_fp32(x), dim=1)


def nnclr_loss(positives: Tensor, predictions: Tensor, temperature: float = 0.1) -> Tensor:
    """One direction of the NNCLR loss (Dwibedi et al., ICCV 2021, arXiv 2104.14548, Eq. 2).

    With everything L2-normalised, NN(z_i) the support-set neighbour of view 1's projection and
    p⁺ the predictions of view 2 over the global batch of n samples::

        L_i = -log( exp(NN(z_i)·p⁺_i / τ) / Σ_{k=1..n} exp(NN(z_i)·p⁺_k / τ) )

    The paper uses τ = 0.1 and symmetrises over the views; the caller does that::

        loss = 0.5 * (nnclr_loss(nn1, p2) + nnclr_loss(nn2, p1))

    The same function is the positive-only InfoNCE used by KMCLR (positive = nearest prototype)
    and by an NNCLR-style SimCLR (positive = the view's own z).

    Args:
        positives: (B, D) positives of this rank's samples (usually detached neighbours).
        predictions: (B, D) the other view's predictions; gathered across ranks with gradient.
        temperature: softmax temperature τ.

    Returns:
        Scalar float32 tensor: the mean of L_i over the local batch.
    """
    with torch.autocast(device_type=predictions.device.type, enabled=False):
        logits, own = _logits_against_batch(positives, predictions, temperature)  # (B, W*B), (B,)
        return F.cross_entropy(logits, own)


def _logits_against_batch(positives: Tensor, predictions: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """Logits q·p⁺_b / τ of positives (B, ..., D) against the global batch's predictions (gathered with gradient),
    everything L2-normalised in at least fp32, and each anchor's own column (B,). Call with autocast off."""
    dtype = torch.promote_types(at_least_fp32(positives).dtype, at_least_fp32(predictions).dtype)
    pos = F.normalize(at_least_fp32(positives), dim=-1).to(dtype)  # (B, ..., D)
    pred = _fp32_normalised(predictions).to(dtype)  # (B, D)
    pred_all = distributed.gather_with_grad(pred)  # (W*B, D)
    own = torch.arange(pos.shape[0], device=pos.device) + distributed.rank() * pos.shape[0]  # (B,)
    return pos @ pred_all.T / temperature, own  # (B, ..., W*B)


def multi_positive_loss(positives: Tensor, weights: Tensor, predictions: Tensor, temperature: float = 0.1) -> Tensor:
    """NNCLR's loss with k positives per sample, weighted: one direction, averaged over the local anchors.

    With q_ij the j-th positive of sample i (e.g. its j-th nearest support-set neighbour) and p⁺ the
    other view's predictions over the global batch of n samples, everything L2-normalised::

        L_i = Σ_j w_ij · -log( exp(q_ij·p⁺_i / τ) / Σ_{b=1..n} exp(q_ij·p⁺_b / τ) )

    Each positive is contrasted with the batch's predictions as NNCLR's single neighbour is (Eq. 2 of
    Dwibedi et al., ICCV 2021); with k = 1 and w = 1 this is :func:`nnclr_loss`. Uniform weights 1/k make
    every one of the k nearest neighbours a positive, as the "NNCLR top-k" rows of pc-cp/Benchmark-Methods-For-MNN
    do (its ``network/NNCLR.py``, this direction of its loss); similarity-softmax weights make them soft.

    Args:
        positives: (B, k, D) positives of this rank's samples (detached neighbours).
        weights: (B, k) non-negative, each row summing to 1 (rows of a padded neighbour set carry weight 0).
        predictions: (B, D) the other view's predictions; gathered across ranks with gradient.
        temperature: softmax temperature τ.

    Returns:
        Scalar float32 tensor: the mean of L_i over the local batch.
    """
    with torch.autocast(device_type=predictions.device.type, enabled=False):
        logits, own = _logits_against_batch(positives, predictions, temperature)  # (B, k, W*B), (B,)
        log_prob = logits.log_softmax(dim=-1).gather(-1, own[:, None, None].expand(-1, logits.shape[1], 1))[..., 0]
        return -(weights.to(logits.dtype) * log_prob).sum(dim=1).mean()


def nt_xent(z1: Tensor, z2: Tensor, temperature: float = 0.1) -> Tensor:
    """SimCLR's NT-Xent loss (Chen et al., ICML 2020, arXiv 2002.05709, Eq. 1).

    Over the 2N embeddings of a global batch of N pairs, all L2-normalised, for an anchor i whose
    positive is the other view j(i) of the same image::

        ℓ_i = -log( exp(z_i·z_j(i) / τ) / Σ_{k≠i} exp(z_i·z_k / τ) )

    so every anchor has 2N-2 negatives (both views of the other images, same-side and
    cross-side) and itself is excluded. The loss is the mean of ℓ over all 2N anchors.

    Args:
        z1: (B, D) first-view embeddings of this rank's samples.
        z2: (B, D) second-view embeddings, row i the same image as ``z1[i]``.
        temperature: softmax temperature τ (SimCLR's best at batch 4096 is 0.1).

    Returns:
        Scalar float32 tensor: the mean of ℓ over this rank's 2B anchors.
    """
    with torch.autocast(device_type=z1.device.type, enabled=False):
        a = _fp32_normalised(z1)  # (B, D)
        b = _fp32_normalised(z2)  # (B, D)
        a_all = distributed.gather_with_grad(a)  # (N, D)
        b_all = distributed.gather_with_grad(b)  # (N, D)
        n_local, n_global = a.shape[0], a_all.shape[0]
        anchors = torch.cat([a, b])  # (2B, D)
        logits = anchors @ torch.cat([a_all, b_all]).T / temperature  # (2B, 2N)
        own = torch.arange(n_local, device=a.device) + distributed.rank() * n_local  # (B,)
        self_cols = torch.cat([own, own + n_global])  # (2B,) the anchor's own column
        pos_cols = torch.cat([own + n_global, own])  # (2B,) the other view's column
        rows = torch.arange(2 * n_local, device=a.device)
        logits = logits.index_put((rows, self_cols), torch.tensor(float("-inf"), dtype=logits.dtype, device=a.device))
        return F.cross_entropy(logits, pos_cols)
