"""Encoder weights from a local file: ``model.init_from=PATH`` starts pretraining from them.

PATH may be

* an nnclr export (``nnclr export --format safetensors``; a projector in it is not used),
* an nnclr run directory or ``checkpoint.pt`` (its ``backbone.*`` weights),
* a state dict of the encoder's own library: a ``.safetensors`` file (as timm's weights on the
  Hugging Face hub come) or a ``torch.save`` file (``.pth``, ``.pt``, ``.bin``), possibly inside a
  ``{"state_dict": ...}`` or ``{"model": ...}`` mapping, as training scripts save them.

Files are read with ``safetensors`` or ``torch.load(weights_only=True)``: nothing in them runs. The
weights are loaded strictly: every parameter and buffer of the encoder must be in the file with its
shape, and the file may hold nothing else except the classifier of a classification model (timm's
``pretrained_cfg["classifier"]``, torchvision ResNets' ``fc``), which the encoder does not have; a
mismatch is one line naming the missing, unexpected and differently shaped keys. Nothing downloads:
fetch the file yourself (e.g. ``huggingface-cli download timm/resnet18.a1_in1k``).
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nnclr import rundir
from nnclr.checkpoint import load_failure, unsafe_globals
from nnclr.errors import UserError
from nnclr.integrity import check_safetensors, verify_zip

SHOWN = 4  # keys named per kind of mismatch


def state_mismatch(expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor]) -> str | None:
    """What keeps ``given`` from loading strictly where ``expected`` is the module's ``state_dict()``:
    ``"missing (2): a, b; unexpected (1): c; other shapes (file vs model) (1): d (3,) vs (4,)"``, or None."""
    missing = [key for key in expected if key not in given]
    unexpected = [key for key in given if key not in expected]
    shapes = [f"{key} {tuple(given[key].shape)} vs {tuple(expected[key].shape)}"
              for key in expected if key in given and given[key].shape != expected[key].shape]
    parts = [f"{label} ({len(keys)}): {', '.join(keys[:SHOWN])}{', ...' if len(keys) > SHOWN else ''}"
             for label, keys in (("missing", missing), ("unexpected", unexpected),
                                 ("other shapes (file vs model)", shapes)) if keys]
    return "; ".join(parts) or None


def classifier_names(encoder: nn.Module) -> tuple[str, ...]:
    """The module names of the classifier a classification checkpoint of this encoder's family holds."""
    resnet = sys.modules.get("torchvision.models.resnet")  # never imported: the encoder is no torchvision ResNet
    if resnet is not None and isinstance(encoder, resnet.ResNet):
        return ("fc",)
    names = (getattr(encoder, "pretrained_cfg", None) or {}).get("classifier") or ()
    return (names,) if isinstance(names, str) else tuple(names)


def _torch_file(path: Path) -> Any:
    """``torch.load(weights_only=True)`` of ``path``, its checksum checked when it has one (:mod:`nnclr.integrity`)."""
    zipped = False
    try:
        with open(path, "rb") as file:
            if verify_zip(file).damaged:
                raise UserError(f"model.init_from={path} is damaged: its bytes no longer match the SHA-256 written "
                                "with it (changed on disk or in a copy); copy it again from where it came from")
            file.seek(0)
            zipped = file.read(4) == b"PK\x03\x04"
            file.seek(0)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return torch.load(file, map_location="cpu", weights_only=True)
    except UserError:
        raise
    except OSError as error:
        raise UserError(f"model.init_from={path} cannot be read ({error.strerror or error}); check its permissions "
                        "and the path") from None
    except Exception as error:  # noqa: BLE001 - any unpickling failure means the same to a user
        unsafe = unsafe_globals(path) if zipped else []
        if unsafe:
            raise UserError(
                f"model.init_from={path}: refused, it needs unpickling Python objects ({', '.join(unsafe[:3])}), which "
                "can run code; save the weights alone: torch.save(model.state_dict(), FILE)"
            ) from None
        kind = "" if zipped else (", not in torch's zip format (a plain pickle or a torch < 1.6 file); nnclr never "
                                  "unpickles code")
        raise UserError(f"model.init_from={path} cannot be read ({load_failure(error)}){kind}; save the weights alone "
                        "from a copy you trust: torch.save(model.state_dict(), FILE)") from None


