"""Backbone features h of a data set, in eval mode (batch-norm statistics frozen), ``batch_size`` images at a time.

``images`` may be an in-memory tensor or a folder decoded on demand (:class:`nnclr.data.lazy.FolderImages`):
only slices of it are read.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nnclr.augment import eval_transform
from nnclr.data.lazy import batch_slices, prefetched
from nnclr.evaluate.preprocess import Preprocess
from nnclr.runtime import autocast


@torch.no_grad()
def extract_features(
    backbone: nn.Module,
    images: torch.Tensor,
    preprocess: Preprocess,
    *,
    batch_size: int = 512,
    channels_last: bool = False,
) -> torch.Tensor:
    """uint8 images (N, 3, H, W) -> L2-normalised float32 features (N, F), on ``preprocess.device``.

    The images are scaled and normalised as ``preprocess`` says (no augmentation); the backbone runs under
    autocast to ``preprocess.dtype``.

    The backbone is put in eval mode for the extraction and restored to its mode afterwards.
    """
    was_training = backbone.training
    backbone.eval()
    features = []
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    for batch in prefetched(images, batch_slices(images.shape[0], batch_size)):
        x = batch.to(preprocess.device, non_blocking=True)
        x = eval_transform(x, preprocess.size, mean=preprocess.mean, std=preprocess.std)
        x = x.contiguous(memory_format=memory_format)
        with autocast(preprocess.device, preprocess.dtype):
            h = backbone(x)
        features.append(F.normalize(h.float(), dim=1))
    backbone.train(was_training)
    return torch.cat(features)
