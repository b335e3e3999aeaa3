"""Export the trained encoder f (optionally with the projection MLP g) for use without nnclr.

Formats:

* ``safetensors``: the backbone's ``state_dict``. ResNet backbones use torchvision's module names
  (see :mod:`nnclr.backbones`), so the file loads into ``torchvision.models.resnetXX()``; ``timm:``
  backbones are timm's own modules, so it loads into ``timm.create_model(NAME, num_classes=0, ...)``
  (the header's ``timm`` key holds NAME and the keywords); what does not carry over, or how to build
  the network it loads into, is in the header (key ``left_out``) and in :func:`left_out`. With the
  projector its keys are prefixed ``projector.``. The header's metadata holds the preprocessing,
  the backbone name and the config as JSON strings, and ``nnclr_sha256``, the SHA-256 of the tensor
  bytes and the other metadata (:func:`nnclr.integrity.safetensors_digest`), which ``nnclr.load`` and
  ``model.init_from`` check.
* ``torchscript``: ``torch.jit.trace`` of the encoder in fp32 eval mode; ``preprocessing.json`` is
  stored as an extra file.
* ``onnx``: ``torch.onnx.export`` (the dynamo exporter, dynamic batch size); metadata properties
  hold the preprocessing. Needs the ``onnx`` extra.

Inputs of the TorchScript and ONNX models are normalised images float32 (B, 3, S, S) (the
preprocessing in the metadata); outputs are the pooled features h (B, F) before L2
normalisation, and with the projector also z = g(h) (B, D). An encoder that torch cannot trace or
export is a UserError naming the format and the reason (safetensors always works).
"""

from __future__ import annotations

import contextlib
import copy
import errno
import io
import json
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nnclr.backbones import parse_spec, rebuild_note
from nnclr.config import to_dict
from nnclr.errors import UserError, shown_path
from nnclr.integrity import SAFETENSORS_KEY, safetensors_digest, safetensors_parts
from nnclr.pretrained import Pretrained
from nnclr.rundir import write_atomic
from nnclr.version import __version__

FORMATS = ("safetensors", "torchscript", "onnx")
PROJECTOR_PREFIX = "projector."


class ExportedEncoder(nn.Module):
    """f (and g): normalised images (B, 3, S, S) -> h (B, F), or (h, z (B, D)) with the projector."""

    def __init__(self, encoder: nn.Module, projector: nn.Module | None = None) -> None:
        super().__init__()
        self.encoder = encoder
        self.projector = projector

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(x)
        if self.projector is None:
            return h
        return h, self.projector(h)


def left_out(pretrained: Pretrained) -> str:
    """What a stock torchvision model does not share with the exported weights, and what to do; for ``timm:`` and
    ``py:`` backbones, how to build the network the weights load into (:func:`nnclr.backbones.rebuild_note`)."""
    m = pretrained.config.model
    note = rebuild_note(m.backbone, cifar_stem=m.cifar_stem, image_size=pretrained.image_size)
    if note is not None:
        return note
    if not m.backbone.startswith("resnet"):
        return (
            f"{m.backbone} is not a torchvision model: build it with nnclr.backbones.build_backbone({m.backbone!r})[0] "
            "and its load_state_dict, or use nnclr.load(FILE)"
        )
    text = "fc (the classifier) is not part of the encoder: set model.fc = nn.Identity() or load with strict=False"
    if m.cifar_stem:
        text = (
            "CIFAR stem: conv1 is 3x3 stride 1 (torchvision: 7x7 stride 2) and there is no maxpool; before "
            "load_state_dict set model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False) and model.maxpool = "
            "nn.Identity(); " + text
        )
    return text


def metadata(pretrained: Pretrained, with_projector: bool) -> dict[str, str]:
    """Header metadata (string -> string, as safetensors requires)."""
    m = pretrained.config.model
    spec = parse_spec(m.backbone)
    timm = {}
    if spec.family == "timm":  # what timm.create_model needs, machine-readable
        from nnclr.timm_backbone import recipe

        made = recipe(spec, cifar_stem=m.cifar_stem, image_size=pretrained.image_size)
        timm = {"timm": json.dumps({"name": made.name, "kwargs": made.kwargs, "cifar_stem_width": made.stem_width},
                                  default=repr)}
    return {
        "format": "pt",
        "producer": f"nnclr {__version__}",
        "backbone": m.backbone,
        "cifar_stem": json.dumps(bool(m.cifar_stem)),
        "feature_dim": str(pretrained.feature_dim),
        "with_projector": json.dumps(with_projector),
        "preprocessing": json.dumps(pretrained.preprocessing()),
        "checkpoint_hash": pretrained.checkpoint_hash,
        "step": str(pretrained.step),
        "left_out": left_out(pretrained),
        "config": json.dumps(to_dict(pretrained.config)),
        **timm,
    }


def _module(pretrained: Pretrained, with_projector: bool) -> ExportedEncoder:
    """A CPU fp32 eval-mode copy of f (and g), contiguous weights; ``pretrained`` is left as it is."""
    if with_projector and pretrained.projector is None:
        raise UserError(f"{pretrained.checkpoint} holds no projector; export without --with-projector")
    projector = copy.deepcopy(pretrained.projector) if with_projector else None
    module = ExportedEncoder(copy.deepcopy(pretrained.encoder), projector)
    return module.to("cpu", torch.float32, memory_format=torch.contiguous_format).eval()


