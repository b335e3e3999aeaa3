"""BYOL's target network and the methods built on it (nnbyol, msf; nnsiam, the same loss without a target): the EMA
update and its schedule against the paper's formulas, the losses against brute-force loops, and a run's target
starting from the encoder it trains."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tiny import SMALLER_HEADS
from use_helpers import make_checkpoint

from nnclr.checkpoint import load_checkpoint
from nnclr.config import load_config
from nnclr.errors import UserError
from nnclr.methods import METHODS
from nnclr.model import build_model, target_momentum
from nnclr.optim import param_groups
from nnclr.selectors import NearestNeighbourSelector, NeighboursSelector
from nnclr.step import StepInputs, mean_shift_loss, nn_byol_loss, nn_siam_loss
from nnclr.support import SupportSet
from nnclr.train import pretrain

SMALL = [*SMALLER_HEADS, "model.backbone=small_cnn", "data.image_size=16"]


def _online(model: torch.nn.Module) -> torch.nn.Module:
    return torch.nn.Sequential(model.backbone, model.projector)


@pytest.mark.parametrize("name", ["nnbyol", "msf", "all4one"])
def test_the_target_starts_as_the_online_network_and_is_not_trained(name: str) -> None:
    model = build_model(load_config(None, [*SMALL, f"method.name={name}"]))
    assert model.target is not None
    for (key, online), target in zip(_online(model).state_dict().items(), model.target.state_dict().values()):
        assert torch.equal(online, target), key
    assert not any(p.requires_grad for p in model.target.parameters())
    optimised = {id(p) for group in param_groups(model, 1e-6) for p in group["params"]}
    assert not optimised & {id(p) for p in model.target.parameters()}
    assert build_model(load_config(None, [*SMALL, "method.name=nnclr"])).target is None


def test_the_target_moves_by_byols_moving_average() -> None:
    """ξ ← τ ξ + (1 - τ) θ for every parameter (Grill et al., 2020, Eq. 1); buffers are the target's own."""
    model = build_model(load_config(None, [*SMALL, "method.name=nnbyol"]))
    with torch.no_grad():
        for p in _online(model).parameters():
            p.add_(torch.randn_like(p))
    before = [p.clone() for p in model.target.parameters()]
    buffers = [b.clone() for b in model.target.buffers()]
    model.update_target(0.9)
    for xi, old, theta in zip(model.target.parameters(), before, _online(model).parameters()):
        torch.testing.assert_close(xi, 0.9 * old + 0.1 * theta)
    assert all(torch.equal(a, b) for a, b in zip(model.target.buffers(), buffers))


def test_target_momentum_follows_byols_cosine() -> None:
    """τ_k = 1 - (1 - τ_base)(cos(πk/K) + 1)/2 (Grill et al., 2020, Sec. 3.2)."""
    for k in (0, 1, 37, 50, 99, 100, 150):
        expected = 1 - (1 - 0.99) * (math.cos(math.pi * min(k, 100) / 100) + 1) / 2
        assert target_momentum(0.99, k, 100) == pytest.approx(expected, abs=1e-15)
    assert target_momentum(0.99, 50, 100) == pytest.approx(0.995)


@pytest.mark.parametrize("value", ["-0.1", "1.5"])
def test_target_momentum_outside_the_unit_interval_is_refused(value: str) -> None:
    with pytest.raises(UserError, match="method.target_momentum"):
        load_config(None, [f"method.target_momentum={value}"])


def _inputs(selector: torch.nn.Module, b: int, dim: int, seed: int) -> StepInputs:
    """A full 32-row support set of target projections (row r has label r % 4) and b queries."""
    g = torch.Generator().manual_seed(seed)
    support = SupportSet(32, dim)
    support.enqueue(torch.randn(32, dim, generator=g), torch.arange(32) % 4, torch.arange(100, 132), step=0)
    z1, z2, t1, t2 = (F.normalize(torch.randn(b, dim, generator=g), dim=1) for _ in range(4))
    return StepInputs(z1=z1, z2=z2, p1=torch.randn(b, dim, generator=g), p2=torch.randn(b, dim, generator=g),
                      support=support, selector=selector, labels=torch.arange(b) % 4, indices=torch.arange(b),
                      step=1, uniforms=torch.zeros(2, b), temperature=0.1, instance_weight=0.0, t1=t1, t2=t2)


def _byol(p: torch.Tensor, t: torch.Tensor) -> float:
    """||p/|p| - t/|t|||², one pair (float64)."""
    p, t = p.double() / p.double().norm(), t.double() / t.double().norm()
    return float(((p - t) ** 2).sum())


