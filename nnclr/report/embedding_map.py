"""A 2-D map of embeddings: UMAP when ``umap-learn`` is installed, else t-SNE, else PCA.

UMAP (McInnes et al., 2018; the ``umap`` extra) and t-SNE (van der Maaten & Hinton, 2008; from
scikit-learn, when installed) keep local neighbourhoods, which is what a kNN-evaluated encoder is
judged by; PCA (``torch.pca_lowrank``, no dependency) is the fallback and only shows the two
directions of largest variance. Inputs are L2-normalised features, so both use the cosine geometry.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import torch

MAX_POINTS = 2000  # t-SNE/UMAP cost grows with N; a seeded subset of this many points is drawn
TSNE_ITERATIONS = 500  # 250 of early exaggeration + 250: the layout is settled for a few thousand points


def available_method() -> str:
    """``umap``, ``t-SNE`` or ``PCA``: the best installed method."""
    if importlib.util.find_spec("umap") is not None:
        return "umap"
    if importlib.util.find_spec("sklearn") is not None:
        return "t-SNE"
    return "PCA"


def project_2d(features: torch.Tensor, method: str | None = None, seed: int = 0) -> tuple[np.ndarray, str]:
    """Features (N, F) -> coordinates (N, 2) float32 and the method used (``umap``, ``t-SNE``, ``PCA``)."""
    method = method or available_method()
    x = features.float().cpu()
    if x.shape[0] < 5:
        method = "PCA"  # too few points for a neighbourhood embedding
    if method == "umap":
        import umap

        reducer = umap.UMAP(n_components=2, metric="cosine", random_state=seed, n_neighbors=min(15, x.shape[0] - 1))
        return reducer.fit_transform(x.numpy()).astype(np.float32), "UMAP"
    if method == "t-SNE":
        from sklearn.manifold import TSNE
        from threadpoolctl import threadpool_limits

        tsne = TSNE(n_components=2, metric="cosine", init="pca", random_state=seed, max_iter=TSNE_ITERATIONS,
                    perplexity=min(30.0, (x.shape[0] - 1) / 3))
        with threadpool_limits(limits=1):  # OpenMP threads that wait for a busy core cost far more than they win
            return tsne.fit_transform(x.numpy()).astype(np.float32), "t-SNE"
    centred = x - x.mean(dim=0)
    q = min(2, *centred.shape)
    _, _, v = torch.pca_lowrank(centred, q=q, center=False)
    xy = (centred @ v[:, :q]).numpy()
    if q < 2:
        xy = np.concatenate([xy, np.zeros((xy.shape[0], 2 - q))], axis=1)
    return xy.astype(np.float32), "PCA"


def subset(n: int, limit: int = MAX_POINTS, seed: int = 0) -> torch.Tensor:
    """A sorted, seeded subset of ``range(n)`` of at most ``limit`` indices."""
    if n <= limit:
        return torch.arange(n)
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=generator)[:limit].sort().values
