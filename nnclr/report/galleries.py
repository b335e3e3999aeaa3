"""Neighbour galleries and KMCLR prototype usage: what the encoder and the support set "see".

For a fixed set of test images (one per class, chosen with a fixed seed, so every report of every
run shows the same queries) a gallery row holds:

- the nearest entries of the **support set** Q by the projection ``z = g(f(x))``, which is what
  NNCLR uses as positives (Dwibedi et al., 2021, Sec. 3: NN(z, Q) = argmax_q z·q), each shown as
  the training image the entry was computed from (Q stores the sample index of each entry; Q's
  ``z`` came from an augmented view, the image shown is the un-augmented one);
- the nearest **training images** by backbone features ``h = f(x)`` (what kNN evaluation uses).

Labels, cosine similarities and, for support entries, their age in steps are kept; a neighbour of
another class than the query is marked wrong. For KMCLR, the support rows are assigned to their
nearest k-means prototype, which gives each prototype's usage and its most typical members.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from nnclr import runtime
from nnclr.augment import eval_transform

BORDER = {"query": (40, 90, 200), "right": (30, 150, 60), "wrong": (210, 40, 40), "unknown": (160, 160, 160)}


@dataclass
class Neighbour:
    """One neighbour: its uint8 image (3, H, W) or None (no image), label (-1 unknown), cosine, a note."""

    image: torch.Tensor | None
    label: int
    similarity: float
    note: str = ""
    wrong: bool = False


@dataclass
class GalleryRow:
    """A query test image (3, H, W) with its label and its support-set and training-set neighbours."""

    image: torch.Tensor
    label: int
    test_index: int
    support: list[Neighbour] = field(default_factory=list)
    train: list[Neighbour] = field(default_factory=list)


@dataclass
class PrototypeUsage:
    """KMCLR: encoded images claimed by each prototype (K,), members of the largest prototypes, images encoded."""

    counts: list[int]
    largest: list[tuple[int, int, list[Neighbour]]]  # (prototype, count, members nearest to it)
    rows: int


@dataclass
class Embedded:
    """A split with the encodings of its images, or of a sample of them.

    Attributes:
        images: the whole split's uint8 images (N, 3, H, W): a tensor or a folder decoded on demand
            (:class:`~nnclr.data.lazy.FolderImages`); indexed by split index.
        labels: (M,) labels of the encoded images (-1 unknown).
        h, z: (M, F) / (M, D) L2-normalised backbone features and projections of the encoded images.
        rows: (M,) split indices of the encoded images; None: all N, in order (M = N).
    """

    images: torch.Tensor
    labels: torch.Tensor
    h: torch.Tensor
    z: torch.Tensor
    rows: torch.Tensor | None = None

    def split_index(self, i: int) -> int:
        """The split index of encoded row ``i``."""
        return int(i) if self.rows is None else int(self.rows[i])

    @property
    def sampled(self) -> bool:
        """True when only a sample of the split was encoded."""
        return self.rows is not None and len(self.rows) < len(self.images)


def sample_rows(n: int, limit: int, seed: int = 0) -> torch.Tensor | None:
    """A sorted, seeded sample of ``limit`` split indices of ``range(n)``; None (all of them) when ``n <= limit``."""
    if n <= limit:
        return None
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:limit].sort().values


@torch.no_grad()
def embed(
    pretrained: Any, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 512,
    rows: torch.Tensor | None = None,
) -> Embedded:
    """Encode uint8 images (N, 3, H, W), or only those at ``rows``, with the run's encoder and projector.

    Eval mode, CPU fp32 results. ``images`` may be a folder decoded on demand: it is read
    ``batch_size`` images at a time, the next batch decoded while this one is encoded.
    """
    from nnclr.data.lazy import batch_slices, prefetched

    n = images.shape[0] if rows is None else len(rows)
    keys = batch_slices(n, batch_size) if rows is None else [rows[k] for k in batch_slices(n, batch_size)]
    hs, zs = [], []
    for batch in prefetched(images, keys):
        x = eval_transform(batch, pretrained.image_size, mean=pretrained.mean, std=pretrained.std).to(pretrained.device)
        with runtime.autocast(pretrained.device, pretrained.dtype):
            h = pretrained.encoder(x)
            z = pretrained.projector(h)
        hs.append(F.normalize(h.float(), dim=1).cpu())
        zs.append(F.normalize(z.float(), dim=1).cpu())
    return Embedded(images, labels if rows is None else labels[rows], torch.cat(hs), torch.cat(zs), rows)


def pick_queries(labels: torch.Tensor, count: int = 10, seed: int = 0) -> torch.Tensor:
    """A fixed set of ``count`` indices (M,): one per class in class order, round after round, each class's
    images in a seeded order; the first ``count`` of a seeded order when unlabelled."""
    order = torch.randperm(labels.shape[0], generator=torch.Generator().manual_seed(seed)).tolist()
    by_class: dict[int, list[int]] = {}
    for i in order:
        if int(labels[i]) >= 0:
            by_class.setdefault(int(labels[i]), []).append(i)
    if not by_class:
        return torch.tensor(order[:count], dtype=torch.long)
    picked: list[int] = []
    for round_ in range(max(len(members) for members in by_class.values())):
        for label in sorted(by_class):
            if round_ < len(by_class[label]) and len(picked) < count:
                picked.append(by_class[label][round_])
    return torch.tensor(picked, dtype=torch.long)


def _wrong(query_label: int, label: int) -> bool:
    return query_label >= 0 and label >= 0 and label != query_label


def _nearest(scores: torch.Tensor, k: int) -> tuple[list[list[float]], list[list[int]]]:
    """Per row of ``scores`` (M, N): the top-``k`` similarities and columns, masked (-inf) columns left out."""
    sims, idx = scores.topk(min(k, scores.shape[1]), dim=1)
    keep = sims.isfinite()
    return [s[m].tolist() for s, m in zip(sims, keep)], [i[m].tolist() for i, m in zip(idx, keep)]


def galleries(
    queries: Embedded, picks: torch.Tensor, train: Embedded, support: dict[str, Any] | None, step: int, *,
    k: int = 6, same_split: bool = False,
) -> list[GalleryRow]:
    """The gallery rows of the query images ``picks`` (M,): top-``k`` support entries by z, training images by h.

    ``picks`` are rows of ``queries`` (positions among its encoded images); the training neighbours are
    searched among the encoded training images (a sample when ``train.rows`` is set); support entries
    are shown as the training image of their split index (decoded just for them).

    ``support`` is the checkpoint's support set (embeddings (Q, D), labels, indices, steps (Q,), num_filled), taken
    at ``step``. With ``same_split`` the queries are training images: the query itself is never its own neighbour
    (as NNCLR excludes a sample's own older copy).
    """
    rows = [GalleryRow(queries.images[queries.split_index(i)], int(queries.labels[i]), queries.split_index(i))
            for i in picks.tolist()]
    scores = queries.h[picks] @ train.h.T  # (M, N)
    if same_split:
        scores[torch.arange(len(picks)), picks] = -float("inf")
    sims, nearest = _nearest(scores, k)
    for row, sim, idx in zip(rows, sims, nearest):
        row.train = [Neighbour(train.images[train.split_index(j)], int(train.labels[j]), s,
                               f"train #{train.split_index(j)}", _wrong(row.label, int(train.labels[j])))
                     for s, j in zip(sim, idx)]
    filled = int(support["num_filled"]) if support is not None else 0
    if filled == 0:
        return rows
    bank = support["embeddings"][:filled].float()  # (Q', D)
    bank_samples = support["indices"][:filled]
    scores = queries.z[picks] @ bank.T  # (M, Q')
    if same_split:  # the support set stores split indices
        picked = picks if queries.rows is None else queries.rows[picks]
        scores = scores.masked_fill(bank_samples[None, :] == picked[:, None], -float("inf"))
    sims, nearest = _nearest(scores, k)
    for row, sim, idx in zip(rows, sims, nearest):
        for s, r in zip(sim, idx):
            label, sample = int(support["labels"][r]), int(bank_samples[r])
            image = train.images[sample] if 0 <= sample < train.images.shape[0] else None
            age = step - int(support["steps"][r])
            row.support.append(Neighbour(image, label, s, f"age {age}", _wrong(row.label, label)))
    return rows


def prototype_usage(prototypes: torch.Tensor, split: Embedded, largest: int = 5, members: int = 8
                    ) -> PrototypeUsage:
    """Assign the split's encoded images by z (M, D) to their nearest prototype (K, D): counts and typical members.

    This is how KMCLR picks a positive: the prototype nearest to the projection z.
    """
    centres = F.normalize(prototypes.float(), dim=1)
    sims, owner = (split.z.float() @ centres.T).max(dim=1)  # (M,)
    counts = torch.bincount(owner, minlength=centres.shape[0])
    samples = split.rows if split.rows is not None else torch.arange(len(split.labels))
    top = []
    for p in counts.argsort(descending=True)[:largest].tolist():
        mine = (owner == p).nonzero().flatten()
        best = mine[sims[mine].argsort(descending=True)[:members]]
        people = [Neighbour(split.images[int(samples[r])], int(split.labels[r]), float(sims[r])) for r in best.tolist()]
        top.append((p, int(counts[p]), people))
    return PrototypeUsage(counts.tolist(), top, len(split.labels))


def gallery_grid(rows: list[GalleryRow], size: int = 32, border: int = 2) -> torch.Tensor:
    """The galleries as one uint8 image (3, H, W) for TensorBoard: per row the query, then support, then train
    neighbours; borders blue (query), green (same class), red (other class), grey (unknown)."""
    from torchvision.utils import make_grid

    width = 1 + max((len(r.support) for r in rows), default=0) + max((len(r.train) for r in rows), default=0)
    tiles = []
    for row in rows:
        line = [_tile(row.image, "query", size, border)]
        line += [_tile(n.image, _kind(row.label, n), size, border) for n in row.support]
        line += [_tile(None, "unknown", size, border)] * (width - len(line) - len(row.train))
        line += [_tile(n.image, _kind(row.label, n), size, border) for n in row.train]
        tiles += line
    if not tiles:
        return torch.zeros(3, size, size, dtype=torch.uint8)
    return make_grid(torch.stack(tiles), nrow=width, padding=2, pad_value=255)


def _kind(query_label: int, n: Neighbour) -> str:
    if query_label < 0 or n.label < 0:
        return "unknown"
    return "wrong" if n.wrong else "right"


def _tile(image: torch.Tensor | None, kind: str, size: int, border: int) -> torch.Tensor:
    tile = torch.tensor(BORDER[kind], dtype=torch.uint8).view(3, 1, 1).repeat(1, size + 2 * border, size + 2 * border)
    if image is None:
        tile[:, border:-border, border:-border] = 255
        return tile
    if image.shape[-2:] != (size, size):
        image = F.interpolate(image[None].float(), size=(size, size), mode="bilinear", antialias=True,
                              align_corners=False)[0].round().clamp(0, 255).to(torch.uint8)
    tile[:, border:-border, border:-border] = image
    return tile
