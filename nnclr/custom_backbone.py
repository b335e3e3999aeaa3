"""Your own encoder: ``model.backbone=py:MODULE:CLASS`` or ``py:MODULE:CLASS(key=value, ...)``, or an instance.

``CLASS`` is an ``nn.Module`` subclass in the importable module ``MODULE`` (``mymodels`` for a file
``mymodels.py`` in the folder nnclr runs from: the current folder is searched first, as
``python -m`` does). nnclr builds it as ``CLASS(**kwargs)`` with the keywords of the spec, whenever
it needs the network: to pretrain, and to rebuild it for ``nnclr eval``, ``embed``, ``search`` and
``export``, which then load the trained weights into it. Its ``forward`` must map float images
``(B, 3, S, S)`` (normalised, S = ``data.image_size``) to features ``(B, F)``; F is its
``num_features`` if it has one, else what one forward pass on two blank images returns (the pass
checks the shape either way, in eval mode; ``num_features`` is then set on the module).

Only classes are built, never other callables: a checkpoint's config names the spec, and loading a
checkpoint must not call an arbitrary function (``os.system``...) it names. Importing ``MODULE``
runs its top-level code, as any import does: load runs from people you trust.

From Python, an instance can be passed instead (``nnclr.train.pretrain(config, backbone=net)``,
:func:`nnclr.model.build_model`): :func:`adopt` then finds the spec that rebuilds it (the
config's, else ``py:`` + its class's module and name) and refuses an instance no spec rebuilds.
"""

from __future__ import annotations

import importlib
import itertools
import os
import sys
import warnings

import torch
from torch import nn

from nnclr.backbones import BackboneSpec, build_backbone, parse_spec
from nnclr.errors import UserError
from nnclr.weights import state_mismatch


def _import_module(spec: BackboneSpec, name: str) -> object:
    """``import name`` with the current folder first on ``sys.path`` (where ``mymodels.py`` usually is)."""
    if name == "__main__":
        return sys.modules["__main__"]
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as error:
        raise UserError(
            f"model.backbone={spec.text}: cannot import {name} ({error}); run nnclr from the folder that holds "
            f"{name.replace('.', '/')}.py or add that folder to PYTHONPATH"
        ) from None
    except Exception as error:  # noqa: BLE001 - the user's module failed while importing: one line
        reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        raise UserError(f"model.backbone={spec.text}: importing {name} raised {reason}") from None
    finally:
        if added:
            sys.path.remove(cwd)


def resolve(spec: BackboneSpec) -> type[nn.Module]:
    """The class a ``py:`` spec names (``MODULE:CLASS``, ``CLASS`` may be ``Outer.Inner``)."""
    module_name, attribute = spec.target.split(":")
    target: object = _import_module(spec, module_name)
    for part in attribute.split("."):
        target = getattr(target, part, None)
        if target is None:
            if module_name == "__main__":
                raise UserError(
                    f"model.backbone={spec.text}: {attribute} was defined in the script or notebook that trained "
                    f"this run (__main__), which cannot be imported here; load the run where {attribute} is defined, "
                    f"or define it in a module file (e.g. mymodels.py) and name it py:mymodels:{attribute}"
                )
            raise UserError(f"model.backbone={spec.text}: module {module_name} has no {attribute}")
    if not (isinstance(target, type) and issubclass(target, nn.Module)):
        raise UserError(
            f"model.backbone={spec.text}: {attribute} is not an nn.Module class (nnclr builds classes only, never "
            "other callables named in a config); wrap your factory in an nn.Module subclass"
        )
    return target


def measure(module: nn.Module, image_size: int, text: str) -> int:
    """F of ``module``, checked with one eval-mode forward pass on (2, 3, S, S) zeros; sets ``num_features``
    on a module without it. The module's training mode and weights are left as they were."""
    like = next((t for t in itertools.chain(module.parameters(), module.buffers()) if t.is_floating_point()), None)
    x = torch.zeros(2, 3, image_size, image_size, device=like.device if like is not None else "cpu",
                    dtype=like.dtype if like is not None else torch.float32)
    training = module.training
    module.eval()
    try:
        with torch.no_grad():
            out = module(x)
    except Exception as error:  # noqa: BLE001 - whatever the user's forward raises, in one line
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserError(f"model.backbone={text}: its forward pass on (2, 3, {image_size}, {image_size}) images "
                        f"failed ({reason})") from None
    finally:
        module.train(training)
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise UserError(f"model.backbone={text} returns {shape} for (2, 3, {image_size}, {image_size}) images; the "
                        "encoder must return pooled features (B, F): pool and flatten at the end of forward")
    width = int(out.shape[1])
    declared = getattr(module, "head_hidden_size", None) or getattr(module, "num_features", None)
    if declared is None:
        module.num_features = width
    elif declared != width:
        raise UserError(f"model.backbone={text}: num_features is {declared} but its output has {width} features")
    return width


def build(spec: BackboneSpec, *, image_size: int) -> tuple[nn.Module, int]:
    """``CLASS(**kwargs)`` of a ``py:`` spec, and its F."""
    cls = resolve(spec)
    try:
        module = cls(**spec.kwargs)
    except TypeError as error:
        raise UserError(f"model.backbone={spec.text}: {cls.__name__}({_arguments(spec)}) failed ({error}); "
                        "give its constructor's arguments in the spec: py:MODULE:CLASS(KEY=VALUE, ...)") from None
    return module, measure(module, image_size, spec.text)


def _arguments(spec: BackboneSpec) -> str:
    return ", ".join(f"{key}={value!r}" for key, value in spec.kwargs.items())


def spec_of(module: nn.Module) -> str:
    """``py:MODULE:CLASS`` of ``module``'s class, without arguments."""
    cls = type(module)
    return f"py:{cls.__module__}:{cls.__qualname__}"


def adopt(module: nn.Module, text: str, *, cifar_stem: bool, image_size: int) -> tuple[str, int]:
    """The spec that rebuilds ``module``'s architecture, and its F.

    ``text`` (``model.backbone``) when it builds a network with the same parameter and buffer names
    and shapes, else :func:`spec_of` when that does. The rebuilds draw from a forked RNG: the run's
    random numbers are those of a run given the spec.

    Raises:
        UserError: Neither rebuilds it (the message names both and what to set).
    """
    candidates = list(dict.fromkeys([text, spec_of(module)]))
    reasons = []
    for candidate in candidates:
        if "<locals>" in candidate:
            reasons.append(f"{candidate} is defined inside a function")
            continue
        try:
            with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                rebuilt, _ = build_backbone(candidate, cifar_stem=cifar_stem, image_size=image_size)
        except UserError as error:
            reasons.append(str(error))
            continue
        mismatch = state_mismatch(rebuilt.state_dict(), module.state_dict())
        if mismatch is None:
            if parse_spec(candidate).target.startswith("__main__:"):
                warnings.warn(f"model.backbone={candidate}: nnclr eval, embed and export cannot import a class "
                              "defined in __main__; define it in a module file to use them", stacklevel=3)
            return candidate, measure(module, image_size, candidate)
        reasons.append(f"{candidate} builds another network ({mismatch})")
    raise UserError(
        "the backbone passed from Python must be rebuildable from model.backbone (eval, embed and export rebuild "
        f"it): {'; '.join(reasons)}; set model.backbone=py:MODULE:CLASS(KEY=VALUE, ...) with its arguments"
    )
