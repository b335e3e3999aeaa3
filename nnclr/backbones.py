"""Encoders f: a spec string -> a module mapping images ``(B, 3, S, S)`` to features ``h`` ``(B, F)``.

``model.backbone`` is one of three kinds of spec (:func:`parse_spec`):

* a registered name (:data:`BACKBONES`, the timm pattern): ``small_cnn``, ``resnet18``, ``resnet34``,
  ``resnet50``;
* ``timm:NAME`` or ``timm:NAME(key=value, ...)``: any model of the optional ``timm`` package, built
  without its classifier (:mod:`nnclr.timm_backbone`);
* ``py:MODULE:ATTR`` or ``py:MODULE:ATTR(key=value, ...)``: the user's own ``nn.Module``, a class or
  function imported from a module (:mod:`nnclr.custom_backbone`).

The arguments in parentheses are Python literals given as keywords; they are part of the spec, so
the saved config rebuilds the same network for evaluation, embedding and export.

NNCLR (Dwibedi et al., ICCV 2021, arXiv 2104.14548) uses a ResNet-50 encoder whose globally
average-pooled output is the representation h. For 32x32 images the usual choice is a ResNet-18
with the CIFAR stem of SimCLR (Chen et al., ICML 2020, arXiv 2002.05709, Appendix B.9: "Because
CIFAR-10 images are much smaller than ImageNet images, we replace the first 7x7 Conv of stride 2
with 3x3 Conv of stride 1, and also remove the first max pooling operation.").

Every entry of :data:`BACKBONES` is a constructor taking the keyword ``cifar_stem`` and returning
a module with an integer attribute ``num_features`` (F). Use :func:`build_backbone`; the test suite
runs every registered entry automatically, so adding a backbone is one function and one line.

Weights are always random (``weights=None``, timm's ``pretrained=False``): nothing here downloads.
``model.init_from`` loads a local file afterwards (:mod:`nnclr.weights`).
"""

from __future__ import annotations

import ast
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from nnclr.errors import UserError

__all__ = ["BACKBONES", "BackboneSpec", "SmallCNN", "build_backbone", "feature_dim", "parse_spec", "rebuild_note"]


def _resnet(factory: Callable[..., nn.Module], *, cifar_stem: bool) -> nn.Module:
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


def _torchvision_models() -> Any:
    """``torchvision.models``, imported when a ResNet is built: ``import torchvision`` takes 1-2 s, which the
    default small CNN (and every command that builds none) does not pay."""
    from torchvision import models

    return models


def resnet18(*, cifar_stem: bool = False) -> nn.Module:
    """ResNet-18 encoder, F = 512 (see :func:`_resnet`)."""
    return _resnet(_torchvision_models().resnet18, cifar_stem=cifar_stem)


def resnet34(*, cifar_stem: bool = False) -> nn.Module:
    """ResNet-34 encoder, F = 512 (see :func:`_resnet`)."""
    return _resnet(_torchvision_models().resnet34, cifar_stem=cifar_stem)


def resnet50(*, cifar_stem: bool = False) -> nn.Module:
    """ResNet-50 encoder, F = 2048, the paper's encoder (see :func:`_resnet`)."""
    return _resnet(_torchvision_models().resnet50, cifar_stem=cifar_stem)


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


@dataclass
class BackboneSpec:
    """A parsed ``model.backbone``.

    Attributes:
        family: ``registered`` (a key of :data:`BACKBONES`), ``timm`` or ``py``.
        target: the registered name, the timm model name, or ``MODULE:ATTR``.
        kwargs: the keyword arguments given in parentheses (empty for registered names).
        text: the spec as written.
    """

    family: str
    target: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    text: str = ""


def _keywords(arguments: str, text: str) -> dict[str, Any]:
    """``"depth=6, patch_size=4"`` -> ``{"depth": 6, "patch_size": 4}``: keywords with Python literal values."""
    problem = f"model.backbone={text!r}: the arguments in parentheses must be KEY=VALUE with Python literals"
    try:
        call = ast.parse(f"f({arguments})", mode="eval").body
    except SyntaxError:
        raise UserError(f"{problem}, e.g. timm:vit_tiny_patch16_224(depth=6)") from None
    assert isinstance(call, ast.Call)
    if call.args or any(keyword.arg is None for keyword in call.keywords):
        raise UserError(f"{problem} (keywords only, no positional arguments)")
    try:
        return {keyword.arg: ast.literal_eval(keyword.value) for keyword in call.keywords}
    except ValueError:
        raise UserError(f"{problem} (numbers, strings, True/False/None, tuples, lists)") from None


