"""DeepCluster: k-means pseudo-labels of the whole training set, re-computed every epoch, learned by classification.

Caron, Bojanowski, Joulin, Douze, "Deep Clustering for Unsupervised Learning of Visual Features",
ECCV 2018 (arXiv 1807.05520). Each epoch (Sec. 3.2-3.4):

1. the features of every training image are computed without augmentation (model in eval mode);
2. k-means with K clusters on them gives every image a pseudo-label (the paper: K = 10,000 on
   ImageNet, "some amount of over-segmentation is beneficial");
3. the classifier W on top of the features is re-initialised (cluster indices are arbitrary from
   one clustering to the next), and the network is trained with cross-entropy on augmented
   images and their pseudo-labels, with images "sampled from a uniform distribution over the
   classes, or pseudo-labels" so that large clusters do not dominate (Sec. 3.3, avoiding
   trivial solutions).

What is clustered here: the L2-normalised projection ``z = g(f(x))`` (B, D), not the backbone
features h. The paper clusters the layer right below its classifier (fc7 of AlexNet/VGG,
PCA-whitened to 256 dimensions, then L2-normalised); here the classifier sits on ``z``, so ``z``
is that layer, it already has the paper's 256 dimensions (``model.proj_dim``), and the projection
MLP ends with batch-norm, which in eval mode standardises every dimension (a diagonal whitening),
so no separate PCA step is needed. Clustering h instead would leave the projection MLP without a
clustering objective of its own and put the classifier on a layer that is not the one clustered.

Where this differs from the paper, and why:

- k-means is spherical (cosine) k-means from :mod:`nnclr.kmeans`, seeded by
  greedy k-means++ from a generator seeded with (``train.seed``, epoch), so that a resumed run
  clusters exactly as the uninterrupted one; the paper runs Faiss's Euclidean k-means on the
  whitened, normalised features (for unit vectors the two objectives agree up to the centroids'
  norm).
- Empty clusters: the paper gives an empty cluster the centroid of a random non-empty cluster
  plus a small perturbation and splits that cluster's points between the two; ``nnclr.kmeans``
  moves the rows farthest from their centroid (taken from clusters of more than one row) into the
  empty clusters after every assignment. Both ensure that no cluster is empty (when N >= K),
  so every pseudo-label has images.
- The paper trains on one augmented view per image (crops, flips, and a fixed Sobel filter that
  removes colour); here both views of the shared pipeline (``augment.recipe``, BYOL's by default,
  whose colour jitter and grayscale serve the Sobel filter's purpose of making colour a poor
  cue) are classified, as every method here sees two views per sample.

Under ``torchrun`` every rank extracts the features of its shard of the images, which are
gathered in index order (``distributed.shard``/``gather_in_order``); k-means++ runs on the whole
(identical) set on every rank, the Lloyd iterations on each rank's 1/W with the cluster
statistics all-reduced, and the pseudo-labels are gathered back, so every rank holds the same
labels and draws the same epoch order.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nnclr import distributed
from nnclr.errors import UserError
from nnclr.kmeans import kmeans_plus_plus, spherical_kmeans
from nnclr.selectors import EpochContext, Selector

CLASSIFIER_INIT_STD = 0.01  # DeepCluster's code: top-layer weights ~ N(0, 0.01^2), bias 0


def cluster(z: Tensor, num_clusters: int, *, iters: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Spherical k-means of the whole training set's features, distributed-ready.

    Args:
        z: (N, D) L2-normalised features of all N samples, the same on every rank.
        num_clusters: K.
        iters: Lloyd iterations.
        generator: CPU generator of the k-means++ seeding.

    Returns:
        centroids (K, D) and pseudo-labels (N,) int64, the same on every rank; no cluster is empty
        when N >= K (``nnclr.kmeans`` re-seeds empty clusters after every assignment).
    """
    n = z.shape[0]
    init = kmeans_plus_plus(z, num_clusters, generator)  # (K, D), from all N rows: the same for any W
    part = distributed.shard(n)
    centroids, local = spherical_kmeans(z[part.start : part.stop], num_clusters, iters=iters, init=init)
    return centroids, distributed.gather_in_order(local, n)


