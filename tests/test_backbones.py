"""Encoders: every registered backbone is tested automatically (the timm pattern)."""

from __future__ import annotations

import socket

import pytest
import torch
import torchvision
from backbone_helpers import assert_trains_bf16_channels_last
from torch import nn

from nnclr.backbones import BACKBONES, build_backbone
from nnclr.errors import UserError

RESNETS = [name for name in BACKBONES if name.startswith("resnet")]


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail any test of this file that opens a connection (e.g. a weight download)."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("backbones must not touch the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)


@pytest.mark.parametrize("cifar_stem", [False, True])
@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_output_shape(name: str, cifar_stem: bool) -> None:
    model, features = build_backbone(name, cifar_stem=cifar_stem)
    assert isinstance(model, nn.Module)
    assert isinstance(features, int) and features > 0
    with torch.no_grad():  # batch 2: even resnet50 with the CIFAR stem at 64x64 takes < 0.5 s
        for size in (32, 64):
            out = model(torch.randn(2, 3, size, size))
            assert out.shape == (2, features)
            assert out.dtype == torch.float32
            assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_random_weights_differ_by_seed(name: str) -> None:
    """weights=None: initialisation comes from the RNG, never from a download."""
    torch.manual_seed(1)
    a, _ = build_backbone(name)
    torch.manual_seed(2)
    b, _ = build_backbone(name)
    first_a = next(iter(a.parameters()))
    first_b = next(iter(b.parameters()))
    assert not torch.equal(first_a, first_b)


def test_feature_widths() -> None:
    widths = {name: build_backbone(name)[1] for name in BACKBONES}
    assert widths == {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "small_cnn": 256}


def test_resnet18_cifar_stem() -> None:
    model, _ = build_backbone("resnet18", cifar_stem=True)
    assert isinstance(model.conv1, nn.Conv2d)
    assert model.conv1.kernel_size == (3, 3)
    assert model.conv1.stride == (1, 1)
    assert model.conv1.padding == (1, 1)
    assert model.conv1.bias is None
    assert model.conv1.in_channels == 3 and model.conv1.out_channels == 64
    assert isinstance(model.maxpool, nn.Identity)
    assert isinstance(model.fc, nn.Identity)
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())


def test_resnet18_imagenet_stem() -> None:
    model, _ = build_backbone("resnet18", cifar_stem=False)
    assert model.conv1.kernel_size == (7, 7)
    assert model.conv1.stride == (2, 2)
    assert isinstance(model.maxpool, nn.MaxPool2d)
    assert isinstance(model.fc, nn.Identity)


@pytest.mark.parametrize("cifar_stem", [False, True])
@pytest.mark.parametrize("name", RESNETS)
def test_resnet_state_dict_uses_torchvision_keys(name: str, cifar_stem: bool) -> None:
    model, _ = build_backbone(name, cifar_stem=cifar_stem)
    reference = getattr(torchvision.models, name)(weights=None)
    expected = {k: v.shape for k, v in reference.state_dict().items() if not k.startswith("fc.")}
    ours = {k: v.shape for k, v in model.state_dict().items()}
    assert ours.keys() == expected.keys()
    differ = {k for k in ours if ours[k] != expected[k]}
    assert differ == ({"conv1.weight"} if cifar_stem else set())
    if not cifar_stem:  # an export loads strictly into torchvision's model without its classifier
        reference.fc = nn.Identity()
        reference.load_state_dict(model.state_dict(), strict=True)


def test_small_cnn_size_and_depth() -> None:
    model, features = build_backbone("small_cnn")
    params = sum(p.numel() for p in model.parameters())
    assert 700_000 <= params <= 1_500_000
    assert sum(isinstance(m, nn.Conv2d) for m in model.modules()) >= 6
    assert features == 256


@pytest.mark.parametrize("size", [16, 24, 96])
def test_small_cnn_any_input_size(size: int) -> None:
    model, features = build_backbone("small_cnn")
    with torch.no_grad():
        assert model(torch.randn(2, 3, size, size)).shape == (2, features)


def test_small_cnn_trains_bf16_channels_last() -> None:
    """The fast CPU path: bf16 autocast + channels_last, forward and backward."""
    assert_trains_bf16_channels_last(*build_backbone("small_cnn"), size=32, batch=8)


def test_unknown_backbone_lists_valid_names() -> None:
    with pytest.raises(UserError) as info:
        build_backbone("resnet1000")
    message = str(info.value)
    assert "resnet1000" in message
    for name in BACKBONES:
        assert name in message
    assert "timm:NAME" in message and "py:MODULE:ATTR" in message  # the other kinds (docs/backbones.md)
