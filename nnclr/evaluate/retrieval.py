"""Image retrieval by class label: each test image is a query against the training images (the gallery).

Ranking is by cosine similarity of L2-normalised backbone features. Metrics:

* recall@k: the share of queries with at least one of their k nearest gallery images of the
  query's class (the "Recall@K" of metric learning, Musgrave et al. 2020, Sec. 3.1).
* mAP@R (Musgrave, Belongie, Lim, "A Metric Learning Reality Check", ECCV 2020, Sec. 3.2): with
  R the number of gallery images of the query's class and P(i) the precision of the first i
  results, ``AP@R = (1/R) * sum_{i=1..R} P(i) * rel(i)``; mAP@R averages it over queries.

Chunked over queries: memory is ``chunk_size x N`` similarities plus ``chunk_size x max R`` ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class RetrievalResult:
    """recall@k (percent, for each k) and mAP@R (percent) over ``num_queries`` queries."""

    recall: dict[int, float]
    map_at_r: float
    num_queries: int
    num_gallery: int


@torch.no_grad()
def retrieval_metrics(
    query_features: torch.Tensor,
    query_labels: torch.Tensor,
    gallery_features: torch.Tensor,
    gallery_labels: torch.Tensor,
    *,
    ks: tuple[int, ...] = (1, 5, 10),
    chunk_size: int = 256,
) -> RetrievalResult:
    """recall@k and mAP@R of queries (M, F) with labels (M,) against a gallery (N, F) with labels (N,).

    Entries with unknown labels (< 0) are dropped from both sides; queries whose class has no
    gallery image (R = 0) are not counted.
    """
    gallery_known = gallery_labels >= 0
    gallery = F.normalize(gallery_features[gallery_known].float(), dim=1)
    gallery_labels = gallery_labels[gallery_known]
    query_known = query_labels >= 0
    queries = F.normalize(query_features[query_known].float(), dim=1)
    query_labels = query_labels[query_known]
    num_classes = int(max(gallery_labels.max(), query_labels.max())) + 1 if gallery_labels.numel() else 0
    class_sizes = torch.bincount(gallery_labels, minlength=num_classes)  # (C,)
    r_all = class_sizes[query_labels]  # (M,)
    counted = r_all > 0
    queries, query_labels, r_all = queries[counted], query_labels[counted], r_all[counted]
    depth = min(gallery.shape[0], max([*ks, int(r_all.max()) if r_all.numel() else 0]))
    recall_hits = {k: 0 for k in ks}
    ap_sum = 0.0
    for start in range(0, queries.shape[0], chunk_size):
        similarity = queries[start : start + chunk_size] @ gallery.T  # (m, N)
        ranked = similarity.topk(depth, dim=1).indices  # (m, depth)
        relevant = gallery_labels[ranked] == query_labels[start : start + chunk_size, None]  # (m, depth) bool
        for k in ks:
            recall_hits[k] += int(relevant[:, :k].any(dim=1).sum())
        r = r_all[start : start + chunk_size, None]  # (m, 1)
        positions = torch.arange(1, depth + 1)[None, :]  # (1, depth)
        within_r = positions <= r  # (m, depth)
        rel = (relevant & within_r).float()
        precision = rel.cumsum(dim=1) / positions  # P(i), counting only hits within the first R
        ap_sum += float(((precision * rel).sum(dim=1) / r.squeeze(1).float()).sum())
    m = max(1, queries.shape[0])
    return RetrievalResult(
        recall={k: 100.0 * recall_hits[k] / m for k in ks},
        map_at_r=100.0 * ap_sum / m,
        num_queries=int(queries.shape[0]),
        num_gallery=int(gallery.shape[0]),
    )
