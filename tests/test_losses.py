"""Losses against slow float64 reference loops written straight from the papers' equations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from nnclr.losses import multi_positive_loss, nnclr_loss, nt_xent, positiveness, soft_neighbours_loss


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _nnclr_reference(pos: np.ndarray, pred: np.ndarray, tau: float) -> float:
    """NNCLR Eq. (2): L_i = -log(exp(nn_i·p_i/τ) / Σ_k exp(nn_i·p_k/τ)), mean over i."""
    pos, pred = _unit(pos.astype(np.float64)), _unit(pred.astype(np.float64))
    n = pos.shape[0]
    total = 0.0
    for i in range(n):
        denom = sum(math.exp(float(pos[i] @ pred[k]) / tau) for k in range(n))
        total += -math.log(math.exp(float(pos[i] @ pred[i]) / tau) / denom)
    return total / n


def _ntxent_reference(z1: np.ndarray, z2: np.ndarray, tau: float) -> float:
    """SimCLR Eq. (1) over the 2N views: ℓ(i,j) = -log(exp(s_ij/τ) / Σ_{k≠i} exp(s_ik/τ))."""
    z = _unit(np.concatenate([z1, z2]).astype(np.float64))
    n = z1.shape[0]
    total = 0.0
    for i in range(2 * n):
        j = (i + n) % (2 * n)
        denom = sum(math.exp(float(z[i] @ z[k]) / tau) for k in range(2 * n) if k != i)
        total += -math.log(math.exp(float(z[i] @ z[j]) / tau) / denom)
    return total / (2 * n)


CASES = pytest.mark.parametrize(
    "batch, dim, tau", [(1, 8, 0.1), (2, 4, 0.5), (7, 16, 0.1), (32, 32, 0.2), (33, 3, 1.0)]
)


@CASES
def test_nnclr_loss_matches_reference(batch: int, dim: int, tau: float) -> None:
    rng = np.random.default_rng(batch * 100 + dim)
    pos, pred = rng.normal(size=(batch, dim)), rng.normal(size=(batch, dim))
    as_t = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    got = nnclr_loss(as_t(pos), as_t(pred), temperature=tau)
    assert got.dtype == torch.float32 and got.ndim == 0
    assert got.item() == pytest.approx(_nnclr_reference(pos, pred, tau), rel=1e-4, abs=1e-5)


@CASES
def test_nt_xent_matches_reference(batch: int, dim: int, tau: float) -> None:
    rng = np.random.default_rng(batch * 100 + dim + 1)
    z1, z2 = rng.normal(size=(batch, dim)), rng.normal(size=(batch, dim))
    got = nt_xent(torch.tensor(z1, dtype=torch.float32), torch.tensor(z2, dtype=torch.float32),
                  temperature=tau)
    assert got.item() == pytest.approx(_ntxent_reference(z1, z2, tau), rel=1e-4, abs=1e-5)


def test_nnclr_loss_is_one_direction_not_symmetric() -> None:
    pos, pred = torch.randn(6, 8), torch.randn(6, 8)
    assert not torch.isclose(nnclr_loss(pos, pred), nnclr_loss(pred, pos))


def test_losses_are_scale_invariant() -> None:
    a, b = torch.randn(5, 8), torch.randn(5, 8)
    assert torch.allclose(nnclr_loss(a, b), nnclr_loss(3 * a, 0.5 * b), atol=1e-6)
    assert torch.allclose(nt_xent(a, b), nt_xent(3 * a, 0.5 * b), atol=1e-6)


def test_nnclr_gradient_matches_float64_autograd() -> None:
    pos, pred = torch.randn(5, 6), torch.randn(5, 6, requires_grad=True)
    nnclr_loss(pos, pred, temperature=0.2).backward()
    pred64 = pred.detach().double().requires_grad_()
    p = torch.nn.functional.normalize(pred64, dim=1)
    q = torch.nn.functional.normalize(pos.double(), dim=1)
    torch.nn.functional.cross_entropy(q @ p.T / 0.2, torch.arange(5)).backward()
    assert torch.allclose(pred.grad.double(), pred64.grad, atol=1e-5)


def test_nt_xent_gradient_flows_into_both_views() -> None:
    z1 = torch.randn(4, 8, requires_grad=True)
    z2 = torch.randn(4, 8, requires_grad=True)
    nt_xent(z1, z2).backward()
    assert z1.grad.abs().sum() > 0 and z2.grad.abs().sum() > 0


def test_losses_compute_in_fp32_under_autocast() -> None:
    a, b = torch.randn(16, 32), torch.randn(16, 32)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        got_nn = nnclr_loss(a.bfloat16(), b.bfloat16())
        got_nt = nt_xent(a.bfloat16(), b.bfloat16())
    assert got_nn.dtype == torch.float32 and got_nt.dtype == torch.float32
    assert torch.allclose(got_nn, nnclr_loss(a.bfloat16().float(), b.bfloat16().float()), atol=1e-6)
    assert torch.allclose(got_nt, nt_xent(a.bfloat16().float(), b.bfloat16().float()), atol=1e-6)


def test_perfect_alignment_gives_low_loss() -> None:
    z = torch.eye(8)
    assert nnclr_loss(z, z).item() < 1e-2
    assert nt_xent(z, z).item() < 1e-2


def _multi_positive_reference(positives: torch.Tensor, weights: torch.Tensor, predictions: torch.Tensor,
                              temperature: float) -> float:
    """L = mean_i sum_j w_ij * -log(exp(q_ij.p_i/T) / sum_b exp(q_ij.p_b/T)), one scalar at a time (float64)."""
    q = torch.nn.functional.normalize(positives.double(), dim=-1)
    p = torch.nn.functional.normalize(predictions.double(), dim=-1)
    b, k, _ = q.shape
    total = 0.0
    for i in range(b):
        for j in range(k):
            logits = [float(q[i, j] @ p[m]) / temperature for m in range(b)]
            top = max(logits)
            log_denominator = top + math.log(sum(math.exp(v - top) for v in logits))
            total += float(weights[i, j]) * -(logits[i] - log_denominator)
    return total / b


def test_multi_positive_loss_matches_a_reference_loop() -> None:
    g = torch.Generator().manual_seed(0)
    positives, predictions = torch.randn(6, 3, 8, generator=g), torch.randn(6, 8, generator=g)
    weights = torch.rand(6, 3, generator=g).softmax(dim=1)
    loss = multi_positive_loss(positives, weights, predictions, temperature=0.2)
    assert loss.item() == pytest.approx(_multi_positive_reference(positives, weights, predictions, 0.2), rel=1e-5)


def test_multi_positive_loss_with_one_positive_is_nnclr_loss() -> None:
    positives, predictions = torch.randn(5, 8), torch.randn(5, 8, requires_grad=True)
    one = multi_positive_loss(positives[:, None], torch.ones(5, 1), predictions, temperature=0.1)
    assert one.item() == pytest.approx(nnclr_loss(positives, predictions, temperature=0.1).item(), rel=1e-6)


def _soft_neighbours_reference(q: torch.Tensor, targets: torch.Tensor, neighbours: torch.Tensor, z: torch.Tensor,
                               found: torch.Tensor, temperature: float, attention_temperature: float) -> float:
    """SNCLR's loss written out from its Eq. 4 and the attention scores of its Sec. 3.2, one scalar at a time
    (float64): candidates are every sample's target and existing neighbours; the target has weight 1, the
    neighbours their positiveness softmax_j(z_i.n_ij / T_a)."""
    normalise = lambda x: torch.nn.functional.normalize(x.double(), dim=-1)  # noqa: E731
    q, targets, neighbours, z = normalise(q), normalise(targets), normalise(neighbours), normalise(z)
    b, k, _ = neighbours.shape
    candidates = []  # (owner, slot, vector): slot 0 = the target, j + 1 = neighbour j
    for m in range(b):
        candidates.append((m, 0, targets[m]))
        candidates += [(m, j + 1, neighbours[m, j]) for j in range(k) if found[m, j]]
    total = 0.0
    for i in range(b):
        logits = [float(q[i] @ c) / temperature for _, _, c in candidates]
        top = max(logits)
        log_denominator = top + math.log(sum(math.exp(v - top) for v in logits))
        scores = [math.exp(float(z[i] @ neighbours[i, j]) / attention_temperature) if found[i, j] else 0.0
                  for j in range(k)]
        weight = {0: 1.0} | {j + 1: s / sum(scores) for j, s in enumerate(scores) if s > 0}
        total += -sum(weight.get(slot, 0.0) * (logit - log_denominator)
                      for (owner, slot, _), logit in zip(candidates, logits) if owner == i)
    return total / b


@pytest.mark.parametrize("attention_temperature", [1.0, 0.1])
def test_soft_neighbours_loss_matches_a_reference_loop(attention_temperature: float) -> None:
    g = torch.Generator().manual_seed(3)
    q, targets, z = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    neighbours = torch.nn.functional.normalize(torch.randn(6, 4, 8, generator=g), dim=-1)
    found = torch.rand(6, 4, generator=g) > 0.3
    found[0] = False  # a sample without neighbours yet: only its target is a positive
    weights = positiveness(z, neighbours, found, temperature=attention_temperature)
    loss = soft_neighbours_loss(q, targets, neighbours, weights, found, temperature=0.2)
    expected = _soft_neighbours_reference(q, targets, neighbours, z, found, 0.2, attention_temperature)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_soft_neighbours_loss_without_neighbours_is_infonce_on_the_targets() -> None:
    q, targets = torch.randn(5, 8), torch.randn(5, 8)
    found = torch.zeros(5, 3, dtype=torch.bool)
    weights = positiveness(torch.randn(5, 8), torch.randn(5, 3, 8), found)
    assert torch.equal(weights, torch.zeros(5, 3))
    loss = soft_neighbours_loss(q, targets, torch.randn(5, 3, 8), weights, found, temperature=0.1)
    # every anchor q_i against the batch's targets, its own the positive: nnclr_loss with the roles swapped
    assert loss.item() == pytest.approx(nnclr_loss(q, targets, temperature=0.1).item(), rel=1e-6)


def test_soft_neighbours_gradients_reach_predictions_targets_and_the_attention_query() -> None:
    q, targets, z = (torch.randn(4, 8, requires_grad=True) for _ in range(3))
    neighbours, found = torch.randn(4, 2, 8), torch.ones(4, 2, dtype=torch.bool)
    loss = soft_neighbours_loss(q, targets, neighbours, positiveness(z, neighbours, found), found)
    loss.backward()
    for x in (q, targets, z):  # z through the positiveness scores, as the reference code lets it
        assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
