"""Projection and prediction heads: the paper's sizes and layer structure."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nnclr.heads import mlp, prediction_head, projection_head


def kinds(module: nn.Sequential) -> list[str]:
    return [type(layer).__name__ for layer in module]


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_projection_head_structure() -> None:
    head = projection_head(512)
    assert kinds(head) == [
        "Linear", "BatchNorm1d", "ReLU",
        "Linear", "BatchNorm1d", "ReLU",
        "Linear", "BatchNorm1d",
    ]  # fmt: skip
    linears = [m for m in head if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [
        (512, 2048),
        (2048, 2048),
        (2048, 256),
    ]
    assert all(m.bias is None for m in linears)  # every linear is followed by batch-norm
    assert sum(isinstance(m, nn.BatchNorm1d) for m in head) == 3
    assert sum(isinstance(m, nn.ReLU) for m in head) == 2
    assert not isinstance(head[-1], nn.ReLU)


def test_prediction_head_structure() -> None:
    head = prediction_head()
    assert kinds(head) == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    first, _, _, last = head
    assert (first.in_features, first.out_features) == (256, 4096)
    assert (last.in_features, last.out_features) == (4096, 256)
    assert first.bias is None
    assert last.bias is not None  # no batch-norm after the output layer


def test_paper_parameter_counts() -> None:
    """ResNet-50 features (2048) -> g: [2048, 2048, 256] -> q: [4096, 256]."""
    d, hidden, f = 256, 2048, 2048
    expected_g = (f * hidden + 2 * hidden) + (hidden * hidden + 2 * hidden) + (hidden * d + 2 * d)
    assert n_params(projection_head(f)) == expected_g == 8_921_600
    expected_q = (d * 4096 + 2 * 4096) + (4096 * d + d)
    assert n_params(prediction_head()) == expected_q == 2_105_600


@pytest.mark.parametrize("in_dim", [256, 512, 2048])
def test_shapes_train_and_eval(in_dim: int) -> None:
    g, q = projection_head(in_dim), prediction_head()
    h = torch.randn(8, in_dim)
    z = g(h)
    p = q(z)
    assert z.shape == (8, 256) and p.shape == (8, 256)
    g.eval(), q.eval()
    with torch.no_grad():
        assert q(g(h[:1])).shape == (1, 256)


def test_projection_num_layers_and_sizes() -> None:
    two = projection_head(512, hidden_dim=512, out_dim=128, num_layers=2)  # SimCLR's CIFAR head
    assert kinds(two) == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d"]
    assert two(torch.randn(4, 512)).shape == (4, 128)
    one = projection_head(512, out_dim=64, num_layers=1)
    assert kinds(one) == ["Linear", "BatchNorm1d"]
    with pytest.raises(ValueError):
        projection_head(512, num_layers=0)


def test_mlp_last_bn_flag() -> None:
    with_bn = mlp([8, 16, 4], last_bn=True)
    without = mlp([8, 16, 4], last_bn=False)
    assert kinds(with_bn) == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d"]
    assert kinds(without) == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert with_bn[3].bias is None and without[3].bias is not None


@pytest.mark.parametrize("dims", [[], [8], [8, 0, 4]])
def test_mlp_rejects_bad_dims(dims: list[int]) -> None:
    with pytest.raises(ValueError):
        mlp(dims, last_bn=True)


def test_heads_backpropagate() -> None:
    g, q = projection_head(32, hidden_dim=64, out_dim=16), prediction_head(16, hidden_dim=64)
    q(g(torch.randn(8, 32))).pow(2).mean().backward()
    assert all(p.grad is not None for p in [*g.parameters(), *q.parameters()])