def balanced_order(labels: Tensor, num_samples: int, generator: torch.Generator) -> Tensor:
    """(num_samples,) sample indices drawn uniformly over the pseudo-labels, shuffled.

    DeepCluster's sampler (``UnifLabelSampler`` of its code): with C non-empty clusters, each
    contributes ``num_samples // C + 1`` of its samples (without replacement when it has that many,
    else with replacement), the draws are shuffled and cut to ``num_samples``. So every pseudo-label
    is drawn ``num_samples / C`` times, give or take the C samples the cut removes, however
    unequal the clusters are.

    Args:
        labels: (N,) pseudo-label of each sample.
        num_samples: length of the epoch (N: an epoch sees as many images as there are).
        generator: CPU generator.
    """
    labels = labels.cpu()
    by_label = torch.argsort(labels, stable=True)  # (N,) samples grouped by pseudo-label
    clusters, counts = torch.unique_consecutive(labels[by_label], return_counts=True)
    per = num_samples // len(clusters) + 1
    draws, start = [], 0
    for count in counts.tolist():
        members = by_label[start : start + count]
        start += count
        if count >= per:
            draws.append(members[torch.randperm(count, generator=generator)[:per]])
        else:
            draws.append(members[torch.randint(count, (per,), generator=generator)])
    order = torch.cat(draws)
    return order[torch.randperm(order.numel(), generator=generator)][:num_samples]


@torch.no_grad()
def reset_classifier(classifier: nn.Linear, optimizer: torch.optim.Optimizer, generator: torch.Generator) -> None:
    """Re-initialise the classifier after a clustering: weights ~ N(0, 0.01^2), bias 0, no momentum.

    The cluster indices of a new clustering have nothing to do with the previous ones, so the
    classifier starts afresh (DeepCluster Sec. 3.4; its code also builds a new optimiser for this
    layer every epoch, which is what dropping the layer's optimiser state does). The weights are
    drawn on the CPU from ``generator`` and copied, so they are the same on every device and rank.
    """
    weight = torch.randn(classifier.weight.shape, generator=generator) * CLASSIFIER_INIT_STD
    classifier.weight.copy_(weight)
    if classifier.bias is not None:
        classifier.bias.zero_()
    for parameter in classifier.parameters():
        optimizer.state.pop(parameter, None)


def classifier_without_lars(
    groups: list[dict[str, Any]], classifier: nn.Module, *, weight_decay: float
) -> list[dict[str, Any]]:
    """Parameter groups (``nnclr.optim.param_groups``) with the classifier's weight out of LARS's adaptation.

    LARS scales a layer's step by its trust ratio ``0.001 * ||w|| / ||g||``, so a layer moves by about
    a thousandth of its norm per step: fine for layers that keep their weights, but the classifier is
    re-initialised to N(0, 0.01^2) weights after every clustering and would hardly leave that
    initialisation within an epoch (measured on the demo: with the classifier adapted, the loss
    stayed within 1.5% of ln K and the classifier's accuracy on its pseudo-labels at 3% with K = 100
    after 5 epochs). Its weight therefore gets plain momentum SGD with weight decay, as every layer
    does in the paper (which trains with SGD); biases and norms are excluded already.
    """
    weights = {id(p) for p in classifier.parameters() if p.ndim > 1}
    kept = [{**g, "params": [p for p in g["params"] if id(p) not in weights]} for g in groups]
    moved = [p for g in groups for p in g["params"] if id(p) in weights]
    return [g for g in kept if g["params"]] + [{"params": moved, "weight_decay": weight_decay, "lars_exclude": True}]


def normalized_mutual_information(a: Tensor, b: Tensor) -> float:
    """NMI(A; B) = I(A; B) / sqrt(H(A) H(B)) of two labellings (N,), as in DeepCluster Sec. 4.2."""
    from sklearn.metrics import normalized_mutual_info_score

    return float(normalized_mutual_info_score(a.cpu().numpy(), b.cpu().numpy(), average_method="geometric"))


