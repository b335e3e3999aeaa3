"""A trained encoder, loaded from a run directory or checkpoint file: ``nnclr.load(...)``.

Everything that uses a pretrained encoder after training (evaluation, embedding, search,
export) starts here, so that all of them see the same weights, the same preprocessing and the
same checkpoint identity (a hash of the file's bytes, used to key caches and to refuse mixing
embeddings of different checkpoints).

Preprocessing is the evaluation transform of training (``nnclr.augment.eval_transform``): a PIL
image is converted to RGB, its centred square is scaled to ``image_size`` (as image folders are
at load time; uint8 tensors of another size get the same centred square, scaled with antialiased
bilinear interpolation), then pixels are scaled to [0, 1] and normalised with the data set's
statistics.

:meth:`Pretrained.embed` runs a copy of the encoder with every batch-norm folded into the
convolution before it (``torch.fx.experimental.optimization.fuse``: the same function in eval
mode, measured 1.1-1.4x faster on a CPU); the copy is rebuilt when the encoder's weights change.
"""

from __future__ import annotations

import hashlib
import itertools
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from nnclr import rundir, runtime
from nnclr.augment import eval_transform, normalization_for
from nnclr.backbones import feature_dim
from nnclr.checkpoint import PRETRAINING_FIELDS, check_fields, load_state_strict, read_checkpoint, written_by
from nnclr.config import Config, from_dict
from nnclr.data.decode import square_box, to_rgb
from nnclr.data.resize import resize_images
from nnclr.errors import UserError, shown_path
from nnclr.integrity import check_safetensors
from nnclr.model import ContrastiveModel, build_model

ImageLike = Image.Image | torch.Tensor | np.ndarray


def resolve_checkpoint(path: str | Path) -> Path:
    """A run directory -> its ``checkpoint.pt``; a file -> itself; anything else is a UserError."""
    path = Path(path).expanduser()
    try:
        if path.is_dir():
            candidate = path / rundir.CHECKPOINT
            if not candidate.is_file():
                raise UserError(f"{path} has no {rundir.CHECKPOINT}; is it a run directory of `nnclr pretrain`?")
            return candidate
        if not path.exists():
            raise UserError(f"checkpoint {path} not found; pass a run directory or a checkpoint file")
    except OSError as error:  # a name too long for the file system, a folder we may not enter...
        raise UserError(f"checkpoint {shown_path(path)} cannot be looked up ({error.strerror or error}); pass the "
                        "path of a run directory or a checkpoint file (at most 255 bytes per name)") from None
    return path


def file_hash(path: Path, length: int = 16) -> str:
    """The first ``length`` hex digits of the SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:length]


def precision_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``bf16``, ``torch.float32`` -> ``fp32`` (the names ``precision`` takes)."""
    return "bf16" if dtype == torch.bfloat16 else "fp32"


def _weights_key(module: nn.Module) -> tuple:
    """Changes whenever a parameter or buffer of ``module`` is replaced, moved or modified in place."""
    return tuple((t.data_ptr(), t._version, t.dtype) for t in itertools.chain(module.parameters(), module.buffers()))


def fold_batchnorm(encoder: nn.Module) -> nn.Module:
    """A copy of ``encoder`` (eval mode) with each batch-norm folded into its convolution.

    Returns the encoder itself when it cannot be traced by ``torch.fx`` (same outputs, unfused).
    """
    from torch.fx.experimental.optimization import fuse

    try:
        return fuse(encoder, inplace=False)
    except Exception:  # noqa: BLE001 - any tracing failure: fall back to the module as it is
        return encoder