def test_nnbyol_loss_is_byols_loss_to_the_targets_nearest_neighbour() -> None:
    b, dim = 5, 8
    x = _inputs(NearestNeighbourSelector(), b, dim, seed=0)
    out = nn_byol_loss(x)
    stored = x.support.embeddings
    total = 0.0
    for i in range(b):
        nn_of_t2 = stored[int((x.t2[i] @ stored.T).argmax())]
        nn_of_t1 = stored[int((x.t1[i] @ stored.T).argmax())]
        total += 0.5 * (_byol(x.p1[i], nn_of_t2) + _byol(x.p2[i], nn_of_t1))
    assert out.loss.item() == pytest.approx(total / b, rel=1e-5)
    assert torch.equal(out.z1, x.t1)  # the support set stores target projections
    nearest = (x.t1 @ stored.T).argmax(dim=1)
    assert out.diagnostics["nn_label_agreement"] == pytest.approx(((nearest % 4) == torch.arange(b) % 4).float().mean())


def test_nnsiam_loss_is_simsiams_loss_to_the_nearest_neighbour_of_z() -> None:
    """D(p, NN(z)) = -cos(p, NN(z)) (SimSiam Eq. 1, the target a support-set neighbour), halved over the views."""
    b, dim = 5, 8
    x = _inputs(NearestNeighbourSelector(), b, dim, seed=3)
    z1, z2 = x.z1.clone().requires_grad_(), x.z2.clone().requires_grad_()
    x.z1, x.z2, x.t1, x.t2 = z1, z2, None, None
    x.p1.requires_grad_()
    out = nn_siam_loss(x)
    stored = x.support.embeddings
    cos = torch.nn.functional.cosine_similarity
    expected = sum(-0.5 * (float(cos(x.p1[i], stored[int((z2[i] @ stored.T).argmax())], dim=0))
                           + float(cos(x.p2[i], stored[int((z1[i] @ stored.T).argmax())], dim=0)))
                   for i in range(b)) / b
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)
    assert torch.equal(out.z1, z1.detach())  # the support set stores z, as NNCLR's
    out.loss.backward()
    assert z1.grad is None and z2.grad is None and x.p1.grad.abs().sum() > 0  # stop-gradient on the targets


@pytest.mark.parametrize("k", [1, 3])
def test_mean_shift_loss_averages_byols_loss_over_the_target_and_its_k_nearest(k: int) -> None:
    b, dim = 5, 8
    x = _inputs(NeighboursSelector(k=k), b, dim, seed=1)
    out = mean_shift_loss(x)
    stored = x.support.embeddings
    total = 0.0
    for i in range(b):
        for p, t in ((x.p1[i], x.t2[i]), (x.p2[i], x.t1[i])):
            nearest = (t @ stored.T).topk(k).indices
            targets = [t, *(stored[int(r)] for r in nearest)]
            total += 0.5 * sum(_byol(p, c) for c in targets) / len(targets)
    assert out.loss.item() == pytest.approx(total / b, rel=1e-5)
    assert torch.equal(out.z1, x.t1)


def test_mean_shift_with_an_empty_support_set_is_byol() -> None:
    b, dim = 4, 8
    x = _inputs(NeighboursSelector(k=3), b, dim, seed=2)
    x.support = SupportSet(32, dim)
    byol = sum(0.5 * (_byol(x.p1[i], x.t2[i]) + _byol(x.p2[i], x.t1[i])) for i in range(b)) / b
    assert mean_shift_loss(x).loss.item() == pytest.approx(byol, rel=1e-5)


def test_the_methods_with_a_target_are_the_records_that_say_so() -> None:
    assert {name for name, m in METHODS.items() if m.target} == {"nnbyol", "msf", "all4one"}


@pytest.mark.slow
def test_a_run_from_init_from_starts_its_target_from_those_weights(tmp_path: Path) -> None:
    """With τ = 1 the target never moves: after a step it still holds the encoder the run was initialised from."""
    source = make_checkpoint(tmp_path / "source" / "checkpoint.pt", "data.image_size=32")
    original = torch.load(source, weights_only=True)["model"]
    overrides = [*SMALLER_HEADS, "optim.batch_size=32", "optim.warmup_epochs=0", "method.support_size=64",
                 "data.test_split=", "train.report=false", "method.name=nnbyol", "method.target_momentum=1.0",
                 "train.seed=7", f"model.init_from={source}", f"train.run_dir={tmp_path / 'run'}", "train.epochs=1",
                 "train.max_steps=1"]
    pretrain(load_config(None, overrides), progress=False, echo=lambda line: None)
    trained = load_checkpoint(tmp_path / "run" / "checkpoint.pt")["model"]
    weights = [k for k in original if k.startswith("backbone.") and k.endswith("weight")]
    assert weights
    for key in weights:
        torch.testing.assert_close(trained["target.0." + key.removeprefix("backbone.")], original[key], atol=0, rtol=0)