class PseudoLabels(Selector):
    """DeepCluster's selector: the pseudo-label of every training sample, re-computed every epoch.

    It gives each sample its target, as a positive selector does for the other methods, and is
    saved in the checkpoint, so a run resumed within an epoch trains on the pseudo-labels of that
    epoch without clustering again. Hooks: :meth:`start_epoch` clusters and resets the classifier,
    :meth:`epoch_order` samples uniformly over the pseudo-labels.

    Buffers (persistent): ``labels`` (N,) int64 (-1 before the first clustering), ``epoch`` int64
    scalar, the epoch the labels were computed for (-1 = never).

    Args:
        num_samples: N, the size of the training set.
        num_clusters: K (must be <= N).
        iters: Lloyd iterations per clustering.
    """

    def __init__(self, *, num_samples: int, num_clusters: int, iters: int = 10) -> None:
        super().__init__()
        if not 1 <= num_clusters <= num_samples:
            raise UserError(
                f"method.num_clusters={num_clusters} must be at most the {num_samples} training images "
                f"(every cluster gets images); lower it, e.g. --set method.num_clusters={max(1, num_samples // 50)}"
            )
        self.num_clusters, self.iters = num_clusters, iters
        self.register_buffer("labels", torch.full((num_samples,), -1, dtype=torch.long))
        self.register_buffer("epoch", torch.tensor(-1, dtype=torch.long))

    def extra_repr(self) -> str:
        return f"num_samples={self.labels.numel()}, num_clusters={self.num_clusters}, iters={self.iters}"

    @torch.no_grad()
    def recluster(self, z: Tensor, *, epoch: int, generator: torch.Generator,
                  true_labels: Tensor | None = None) -> dict[str, float | None]:
        """Cluster ``z`` (N, D, L2-normalised) into new pseudo-labels for ``epoch``; returns statistics.

        Statistics: ``nmi_labels`` (NMI of the pseudo-labels with ``true_labels`` where those are
        >= 0, None without labels; DeepCluster Fig. 2a), ``nmi_previous`` (NMI with the previous
        epoch's pseudo-labels, None at the first clustering; Fig. 2b: how stable the clustering is),
        ``largest_cluster`` and ``smallest_cluster`` (images), ``kmeans_similarity`` (mean cosine
        of a sample to its centroid).
        """
        centroids, labels = cluster(z, self.num_clusters, iters=self.iters, generator=generator)
        counts = torch.bincount(labels, minlength=self.num_clusters)
        stats: dict[str, float | None] = {"nmi_labels": None, "nmi_previous": None}
        if true_labels is not None and bool((true_labels >= 0).any()):
            true_labels = true_labels.to(labels.device)
            known = true_labels >= 0
            stats["nmi_labels"] = normalized_mutual_information(labels[known], true_labels[known])
        if int(self.epoch) >= 0:
            stats["nmi_previous"] = normalized_mutual_information(labels, self.labels)
        self.labels.copy_(labels)
        self.epoch.fill_(epoch)
        return stats | {
            "largest_cluster": int(counts.max()),
            "smallest_cluster": int(counts.min()),
            "kmeans_similarity": float((F.normalize(z.float(), dim=1) * centroids[labels]).sum(dim=1).mean()),
        }

    def start_epoch(self, context: EpochContext) -> dict[str, Any] | None:
        """Cluster the training set's z for ``context.epoch`` and reset the classifier; returns the statistics.

        Nothing happens when the labels are already this epoch's (a run resumed within the epoch).
        """
        if int(self.epoch) == context.epoch:
            return None
        stats = self.recluster(context.features(), epoch=context.epoch, generator=context.generator,
                               true_labels=context.true_labels)
        assert isinstance(context.classifier, nn.Linear), "DeepCluster's model has a linear classifier"
        reset_classifier(context.classifier, context.optimizer, context.generator)
        return stats

    def epoch_order(self, num_samples: int, generator: torch.Generator) -> Tensor:
        """(N,) the epoch's sample order, uniform over the pseudo-labels (:func:`balanced_order`)."""
        if int(self.epoch) < 0:
            raise RuntimeError("DeepCluster's epoch order needs a clustering first (PseudoLabels.recluster)")
        return balanced_order(self.labels, num_samples, generator)

    def forward(self, indices: Tensor) -> Tensor:
        """(B,) pseudo-labels of the samples ``indices`` (B,)."""
        return self.labels[indices.to(self.labels.device)]


def pseudo_label_loss(logits: Tensor, targets: Tensor) -> tuple[Tensor, dict[str, float]]:
    """DeepCluster's objective: cross-entropy of the classifier's logits (B, K) with the pseudo-labels (B,).

    Returns the mean loss (fp32 scalar) and ``pseudo_label_accuracy``, the share of rows whose
    highest logit is their pseudo-label.
    """
    logits = logits.float()
    accuracy = (logits.detach().argmax(dim=1) == targets).float().mean().item()
    return F.cross_entropy(logits, targets), {"pseudo_label_accuracy": accuracy}
