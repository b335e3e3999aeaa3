"""timm encoders: ``model.backbone=timm:NAME`` or ``timm:NAME(key=value, ...)``.

Any model of timm (Wightman, ``pip install "nnclr[timm]"``) is built with
``timm.create_model(NAME, pretrained=False, num_classes=0, **kwargs)``: random weights, no
classifier, so that ``forward`` returns the pooled pre-logits features ``(B, F)``, F being timm's
``head_hidden_size`` (``num_features`` for most models). Nothing downloads; ``model.init_from``
loads a local file afterwards (:mod:`nnclr.weights`).

What nnclr adds to the keywords of the spec (:func:`recipe`):

* ``img_size=data.image_size`` for models that take one (vision transformers: their position
  embedding is made for that grid);
* with ``model.cifar_stem=true``, the small-image variant where one is standard: ``patch_size=4``
  for vision transformers (a 32x32 image is then 8x8 patches, as solo-learn's CIFAR ViT recipes:
  ``scripts/pretrain/cifar/mae.yaml``, ``backbone.kwargs: {patch_size: 4, img_size: 32}``), and for
  timm's ResNets the CIFAR stem of SimCLR (3x3 stride-1 ``conv1``, no ``maxpool``) put in after
  creation, as :func:`nnclr.backbones._resnet` does for torchvision's. Other families are built as
  timm defines them.

The module is timm's own (not wrapped), so its ``state_dict`` has timm's parameter names: an
export loads into ``timm.create_model(NAME, num_classes=0, **kwargs)`` with the kwargs of
:func:`recipe` (:func:`rebuild_note` says how).
"""

from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
from torch import nn

from nnclr.backbones import BackboneSpec
from nnclr.errors import UserError

SMALL_PATCH = 4  # patch size of the small-image ViT variant (32x32 -> 8x8 tokens)

# keywords the spec may not set, and why
REFUSED = {
    "pretrained": "nnclr never downloads weights; download a file yourself and set model.init_from=FILE",
    "checkpoint_path": "set model.init_from=FILE instead (loaded strictly with weights_only=True)",
    "pretrained_cfg_overlay": "set model.init_from=FILE for local weights",
    "num_classes": "the encoder has no classifier (num_classes=0)",
    "img_size": "it is data.image_size",
    "features_only": "the encoder must return pooled features (B, F)",
}


@dataclass
class TimmRecipe:
    """How a timm encoder is made: ``timm.create_model(name, pretrained=False, num_classes=0, **kwargs)``,
    then, when ``stem_width`` > 0, a ResNet's CIFAR stem with that many channels put in."""

    name: str
    kwargs: dict[str, Any]
    stem_width: int = 0


def import_timm(spec: BackboneSpec) -> ModuleType:
    """The timm package, or a UserError saying how to install it."""
    try:
        import timm
    except ImportError:
        raise UserError(f"model.backbone={spec.text} needs the timm package: pip install 'nnclr[timm]'") from None
    return timm


