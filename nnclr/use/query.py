"""Find the images of an EMB_DIR most similar to query images: what ``nnclr search`` does, callable from Python.

The queries are embedded with the checkpoint that made the EMB_DIR (checked by its hash, so that
queries and gallery share one feature space) and searched by cosine similarity of L2-normalised
backbone features, exactly or with a faiss index (:func:`nnclr.use.search.search`), the retrieval
use of NNCLR's encoder (Dwibedi et al., ICCV 2021)::

    from nnclr.use.query import find_similar

    found = find_similar("emb/", "photos/cat.jpg", k=5)
    for n in found.results[0].neighbours:
        print(n.rank, n.score, n.path)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nnclr.errors import UserError
from nnclr.pretrained import Pretrained, load
from nnclr.use.embed import embed_files, scan_images
from nnclr.use.embeddings import EMBEDDINGS_FILE, MANIFEST_FILE, Embeddings, open_embeddings
from nnclr.use.search import DEFAULT_APPROX_THRESHOLD, ApproxIndex, search


@dataclass(frozen=True)
class Neighbour:
    """One image of the EMB_DIR found for a query: its rank (1 = most similar), cosine similarity and row."""

    rank: int
    score: float
    index: int  # the row in embeddings.npy / index.csv
    path: str
    label: int  # -1 when unknown
    cls: str  # class name, "" when unknown

    def as_dict(self) -> dict[str, Any]:
        """The JSON form ``nnclr search --json`` prints (``class`` for ``cls``)."""
        return {"rank": self.rank, "score": self.score, "index": self.index, "path": self.path, "label": self.label,
                "class": self.cls}


@dataclass(frozen=True)
class QueryResult:
    """A query image and its neighbours, most similar first."""

    query: Path
    neighbours: list[Neighbour]

    def as_dict(self) -> dict[str, Any]:
        return {"query": str(self.query), "neighbours": [n.as_dict() for n in self.neighbours]}


@dataclass
class SearchResults:
    """What :func:`find_similar` found.

    Attributes:
        embeddings: the EMB_DIR searched.
        results: one per readable query image, in the order of the query files.
        skipped: query files that are not readable images, with the reason.
        index: the faiss index searched (with its measured recall), or None for exact search.
    """

    embeddings: Embeddings
    results: list[QueryResult]
    skipped: dict[Path, str]
    index: ApproxIndex | None

    @property
    def method(self) -> str:
        """``exact``, or ``faiss-ivf recall@K=R`` (the index's recall against exact search on a sample)."""
        if self.index is None:
            return "exact"
        return f"faiss-ivf recall@{self.index.k_recall}={self.index.recall:.3f}"


def query_files(query: str | Path) -> list[Path]:
    """An image file as a one-element list, or every image file below a folder (sorted).

    Raises:
        UserError: nothing exists at ``query``, or a folder holds no image files.
    """
    path = Path(query).expanduser()
    try:
        if path.is_dir():
            return scan_images(path)[0]
        if not path.exists():
            raise UserError(f"query {path} not found; pass an image file or a folder of images")
    except OSError as error:  # a name too long for the file system, a folder we may not enter
        raise UserError(f"query {path} cannot be looked up ({error.strerror or error}); pass an image file or a "
                        "folder of images") from None
    return [path]


def _exists(path: Path) -> bool:
    """Whether ``path`` exists; False for a name the file system cannot even look up (too long)."""
    try:
        return path.exists()
    except OSError:
        return False


def encoder_of(embeddings: Embeddings, checkpoint: str | Path | None = None, device: str = "cpu") -> Pretrained:
    """The encoder that made ``embeddings``: ``checkpoint`` (default: the one its manifest records), checked by hash.

    Raises:
        UserError: the recorded checkpoint is gone, or ``checkpoint`` is another one than made the EMB_DIR.
    """
    path = checkpoint or embeddings.manifest.get("checkpoint")
    if not path:
        raise UserError(f"{MANIFEST_FILE} of {embeddings.root} names no checkpoint; pass --checkpoint with the one "
                        "that made it")
    if not checkpoint and not _exists(Path(path)):
        raise UserError(
            f"the checkpoint that made {embeddings.root} ({path}) is gone; pass --checkpoint with the same one"
        )
    pretrained = load(path, device=device, precision=embeddings.manifest.get("precision", "auto"))
    if pretrained.checkpoint_hash != embeddings.checkpoint_hash:
        raise UserError(
            f"{embeddings.root} was made with checkpoint {embeddings.checkpoint_hash}, but {pretrained.checkpoint} "
            f"is {pretrained.checkpoint_hash}: query with the same checkpoint, or re-embed with "
            f"`nnclr embed --checkpoint {path} --fresh`"
        )
    width = embeddings.vectors.shape[1]
    if pretrained.feature_dim != width:  # the same checkpoint: only a changed embeddings.npy gets here
        raise UserError(
            f"{embeddings.root}/{EMBEDDINGS_FILE} holds vectors of width {width}, but {pretrained.checkpoint} gives "
            f"{pretrained.feature_dim}; re-embed with `nnclr embed --checkpoint {path} --out {embeddings.root} --fresh`"
        )
    return pretrained


def find_similar(
    embeddings: Embeddings | str | Path,
    query: str | Path | Sequence[str | Path],
    k: int = 10,
    *,
    checkpoint: str | Path | None = None,
    method: str = "auto",
    approx_threshold: int = DEFAULT_APPROX_THRESHOLD,
    device: str = "cpu",
    on_skip: Callable[[Path, str], None] | None = None,
) -> SearchResults:
    """The ``k`` images of an EMB_DIR most similar to each query image, by cosine similarity.

    Args:
        embeddings: an EMB_DIR written by ``nnclr embed`` (its path, or :func:`~nnclr.use.embeddings.open_embeddings`).
        query: an image file, a folder of images (searched at any depth), or a list of image files.
        k: neighbours per query (fewer when the EMB_DIR holds fewer images).
        checkpoint: the checkpoint to embed the queries with (default: the one that made the EMB_DIR; it must be
            that one).
        method: ``exact``, ``approx`` (faiss) or ``auto`` (faiss above ``approx_threshold`` vectors when installed).
        device: where the queries are embedded.
        on_skip: called with each query file that is not a readable image and the reason, as they are found.

    Raises:
        UserError: ``k`` < 1, a missing or foreign checkpoint, a single query that is not an image, or no
            readable query at all.
    """
    if k < 1:
        raise UserError(f"k={k}: must be at least 1")
    if not isinstance(embeddings, Embeddings):
        embeddings = open_embeddings(embeddings)
    if isinstance(query, (str, Path)):
        files, where = query_files(query), f" in {query}"
    else:
        files, where = [Path(q).expanduser() for q in query], ""
    pretrained = encoder_of(embeddings, checkpoint, device)
    queries = embed_files(pretrained, files)
    if len(files) == 1 and queries.failed:
        raise UserError(f"query {files[0]} is not an image Pillow can read ({queries.failed[0]})")
    skipped = {files[position]: reason for position, reason in queries.failed.items()}
    for path, reason in skipped.items():
        if on_skip is not None:
            on_skip(path, reason)
    if not queries.positions:
        raise UserError(f"none of the {len(files)} query files{where} could be read")
    scores, indices, index = search(
        embeddings, torch.from_numpy(queries.vectors), k, method=method, approx_threshold=approx_threshold,
    )
    results = []
    for q, position in enumerate(queries.positions):
        neighbours = []
        for rank, (score, row) in enumerate(zip(scores[q].tolist(), indices[q].tolist()), start=1):
            if row < 0:  # faiss found fewer than k
                continue
            entry = embeddings.entries[row]
            neighbours.append(Neighbour(rank, round(score, 6), row, entry.path, entry.label, entry.cls))
        results.append(QueryResult(files[position], neighbours))
    return SearchResults(embeddings, results, skipped, index)
