"""LARS, parameter groups, the optimizer factory and the learning-rate schedule."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from nnclr.backbones import build_backbone
from nnclr.errors import UserError
from nnclr.heads import projection_head
from nnclr.optim import LARS, build_optimizer, param_groups, scaled_lr, warmup_cosine

# ----------------------------------------------------------------------------- LARS


def reference_lars(
    w: list[float],
    grads: list[list[float]],
    lrs: list[float],
    *,
    momentum: float,
    weight_decay: float,
    eta: float,
    exclude: bool,
) -> list[float]:
    """LARS written out with Python floats, one step at a time (You et al. 2017 / SimCLR)."""
    w = list(w)
    buf = [0.0] * len(w)
    for step, (g, lr) in enumerate(zip(grads, lrs)):
        if exclude:
            d = list(g)  # plain momentum SGD: neither weight decay nor adaptation
        else:
            w_norm = math.sqrt(sum(x * x for x in w))
            g_norm = math.sqrt(sum(x * x for x in g))
            trust = eta * w_norm / (g_norm + weight_decay * w_norm)
            d = [trust * (gi + weight_decay * wi) for gi, wi in zip(g, w)]
        buf = d if step == 0 else [momentum * b + di for b, di in zip(buf, d)]
        w = [wi - lr * b for wi, b in zip(w, buf)]
    return w


W0 = [0.5, -1.0, 2.0, 0.25]
GRADS = [[0.1, 0.2, -0.3, 0.05], [-0.2, 0.1, 0.4, 0.0], [0.3, -0.1, 0.1, 0.2]]
LRS = [1.0, 0.5, 2.0]


def run_lars(*, weight_decay: float, exclude: bool) -> torch.Tensor:
    w = nn.Parameter(torch.tensor(W0, dtype=torch.float64))
    opt = LARS(
        [{"params": [w], "weight_decay": weight_decay, "lars_exclude": exclude}],
        momentum=0.9,
        trust_coefficient=0.001,
    )
    for g, lr in zip(GRADS, LRS):
        opt.param_groups[0]["lr"] = lr  # as the training loop does from the schedule
        w.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
    return w.detach()


@pytest.mark.parametrize("weight_decay", [0.0, 1e-6, 0.1])
def test_lars_matches_reference(weight_decay: float) -> None:
    expected = reference_lars(
        W0, GRADS, LRS, momentum=0.9, weight_decay=weight_decay, eta=0.001, exclude=False
    )
    w0 = torch.tensor(W0, dtype=torch.float64)
    # Compare the displacement, not w: updates are ~1e-3 of w, so w alone would hide errors.
    torch.testing.assert_close(
        w0 - run_lars(weight_decay=weight_decay, exclude=False),
        w0 - torch.tensor(expected, dtype=torch.float64),
        rtol=1e-6,  # the optimizer's eps=1e-8 in the trust ratio's denominator
        atol=0.0,
    )


def test_lars_first_step_by_hand() -> None:
    """One step, numbers spelled out: trust = eta ||w|| / (||g|| + wd ||w||)."""
    w = nn.Parameter(torch.tensor([3.0, 4.0], dtype=torch.float64))  # ||w|| = 5
    w.grad = torch.tensor([0.6, 0.8], dtype=torch.float64)  # ||g|| = 1
    opt = LARS([w], lr=2.0, weight_decay=0.1, trust_coefficient=0.001)
    opt.step()
    trust = 0.001 * 5.0 / (1.0 + 0.1 * 5.0)
    update = trust * (torch.tensor([0.6, 0.8]) + 0.1 * torch.tensor([3.0, 4.0]))
    moved = torch.tensor([3.0, 4.0], dtype=torch.float64) - w.detach()
    torch.testing.assert_close(moved, 2.0 * update.double(), rtol=1e-6, atol=0.0)


def test_lars_excluded_group_is_momentum_sgd() -> None:
    expected = reference_lars(W0, GRADS, LRS, momentum=0.9, weight_decay=0.0, eta=0.0, exclude=True)
    ours = run_lars(weight_decay=0.0, exclude=True)
    torch.testing.assert_close(ours, torch.tensor(expected, dtype=torch.float64))
    # ... and the same as torch's SGD with momentum.
    w = nn.Parameter(torch.tensor(W0, dtype=torch.float64))
    sgd = torch.optim.SGD([w], lr=1.0, momentum=0.9)
    for g, lr in zip(GRADS, LRS):
        sgd.param_groups[0]["lr"] = lr
        w.grad = torch.tensor(g, dtype=torch.float64)
        sgd.step()
    torch.testing.assert_close(ours, w.detach())


def test_lars_zero_weight_or_grad_uses_trust_one() -> None:
    w = nn.Parameter(torch.zeros(3))
    w.grad = torch.tensor([1.0, -2.0, 0.5])
    LARS([w], lr=0.1, momentum=0.9).step()
    torch.testing.assert_close(w.detach(), torch.tensor([-0.1, 0.2, -0.05]))
    v = nn.Parameter(torch.ones(3))
    v.grad = torch.zeros(3)
    LARS([v], lr=0.1).step()
    torch.testing.assert_close(v.detach(), torch.ones(3))


def test_lars_skips_params_without_grad() -> None:
    a, b = nn.Parameter(torch.ones(2, 2)), nn.Parameter(torch.ones(2, 2))
    a.grad = torch.ones(2, 2)
    opt = LARS([a, b], lr=1.0)
    opt.step()
    assert torch.equal(b.detach(), torch.ones(2, 2))
    assert b not in opt.state and a in opt.state


def test_lars_state_dict_round_trip() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    x = torch.randn(16, 4)

    def train(opt: torch.optim.Optimizer, m: nn.Module, steps: int) -> None:
        for _ in range(steps):
            opt.zero_grad()
            m(x).pow(2).mean().backward()
            opt.step()

    opt = LARS(param_groups(model, weight_decay=1e-4), lr=0.5, momentum=0.9)
    train(opt, model, 3)
    buffer = io.BytesIO()  # through serialisation, as a checkpoint does
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    saved_model, saved_opt = checkpoint["model"], checkpoint["optimizer"]
    assert [g["lars_exclude"] for g in saved_opt["param_groups"]] == [False, True]
    assert [g["weight_decay"] for g in saved_opt["param_groups"]] == [1e-4, 0.0]

    torch.manual_seed(0)
    clone = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    clone.load_state_dict(saved_model)
    resumed = LARS(param_groups(clone, weight_decay=0.0), lr=0.0)
    resumed.load_state_dict(saved_opt)
    assert resumed.param_groups[0]["weight_decay"] == 1e-4
    train(opt, model, 2)
    train(resumed, clone, 2)
    for a, b in zip(model.parameters(), clone.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_lars_rejects_bad_hyperparameters() -> None:
    p = [nn.Parameter(torch.ones(1))]
    bad = [{"lr": -1.0}, {"momentum": 1.0}, {"weight_decay": -1.0}, {"trust_coefficient": 0.0}]
    for kwargs in bad:
        with pytest.raises(ValueError):
            LARS(p, **kwargs)


# ----------------------------------------------------------------------------- param_groups


@pytest.mark.parametrize("name", ["resnet18", "small_cnn"])
def test_param_groups_split(name: str) -> None:
    backbone, features = build_backbone(name, cifar_stem=True)
    model = nn.Sequential(backbone, projection_head(features, hidden_dim=64, out_dim=32))
    decay_group, no_decay_group = param_groups(model, weight_decay=1e-6)
    assert decay_group["weight_decay"] == 1e-6 and decay_group["lars_exclude"] is False
    assert no_decay_group["weight_decay"] == 0.0 and no_decay_group["lars_exclude"] is True
    decay = {id(p) for p in decay_group["params"]}
    no_decay = {id(p) for p in no_decay_group["params"]}
    assert not decay & no_decay
    assert decay | no_decay == {id(p) for p in model.parameters()}
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            assert id(module.weight) in decay
            if module.bias is not None:
                assert id(module.bias) in no_decay
        if isinstance(module, nn.BatchNorm2d | nn.BatchNorm1d):
            assert id(module.weight) in no_decay and id(module.bias) in no_decay
    assert all(p.ndim > 1 for p in decay_group["params"])
    assert all(p.ndim <= 1 for p in no_decay_group["params"])


def test_param_groups_frozen_shared_and_norms() -> None:
    shared = nn.Linear(4, 4)
    ln = nn.LayerNorm([2, 3])  # 2-D weight, still a norm parameter
    frozen = nn.Linear(4, 4)
    frozen.requires_grad_(False)
    model = nn.ModuleDict({"a": shared, "b": nn.Sequential(shared), "ln": ln, "frozen": frozen})
    decay, no_decay = param_groups(model, weight_decay=0.1)
    assert [id(p) for p in decay["params"]] == [id(shared.weight)]
    assert {id(p) for p in no_decay["params"]} == {id(shared.bias), id(ln.weight), id(ln.bias)}
    assert len(no_decay["params"]) == 3
    only_bn = param_groups(nn.BatchNorm1d(3), weight_decay=0.1)
    assert len(only_bn) == 1 and only_bn[0]["lars_exclude"] is True


# ----------------------------------------------------------------------------- build_optimizer


@pytest.mark.parametrize(
    ("name", "cls"),
    [("lars", LARS), ("sgd", torch.optim.SGD), ("adamw", torch.optim.AdamW)],
)
def test_build_optimizer(name: str, cls: type) -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    opt = build_optimizer(name, param_groups(model, 1e-6), lr=0.3, weight_decay=1e-6)
    assert isinstance(opt, cls)
    assert [g["weight_decay"] for g in opt.param_groups] == [1e-6, 0.0]
    assert all(g["lr"] == 0.3 for g in opt.param_groups)
    if name != "adamw":
        assert all(g["momentum"] == 0.9 for g in opt.param_groups)
    model(torch.randn(8, 4)).sum().backward()
    opt.step()


def test_build_optimizer_plain_parameters_get_default_decay() -> None:
    opt = build_optimizer("lars", nn.Linear(2, 2).parameters(), lr=0.1, weight_decay=0.5)
    assert opt.param_groups[0]["weight_decay"] == 0.5
    assert opt.param_groups[0]["lars_exclude"] is False


def test_build_optimizer_errors() -> None:
    params = list(nn.Linear(2, 2).parameters())
    with pytest.raises(UserError, match="adamw, lars, sgd"):
        build_optimizer("adam", params, lr=0.1, weight_decay=0.0)
    with pytest.raises(UserError, match="lr"):
        build_optimizer("sgd", params, lr=-0.1, weight_decay=0.0)
    with pytest.raises(UserError, match="weight_decay"):
        build_optimizer("lars", params, lr=0.1, weight_decay=float("nan"))


# ----------------------------------------------------------------------------- schedule


def test_warmup_cosine_shape_and_endpoints() -> None:
    s = warmup_cosine(1.2, total_steps=100, warmup_steps=10, final_lr=0.01)
    assert s.shape == (100,) and s.dtype == torch.float64
    assert 0 < s[0] <= 1.2 / 10 + 1e-12  # starts near zero, not at zero
    assert s[9] == pytest.approx(1.2)  # warm-up ends at base_lr
    assert s.max() == pytest.approx(1.2)
    assert s[-1] == pytest.approx(0.01)
    assert (s[1:10] > s[:9]).all()  # warm-up strictly increasing
    assert (s[11:] <= s[10:-1]).all()  # cosine non-increasing
    torch.testing.assert_close(s[:10], 1.2 * torch.arange(1, 11, dtype=torch.float64) / 10)


def test_warmup_cosine_midpoint() -> None:
    # 5 warm-up steps, then 11 cosine steps: t = 0, 0.1, ..., 1; the 6th is t = 0.5.
    s = warmup_cosine(1.0, total_steps=16, warmup_steps=5, final_lr=0.2)
    assert s[5 + 5] == pytest.approx((1.0 + 0.2) / 2)
    assert s[5 + 2] == pytest.approx(0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * 0.2)))


def test_warmup_cosine_edge_cases() -> None:
    no_warmup = warmup_cosine(0.5, total_steps=5, warmup_steps=0)
    assert no_warmup[0] == pytest.approx(0.5) and no_warmup[-1] == pytest.approx(0.0)
    assert warmup_cosine(0.5, total_steps=1, warmup_steps=0).tolist() == [0.5]
    assert warmup_cosine(0.5, total_steps=1, warmup_steps=1).tolist() == [0.5]
    only_warmup = warmup_cosine(1.0, total_steps=3, warmup_steps=3)
    torch.testing.assert_close(only_warmup, torch.tensor([1 / 3, 2 / 3, 1.0], dtype=torch.float64))
    truncated = warmup_cosine(1.0, total_steps=3, warmup_steps=10)
    torch.testing.assert_close(truncated, torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64))
    one_cosine_step = warmup_cosine(1.0, total_steps=3, warmup_steps=2)
    torch.testing.assert_close(one_cosine_step, torch.tensor([0.5, 1.0, 1.0], dtype=torch.float64))
    assert torch.isfinite(warmup_cosine(1.0, total_steps=2, warmup_steps=0)).all()
    with pytest.raises(ValueError):
        warmup_cosine(1.0, total_steps=0, warmup_steps=0)
    with pytest.raises(ValueError):
        warmup_cosine(1.0, total_steps=10, warmup_steps=-1)


def test_schedule_drives_optimizer_groups() -> None:
    """The training loop's pattern: lr per group = schedule[step] * lr_scale."""
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    groups = param_groups(model, 0.0)
    groups[1]["lr_scale"] = 0.1
    opt = build_optimizer("lars", groups, lr=0.0, weight_decay=0.0)
    schedule = warmup_cosine(1.0, total_steps=4, warmup_steps=2)
    for step in range(4):
        for group in opt.param_groups:
            group["lr"] = float(schedule[step]) * group.get("lr_scale", 1.0)
        assert opt.param_groups[1]["lr"] == pytest.approx(0.1 * opt.param_groups[0]["lr"])
    assert opt.state_dict()["param_groups"][1]["lr_scale"] == 0.1


def test_scaled_lr() -> None:
    assert scaled_lr(0.3, 4096) == pytest.approx(4.8)
    assert scaled_lr(0.3, 256) == pytest.approx(0.3)
    assert scaled_lr(0.3, 512) == pytest.approx(0.6)
    with pytest.raises(ValueError):
        scaled_lr(0.3, 0)
