"""The short-run instance schedule: w(step) and the mixed loss w * NT-Xent + (1 - w) * NNCLR."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nnclr.config import MethodConfig, load_config
from nnclr.errors import UserError
from nnclr.losses import nnclr_loss, nt_xent
from nnclr.methods import METHODS
from nnclr.selectors import NearestNeighbourSelector, NeighboursSelector
from nnclr.step import StepInputs, contrastive_step, instance_weight, neighbours_loss, positive_loss
from nnclr.support import SupportSet


class _Linear(torch.nn.Module):
    """(2B, F) -> (h, z, p): z = W x, p = V z; enough to check which tensors get gradients."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(dim, dim, bias=False)
        self.pred = torch.nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        z = self.proj(x)
        return x, z, self.pred(z)


def test_weight_falls_linearly_to_zero_over_the_decay_share() -> None:
    method = MethodConfig(name="nnclr", instance_weight=0.8, instance_decay=0.5)
    weights = [instance_weight(method, step, 100) for step in range(100)]
    assert weights[0] == pytest.approx(0.8)
    assert weights[25] == pytest.approx(0.4)
    assert all(w == 0 for w in weights[50:])
    assert all(a > b for a, b in zip(weights[:50], weights[1:50]))


@pytest.mark.parametrize("method", [
    MethodConfig(name="nnclr", instance_weight=0.0), MethodConfig(name="kmclr", instance_decay=0.0),
])
def test_weight_is_zero_where_there_is_no_instance_term(method: MethodConfig) -> None:
    assert instance_weight(method, 0, 10) == 0.0


def test_the_short_run_schedule_is_what_the_records_say() -> None:
    """Methods mixing in SimCLR's loss read its keys; the trainer asks the record (test_train checks the loss)."""
    assert not METHODS["simclr"].short_run and not METHODS["deepcluster"].short_run
    assert METHODS["nnclr"].short_run and METHODS["kmclr"].short_run
    for method in METHODS.values():
        assert method.short_run == ("method.instance_weight" in method.keys)


def test_published_recipes_use_the_papers_loss_and_the_demo_mixes() -> None:
    assert load_config().method.instance_weight == 1.0
    assert load_config("configs/cifar10_nnclr.yaml").method.instance_weight == 0.0
    assert load_config("configs/imagenet_nnclr_paper.yaml").method.instance_weight == 0.0


@pytest.mark.parametrize("key", ["method.instance_weight", "method.instance_decay"])
def test_weight_and_decay_outside_unit_interval_are_config_errors(key: str) -> None:
    with pytest.raises(UserError, match=key):
        load_config(overrides=[f"{key}=1.5"])


@pytest.mark.parametrize("w", [0.0, 0.3, 1.0])
def test_mixed_loss_is_the_weighted_sum_of_nt_xent_and_nnclr(w: float) -> None:
    torch.manual_seed(0)
    model, b, dim = _Linear(), 6, 8
    views = torch.randn(2 * b, dim)
    support = SupportSet(32, dim)
    support.enqueue(F.normalize(torch.randn(32, dim), dim=1), None, torch.arange(100, 132), step=0)
    selector = NearestNeighbourSelector()
    out = contrastive_step(
        model, views, loss=positive_loss, temperature=0.1, support=support, selector=selector,
        labels=torch.full((b,), -1), indices=torch.arange(b), step=1, instance_weight=w,
    )
    _, z, p = model(views)
    z1, z2 = F.normalize(z, dim=1).chunk(2)
    p1, p2 = p.chunk(2)
    u = torch.zeros(b)
    nn1 = selector(z1, support, indices=torch.arange(b), uniform=u).positives
    nn2 = selector(z2, support, indices=torch.arange(b), uniform=u).positives
    nnclr = 0.5 * (nnclr_loss(nn1, p2, temperature=0.1) + nnclr_loss(nn2, p1, temperature=0.1))
    expected = w * nt_xent(z1, z2, temperature=0.1) + (1 - w) * nnclr
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert out.diagnostics["instance_weight"] == w
    assert "nn_label_agreement" in out.diagnostics or "support_fill" in out.diagnostics
    out.loss.backward()
    # the predictor is trained only by the NNCLR term: at w = 1 it gets no gradient
    grad = model.pred.weight.grad
    assert (grad is None or grad.abs().max() == 0) if w == 1.0 else grad.abs().max() > 0