def parse_spec(text: str) -> BackboneSpec:
    """Parse ``model.backbone``: ``NAME``, ``timm:NAME[(k=v, ...)]`` or ``py:MODULE:ATTR[(k=v, ...)]``.

    Raises:
        UserError: malformed arguments or an empty name; unknown registered names are reported by
            :func:`build_backbone`.
    """
    head, kwargs = text.strip(), {}
    if "(" in head:
        if not head.endswith(")"):
            raise UserError(f"model.backbone={text!r}: the arguments must end the spec, e.g. timm:NAME(depth=6)")
        head, arguments = head[:-1].split("(", 1)
        kwargs = _keywords(arguments, text)
    family, _, target = head.partition(":")
    if family not in ("timm", "py") or not target:
        if kwargs:
            raise UserError(f"model.backbone={text!r}: registered backbones take no arguments")
        return BackboneSpec("registered", head, {}, text)
    if family == "py" and target.count(":") != 1:
        raise UserError(f"model.backbone={text!r}: write py:MODULE:ATTR, e.g. py:mymodels:MyCNN")
    return BackboneSpec(family, target.strip(), kwargs, text)


def feature_dim(module: nn.Module) -> int:
    """F of an encoder built here: timm's ``head_hidden_size`` (the pooled output with ``num_classes=0``)
    where a timm model has one, else ``num_features``."""
    width = getattr(module, "head_hidden_size", None) or getattr(module, "num_features", None)
    if not isinstance(width, int):
        raise UserError(f"{type(module).__name__} has no integer num_features: build it with build_backbone")
    return width


def build_backbone(name: str, *, cifar_stem: bool = False, image_size: int = 32) -> tuple[nn.Module, int]:
    """Build the encoder a spec names (:func:`parse_spec`), with random weights.

    Args:
        name: A key of :data:`BACKBONES`, ``timm:NAME(...)`` or ``py:MODULE:ATTR(...)``.
        cifar_stem: The small-image variant, recommended for 32x32 images: for ResNets (torchvision's
            and timm's) the 3x3 stride-1 stem without max-pool (SimCLR, Appendix B.9), for timm's
            vision transformers patch size 4 (as solo-learn's CIFAR recipes). Ignored by
            ``small_cnn`` and ``py:`` modules.
        image_size: Side S of the input images; timm models that take an ``img_size`` are built for it.

    Returns:
        ``(module, F)``: the module maps ``(B, 3, S, S)`` float images to ``(B, F)`` features.

    Raises:
        UserError: If the spec names nothing buildable; the message says what is valid.
    """
    spec = parse_spec(name)
    if spec.family == "timm":
        from nnclr import timm_backbone

        return timm_backbone.build(spec, cifar_stem=cifar_stem, image_size=image_size)
    if spec.family == "py":
        from nnclr import custom_backbone

        return custom_backbone.build(spec, image_size=image_size)
    try:
        constructor = BACKBONES[spec.target]
    except KeyError:
        valid = ", ".join(sorted(BACKBONES))
        raise UserError(
            f"unknown backbone {name!r}; choose one of: {valid}, or timm:NAME (a timm model) or "
            "py:MODULE:ATTR (your own nn.Module)"
        ) from None
    model = constructor(cifar_stem=cifar_stem)
    return model, int(model.num_features)


def rebuild_note(name: str, *, cifar_stem: bool, image_size: int) -> str | None:
    """How to build the network an export of ``model.backbone=name`` loads into without nnclr, for ``timm:`` and
    ``py:`` specs; None for registered names (:func:`nnclr.use.export.left_out` says it for them)."""
    spec = parse_spec(name)
    if spec.family == "timm":
        from nnclr import timm_backbone

        return timm_backbone.rebuild_note(spec, cifar_stem=cifar_stem, image_size=image_size)
    if spec.family == "py":
        module, cls = spec.target.split(":")
        arguments = ", ".join(f"{key}={value!r}" for key, value in spec.kwargs.items())
        return f"your own module: {module}.{cls}({arguments}) loads it with load_state_dict(strict=True)"
    return None