def _is_state(tree: Any) -> bool:
    return isinstance(tree, Mapping) and bool(tree) and all(isinstance(v, torch.Tensor) for v in tree.values())


def read_encoder_state(path: str | Path) -> tuple[dict[str, torch.Tensor], str]:
    """The encoder weights in ``path`` (see the module docstring) and what kind of file it was."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / rundir.CHECKPOINT
    if not path.is_file():
        raise UserError(f"model.init_from={path} not found; give a run directory, a checkpoint, an export or a "
                        "state dict file")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            damage = check_safetensors(path)
            if damage is not None:
                raise UserError(f"model.init_from={path} is damaged: {damage} (changed on disk or in a copy); export "
                                "it again or copy it again from where it came from")
            with safe_open(str(path), framework="pt") as file:
                meta = file.metadata() or {}
                state = {key: file.get_tensor(key) for key in file.keys()}
        except (SafetensorError, OSError, ValueError) as error:
            raise UserError(f"model.init_from={path} cannot be read as safetensors ({error})") from None
        if "config" in meta:  # written by nnclr export: the encoder, and perhaps the projector
            return {k: v for k, v in state.items() if not k.startswith("projector.")}, "an nnclr export"
        return state, "a safetensors state dict"
    tree = _torch_file(path)
    if isinstance(tree, Mapping) and "format_version" in tree and "model" in tree:  # nnclr's checkpoint
        prefix = "backbone."
        return {k[len(prefix):]: v for k, v in tree["model"].items() if k.startswith(prefix)}, "an nnclr checkpoint"
    if _is_state(tree):
        return dict(tree), "a state dict"
    for key in ("state_dict", "model"):
        if isinstance(tree, Mapping) and _is_state(tree.get(key)):
            return dict(tree[key]), f"the state dict under {key!r}"
    keys = ", ".join(map(str, list(tree)[:5])) if isinstance(tree, Mapping) else type(tree).__name__
    raise UserError(f"model.init_from={path} holds no state dict of tensors (found: {keys}); save one with "
                    "torch.save(model.state_dict(), FILE)")


def _prefix_hint(unexpected: list[str], expected: Mapping[str, torch.Tensor]) -> str:
    """A hint when every key of the file has one prefix too many (``module.`` of DDP, ``backbone.``...)."""
    prefixes = {key.split(".", 1)[0] for key in unexpected}
    if len(prefixes) == 1 and all("." in key for key in unexpected):
        prefix = prefixes.pop() + "."
        if {key[len(prefix):] for key in unexpected} >= set(expected):
            return f" (its keys start with {prefix!r}: save that part's state_dict() alone)"
    return ""


def init_encoder(encoder: nn.Module, path: str | Path, backbone: str) -> str:
    """Load the encoder weights of ``path`` into ``encoder`` strictly; returns a line saying what was loaded.

    Raises:
        UserError: unreadable file, or keys or shapes that do not match (named in the message).
    """
    state, kind = read_encoder_state(path)
    expected = encoder.state_dict()
    dropped = [key for key in state if key not in expected
               and any(key.startswith(name + ".") for name in classifier_names(encoder))]
    state = {key: value for key, value in state.items() if key not in dropped}
    mismatch = state_mismatch(expected, state)
    if mismatch is not None:
        hint = _prefix_hint([key for key in state if key not in expected], expected)
        raise UserError(f"model.init_from={path} ({kind}) does not fit model.backbone={backbone}: {mismatch}{hint}")
    encoder.load_state_dict(state, strict=True)
    note = f"backbone initialised from {path} ({kind}, {len(state)} tensors)"
    return note + (f"; its classifier left out ({', '.join(sorted(dropped))})" if dropped else "")