@dataclass
class Pretrained:
    """A trained encoder f with its preprocessing, in eval mode.

    Attributes:
        encoder: the backbone f: normalised images (B, 3, S, S) -> features h (B, F).
        projector: the projection MLP g: h (B, F) -> z (B, D); None for an export without it.
        config: the resolved config the checkpoint was trained with.
        checkpoint: the checkpoint file.
        checkpoint_hash: 16 hex digits of the checkpoint file's SHA-256.
        step: the optimiser step the checkpoint was written at.
        device, dtype: where and in which autocast precision :meth:`embed` runs.
    """

    encoder: nn.Module
    projector: nn.Module | None
    config: Config
    checkpoint: Path
    checkpoint_hash: str
    step: int
    device: torch.device
    dtype: torch.dtype
    _folded: tuple[tuple, nn.Module] | None = field(default=None, init=False, repr=False)

    @property
    def image_size(self) -> int:
        """Side S of the square images the encoder expects."""
        return self.config.data.image_size

    @property
    def mean(self) -> tuple[float, ...]:
        return normalization_for(self.config.data.name)[0]

    @property
    def std(self) -> tuple[float, ...]:
        return normalization_for(self.config.data.name)[1]

    @property
    def feature_dim(self) -> int:
        """F, the size of the encoder's features."""
        return feature_dim(self.encoder)

    def preprocessing(self) -> dict[str, Any]:
        """The preprocessing as plain data (for manifests and exports)."""
        return {
            "image_size": self.image_size, "resize": "shorter side to image_size, centre square, bilinear",
            "scale": "1/255", "mean": list(self.mean), "std": list(self.std),
        }

    def to_uint8(self, image: ImageLike) -> torch.Tensor:
        """One PIL image, or a uint8 (3, H, W) / (H, W, 3) / (H, W) array -> uint8 (3, S, S)."""
        if isinstance(image, Image.Image):
            rgb = to_rgb(image)
            square = rgb.resize((self.image_size,) * 2, Image.Resampling.BILINEAR, box=square_box(*rgb.size))
            return torch.from_numpy(np.asarray(square, dtype=np.uint8).transpose(2, 0, 1).copy())
        if isinstance(image, np.ndarray) and not image.flags.writeable:
            image = image.copy()  # torch warns on read-only arrays (e.g. np.asarray of a PIL image)
        tensor = torch.as_tensor(image)
        if tensor.ndim == 2:
            tensor = tensor[None]
        if tensor.ndim == 3 and tensor.shape[0] not in (1, 3) and tensor.shape[-1] in (1, 3):
            tensor = tensor.permute(2, 0, 1)
        if tensor.dtype != torch.uint8 or tensor.ndim != 3 or tensor.shape[0] not in (1, 3):
            shape = tuple(tensor.shape)
            raise UserError(f"expected a PIL image or a uint8 (3, H, W) tensor, got {tensor.dtype} {shape}")
        return resize_images(tensor.expand(3, -1, -1)[None], self.image_size)[0]

    def transform(self, images: ImageLike | Sequence[ImageLike]) -> torch.Tensor:
        """Images -> the encoder's input, float32 (B, 3, S, S), normalised.

        Accepts one PIL image, a list of PIL images or uint8 tensors, or a uint8 batch (B, 3, H, W).
        """
        if isinstance(images, torch.Tensor) and images.ndim == 4:
            if images.dtype != torch.uint8 or images.shape[1] != 3:
                raise UserError(f"expected a uint8 batch (B, 3, H, W), got {images.dtype} {tuple(images.shape)}")
            batch = resize_images(images, self.image_size)
        elif isinstance(images, (Image.Image, torch.Tensor, np.ndarray)):
            batch = self.to_uint8(images)[None]
        else:
            uint8 = [self.to_uint8(image) for image in images]
            empty = torch.zeros((0, 3, self.image_size, self.image_size), dtype=torch.uint8)
            batch = torch.stack(uint8) if uint8 else empty
        return eval_transform(batch, self.image_size, mean=self.mean, std=self.std)

    def inference_encoder(self) -> nn.Module:
        """The encoder with batch-norm folded (see :func:`fold_batchnorm`); itself in training mode."""
        if self.encoder.training:
            return self.encoder
        key = _weights_key(self.encoder)
        if self._folded is None or self._folded[0] != key:
            self._folded = (key, fold_batchnorm(self.encoder))
        return self._folded[1]

    @torch.no_grad()
    def embed(self, images: ImageLike | Sequence[ImageLike], batch_size: int = 512) -> torch.Tensor:
        """Images -> L2-normalised float32 features h (B, F), on the CPU."""
        x = self.transform(images)
        encoder = self.inference_encoder()
        out = []
        memory_format = torch.channels_last if self.config.train.channels_last else torch.contiguous_format
        for start in range(0, x.shape[0], batch_size):
            chunk = x[start : start + batch_size].to(self.device).contiguous(memory_format=memory_format)
            with runtime.autocast(self.device, self.dtype):
                h = encoder(chunk)
            out.append(F.normalize(h.float(), dim=1).cpu())
        if not out:
            return torch.zeros(0, self.feature_dim)
        return torch.cat(out)