def _write(out: Path, data: bytes, fmt: str) -> None:
    """Write the finished file in one go (:func:`nnclr.rundir.write_atomic`): a full or read-only disk is a
    one-line error and leaves nothing behind (the writers of TorchScript and ONNX abort or hide the reason when
    they write to such a disk themselves, so they write to memory first)."""
    write_atomic(out, lambda file: file.write(data), what=f"the {fmt} export", kept=f"nothing was written to {out}")


def export_safetensors(pretrained: Pretrained, out: Path, with_projector: bool = False) -> None:
    """Write the backbone's state_dict (and the projector's, prefixed) with metadata."""
    from safetensors.torch import save

    module = _module(pretrained, with_projector)
    tensors = {k: v.detach().contiguous() for k, v in module.encoder.state_dict().items()}
    if module.projector is not None:
        projector = module.projector.state_dict()
        tensors.update({PROJECTOR_PREFIX + k: v.detach().contiguous() for k, v in projector.items()})
    meta = metadata(pretrained, with_projector)
    # the checksum covers the tensor bytes, which the metadata does not change: serialise, hash, serialise again
    _, data = safetensors_parts(save(tensors, metadata=meta))
    meta[SAFETENSORS_KEY] = safetensors_digest(data, meta)
    _write(out, save(tensors, metadata=meta), "safetensors")


def _example(pretrained: Pretrained, batch: int = 2) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(batch, 3, pretrained.image_size, pretrained.image_size, generator=generator)


def export_torchscript(pretrained: Pretrained, out: Path, with_projector: bool = False) -> None:
    """``torch.jit.trace`` the encoder in fp32; the metadata is stored as ``preprocessing.json``."""
    module = _module(pretrained, with_projector)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated in torch >= 2.10, still loads
        warnings.filterwarnings("ignore", message=".*deprecated.*")
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shape checks (timm's) become constants
        try:
            traced = torch.jit.trace(module, _example(pretrained), check_trace=False)
        except Exception as error:  # noqa: BLE001 - whatever the tracer raises: one line
            raise UserError(_cannot(pretrained, "torchscript", "torch.jit.trace", error)) from None
        extra = {"preprocessing.json": json.dumps(metadata(pretrained, with_projector))}
        buffer = io.BytesIO()
        torch.jit.save(traced, buffer, _extra_files=extra)
    _write(out, buffer.getvalue(), "torchscript")


def export_onnx(pretrained: Pretrained, out: Path, with_projector: bool = False) -> None:
    """``torch.onnx.export`` with a dynamic batch dimension; metadata as ONNX metadata properties."""
    try:
        import onnx
        import onnxscript  # noqa: F401  (the dynamo exporter needs it)
    except ImportError:
        raise UserError("--format onnx needs the onnx extra: pip install 'nnclr[onnx]'") from None
    module = _module(pretrained, with_projector)
    outputs = ["h", "z"] if with_projector else ["h"]
    batch = torch.export.Dim("batch", min=1)
    # the exporter reports to stdout and, through torch's logging, to stderr: the user gets one line or the file
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings(), \
            contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                module, (_example(pretrained),), f"{folder}/model.onnx", input_names=["images"],
                output_names=outputs, dynamic_shapes=({0: batch},), dynamo=True, external_data=False, verbose=False,
            )
        except Exception as error:  # noqa: BLE001 - whatever the exporter raises: one line
            raise UserError(_cannot(pretrained, "onnx", "torch.onnx.export", error)) from None
        model = onnx.load(f"{folder}/model.onnx")
    for key, value in metadata(pretrained, with_projector).items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    _write(out, model.SerializeToString(), "onnx")


def _cannot(pretrained: Pretrained, fmt: str, tool: str, error: Exception) -> str:
    """The one line for an encoder that ``tool`` cannot convert."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))  # the ONNX exporter colours its messages
    reason = next((line.strip() for line in text.splitlines() if line.strip()), type(error).__name__)[:200]
    return (f"--format {fmt}: {tool} cannot convert backbone {pretrained.config.model.backbone} ({reason}); "
            "export --format safetensors and load the weights into the module in Python")


def export(pretrained: Pretrained, out: str | Path, fmt: str, with_projector: bool = False) -> Path:
    """Export in ``fmt`` (one of :data:`FORMATS`) to ``out``, atomically; returns the path."""
    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}; use one of {', '.join(FORMATS)}")
    out = Path(out).expanduser()
    try:
        if out.is_dir():
            raise UserError(f"--out {out} is a directory; pass a file name, e.g. {out / ('encoder.' + fmt)}")
        if not out.parent.is_dir():
            raise UserError(f"--out {out}: folder {out.parent} does not exist")
        longest = (os.pathconf(out.parent, "PC_NAME_MAX") if hasattr(os, "pathconf") else 255) - len("..tmp")
        if len(os.fsencode(out.name)) > longest:  # write_atomic writes .NAME.tmp beside it first
            raise OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG))
    except OSError as error:
        raise UserError(f"--out {shown_path(out)} cannot be written ({error.strerror or error}); pass a shorter "
                        "file name (at most 250 bytes: a temporary .NAME.tmp is written beside it first)") from None
    writer: dict[str, Any] = {
        "safetensors": export_safetensors, "torchscript": export_torchscript, "onnx": export_onnx,
    }
    writer[fmt](pretrained, out, with_projector)
    return out
