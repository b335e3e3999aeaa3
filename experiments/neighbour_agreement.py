"""How often a trained encoder's nearest neighbours share the query's label, in h and in z (issue 21).

NNCLR's positive is the nearest neighbour of a view's projection ``z`` in a support set of past projections
(Dwibedi et al., ICCV 2021, Sec. 3.2); issue 21 asks for positives that share the query's class >= 45% of the
time, and the runs' own diagnostic (``nn_label_agreement``: augmented views against a queue of past, augmented
views) reports 20-30%. This script separates what that figure depends on, for one checkpoint:

- ``bank N, h`` / ``bank N, z``: un-augmented queries against a bank of N other un-augmented training images,
  nearest neighbour by cosine of the backbone's features ``h`` (B, F) or of the projections ``z`` (B, D):
  the lookup space and the bank's size, without augmentation or stale embeddings;
- ``training support``: the same un-augmented queries' ``z`` against the support set the checkpoint holds
  (``z`` of past augmented views, with their labels): staleness and augmentation of the support only;
- ``view``: the queries augmented as the run trains (its ``augment`` settings, one view), their ``z`` against the
  banks and the support set: what the run's lookup does; ``mean of 2 views``: the normalised mean of two views'
  ``z`` (a lookup that averages out some of the augmentation, at no extra forward pass in training).

For each, the share of queries whose nearest neighbour has their label and the share of their 5 nearest that
do (the several-neighbour methods' positives). Queries and bank are disjoint random draws (``--seed``) of the
training split. Usage (from the repository root)::

    python experiments/neighbour_agreement.py experiments/runs/neighbours_budget/nnclr-soft-s0 \\
        --data npz:../shared/data/cifar10 --banks 1024 8192
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
import torch.nn.functional as F

import nnclr
from nnclr.checkpoint import load_checkpoint
from nnclr.data import load_dataset
from nnclr.evaluate.features import extract_features
from nnclr.evaluate.preprocess import Preprocess
from nnclr.pretrained import resolve_checkpoint
from nnclr.train import build_augment


def agreement(queries: torch.Tensor, bank: torch.Tensor, query_labels: torch.Tensor, bank_labels: torch.Tensor,
              k: int = 5) -> tuple[float, float]:
    """(% of queries whose nearest bank row has their label, % of their ``k`` nearest rows that do).

    Args:
        queries: (Q, D) L2-normalised; bank: (N, D) L2-normalised, N >= k; labels (Q,) and (N,).
    """
    nearest = (queries @ bank.T).topk(k, dim=1).indices  # (Q, k), most similar first
    same = bank_labels[nearest] == query_labels[:, None]
    return 100 * same[:, 0].float().mean().item(), 100 * same.float().mean().item()


def features(pretrained: nnclr.Pretrained, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (N, 3, S, S) -> L2-normalised h (N, F) and z (N, D), fp32, without augmentation (the evaluation's
    extraction, :func:`nnclr.evaluate.features.extract_features`)."""
    preprocess = Preprocess(pretrained.image_size, pretrained.mean, pretrained.std, torch.device("cpu"), torch.float32)
    h = extract_features(pretrained.encoder, images, preprocess)
    z = extract_features(torch.nn.Sequential(pretrained.encoder, pretrained.projector), images, preprocess)
    return h, z


@torch.no_grad()
def augmented_z(pretrained: nnclr.Pretrained, images: torch.Tensor, seed: int,
                batch: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (N, 3, S, S) -> L2-normalised z (N, D) of two views augmented as the run trains (eval mode)."""
    augment = build_augment(pretrained.config)
    generator = torch.Generator().manual_seed(seed)
    views: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
    for start in range(0, len(images), batch):
        for out, x in zip(views, augment(images[start:start + batch], generator)):
            out.append(F.normalize(pretrained.projector(pretrained.encoder(x)), dim=1))
    return torch.cat(views[0]), torch.cat(views[1])


def main(argv: list[str] | None = None, echo: Callable[[str], None] = print) -> dict[str, tuple[float, float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", help="a run directory of nnclr pretrain or its checkpoint.pt")
    parser.add_argument("--data", default="npz:../shared/data/cifar10", help="the run's training data")
    parser.add_argument("--queries", type=int, default=2048)
    parser.add_argument("--banks", type=int, nargs="+", default=[1024, 8192])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    pretrained = nnclr.load(args.checkpoint, precision="fp32")
    data = load_dataset(args.data, "train", download=False)
    order = torch.randperm(len(data.labels), generator=torch.Generator().manual_seed(args.seed))
    if args.queries + max(args.banks) > len(order) or args.queries < 1 or min(args.banks) < 5:
        parser.error(f"--queries and the largest of --banks must add up to at most {len(order)} images, each bank"
                     " >= 5")
    q, rest = order[:args.queries], order[args.queries:args.queries + max(args.banks)]
    hq, zq = features(pretrained, data.images[q])
    hb, zb = features(pretrained, data.images[rest])
    z1, z2 = augmented_z(pretrained, data.images[q], args.seed + 1)
    mean_of_views = F.normalize(z1 + z2, dim=1)
    yq, yb = data.labels[q], data.labels[rest]
    out: dict[str, tuple[float, float]] = {}
    for n in args.banks:
        out[f"bank {n}, h"] = agreement(hq, hb[:n], yq, yb[:n])
        out[f"bank {n}, z"] = agreement(zq, zb[:n], yq, yb[:n])
        out[f"bank {n}, view z"] = agreement(z1, zb[:n], yq, yb[:n])
        out[f"bank {n}, mean of 2 views' z"] = agreement(mean_of_views, zb[:n], yq, yb[:n])
    support = load_checkpoint(resolve_checkpoint(args.checkpoint)).get("support") or {}
    filled = int(support.get("num_filled", 0))
    if filled >= 5:
        rows = F.normalize(support["embeddings"][:filled].float(), dim=1)
        labels = support["labels"][:filled]
        out[f"training support ({filled} rows), z"] = agreement(zq, rows, yq, labels)
        out[f"training support ({filled} rows), view z"] = agreement(z1, rows, yq, labels)
        out[f"training support ({filled} rows), mean of 2 views' z"] = agreement(mean_of_views, rows, yq, labels)
    for name, (nearest, five) in out.items():
        echo(f"{name}: nearest {nearest:.1f}%, 5 nearest {five:.1f}%")
    return out


if __name__ == "__main__":
    main()