def _load_safetensors(path: Path) -> tuple[dict, dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """An ``nnclr export --format safetensors`` file -> (config dict, backbone state, projector state or None).

    Raises:
        UserError: The file cannot be read, its checksum (:func:`nnclr.integrity.check_safetensors`) does not
            match, or its ``config`` metadata is missing or not a JSON object.
    """
    import json

    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    try:
        damage = check_safetensors(path)
        if damage is not None:
            raise UserError(f"{path} is damaged: {damage} (changed on disk or in a copy); export it again "
                            "(nnclr export) or copy it again from where it came from")
        with safe_open(str(path), framework="pt") as file:
            meta = file.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        reason = getattr(error, "strerror", None) or str(error).splitlines()[0][:200]
        raise UserError(f"{path} cannot be read as safetensors ({reason})") from None
    if "config" not in meta:
        raise UserError(f"{path} has no nnclr metadata; only files written by `nnclr export` can be loaded")
    try:
        tree = json.loads(meta["config"])
    except ValueError as error:
        raise UserError(f"{path}: its config metadata is not JSON ({error}); the file is damaged or not written "
                        "by `nnclr export`: export it again") from None
    if not isinstance(tree, dict) or not all(isinstance(v, dict) for v in tree.values()):
        raise UserError(f"{path}: its config metadata is not a mapping of config sections; the file is damaged or "
                        "not written by `nnclr export`: export it again")
    prefix = "projector."
    backbone = {k: v for k, v in tensors.items() if not k.startswith(prefix)}
    projector = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)} or None
    return tree, backbone, projector


def _config_of(tree: dict[str, Any], path: Path) -> Config:
    """The Config saved in ``path``; a value the config refuses is one line naming the file."""
    try:
        return from_dict(tree)
    except UserError as error:
        raise UserError(f"{path}: the config stored in it is refused ({error}); the file is damaged or crafted, "
                        "or written by another nnclr version") from None
    except (TypeError, ValueError, AttributeError, KeyError) as error:
        raise UserError(f"{path}: the config stored in it cannot be read ({type(error).__name__}: "
                        f"{str(error)[:120]}); the file is damaged or crafted") from None


