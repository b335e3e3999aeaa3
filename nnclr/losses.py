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


def positiveness(z: Tensor, neighbours: Tensor, found: Tensor, temperature: float = 1.0) -> Tensor:
    """SNCLR's positiveness scores: how much each of a sample's k soft neighbours counts as its positive.

    The attention module of Ge et al. (ICLR 2023, arXiv 2303.17142, Sec. 3.2): the anchor's projection is the
    query, its candidate neighbours the keys, and the scores are the attention map over the candidates::

        w_ij = exp(ẑ_i·n_ij / τ_a) / Σ_j' exp(ẑ_i·n_ij' / τ_a)

    The reference code (ChongjianGE/SNCLR, ``att_clc``) uses τ_a = 1 and lets the gradient flow into ``z``
    through the scores; so does this function (``z`` is not detached). A sample without any neighbour yet (a
    support set still filling) gets all-zero scores.

    Args:
        z: (B, D) the anchors' projections (with gradient).
        neighbours: (B, k, D) candidate neighbours, L2-normalised (detached).
        found: (B, k) True where a candidate exists.
        temperature: τ_a.

    Returns:
        (B, k) scores, each row summing to 1 (0 where ``found`` is False; all 0 for a row with none).
    """
    with torch.autocast(device_type=z.device.type, enabled=False):
        dtype = torch.promote_types(at_least_fp32(z).dtype, at_least_fp32(neighbours).dtype)
        sims = torch.einsum("bd,bkd->bk", _fp32_normalised(z).to(dtype), at_least_fp32(neighbours).to(dtype))
        none = ~found.any(dim=1, keepdim=True)
        logits = torch.where(found, sims / temperature, float("-inf"))
        logits = torch.where(none, 0.0, logits)  # a finite row, so that softmax and its gradient stay finite
        return logits.softmax(dim=1) * found


def soft_neighbours_loss(predictions: Tensor, targets: Tensor, neighbours: Tensor, weights: Tensor,
                         found: Tensor, temperature: float = 0.1) -> Tensor:
    """One direction of SNCLR's soft-neighbour contrastive loss (Ge et al., ICLR 2023, arXiv 2303.17142, Eq. 4).

    The other view's target ``k_i`` stays a positive (SimCLR's) and its k nearest support-set neighbours
    ``n_ij`` are added as soft positives weighted by their positiveness ``w_ij`` (:func:`positiveness`).
    The candidates are every sample's target and neighbours over the global batch, C = {k_b} ∪ {n_bj}; with
    everything L2-normalised and q_i this view's prediction::

        L_i = -[ log σ_i(k_i) + Σ_j w_ij log σ_i(n_ij) ],   σ_i(c) = exp(q_i·c / τ) / Σ_{c'∈C} exp(q_i·c' / τ)

    so another sample's neighbours are negatives, as in the reference code (its ``soft_neighbors_constrastive``;
    it also scales the loss by 2τ, MoCo v3's convention, which this function leaves out). Candidates that do
    not exist (``found`` False, a support set still filling) are left out of every softmax.

    Args:
        predictions: (B, D) this view's predictions q (with gradient).
        targets: (B, D) the other view's projections k, the instance positives (gathered with gradient).
        neighbours: (B, k, D) the k nearest support-set neighbours of ``targets`` (detached).
        weights: (B, k) their positiveness scores, rows summing to 1 (or 0 for a sample without neighbours).
        found: (B, k) True where a neighbour exists.
        temperature: softmax temperature τ.

    Returns:
        Scalar float32 tensor: the mean of L_i over the local batch.
    """
    with torch.autocast(device_type=predictions.device.type, enabled=False):
        b, k = found.shape
        dtype = torch.promote_types(at_least_fp32(predictions).dtype, at_least_fp32(targets).dtype)
        q = _fp32_normalised(predictions).to(dtype)  # (B, D)
        candidates = torch.cat([_fp32_normalised(targets).to(dtype)[:, None],
                                F.normalize(at_least_fp32(neighbours), dim=-1).to(dtype)], dim=1)  # (B, 1+k, D)
        exists = torch.cat([torch.ones_like(found[:, :1]), found], dim=1)  # (B, 1+k)
        candidates_all = distributed.gather_with_grad(candidates.flatten(0, 1))  # (W*B*(1+k), D)
        exists_all = distributed.gather_no_grad(exists.flatten().to(torch.uint8)).bool()  # (W*B*(1+k),)
        logits = (q @ candidates_all.T / temperature).masked_fill(~exists_all, float("-inf"))
        log_prob = logits.log_softmax(dim=1)  # (B, W*B*(1+k))
        own = (distributed.rank() * b + torch.arange(b, device=q.device))[:, None] * (1 + k)
        own = own + torch.arange(1 + k, device=q.device)  # (B, 1+k): the columns of k_i and its neighbours
        label = torch.cat([torch.ones_like(weights[:, :1]), weights], dim=1).to(dtype)  # (B, 1+k)
        picked = log_prob.gather(1, own).masked_fill(~exists, 0.0)  # -inf of missing neighbours -> 0 (weight 0)
        return -(label * picked).sum(dim=1).mean()


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