def _create(timm: ModuleType, spec: BackboneSpec, kwargs: dict[str, Any]) -> nn.Module:
    """``timm.create_model`` without weights or classifier; timm's errors become one line naming the spec."""
    try:
        return timm.create_model(spec.target, pretrained=False, num_classes=0, **kwargs)
    except RuntimeError as error:
        if not timm.is_model(spec.target):
            close = difflib.get_close_matches(spec.target, timm.list_models(), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else "; list them with timm.list_models('PATTERN*')"
            raise UserError(f"model.backbone={spec.text}: timm has no model {spec.target!r}{hint}") from None
        raise UserError(f"model.backbone={spec.text}: timm cannot build it ({str(error).splitlines()[0]})") from None
    except (TypeError, ValueError, AssertionError) as error:
        raise UserError(f"model.backbone={spec.text}: timm cannot build it ({str(error).splitlines()[0]})") from None


def _resnet_stem_width(timm: ModuleType, model: nn.Module) -> int:
    """The stem's channels of a timm ResNet with the single 7x7 convolution stem (not the deep stems of
    resnet*d), else 0."""
    conv1 = getattr(model, "conv1", None)
    if isinstance(model, timm.models.resnet.ResNet) and isinstance(conv1, nn.Conv2d) and conv1.kernel_size == (7, 7):
        return conv1.out_channels
    return 0


def recipe(spec: BackboneSpec, *, cifar_stem: bool, image_size: int) -> TimmRecipe:
    """The keywords nnclr gives ``timm.create_model`` for this spec (see the module docstring).

    The model's class is found by building it on the meta device (no memory, no initialisation cost).
    """
    timm = import_timm(spec)
    for key, reason in REFUSED.items():
        if key in spec.kwargs:
            raise UserError(f"model.backbone={spec.text}: {key} cannot be set here: {reason}")
    with torch.device("meta"):
        probe = _create(timm, spec, spec.kwargs)
    accepted = inspect.signature(type(probe).__init__).parameters
    kwargs = dict(spec.kwargs)
    if "img_size" in accepted:
        kwargs["img_size"] = image_size
        if cifar_stem and "patch_size" in accepted:  # a vision transformer (ConvNeXt's patch_size has no img_size)
            kwargs.setdefault("patch_size", SMALL_PATCH)
    return TimmRecipe(spec.target, kwargs, stem_width=_resnet_stem_width(timm, probe) if cifar_stem else 0)


def _put_cifar_stem(model: nn.Module) -> None:
    """SimCLR's CIFAR stem in a timm ResNet: 3x3 stride-1 ``conv1`` without bias, no ``maxpool``."""
    conv1 = nn.Conv2d(3, model.conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False,
                      device=model.conv1.weight.device)
    nn.init.kaiming_normal_(conv1.weight, mode="fan_out", nonlinearity="relu")  # timm's ResNet initialisation
    model.conv1 = conv1
    model.maxpool = nn.Identity()


def _output_width(spec: BackboneSpec, model: nn.Module, image_size: int) -> int:
    """F from a forward pass of the meta-device ``model`` on (2, 3, S, S): also checks that it takes S x S
    images and returns pooled features."""
    try:
        out = model(torch.empty(2, 3, image_size, image_size, device="meta"))
    except NotImplementedError:  # an operation without a meta kernel: trust timm's attributes
        return int(getattr(model, "head_hidden_size", None) or model.num_features)
    except Exception as error:  # noqa: BLE001 - whatever the model raises, say it in one line
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserError(f"model.backbone={spec.text} cannot encode {image_size}x{image_size} images ({reason}); "
                        "give it other arguments or set data.image_size") from None
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise UserError(f"model.backbone={spec.text} returns {shape}, not pooled features (B, F)")
    return int(out.shape[1])


def build(spec: BackboneSpec, *, cifar_stem: bool, image_size: int) -> tuple[nn.Module, int]:
    """The timm encoder of ``spec`` with random weights, and its F (see :func:`recipe`)."""
    made = recipe(spec, cifar_stem=cifar_stem, image_size=image_size)
    timm = import_timm(spec)
    with torch.device("meta"):
        probe = _create(timm, spec, made.kwargs)
        if made.stem_width:
            _put_cifar_stem(probe)
    width = _output_width(spec, probe, image_size)
    model = _create(timm, spec, made.kwargs)
    if made.stem_width:
        _put_cifar_stem(model)
    return model, width


def rebuild_note(spec: BackboneSpec, *, cifar_stem: bool, image_size: int) -> str:
    """How to load an export of this encoder into timm without nnclr (for the export's header)."""
    made = recipe(spec, cifar_stem=cifar_stem, image_size=image_size)
    arguments = "".join(f", {key}={value!r}" for key, value in made.kwargs.items())
    text = f"timm.create_model({made.name!r}, num_classes=0{arguments}) loads it with load_state_dict(strict=True)"
    if made.stem_width:
        text += (f" after model.conv1 = nn.Conv2d(3, {made.stem_width}, 3, 1, 1, bias=False) and "
                 "model.maxpool = nn.Identity() (the CIFAR stem)")
    return text
