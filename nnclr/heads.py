"""Projection and prediction MLPs with the defaults of the NNCLR paper.

Dwibedi et al., "With a Little Help from My Friends: Nearest-Neighbor Contrastive Learning of
Visual Representations", ICCV 2021, arXiv 2104.14548, implementation details:

    "The architecture of the projection MLP is 3 fully connected layers of sizes [2048, 2048, d]
    where d is the embedding size used to apply the loss. We use d = 256 in the experiments
    unless otherwise stated. All fully-connected layers are followed by batch-normalization.
    All the batch-norm layers except the last layer are followed by ReLU activation."

    "The architecture of the prediction MLP [q] is 2 fully-connected layers of size [4096, d].
    The hidden layer of the prediction MLP is followed by batch-norm and ReLU. The last layer
    has no batch-norm or activation."

(Quoted as reproduced in lightly's ``NNCLRProjectionHead``/``NNCLRPredictionHead`` docstrings;
"[q]" is ours: we call the projection MLP g and the prediction MLP q.)

A linear layer followed by batch-norm has no bias: the batch-norm shift makes it redundant.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

__all__ = ["mlp", "prediction_head", "projection_head"]


def mlp(dims: Sequence[int], *, last_bn: bool) -> nn.Sequential:
    """A multi-layer perceptron ``Linear-BN-ReLU ... Linear(-BN)``.

    Every hidden layer is ``Linear(bias=False) -> BatchNorm1d -> ReLU``; the last layer is a
    ``Linear`` followed by ``BatchNorm1d`` when ``last_bn`` (then the linear has no bias), and
    never by a ReLU.

    Args:
        dims: Layer widths ``[in, hidden_1, ..., out]``; at least two entries.
        last_bn: Put batch-norm after the last linear layer.

    Returns:
        The MLP, mapping ``(B, dims[0])`` to ``(B, dims[-1])``.

    Raises:
        ValueError: If ``dims`` has fewer than two entries or a non-positive width.
    """
    dims = list(dims)
    if len(dims) < 2:
        raise ValueError(f"mlp needs at least an input and an output width, got {dims}")
    if any(d <= 0 for d in dims):
        raise ValueError(f"mlp widths must be positive, got {dims}")
    layers: list[nn.Module] = []
    num_linear = len(dims) - 1
    for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
        last = i == num_linear - 1
        with_bn = not last or last_bn
        layers.append(nn.Linear(d_in, d_out, bias=not with_bn))
        if with_bn:
            layers.append(nn.BatchNorm1d(d_out))
        if not last:
            layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def projection_head(
    in_dim: int, hidden_dim: int = 2048, out_dim: int = 256, num_layers: int = 3
) -> nn.Sequential:
    """The projection MLP g, mapping encoder features h to embeddings z.

    NNCLR: "The architecture of the projection MLP is 3 fully connected layers of sizes
    [2048, 2048, d] ... All fully-connected layers are followed by batch-normalization. All the
    batch-norm layers except the last layer are followed by ReLU activation." d = 256.

    Args:
        in_dim: Width F of the encoder features (2048 for ResNet-50, 512 for ResNet-18).
        hidden_dim: Width of the hidden layers (2048 in the paper).
        out_dim: Embedding size d (256 in the paper).
        num_layers: Number of fully connected layers (3 in the paper; SimCLR's CIFAR setting
            uses 2).

    Returns:
        ``Sequential`` mapping ``(B, in_dim)`` to ``(B, out_dim)``, with batch-norm after every
        linear layer including the last, and ReLU after all but the last.

    Raises:
        ValueError: If ``num_layers < 1``.
    """
    if num_layers < 1:
        raise ValueError(f"projection_head needs num_layers >= 1, got {num_layers}")
    dims = [in_dim, *([hidden_dim] * (num_layers - 1)), out_dim]
    return mlp(dims, last_bn=True)


def prediction_head(dim: int = 256, hidden_dim: int = 4096) -> nn.Sequential:
    """The prediction MLP q, mapping embeddings z to predictions p.

    NNCLR: "2 fully-connected layers of size [4096, d]. The hidden layer of the prediction MLP
    is followed by batch-norm and ReLU. The last layer has no batch-norm or activation." The
    output layer therefore keeps its bias (as in BYOL's predictor, arXiv 2006.07733).

    Args:
        dim: Embedding size d, both input and output width (256 in the paper).
        hidden_dim: Width of the hidden layer (4096 in the paper).

    Returns:
        ``Sequential`` mapping ``(B, dim)`` to ``(B, dim)``.
    """
    return mlp([dim, hidden_dim, dim], last_bn=False)
