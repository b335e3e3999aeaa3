"""k-nearest-neighbour search by cosine similarity: exact in torch, or a saved faiss index.

Vectors are L2-normalised, so cosine similarity is the inner product ``q . x``. Exact search is a
chunked matrix product ``(Q_chunk, F) @ (F, N)`` followed by ``topk`` (the same computation as the
support-set lookup of NNCLR, Dwibedi et al. ICCV 2021, Sec. 3.1). With ``faiss-cpu`` installed
and more than a threshold of vectors, an inverted-file index (IVF-Flat, inner product; Jégou et
al., TPAMI 2011) is built once, saved beside the embeddings (keyed by the vectors' hash), and its
recall@k against exact search is measured on a sample of the vectors.
"""

from __future__ import annotations

import importlib.util
import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from nnclr import rundir
from nnclr.use.embeddings import Embeddings

DEFAULT_APPROX_THRESHOLD = 100_000
FAISS_INDEX_FILE = "faiss_ivf.index"
FAISS_META_FILE = "faiss_ivf.json"
RECALL_SAMPLE = 200
TARGET_RECALL = 0.95


MAX_SCORES = 1 << 25  # similarities held at once by a chunked search: 128 MB of float32


def rows_per_chunk(n: int, limit: int = 1024) -> int:
    """Query rows per (rows, n) similarity block: at most ``limit``, and at most :data:`MAX_SCORES` scores."""
    return max(1, min(limit, MAX_SCORES // max(1, n)))


@torch.no_grad()
def exact_search(
    queries: torch.Tensor, keys: torch.Tensor, k: int, chunk: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` most similar keys of every query by inner product.

    Args:
        queries: float32 (Q, F), L2-normalised.
        keys: float32 (N, F), L2-normalised.
        k: neighbours per query (clipped to N).
        chunk: queries per matrix product (default :func:`rows_per_chunk`: memory stays bounded).

    Returns:
        ``(scores (Q, k) float32, indices (Q, k) int64)``, best first.
    """
    k = min(k, keys.shape[0])
    chunk = chunk or rows_per_chunk(keys.shape[0])
    scores, indices = [], []
    keys_t = keys.t()
    for start in range(0, queries.shape[0], chunk):
        similarity = queries[start : start + chunk] @ keys_t  # (chunk, N)
        top = similarity.topk(k, dim=1)
        scores.append(top.values)
        indices.append(top.indices)
    if not scores:
        return torch.zeros((0, k)), torch.zeros((0, k), dtype=torch.int64)
    return torch.cat(scores), torch.cat(indices)


def faiss_available() -> bool:
    """Whether the optional ``faiss-cpu`` package is installed (``pip install nnclr[faiss]``)."""
    return importlib.util.find_spec("faiss") is not None


def recall_at_k(approx: np.ndarray, exact: np.ndarray) -> float:
    """Share of the exact top-k indices (Q, k) that the approximate top-k (Q, k) also returns."""
    hits = sum(len(set(a.tolist()) & set(e.tolist())) for a, e in zip(approx, exact))
    return hits / exact.size if exact.size else 1.0


@dataclass
class ApproxIndex:
    """A faiss IVF-Flat inner-product index over an EMB_DIR's vectors, with its measured recall."""

    index: Any
    nlist: int
    nprobe: int
    recall: float
    k_recall: int
    built: bool
    not_saved: str = ""  # why a built index could not be saved in EMB_DIR ("" when it was, or was loaded)

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Approximate top-k: ``(scores (Q, k), indices (Q, k))``; missing neighbours have index -1."""
        self.index.nprobe = self.nprobe
        scores, indices = self.index.search(np.ascontiguousarray(queries.numpy(), dtype=np.float32), k)
        return torch.from_numpy(scores), torch.from_numpy(indices.astype(np.int64))


def _measure_recall(index: Any, vectors: np.ndarray, k: int, seed: int = 0) -> float:
    """recall@k of ``index`` against exact search, with a sample of the vectors as queries."""
    rng = np.random.default_rng(seed)
    sample = vectors[rng.choice(vectors.shape[0], size=min(RECALL_SAMPLE, vectors.shape[0]), replace=False)]
    _, exact = exact_search(torch.from_numpy(sample), torch.from_numpy(vectors), k)
    _, approx = index.search(sample, k)
    return recall_at_k(approx, exact.numpy())


def _saved_index(embeddings: Embeddings) -> ApproxIndex | None:
    """The index saved in the EMB_DIR if it was built for these vectors, else None.

    A missing, unreadable, foreign or crafted file (another dimension or size, settings of the wrong
    type) is None: the index is built again.
    """
    import faiss

    root, vectors = embeddings.root, embeddings.vectors
    meta = rundir.read_json(root / FAISS_META_FILE)
    if not isinstance(meta, dict) or meta.get("embeddings_sha256") != embeddings.manifest["embeddings_sha256"]:
        return None
    fields = {"nlist": (int,), "nprobe": (int,), "k_recall": (int,), "recall": (int, float)}
    if any(not isinstance(meta.get(key), kinds) or isinstance(meta.get(key), bool) for key, kinds in fields.items()):
        return None
    try:
        index = faiss.read_index(str(root / FAISS_INDEX_FILE))
    except (RuntimeError, OSError, ValueError):
        return None
    if index.d != vectors.shape[1] or index.ntotal != vectors.shape[0] or not 1 <= meta["nprobe"] <= meta["nlist"]:
        return None
    return ApproxIndex(index, meta["nlist"], meta["nprobe"], float(meta["recall"]), meta["k_recall"], False)


def _save_index(embeddings: Embeddings, index: Any, meta: dict[str, Any]) -> str:
    """Save the index and its settings in the EMB_DIR; returns why not ("" when saved).

    A full or read-only disk does not stop a search: the index is used unsaved, nothing partial is
    left (:func:`nnclr.rundir.replace_file`), and the next search builds it again.
    """
    import faiss

    index_path, meta_path = embeddings.root / FAISS_INDEX_FILE, embeddings.root / FAISS_META_FILE
    data = faiss.serialize_index(index)
    path = index_path
    try:
        rundir.replace_file(index_path, lambda file: file.write(data.tobytes()))
        path = meta_path
        rundir.replace_file(meta_path, lambda file: file.write(json.dumps(meta, indent=1).encode()))
    except OSError as error:
        if path == meta_path:
            try:
                index_path.unlink(missing_ok=True)  # never loaded without its settings: give the space back
            except OSError:
                pass
        return f"cannot write {path} ({error.strerror or error}); the next search builds it again"
    return ""


def approx_index(embeddings: Embeddings, k_recall: int = 10) -> ApproxIndex:
    """Load the saved faiss index of an EMB_DIR, or build, measure and save it.

    ``nlist = 4 sqrt(N)`` inverted lists (faiss's guideline); ``nprobe`` starts at ``max(8, nlist / 32)``
    and doubles until recall@k on a sample of the vectors reaches :data:`TARGET_RECALL` (or all lists
    are probed). The index is rebuilt when the vectors' hash differs from the one it was built for.
    An index that cannot be saved (a full or read-only disk) is used all the same
    (:attr:`ApproxIndex.not_saved` says why).
    """
    import faiss

    saved = _saved_index(embeddings)
    if saved is not None:
        return saved
    vectors = np.ascontiguousarray(embeddings.vectors, dtype=np.float32)
    n, dim = vectors.shape
    nlist = max(1, min(int(4 * math.sqrt(n)), n // 39))  # faiss wants >= 39 training points per list
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    index.train(vectors)
    index.add(vectors)
    nprobe = min(nlist, max(8, nlist // 32))
    while True:
        index.nprobe = nprobe
        recall = _measure_recall(index, vectors, k_recall)
        if recall >= TARGET_RECALL or nprobe >= nlist:
            break
        nprobe = min(nlist, 2 * nprobe)
    meta = {"embeddings_sha256": embeddings.manifest["embeddings_sha256"], "nlist": nlist, "nprobe": nprobe,
            "recall": recall, "k_recall": k_recall}
    return ApproxIndex(index, nlist, nprobe, recall, k_recall, True, _save_index(embeddings, index, meta))


def search(
    embeddings: Embeddings, queries: torch.Tensor, k: int, *, method: str = "auto",
    approx_threshold: int = DEFAULT_APPROX_THRESHOLD,
) -> tuple[torch.Tensor, torch.Tensor, ApproxIndex | None]:
    """Top-k of each query (Q, F) in an EMB_DIR: exact, or faiss when ``method`` allows it.

    Args:
        method: ``exact``; ``approx`` (faiss, whatever the size); ``auto`` (faiss when installed and
            the EMB_DIR holds more than ``approx_threshold`` vectors).

    Returns:
        ``(scores (Q, k), indices (Q, k), the faiss index used or None)``.
    """
    from nnclr.errors import UserError

    use_faiss = method == "approx" or (method == "auto" and len(embeddings) > approx_threshold and faiss_available())
    if use_faiss:
        if not faiss_available():
            raise UserError("--index approx needs faiss: pip install 'nnclr[faiss]' (faiss-cpu)")
        index = approx_index(embeddings, k_recall=k)
        scores, indices = index.search(queries, min(k, len(embeddings)))
        return scores, indices, index
    scores, indices = exact_search(queries, embeddings.tensor(), k)
    return scores, indices, None