@pytest.mark.parametrize("filled", [False, True])
def test_nnclr_gradient_reaches_z_only_through_the_predictions(filled: bool) -> None:
    """NNCLR's positive NN(z) is detached (Sec. 3.2): the loss has no gradient into z1/z2 except through p,
    whether the positive is a support-set row or, with an empty support set, the fallback z itself."""
    b, dim = 6, 8
    z1, z2 = (F.normalize(torch.randn(b, dim), dim=1).requires_grad_() for _ in range(2))
    p1, p2 = (torch.randn(b, dim, requires_grad=True) for _ in range(2))
    support = SupportSet(32, dim)
    if filled:
        support.enqueue(torch.randn(32, dim), None, torch.arange(100, 132), step=0)
    out = positive_loss(StepInputs(
        z1=z1, z2=z2, p1=p1, p2=p2, support=support, selector=NearestNeighbourSelector(),
        labels=torch.full((b,), -1), indices=torch.arange(b), step=1, uniforms=torch.zeros(2, b),
        temperature=0.1, instance_weight=0.0,
    ))
    out.loss.backward()
    assert z1.grad is None and z2.grad is None
    assert p1.grad.abs().sum() > 0 and p2.grad.abs().sum() > 0


def _labelled_inputs(selector: NeighboursSelector, b: int, dim: int, seed: int) -> StepInputs:
    """A full 32-row support set whose row r has label r % 4, and b random queries with labels 0..3."""
    torch.manual_seed(seed)
    support = SupportSet(32, dim)
    support.enqueue(torch.randn(32, dim), torch.arange(32) % 4, torch.arange(100, 132), step=0)
    z1, z2 = (F.normalize(torch.randn(b, dim), dim=1) for _ in range(2))
    return StepInputs(z1=z1, z2=z2, p1=torch.randn(b, dim), p2=torch.randn(b, dim), support=support,
                      selector=selector, labels=torch.arange(b) % 4, indices=torch.arange(b), step=1,
                      uniforms=torch.zeros(2, b), temperature=0.1, instance_weight=0.0)


@pytest.mark.parametrize("weighting", ["uniform", "soft"])
def test_neighbours_loss_is_nnclrs_loss_weighted_over_the_k_nearest(weighting: str) -> None:
    """L = 1/2 [sum_j w_j nnclr(NN_j(z1), p2) + sum_j w_j nnclr(NN_j(z2), p1)], neighbours found by brute force."""
    b, dim, k = 6, 8, 3
    x = _labelled_inputs(NeighboursSelector(k=k, weighting=weighting, soft_temperature=0.5), b, dim, seed=0)
    stored, z1, z2, p1, p2 = x.support.embeddings, x.z1, x.z2, x.p1, x.p2
    out = neighbours_loss(x)

    def direction(z: torch.Tensor, p: torch.Tensor) -> float:
        top = (z @ stored.T).topk(k, dim=1)
        w = (top.values / 0.5).softmax(dim=1) if weighting == "soft" else torch.full((b, k), 1 / k)
        return sum(float((w[:, j] * F.cross_entropy(stored[top.indices[:, j]] @ F.normalize(p, dim=1).T / 0.1,
                                                      torch.arange(b), reduction="none")).mean()) for j in range(k))

    assert out.loss.item() == pytest.approx(0.5 * (direction(z1, p2) + direction(z2, p1)), rel=1e-5)
    top = (z1 @ stored.T).topk(k, dim=1).indices
    agreement = ((top % 4) == (torch.arange(b) % 4)[:, None]).float().mean().item()
    assert out.diagnostics["nn_label_agreement"] == pytest.approx(agreement)


def test_mean_shift_diagnostics_count_every_neighbour_averaged() -> None:
    """nnclr_mean's positive is the mean of k neighbours: its label agreement is over those k rows."""
    b, dim, k = 6, 8, 3
    x = _labelled_inputs(NeighboursSelector(k=k), b, dim, seed=1)
    out = positive_loss(x)
    top = (x.z1 @ x.support.embeddings.T).topk(k, dim=1).indices
    agreement = ((top % 4) == (torch.arange(b) % 4)[:, None]).float().mean().item()
    assert out.diagnostics["nn_label_agreement"] == pytest.approx(agreement)
