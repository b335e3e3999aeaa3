"""Encoders f: name -> constructor registry (the timm pattern).

An encoder maps a float image batch ``(B, 3, H, W)`` to pooled features ``h`` of shape ``(B, F)``.
NNCLR (Dwibedi et al., ICCV 2021, arXiv 2104.14548) uses a ResNet-50 encoder whose globally
average-pooled output is the representation h. For 32x32 images the usual choice is a ResNet-18
with the CIFAR stem of SimCLR (Chen et al., ICML 2020, arXiv 2002.05709, Appendix B.9: "Because
CIFAR-10 images are much smaller than ImageNet images, we replace the first 7x7 Conv of stride 2
with 3x3 Conv of stride 1, and also remove the first max pooling operation.").

Every entry of :data:`BACKBONES` is a constructor taking the keyword ``cifar_stem`` and returning
a module with an integer attribute ``num_features`` (F). Use :func:`build_backbone`; the test suite
runs every registered entry automatically, so adding a backbone is one function and one line.

Weights are always random (``weights=None``): nothing here downloads.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torchvision import models

from nnclr.errors import UserError

__all__ = ["BACKBONES", "SmallCNN", "build_backbone"]


def _resnet(factory: Callable[..., models.ResNet], *, cifar_stem: bool) -> nn.Module:
    """Build a torchvision ResNet (He et al., CVPR 2016, arXiv 1512.03385) without its classifier.

    The module names are torchvision's, so ``state_dict()`` keys are those of
    ``torchvision.models.resnetXX()`` minus ``fc.*`` and load into torchvision directly.

    Args:
        factory: A torchvision constructor such as ``torchvision.models.resnet18``.
        cifar_stem: Replace ``conv1`` (7x7, stride 2) by a 3x3 stride-1 convolution without bias
            and ``maxpool`` by ``nn.Identity`` (SimCLR, Appendix B.9), for 32x32 inputs.

    Returns:
        The ResNet with ``fc = nn.Identity()`` and ``num_features`` set to the pooled width.
    """
    model = factory(weights=None)
    num_features = model.fc.in_features
    model.fc = nn.Identity()
    if cifar_stem:
        out_channels = model.conv1.out_channels
        conv1 = nn.Conv2d(3, out_channels, kernel_size=3, stride=1, padding=1, bias=False)
        # Same initialisation torchvision gives every ResNet convolution.
        nn.init.kaiming_normal_(conv1.weight, mode="fan_out", nonlinearity="relu")
        model.conv1 = conv1
        model.maxpool = nn.Identity()
    model.num_features = num_features
    return model


def resnet18(*, cifar_stem: bool = False) -> nn.Module:
    """ResNet-18 encoder, F = 512 (see :func:`_resnet`)."""
    return _resnet(models.resnet18, cifar_stem=cifar_stem)


def resnet34(*, cifar_stem: bool = False) -> nn.Module:
    """ResNet-34 encoder, F = 512 (see :func:`_resnet`)."""
    return _resnet(models.resnet34, cifar_stem=cifar_stem)


def resnet50(*, cifar_stem: bool = False) -> nn.Module:
    """ResNet-50 encoder, F = 2048, the paper's encoder (see :func:`_resnet`)."""
    return _resnet(models.resnet50, cifar_stem=cifar_stem)


def _conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    """A 3x3 'same' convolution without bias, batch-norm and ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class SmallCNN(nn.Module):
    """A small VGG-style CNN (about 1.2M parameters) that trains quickly on a CPU at 32x32.

    A 3x3 stem convolution at full resolution, then three stages of
    ``max-pool(2) -> conv -> conv`` with widths 64, 128, 256, every convolution 3x3 without bias
    + batch-norm + ReLU (as in VGG, Simonyan and Zisserman, arXiv 1409.1556, and the fast CIFAR
    networks of airbench, Jordan, arXiv 2404.00498), then global average pooling: seven
    convolutions. At 32x32 the stages run at 16x16, 8x8 and 4x4; global average pooling makes
    any input of at least 8x8 work.

    Pooling right after the stem keeps only one convolution at full resolution: on a 2-core CPU
    (bf16 autocast, channels_last, batch 512 at 32x32) this trains about twice as fast as the
    same widths with a second full-resolution convolution (see ``bench/bench_backbones.py``).

    Args:
        widths: Output channels of the stem and of the three stages.

    Attributes:
        num_features: F, the width of the pooled features (``widths[-1]``).
    """

    def __init__(self, widths: tuple[int, ...] = (32, 64, 128, 256)) -> None:
        super().__init__()
        stem, *stages = widths
        self.stem = _conv_bn_relu(3, stem)
        layers: list[nn.Module] = []
        in_channels = stem
        for width in stages:
            layers.append(
                nn.Sequential(
                    nn.MaxPool2d(2),
                    _conv_bn_relu(in_channels, width),
                    _conv_bn_relu(width, width),
                )
            )
            in_channels = width
        self.stages = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.num_features = in_channels
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map images ``(B, 3, H, W)`` to pooled features ``(B, F)``."""
        x = self.stages(self.stem(x))
        return torch.flatten(self.pool(x), 1)


def small_cnn(*, cifar_stem: bool = False) -> nn.Module:
    """:class:`SmallCNN`, F = 256; its stem is already 3x3 stride 1, ``cifar_stem`` is ignored."""
    del cifar_stem
    return SmallCNN()


BACKBONES: dict[str, Callable[..., nn.Module]] = {
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
    "small_cnn": small_cnn,
}
"""Registered encoders: name -> constructor ``(*, cifar_stem: bool) -> nn.Module``."""


def build_backbone(name: str, *, cifar_stem: bool = False) -> tuple[nn.Module, int]:
    """Build a registered encoder with random weights.

    Args:
        name: A key of :data:`BACKBONES`.
        cifar_stem: For ResNets, use the 3x3 stride-1 stem without max-pool (SimCLR,
            Appendix B.9); recommended for 32x32 images. Ignored by ``small_cnn``.

    Returns:
        ``(module, F)``: the module maps ``(B, 3, H, W)`` float images to ``(B, F)`` features.

    Raises:
        UserError: If ``name`` is not registered; the message lists the valid names.
    """
    try:
        constructor = BACKBONES[name]
    except KeyError:
        valid = ", ".join(sorted(BACKBONES))
        raise UserError(f"unknown backbone {name!r}; choose one of: {valid}") from None
    model = constructor(cifar_stem=cifar_stem)
    return model, int(model.num_features)
