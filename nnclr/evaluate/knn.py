"""Weighted kNN classification on L2-normalised features (Wu et al., 2018, as used by DINO).

Each test sample takes its ``k`` most cosine-similar training samples; each votes for its
class with weight ``exp(sim / temperature)``. Chunked over test samples so that memory stays
at ``chunk_size x num_train`` similarities (50,000 x 10,000 needs ~200 MB with the default).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nnclr.config import EVAL


@dataclass(frozen=True)
class KnnResult:
    """Top-1 and top-5 accuracy in percent, and the settings that produced them."""

    top1: float
    top5: float
    k: int
    temperature: float
    num_train: int
    num_test: int


@torch.no_grad()
def knn_scores(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    *,
    num_classes: int,
    k: int = EVAL.knn_k,
    temperature: float = EVAL.knn_temperature,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Class scores (M, C) for test features (M, F) from training features (N, F) and labels (N,).

    Features are L2-normalised here; labels < 0 (unknown) are ignored.
    """
    known = train_labels >= 0
    train_features = F.normalize(train_features[known].float(), dim=1)
    train_labels = train_labels[known]
    test_features = F.normalize(test_features.float(), dim=1)
    k = min(k, train_features.shape[0])
    scores = []
    for start in range(0, test_features.shape[0], chunk_size):
        similarity = test_features[start : start + chunk_size] @ train_features.T  # (m, N)
        top_sim, top_idx = similarity.topk(k, dim=1)  # (m, k)
        # exp(sim / T) up to each row's factor exp(-max sim / T): the same vote, without overflowing float32 for
        # T < ~1/88 (0.01 gave one class's share); as T -> 0 the nearest neighbour's label
        weights = ((top_sim - top_sim[:, :1]) / temperature).exp()  # (m, k)
        votes = torch.zeros(top_sim.shape[0], num_classes, device=similarity.device)
        votes.scatter_add_(1, train_labels[top_idx], weights)  # (m, C)
        scores.append(votes)
    return torch.cat(scores)


def knn_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    k: int = EVAL.knn_k,
    temperature: float = EVAL.knn_temperature,
) -> KnnResult:
    """Weighted-kNN top-1/top-5 accuracy (percent) of ``test_labels`` (M,)."""
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    scores = knn_scores(
        train_features, train_labels, test_features,
        num_classes=num_classes, k=k, temperature=temperature,
    )
    ranked = scores.topk(min(5, num_classes), dim=1).indices  # (M, 5)
    hits = ranked == test_labels[:, None]
    return KnnResult(
        top1=100.0 * hits[:, 0].float().mean().item(),
        top5=100.0 * hits.any(dim=1).float().mean().item(),
        k=k,
        temperature=temperature,
        num_train=int((train_labels >= 0).sum()),
        num_test=int(test_labels.shape[0]),
    )


@torch.no_grad()
def knn_sweep(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    ks: tuple[int, ...] = (10, 20, 50, 100, 200),
    temperatures: tuple[float, ...] = (0.02, 0.07, 0.2, 0.5),
    chunk_size: int = 1024,
) -> list[KnnResult]:
    """Weighted-kNN accuracy for every (k, T) of a grid, sharing one top-k search per test chunk.

    The ``max(ks)`` most similar training samples of each test sample are found once; every
    (k, T) then re-weights the first k of them. Returns one :class:`KnnResult` per grid point,
    in the order of ``ks`` x ``temperatures``.
    """
    known = train_labels >= 0
    train = F.normalize(train_features[known].float(), dim=1)
    labels = train_labels[known]
    test = F.normalize(test_features.float(), dim=1)
    num_classes = int(max(labels.max(), test_labels.max())) + 1
    ks = tuple(min(k, train.shape[0]) for k in ks)
    k_max = max(ks)
    hits1 = torch.zeros(len(ks), len(temperatures), dtype=torch.long)
    hits5 = torch.zeros_like(hits1)
    for start in range(0, test.shape[0], chunk_size):
        similarity = test[start : start + chunk_size] @ train.T  # (m, N)
        top_sim, top_idx = similarity.topk(k_max, dim=1)  # (m, k_max), sorted
        top_labels = labels[top_idx]  # (m, k_max)
        truth = test_labels[start : start + chunk_size, None]  # (m, 1)
        for i, k in enumerate(ks):
            for j, temperature in enumerate(temperatures):
                votes = torch.zeros(top_sim.shape[0], num_classes, device=similarity.device)
                votes.scatter_add_(1, top_labels[:, :k], ((top_sim[:, :k] - 1) / temperature).exp())  # (m, C)
                ranked = votes.topk(min(5, num_classes), dim=1).indices == truth  # (m, 5)
                hits1[i, j] += int(ranked[:, 0].sum())
                hits5[i, j] += int(ranked.any(dim=1).sum())
    m = max(1, test.shape[0])
    return [
        KnnResult(
            top1=100.0 * int(hits1[i, j]) / m, top5=100.0 * int(hits5[i, j]) / m, k=k, temperature=temperature,
            num_train=int(train.shape[0]), num_test=int(test.shape[0]),
        )
        for i, k in enumerate(ks)
        for j, temperature in enumerate(temperatures)
    ]