def build_checked(config: Config, path: Path, parts: dict[str, dict[str, torch.Tensor]], device: torch.device,
                  origin: str = "") -> ContrastiveModel:
    """Build the model ``config`` describes and load ``parts`` into it (``{"": model state}`` or
    ``{"backbone": ..., "projector": ...}``), strictly.

    The model is first built on the ``meta`` device (no memory): the file's tensors must fit its shapes, and
    the whole model must fit in ``device``'s memory, so that a crafted config asking for a huge model is one
    line, not an allocation that takes the machine down.

    Raises:
        UserError: A key or shape mismatch (:func:`nnclr.checkpoint.load_state_strict`) or a model too large.
    """
    m = config.model
    sizes = (f"model.backbone={m.backbone}, model.proj_hidden_dim={m.proj_hidden_dim}, model.proj_dim={m.proj_dim}, "
             f"model.pred_hidden_dim={m.pred_hidden_dim}")
    try:
        with torch.device("meta"):
            shapes: ContrastiveModel | None = build_model(config)
    except Exception as error:  # noqa: BLE001 - a backbone that cannot be built on meta tensors (a py: module's
        # forward probe calls .item(), say): checked when built for real, below
        if "overflow" in str(error).lower():  # more elements than an int64 counts
            raise UserError(f"{path}: its config asks for a model too large to build ({sizes}); the file is damaged "
                            "or crafted") from None
        shapes = None
    if shapes is not None:
        with warnings.catch_warnings():  # copying into meta tensors is a no-op: only keys and shapes are compared
            warnings.simplefilter("ignore")
            _load_parts(shapes, parts, path, origin)
        size = sum(t.numel() * t.element_size() for t in itertools.chain(shapes.parameters(), shapes.buffers()))
        have, where = runtime.device_memory(device)
        if have and size > have:
            raise UserError(f"{path}: its config asks for a model of {size / 2**30:,.1f} GiB ({sizes}) and {where} "
                            f"has {have / 2**30:,.1f} GiB; the file is damaged or crafted")
    try:
        model = build_model(config)
    except RuntimeError as error:  # what the meta build could not check: the allocator's refusal
        raise UserError(f"{path}: the model its config describes cannot be built ({str(error).splitlines()[0][:160]}; "
                        f"{sizes}); the file is damaged or crafted") from None
    _load_parts(model, parts, path, origin)
    return model


def _load_parts(model: nn.Module, parts: dict[str, dict[str, torch.Tensor]], path: Path, origin: str) -> None:
    """:func:`nnclr.checkpoint.load_state_strict` of each part, the file named in the message."""
    for name, state in parts.items():
        try:
            load_state_strict(getattr(model, name) if name else model, state, name or "model", origin)
        except UserError as error:
            raise UserError(f"{path}: {error}") from None


def load(path: str | Path, device: str = "cpu", precision: str = "auto") -> Pretrained:
    """Load the encoder of a run directory, a checkpoint file (``torch.load(weights_only=True)``) or an export.

    Args:
        path: a run directory of ``nnclr pretrain``, a ``checkpoint.pt``, or a ``.safetensors``
            file written by ``nnclr export`` (its projector is None unless exported with it).
        device: ``cpu``, ``cuda``, ``auto``...
        precision: ``auto`` (bf16 where fast), ``bf16`` or ``fp32`` for :meth:`Pretrained.embed`.

    Raises:
        UserError: the path is not a checkpoint, cannot be read safely, or does not match its config.
    """
    checkpoint = resolve_checkpoint(path)
    resolved = runtime.resolve_device(device)
    if checkpoint.suffix == ".safetensors":
        tree, backbone_state, projector_state = _load_safetensors(checkpoint)
        config = _config_of(tree, checkpoint)
        parts = {"backbone": backbone_state, **({"projector": projector_state} if projector_state is not None else {})}
        model = build_checked(config, checkpoint, parts, resolved)
        state: dict[str, Any] = {"step": 0}
        digest = file_hash(checkpoint, 64)
    else:
        state, whole = read_checkpoint(checkpoint)  # the file's hash comes from the same pass
        digest = whole or file_hash(checkpoint, 64)
        check_fields(state, checkpoint, PRETRAINING_FIELDS)
        config = _config_of(state["config"], checkpoint)
        model = build_checked(config, checkpoint, {"": state["model"]}, resolved, written_by(state))
        projector_state = state["model"]
    model = model.to(resolved).eval()
    if config.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return Pretrained(
        encoder=model.backbone, projector=model.projector if projector_state is not None else None,
        config=config, checkpoint=checkpoint,
        checkpoint_hash=digest[:16], step=int(state.get("step", 0)), device=resolved,
        dtype=runtime.resolve_dtype(precision, resolved),
    )
