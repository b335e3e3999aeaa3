"""The kNN monitor of pretraining, and the features of a whole image set shared out over the ranks.

:func:`knn_monitor` measures the weighted kNN top-1/top-5 (:mod:`nnclr.evaluate.knn`) of the
backbone's features while a run trains: the training split is the memory, the test split the
queries, both without augmentation. :func:`extract_in_shards` gives every rank the features of a
whole set while each extracts only its own block (:func:`nnclr.distributed.shard`); DeepCluster's
clustering at the start of every epoch uses it too.
"""

from __future__ import annotations

from typing import Any

import torch

from nnclr import distributed
from nnclr.augment import normalization_for
from nnclr.config import Config
from nnclr.data import ImageDataset
from nnclr.data.lazy import FolderImages
from nnclr.evaluate.features import extract_features
from nnclr.evaluate.knn import KnnResult, knn_accuracy
from nnclr.evaluate.preprocess import Preprocess


def extract_options(config: Config, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """The keyword arguments of ``extract_features`` for a run's data, device and precision."""
    mean, std = normalization_for(config.data.name)
    return dict(preprocess=Preprocess(config.data.image_size, tuple(mean), tuple(std), device, dtype),
                channels_last=config.train.channels_last)


def extract_in_shards(encoder: torch.nn.Module, images: torch.Tensor | FolderImages, options: dict[str, Any]
                      ) -> torch.Tensor:
    """Features (N, F) of all images on every rank; each rank extracts its shard (no duplicates).

    ``options`` are :func:`extract_options`. A folder that is not in memory (:class:`FolderImages`)
    is decoded one batch at a time.
    """
    n = images.shape[0]
    part = distributed.shard(n)
    mine = images[part.start : part.stop] if isinstance(images, torch.Tensor) else images.rows(part.start, part.stop)
    local = extract_features(encoder, mine, **options)
    return distributed.gather_in_order(local, n)


def knn_monitor(
    backbone: torch.nn.Module, train_set: ImageDataset, test_set: ImageDataset | None, config: Config,
    device: torch.device, dtype: torch.dtype,
) -> KnnResult | None:
    """Weighted kNN top-1/top-5 of backbone features: train split as memory, test split as queries.

    ``k`` and the temperature are ``train.knn_k`` and ``train.knn_temperature``; None when the
    test split is absent or unlabelled.
    """
    if test_set is None or not test_set.has_labels:
        return None
    options = extract_options(config, device, dtype)
    train_features = extract_in_shards(backbone, train_set.images, options)
    test_features = extract_in_shards(backbone, test_set.images, options)
    return knn_accuracy(
        train_features, train_set.labels.to(device), test_features, test_set.labels.to(device),
        k=config.train.knn_k, temperature=config.train.knn_temperature,
    )
